"""Choosing a `--cache` run's epochs (and peak learning rate) on its own held-out rows.

A cached epoch costs the server about a second on a CPU, so the question a `--cache` run faces is
not how many epochs fit in the time but how many help: side networks on conditioned taps overfit
within a few epochs (bench/paper/cache_schedule.py, docs/benchmarks.md "Cached epochs"). With
`--select-epochs`, once the first epoch is cached the server

1. holds out `--select-share` of the cached samples (a seeded draw),
2. trains a fresh side network on the rest for every candidate (epochs x peak lr), with the run's own
   recipe (`train_step`, AdamW, warm-up then linear decay to 0 at the candidate's last epoch), and
   scores each on the held-out samples with the task's metric,
3. keeps the best (ties: fewer epochs, then the lower lr), and the run then trains a fresh side
   network on every cached sample with it: that network is the run's result.

Only rows the device sent are used; the device's dev set is never seen. Everything is seeded by the
run's `--seed`, so a resumed run makes the same choice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from mobillm.common import tasks
from mobillm.common.taps import TapSpec

from .config import RunConfig
from .core import MixedPrecision, WarmupLinear, make_optimizer, scored_task, train_step
from .data import Rows, TapCache, decode_rows
from .model import build_side_network, member_seed

log = logging.getLogger("mobillm.trainer")

MIN_HELD_OUT = 8  # fewer held-out samples than this and the choice is noise: the run says so and keeps its epochs


@dataclass
class Choice:
    """What the selection chose, and every candidate's held-out score."""

    epochs: int
    lr: float
    metric: str
    held_out: int
    candidates: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "metric": self.metric, "held_out": self.held_out,
                "candidates": self.candidates, "seconds": self.seconds}


def held_out_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train entries, held-out entries) of a cache of n samples: a seeded draw of round(share * n)."""
    order = np.random.default_rng([seed, 0x5E1EC7]).permutation(n)
    k = int(round(share * n))
    return np.sort(order[k:]), np.sort(order[:k])


def fit_candidate(cfg: RunConfig, cache: TapCache, entries: np.ndarray, epochs: int, lr: float, batch: int,
                  taps: list[TapSpec], device: torch.device, amp: MixedPrecision,
                  seed: int | None = None) -> torch.nn.Module:
    """A fresh side network trained on `entries` of the cache for `epochs` at peak `lr`, as the run trains
    (initialised and ordered by `seed`, default the run's)."""
    seed = cfg.optim.seed if seed is None else seed
    model = build_side_network(cfg.side, seed).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    total = epochs * len(entries)
    schedule = WarmupLinear(round(cfg.optim.warmup_ratio * total), total)
    done = 0
    for epoch in range(epochs):
        order = entries[np.random.default_rng([seed, 0x5E1EC7, epoch]).permutation(len(entries))]
        for a in range(0, len(order), batch):
            rows = cache.gather(order[a:a + batch])
            factor = schedule.factor(done)
            train_step(model, optimizer, rows, taps, cfg.task_type, device, lambda _: lr * factor,
                       cfg.optim.grad_clip, False, amp)
            done += len(rows)
    return model


def train_members(cfg: RunConfig, cache: TapCache, choice: Choice, batch: int, taps: list[TapSpec],
                  device: torch.device, amp: MixedPrecision) -> list[torch.nn.Module]:
    """Members 1..ensemble-1 of an `--ensemble` run: the chosen schedule on every cached sample, each
    from its own seed (`member_seed`); member 0 is the run's own network, trained step by step."""
    entries = np.arange(len(cache))
    members = []
    for k in range(1, cfg.optim.ensemble):
        t0 = time.perf_counter()
        members.append(fit_candidate(cfg, cache, entries, choice.epochs, choice.lr, batch, taps, device, amp,
                                     seed=member_seed(cfg.optim.seed, k)))
        log.info("run %s: ensemble member %d trained (%d epoch(s) at lr %g, %.1f s)", cfg.run, k, choice.epochs,
                 choice.lr, time.perf_counter() - t0)
    return members


@torch.no_grad()
def predict_rows(model: torch.nn.Module, rows: Rows, taps: list[TapSpec], device: torch.device) -> np.ndarray:
    model.eval()
    inputs = decode_rows(rows, taps, device)
    out = model.logits_from_rows(inputs, torch.from_numpy(rows.lengths).to(device)).float().cpu().numpy()
    model.train()
    return out


def selectable(cfg: RunConfig, cached: int) -> bool:
    """Whether `cached` samples leave enough to hold out; if not the run says so and keeps the device's epochs."""
    train, held = held_out_split(cached, cfg.optim.select_share, cfg.optim.seed)
    if len(held) >= MIN_HELD_OUT and len(train) >= 1:
        return True
    log.warning("run %s: %d cached samples leave %d to hold out (< %d): no selection, the device's %d epochs",
                cfg.run, cached, len(held), MIN_HELD_OUT, cfg.epochs)
    return False


def select_schedule(cfg: RunConfig, cache: TapCache, taps: list[TapSpec], batch: int, device: torch.device,
                    amp: MixedPrecision) -> Choice:
    """The candidate (epochs, lr) with the best held-out metric (`selectable` said there are enough samples)."""
    o = cfg.optim
    train, held = held_out_split(len(cache), o.select_share, o.seed)
    task = scored_task(cfg.task, cfg.task_type, cfg.num_labels)
    metric = task.metric
    held_rows = cache.gather(held)
    t0 = time.perf_counter()
    candidates = []
    for epochs in sorted(set(o.select_epochs)):
        for lr in sorted(set(o.select_lrs or [o.lr])):
            t1 = time.perf_counter()
            model = fit_candidate(cfg, cache, train, epochs, lr, batch, taps, device, amp)
            value = float(tasks.score(task, predict_rows(model, held_rows, taps, device), held_rows.labels)[metric])
            candidates.append({"epochs": epochs, "lr": lr, metric: value, "seconds": time.perf_counter() - t1})
            log.info("run %s: selection, %d epoch(s) at lr %g -> held-out %s %.4f", cfg.run, epochs, lr, metric, value)
    finite = [c for c in candidates if np.isfinite(c[metric])]
    best = max(finite or candidates, key=lambda c: (c[metric] if np.isfinite(c[metric]) else -np.inf,
                                                    -c["epochs"], -c["lr"]))
    choice = Choice(best["epochs"], best["lr"], metric, len(held), candidates, time.perf_counter() - t0)
    log.info("run %s: chose %d epoch(s) at lr %g (held-out %s %.4f on %d samples, %.1f s)", cfg.run, choice.epochs,
             choice.lr, metric, best[metric], len(held), choice.seconds)
    return choice
