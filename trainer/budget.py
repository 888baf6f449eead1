"""The server's memory budget: every allocation a client can cause is reserved here before it is made.

One `MemoryBudget` per server holds a byte total (`--memory-budget`). What a client can make the
server allocate, and where it is reserved:

- before authentication: nothing here; the WebSocket message limit is `--hello-max-bytes` and the
  unauthenticated connections are capped (`gate.AdmissionGate`), so that memory is a small constant;
- per session (after its HELLO is authenticated and its run admitted): `--session-memory`, which
  covers the messages the WebSocket layer may hold before the server reads them and every batch the
  run holds for it (received, queued, decoded for training; `batch_cost`);
- per run: its side network, gradients, AdamW moments and export, sized from the HELLO on torch's
  meta device (`run_cost`: nothing is allocated to size it).

A request that does not fit is refused with ERROR `over_budget` and nothing is created (no run
folder). The process's own idle memory (`base`, measured at start) is charged once.
"""

from __future__ import annotations

import logging
import os
import threading

from mobillm.common.messages import OVER_BUDGET, Hello, ProtocolError

from .config import SideConfig

log = logging.getLogger("mobillm.trainer")

MIB = 1 << 20

# Bytes per side-network parameter: fp32 weights, gradients, AdamW's two moments, and the ONNX bytes
# plus the ONNX Runtime session that checks the export at the end (docs/reliability.md).
BYTES_PER_PARAM = 24
# Peak bytes of a training step per byte of decoded fp32 taps: the decoded input, its gradient (BITPLAN
# importance), the chunked decode's temporaries and the adapters' activations. Measured 4.2-5.3x on
# CPU (2 nf4 taps, 1024-16384 wide, last and mean pooling; tests/trainer/test_budget.py checks it).
DECODE_FACTOR = 6
RUN_OVERHEAD = 4 * MIB  # a run's thread stack, open files, metrics buffers, config


def return_freed_memory() -> None:
    """Give the heap pages freed by released runs back to the OS (glibc's malloc_trim; elsewhere nothing),
    so the process's RSS falls back towards idle after its clients leave. A released run's objects are
    partly in reference cycles (modules, threads, sessions) that only the cyclic collector frees, and an
    idle server allocates too little to trigger its full pass: collect first, or the trim comes before
    they are freed and they stay (6-8 MiB after 10,000 run names, docs/reliability.md)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_budget() -> int:
    """Half of physical RAM (4 GiB when unknown): room for the OS, the page cache and other processes."""
    return physical_memory() // 2 or 4 << 30


def side_parameters(side: SideConfig, seed: int = 0) -> int:
    """Parameters of the side network `side` describes, counted on the meta device (nothing allocated)."""
    import torch

    from .model import build_side_network

    with torch.device("meta"):
        model = build_side_network(side, seed)
    return sum(p.numel() for p in model.parameters())


def run_cost(side: SideConfig, hello: Hello) -> int:
    """Bytes a new run for `hello` needs: its side network and optimizer state, plus a fixed overhead."""
    widths = [t.hidden for t in hello.taps]
    params = side_parameters(side.for_taps(widths, hello.out_dim))
    return params * BYTES_PER_PARAM + RUN_OVERHEAD


def decoded_bytes(rows: int, widths: list[int]) -> int:
    """fp32 bytes of `rows` rows of every tap once dequantized."""
    return rows * sum(widths) * 4


def batch_cost(wire_bytes: int, model_rows: int, widths: list[int]) -> int:
    """What one batch holds in the server from arrival to the end of its training step: the frame
    itself plus the peak of decoding and training its rows (`DECODE_FACTOR`)."""
    return wire_bytes + DECODE_FACTOR * decoded_bytes(model_rows, widths)


class MemoryBudget:
    """A byte total that reservations are taken from and given back to (thread-safe)."""

    def __init__(self, total: int, base: int = 0):
        self.total, self.base = int(total), int(base)
        self.used = self.base
        self.peak = self.used
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.total - self.used

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.total:
                return False
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return True

    def reserve(self, nbytes: int, what: str) -> "Reservation":
        """A reservation of `nbytes`, or ProtocolError `over_budget` saying what did not fit."""
        if not self.try_reserve(nbytes):
            raise ProtocolError(OVER_BUDGET, f"{what} needs {nbytes / MIB:.1f} MiB but the server has "
                                               f"{max(self.free, 0) / MIB:.1f} MiB of its --memory-budget "
                                               f"{self.total / MIB:.0f} MiB left; try later or ask for less")
        return Reservation(self, nbytes)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class Reservation:
    """Bytes held from a `MemoryBudget` until `release()` (idempotent)."""

    def __init__(self, budget: MemoryBudget, nbytes: int):
        self.budget, self.nbytes = budget, nbytes

    def release(self) -> None:
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self.budget.release(nbytes)


class Allowance:
    """One session's share (`--session-memory`): its batches are taken from it as they arrive and given
    back when their training step ends. The share returns to the budget when the session has ended
    and its last batch is trained (thread-safe: the training thread gives back)."""

    def __init__(self, reservation: Reservation, limit: int):
        self.reservation, self.limit = reservation, limit
        self.inflight = 0
        self.closed = False
        self._lock = threading.Lock()

    def take(self, cost: int) -> None:
        with self._lock:
            if self.inflight + cost > self.limit:
                raise ProtocolError(OVER_BUDGET, f"batches in flight would hold {(self.inflight + cost) / MIB:.1f} "
                                                   f"MiB, over this device's {self.limit / MIB:.1f} MiB; wait for "
                                                   f"credits and send smaller batches")
            self.inflight += cost

    def give(self, cost: int) -> None:
        with self._lock:
            self.inflight -= cost
            done = self.closed and self.inflight <= 0
        if done:
            self.reservation.release()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            done = self.inflight <= 0
        if done:
            self.reservation.release()
