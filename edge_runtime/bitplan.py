"""Adaptive bitwidth (MobiLLM Algorithm 2): per-tap formats under a per-iteration byte budget.

Greedy marginal utility: every tap starts at the cheapest format of the ladder; while the
budget allows, upgrade the tap whose next step buys the most importance-weighted
distortion reduction per extra byte. Importance comes from the server (e.g. gradient norm
of each tap's adapter); distortion is the codec's measured relative MSE.
"""

from __future__ import annotations

import functools
import time
from collections import deque

import numpy as np

from mobillm.kernels import codec

DEFAULT_LADDER = ("nf4", "int8", "fp16")


@functools.lru_cache(maxsize=None)
def distortion(fmt: str, block_size: int) -> float:
    """Relative mean squared error of `fmt` on Gaussian activations (seeded, measured once)."""
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    return codec.relative_rms_error(x, fmt, block_size) ** 2


def allocate(hidden: list[int], tokens: int, importance: list[float], budget_bytes: float,
             block_size: int = codec.DEFAULT_BLOCK_SIZE, ladder: tuple[str, ...] = DEFAULT_LADDER) -> list[str]:
    """Format per tap for one iteration carrying `tokens` rows per tap within `budget_bytes`.

    If even the cheapest plan exceeds the budget, the cheapest plan is returned.
    """
    if len(importance) != len(hidden):
        raise ValueError(f"{len(importance)} importance values for {len(hidden)} taps")
    level = [0] * len(hidden)
    cost = sum(codec.bytes_per_row(ladder[0], h, block_size) * tokens for h in hidden)
    while True:
        best, best_ratio, best_extra = None, 0.0, 0.0
        for m, h in enumerate(hidden):
            if level[m] + 1 >= len(ladder):
                continue
            cur, nxt = ladder[level[m]], ladder[level[m] + 1]
            extra = (codec.bytes_per_row(nxt, h, block_size) - codec.bytes_per_row(cur, h, block_size)) * tokens
            gain = max(float(importance[m]), 1e-12) * (distortion(cur, block_size) - distortion(nxt, block_size))
            if cost + extra <= budget_bytes and gain / extra > best_ratio:
                best, best_ratio, best_extra = m, gain / extra, extra
        if best is None:
            return [ladder[i] for i in level]
        level[best] += 1
        cost += best_extra


class UplinkMeter:
    """Uplink throughput from the device's own sends: bytes over busy seconds, sliding window."""

    def __init__(self, window: int = 8):
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)

    def record(self, nbytes: int, seconds: float) -> None:
        self._samples.append((nbytes, max(seconds, 1e-6)))

    @property
    def bytes_per_second(self) -> float | None:
        if not self._samples:
            return None
        return sum(b for b, _ in self._samples) / sum(s for _, s in self._samples)


class BitPlanner:
    """Re-plans every `every` batches from measured uplink and the server's importance."""

    def __init__(self, hidden: list[int], block_size: int, latency_target_s: float, every: int = 4,
                 ladder: tuple[str, ...] = DEFAULT_LADDER):
        self.hidden, self.block_size, self.latency = hidden, block_size, latency_target_s
        self.every, self.ladder = every, ladder
        self.importance = [1.0] * len(hidden)
        self.meter = UplinkMeter()
        self.plan = [ladder[0]] * len(hidden)
        self.history: list[dict] = []
        self._batches = 0

    def next_plan(self, tokens: int) -> list[str]:
        """Plan for the next batch; recomputed every `every` batches once throughput is known."""
        bw = self.meter.bytes_per_second
        if self._batches % self.every == 0 and bw is not None:
            budget = bw * self.latency
            self.plan = allocate(self.hidden, tokens, self.importance, budget, self.block_size, self.ladder)
            self.history.append({"batch": self._batches, "time": time.time(), "bandwidth_Bps": bw,
                                 "budget_bytes": budget, "plan": list(self.plan)})
        self._batches += 1
        return self.plan
