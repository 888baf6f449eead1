"""Why a connection to the trainer failed, and whether trying again can help.

Transient failures (refused, reset, a cut mid-frame or mid-handshake, a timeout, HTTP 5xx and 429,
ERROR `shutting_down`) are retried by `StreamClient` with back-off. Everything else ends the run at
once with one `ServerError` that says the likely cause and what to do: a TLS mismatch (found by
one probe of the address, only while no connection to it has opened yet), an unknown host, an
HTTP 4xx, the server's own refusals (`unauthorized`, `run_exists`, `bad_path`, ...), a close with
"policy violation" whose ERROR frame was lost, and a message over the protocol's size limits.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import websockets
from websockets.frames import CloseCode
from websockets.uri import parse_uri

from mobillm.common import wire
from mobillm.common.errors import BadInput, MobillmError
from mobillm.common.messages import ErrorReport

RETRY_CODES = {"shutting_down"}  # ERROR codes meaning "come back later": retried like a dropped link
PROBE_TIMEOUT_S = 3.0

# What the operator can do about each refusal the server reports (ERROR codes, docs/protocol.md).
HINTS = {
    "unauthorized": "check --token-file: the server expects the token its operator gave out",
    "bad_path": "the trainer serves only the path '/': use --server ws://HOST:PORT (or wss://) without a path",
    "version": "the device and the server speak different protocol versions: update the older one",
    "run_exists": "the server was restarted without --resume while this run had a checkpoint; its operator "
                  "resumes it with `trainer serve --resume` (same --runs folder), then run this command again: "
                  "samples the checkpoint holds are not sent twice (or pass another --run to start afresh)",
    "run_mismatch": "another engine, task or device already uses this run: pass another --run",
    "over_budget": "the server's --memory-budget has no room for this run or batch now: send smaller batches "
                   "(--batch-size), try again later, or ask its operator for a larger budget",
    "too_many_runs": "this device id already holds the server's --max-runs-per-client open runs (finish one, "
                     "or wait until the server releases idle runs, --idle-timeout), or the server holds its "
                     "--max-run-folders runs (continue an existing --run, or ask its operator to archive runs)",
}


class ServerError(MobillmError, RuntimeError):
    """The run cannot go on: the server refused it, or the link can never work as configured.
    `code` is the server's ERROR code, or the device's name for the cause (tls_expected, dns, ...)."""

    def __init__(self, message: str, code: str = "server"):
        super().__init__(message)
        self.code = code


class Reconnect(Exception):
    """The server asked this device to reconnect later (an ERROR code in RETRY_CODES)."""


# A lost link raises OSError (refused, reset), ConnectionClosed, a timeout, or InvalidMessage when it
# drops during the opening handshake; each is worth another attempt unless `final_error` says otherwise.
RETRYABLE = (OSError, websockets.ConnectionClosed, asyncio.TimeoutError, websockets.InvalidMessage, Reconnect)


def check_server_url(url: str) -> None:
    """BadInput unless `url` is a ws:// or wss:// URL."""
    try:
        parse_uri(url)
    except websockets.InvalidURI as exc:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        guess = {"http": "ws", "https": "wss"}.get(scheme)
        hint = f"did you mean {guess}://{url.split('://', 1)[1]}?" if guess else "use ws://HOST:PORT or wss://HOST:PORT"
        raise BadInput(f"--server {url!r} is not a WebSocket URL ({exc.msg}); {hint}") from None


def refusal(error: ErrorReport) -> Exception:
    """What an ERROR frame from the server means here: Reconnect, or the ServerError to stop with."""
    if error.code in RETRY_CODES:
        return Reconnect(error.code)
    hint = HINTS.get(error.code)
    return ServerError(f"the server refused the session ({error.code}): {error.message}"
                       + (f"; {hint}" if hint else ""), error.code)


async def final_error(exc: BaseException, url: str, probe: bool) -> ServerError | None:
    """The ServerError that ends the run after `exc`, or None when `exc` is worth another attempt.
    `probe`: no connection to `url` has opened yet, so a TLS mismatch is possible; one probe checks."""
    host, port, secure = _address(url)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ServerError(f"the server's TLS certificate could not be verified ({exc.verify_message}); "
                           f"pass --ca with the certificate of the CA that signed it", "certificate")
    if isinstance(exc, socket.gaierror):
        return ServerError(f"cannot resolve the host name {host!r} ({exc.strerror}); check the --server URL", "dns")
    if isinstance(exc, websockets.InvalidStatus):
        status = exc.response.status_code
        if status >= 500 or status == 429:
            return None  # e.g. 503 from a server that is stopping, 429 from one that limits new connections
        return ServerError(f"the server refused the WebSocket handshake with HTTP {status}; "
                           f"{_http_hint(status)}", f"http_{status}")
    if isinstance(exc, websockets.ConnectionClosed):
        return _closed_error(exc)
    if isinstance(exc, wire.WireError):
        return ServerError(f"the server sent a frame this device cannot read ({exc}); is --server a mobillm "
                           f"trainer of the same version?", "bad_frame")
    if probe and isinstance(exc, (OSError, websockets.InvalidMessage)) and not isinstance(
            exc, (ConnectionRefusedError, TimeoutError)):
        if not secure and await speaks_tls(host, port):
            return ServerError(f"the server at {host}:{port} answered with TLS, not plain WebSocket: is the "
                               f"server using TLS? try --server wss://{host}:{port}", "tls_expected")
        if secure and await speaks_plain_http(host, port):
            return ServerError(f"the server at {host}:{port} answered plain HTTP to a TLS handshake: is the server "
                               f"using TLS? try --server ws://{host}:{port} (or give `trainer serve` --certfile and "
                               f"--keyfile)", "tls_unexpected")
    return None


def retry_reason(exc: BaseException) -> str:
    """How a retried failure is logged and counted (TrainStats.reconnect_reasons)."""
    if isinstance(exc, websockets.InvalidStatus):
        return f"HTTP {exc.response.status_code}"  # e.g. 503 from a server that is stopping
    return str(exc) if isinstance(exc, Reconnect) else exc.__class__.__name__


def _address(url: str) -> tuple[str, int, bool]:
    uri = parse_uri(url)
    return uri.host, uri.port, uri.secure


def _http_hint(status: int) -> str:
    if status in (401, 403):
        return "the server (or a proxy in front of it) wants credentials: check --token-file"
    if status == 404:
        return "nothing serves that path: use --server ws://HOST:PORT without a path"
    return "is --server the address of a mobillm trainer (trainer serve)?"


def _closed_error(exc: websockets.ConnectionClosed) -> ServerError | None:
    """A close that no retry can fix: either side refusing a message as too big, or the server
    closing for a policy violation (its ERROR frame, sent before, did not reach this device)."""
    sent, rcvd = exc.sent, exc.rcvd
    if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
        return ServerError(f"the server sent a message over this device's limit of {wire.MAX_MODEL_FRAME} bytes "
                           f"(the protocol's limit for a MODEL frame, {sent.reason}); the side network is too big "
                           f"to download: train a smaller one", "model_too_big")
    if rcvd is not None and rcvd.code == CloseCode.MESSAGE_TOO_BIG:
        return ServerError(f"the server refused a frame of this device as too big ({rcvd.reason}); use a smaller "
                           f"--batch-size or ask its operator for a larger --max-frame", "frame_too_big")
    if rcvd is not None and rcvd.code == CloseCode.POLICY_VIOLATION:
        code = rcvd.reason or "policy_violation"
        hint = HINTS.get(code)
        return ServerError(f"the server closed the session ({code})" + (f"; {hint}" if hint else ""), code)
    return None


async def speaks_tls(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TLS handshake with host:port succeeds. A diagnosis only: the certificate is not
    checked because nothing is sent on this connection; sessions always verify it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def speaks_plain_http(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when host:port answers a plain HTTP request with an HTTP status line."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.read(5), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
    return head == b"HTTP/"
