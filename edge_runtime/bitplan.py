"""Adaptive bitwidth (MobiLLM Algorithm 2): per-tap formats under a per-iteration byte budget.

Two rules, chosen with `edge-run train --bits auto:RULE`:
- `utility` (plain `auto`): every tap starts at the cheapest format of `UTILITY_LADDER`; while the
  budget allows, upgrade the tap whose next step buys the most importance-weighted distortion
  reduction per extra byte, skipping steps that do not fit.
- `paper` (Algorithm 2 as published): every tap starts at the lowest of `PAPER_RUNGS`; repeatedly
  take the single +1-rung upgrade with the largest dU = [eps(Q) - eps(Q+1)] * I(m); stop at the first
  upgrade that does not fit the budget (smaller ones are not tried).
Importance I(m) comes from the server (gradient norm of each tap's adapter); eps is the relative
MSE per tap and format, measured on the engine's own taps (edge_runtime/distortion.py) or, without
a calibration, on Gaussian data (`distortion`).
"""

from __future__ import annotations

import functools
import time
from collections import deque

import numpy as np

from mobillm.kernels import codec

# Rungs of the paper's rule, cheapest first. A new format joins by one edit of this tuple.
PAPER_RUNGS = ("int4", "nf4", "fp8", "int8", "fp16")
UTILITY_LADDER = ("nf4", "int8", "fp16")
DEFAULT_LADDER = UTILITY_LADDER
RULES = {"utility": UTILITY_LADDER, "paper": PAPER_RUNGS}
AUTO_CHOICES = ("auto", *(f"auto:{r}" for r in RULES))


def auto_rule(bits: str) -> str | None:
    """The rule an `auto[:RULE]` --bits value names (`auto` is `utility`); None for any other value.
    An unknown rule raises ValueError listing the choices."""
    if bits != "auto" and not bits.startswith("auto:"):
        return None
    rule = bits.partition(":")[2] or "utility"
    if rule not in RULES:
        raise ValueError(f"unknown bit-allocation rule {rule!r}; choose one of {', '.join(AUTO_CHOICES)}")
    return rule


@functools.lru_cache(maxsize=None)
def distortion(fmt: str, block_size: int) -> float:
    """Relative mean squared error of `fmt` on Gaussian activations (seeded, measured once)."""
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    return codec.relative_rms_error(x, fmt, block_size) ** 2


def gaussian_table(n_taps: int, block_size: int, ladder: tuple[str, ...]) -> list[dict[str, float]]:
    """eps per tap and format when no calibration on real taps is at hand: Gaussian data for every tap."""
    return [{f: distortion(f, block_size) for f in ladder} for _ in range(n_taps)]


def _cost(fmt: str, hidden: int, block_size: int, tokens: int) -> int:
    return codec.bytes_per_row(fmt, hidden, block_size) * tokens


def _start(hidden, tokens, importance, block_size, ladder, eps) -> tuple[list[dict[str, float]], list[int], int]:
    """Both rules' starting point: eps (Gaussian if not given), every tap at rung 0, and its bytes."""
    if len(importance) != len(hidden):
        raise ValueError(f"{len(importance)} importance values for {len(hidden)} taps")
    eps = eps or gaussian_table(len(hidden), block_size, ladder)
    level = [0] * len(hidden)
    cost = sum(_cost(ladder[0], h, block_size, tokens) for h in hidden)
    return eps, level, cost


def allocate(hidden: list[int], tokens: int, importance: list[float], budget_bytes: float,
             block_size: int = codec.DEFAULT_BLOCK_SIZE, ladder: tuple[str, ...] = UTILITY_LADDER,
             eps: list[dict[str, float]] | None = None) -> list[str]:
    """The utility rule: format per tap for one iteration carrying `tokens` rows per tap within
    `budget_bytes`. `eps[m][fmt]`: distortion per tap (default: Gaussian). If even the cheapest
    plan exceeds the budget, the cheapest plan is returned."""
    eps, level, cost = _start(hidden, tokens, importance, block_size, ladder, eps)
    while True:
        best, best_ratio, best_extra = None, 0.0, 0
        for m, h in enumerate(hidden):
            if level[m] + 1 >= len(ladder):
                continue
            cur, nxt = ladder[level[m]], ladder[level[m] + 1]
            extra = _cost(nxt, h, block_size, tokens) - _cost(cur, h, block_size, tokens)
            gain = max(float(importance[m]), 1e-12) * (eps[m][cur] - eps[m][nxt])
            ratio = gain / extra if extra > 0 else (float("inf") if gain > 0 else 0.0)  # free steps first
            if cost + extra <= budget_bytes and ratio > best_ratio:
                best, best_ratio, best_extra = m, ratio, extra
        if best is None:
            return [ladder[i] for i in level]
        level[best] += 1
        cost += best_extra


def allocate_paper(hidden: list[int], tokens: int, importance: list[float], budget_bytes: float,
                   block_size: int = codec.DEFAULT_BLOCK_SIZE, ladder: tuple[str, ...] = PAPER_RUNGS,
                   eps: list[dict[str, float]] | None = None, trace: list | None = None) -> list[str]:
    """The paper's Algorithm 2: all taps at `ladder[0]`, then the +1-rung upgrade with the largest
    dU = [eps(Q) - eps(Q+1)] * I(m) (ties: the lowest tap index) while it fits `budget_bytes`; the
    first upgrade that does not fit ends the allocation. `trace`, if given, receives
    (tap, from, to, dU, bytes after) per upgrade taken and finally ("stop", tap or None, ...)."""
    eps, level, cost = _start(hidden, tokens, importance, block_size, ladder, eps)
    while True:
        best, best_gain = None, None
        for m in range(len(hidden)):
            if level[m] + 1 < len(ladder):
                gain = (eps[m][ladder[level[m]]] - eps[m][ladder[level[m] + 1]]) * float(importance[m])
                if best_gain is None or gain > best_gain:
                    best, best_gain = m, gain
        if best is None:  # every tap at the top rung
            break
        cur, nxt = ladder[level[best]], ladder[level[best] + 1]
        extra = _cost(nxt, hidden[best], block_size, tokens) - _cost(cur, hidden[best], block_size, tokens)
        if cost + extra > budget_bytes:
            break
        level[best] += 1
        cost += extra
        if trace is not None:
            trace.append((best, cur, nxt, best_gain, cost))
    if trace is not None:
        trace.append(("stop", best, cost))
    return [ladder[i] for i in level]


ALLOCATORS = {"utility": allocate, "paper": allocate_paper}


class UplinkMeter:
    """Uplink throughput: bytes over the seconds the link was busy with them, sliding window.

    The device feeds it delivery times (`delivered`), not send times: a send returns as soon as
    its bytes sit in socket buffers, which read a 7.5 MB/s link as 12 MB/s (docs/benchmarks.md)."""

    def __init__(self, window: int = 8):
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._last_delivered = float("-inf")

    def record(self, nbytes: int, seconds: float) -> None:
        self._samples.append((nbytes, max(seconds, 1e-6)))

    def delivered(self, nbytes: int, started: float, arrived: float) -> None:
        """A frame of `nbytes` whose send began at `started` was fully read by the peer at `arrived`
        (perf_counter seconds). The link worked on it from its start or from the previous frame's
        arrival, whichever is later (frames queued behind each other share no link time)."""
        self.record(nbytes, arrived - max(started, self._last_delivered))
        self._last_delivered = arrived

    @property
    def bytes_per_second(self) -> float | None:
        if not self._samples:
            return None
        return sum(b for b, _ in self._samples) / sum(s for _, s in self._samples)


class BitPlanner:
    """Re-plans every `every` batches from measured uplink and the server's importance."""

    def __init__(self, hidden: list[int], block_size: int, latency_target_s: float, every: int = 4,
                 rule: str = "utility", eps: list[dict[str, float]] | None = None):
        """`rule`: a key of RULES (its ladder goes with it); `eps[m][fmt]`: measured distortion per
        tap (edge_runtime/distortion.py), Gaussian when None."""
        self.hidden, self.block_size, self.latency = hidden, block_size, latency_target_s
        self.every, self.rule, self.ladder = every, rule, RULES[rule]
        self.eps = eps or gaussian_table(len(hidden), block_size, self.ladder)
        self.importance = [1.0] * len(hidden)
        self.meter = UplinkMeter()
        self.plan = [self.ladder[0]] * len(hidden)
        self.history: list[dict] = []
        self._batches = 0

    def next_plan(self, tokens: int) -> list[str]:
        """Plan for the next batch; recomputed every `every` batches once throughput is known."""
        bw = self.meter.bytes_per_second
        if self._batches % self.every == 0 and bw is not None:
            budget = bw * self.latency
            self.plan = ALLOCATORS[self.rule](self.hidden, tokens, self.importance, budget, self.block_size,
                                              self.ladder, self.eps)
            self.history.append({"batch": self._batches, "time": time.time(), "bandwidth_Bps": bw,
                                 "budget_bytes": budget, "rule": self.rule, "plan": list(self.plan)})
        self._batches += 1
        return self.plan
