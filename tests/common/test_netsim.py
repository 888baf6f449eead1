"""The simulated link (common/netsim.py) and the one synthetic sentiment generator (common/sample.py)."""

from __future__ import annotations

import socket
import socketserver
import threading

import pytest

from mobillm.common.netsim import LinkProxy, free_port
from mobillm.common.sample import sentences, write_sample


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    # A handler may still sit in recv() on a connection the proxy closes a moment later: never
    # join it on server_close (that join is what hung this file now and then).
    daemon_threads = True
    block_on_close = False


def echo_server():
    server = EchoServer(("127.0.0.1", free_port()), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload) and (chunk := s.recv(65536)):
            got += chunk
    return got


def test_proxy_forwards_counts_and_captures_the_uplink():
    server = echo_server()
    try:
        with LinkProxy(server.server_address[1], rate=10e6, down_rate=10e6, capture=True) as proxy:
            payload = bytes(range(256)) * 200
            assert roundtrip(proxy.port, payload) == payload
            assert proxy.bytes_up == len(payload) and bytes(proxy.captured) == payload
            assert proxy.connections == 1
    finally:
        server.shutdown()
        server.server_close()


class Truncating(LinkProxy):
    """Cuts every connection after its first 10 uplink bytes (the hook a fault injector uses)."""

    def forward(self, conn, data, up):
        if up and conn.sent_up + len(data) >= 10:
            return data[:10 - conn.sent_up], True
        return data, False


def test_forward_hook_cuts_a_connection():
    server = echo_server()
    try:
        with Truncating(server.server_address[1]) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(b"x" * 100)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
            # The connection ended (recv returned b""): the server got exactly 10 bytes, and at
            # most their echo came back before the cut closed the client's side.
            assert proxy.bytes_up == 10 and got in (b"x" * k for k in range(11))
    finally:
        server.shutdown()
        server.server_close()


def test_sentence_styles(tmp_path):
    rows = list(sentences(40, seed=3, adjectives=(2, 8), vocabulary=5, noun="movie", numbered=True))
    assert [label for _, label in rows] == [i % 2 for i in range(40)]
    assert all(text.startswith(f"row {i}: a ") and text.endswith(" movie") for i, (text, _) in enumerate(rows))
    assert all(2 <= len(text.split(": a ")[1].split(" and ")) <= 8 for text, _ in rows)
    lines = write_sample(tmp_path / "s.tsv", 10, 1).read_text().splitlines()
    assert lines[0] == "sentence\tlabel" and len(lines) == 11


def test_wait_listening_returns_once_a_port_accepts_and_fails_fast_on_exit():
    import socket
    import subprocess
    import sys

    from mobillm.common.netsim import wait_listening

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert wait_listening(s.getsockname()[1], timeout=5) < 5
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_listening(port, proc, timeout=30)
