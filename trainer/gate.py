"""Admission before authentication: who may open a connection, and who must wait after bad tokens.

An unauthenticated connection may hold at most `--hello-max-bytes` of message (the server raises
the WebSocket limit to `--max-frame` once the HELLO's token is checked and its run admitted), and
there are at most `--max-unauthenticated` of them, `--max-unauthenticated-per-address` from one
address; more are refused at the HTTP handshake with 503, before anything is buffered. After
`FREE_FAILURES` wrong tokens an address waits `auth_backoff_s · 2^(failures − 4)` (up to
`auth_ban_s`) before its next connection is accepted (429), until a right token resets it:
guessing tokens costs seconds per guess, not microseconds.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from http import HTTPStatus

FREE_FAILURES = 3  # wrong tokens an address may send before the back-off starts (a mistyped token)
MAX_TRACKED = 10_000  # addresses remembered for back-off; the oldest are forgotten first


class AdmissionGate:
    """Counts unauthenticated connections per address and remembers failed tokens per address.

    Used on the server's event loop only (no lock)."""

    def __init__(self, total: int, per_address: int, backoff_s: float, ban_s: float, clock=time.monotonic):
        self.total, self.per_address = total, per_address
        self.backoff_s, self.ban_s, self.clock = backoff_s, ban_s, clock
        self.pending: Counter = Counter()  # address -> unauthenticated connections open now
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address -> (count, banned until)

    def refusal(self, address: str) -> tuple[HTTPStatus, str] | None:
        """Why a new connection from `address` is refused now (status, text), or None to let it in."""
        count, until = self._failures.get(address, (0, 0.0))
        wait = until - self.clock()
        if wait > 0:
            return HTTPStatus.TOO_MANY_REQUESTS, f"{count} wrong tokens from this address; retry in {wait:.0f} s\n"
        if sum(self.pending.values()) >= self.total:
            return HTTPStatus.SERVICE_UNAVAILABLE, "too many connections waiting to authenticate; retry later\n"
        if self.pending[address] >= self.per_address:
            return HTTPStatus.SERVICE_UNAVAILABLE, "too many unauthenticated connections from this address\n"
        return None

    def opened(self, address: str) -> bool:
        """A connection from `address` starts unauthenticated; False (do not serve it) when over a cap."""
        if self.refusal(address) is not None:
            return False
        self.pending[address] += 1
        return True

    def settled(self, address: str) -> None:
        """The connection authenticated or ended: it no longer counts as unauthenticated."""
        self.pending[address] -= 1
        if self.pending[address] <= 0:
            del self.pending[address]

    def failed(self, address: str) -> None:
        """A wrong token from `address`: back off exponentially."""
        count = self._failures.pop(address, (0, 0.0))[0] + 1
        delay = 0.0 if count <= FREE_FAILURES else min(self.backoff_s * 2 ** min(count - 1 - FREE_FAILURES, 30),
                                                         self.ban_s)
        self._failures[address] = (count, self.clock() + delay)
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
