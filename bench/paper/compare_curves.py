"""bench/paper/compare.py's curves: a method's dev metric against its training wall-clock.

On-device methods evaluate themselves as they train (their clock paused); a mobillm method's
points come from the server's checkpoints (copied as written, CheckpointWatcher) and the model
it returned, all scored afterwards in one evaluator process on the device's path (JointModel).
From a curve: the metric after the budget, the time to a target, and the time from which it stays there.
"""

from __future__ import annotations


def dedupe_by_step(points: list[dict]) -> list[dict]:
    """One point per training step (the server saves a checkpoint twice at the end), earliest time;
    the returned model replaces the final checkpoint, at the time the device had it."""
    final = [p for p in points if p.get("source") == "returned model"]
    final_step = final[0]["step"] if final else None
    kept: dict = {}
    for p in sorted(points, key=lambda p: p["t"]):
        if p.get("source") == "server checkpoint" and p["step"] == final_step:
            continue
        kept.setdefault(p["step"], p)
    return sorted(kept.values(), key=lambda p: p["t"])


def in_budget(curve: list[dict], budget: float) -> list[dict]:
    """Scored points inside the budget. A time-budgeted run stops at the end of the step that
    crossed the budget; that last point (`final`) counts as the budget's."""
    return sorted((p for p in curve if p.get("metric") is not None and (p["t"] <= budget or p.get("final"))),
                  key=lambda p: p["t"])


def metric_after_budget(curve: list[dict], budget: float, key: str = "metric"):
    """The last scored point's `key` within the budget (`by_split`: each dev split's metric, MNLI)."""
    points = in_budget(curve, budget)
    return points[-1].get(key) if points else None


def time_to_target(curve: list[dict], target: float, budget: float) -> float | None:
    """The first evaluation at or above the target."""
    return next((p["t"] for p in in_budget(curve, budget) if p["metric"] >= target), None)


def time_to_stay(curve: list[dict], target: float, budget: float) -> float | None:
    """The first evaluation from which every later one (within the budget) stays at or above the target."""
    points = in_budget(curve, budget)
    return next((p["t"] for k, p in enumerate(points) if all(q["metric"] >= target for q in points[k:])), None)


def holdout_choice(curve: list[dict], budget: float) -> dict | None:
    """Early stopping on held-out train rows, the one rule for every method: the scored point within
    the budget with the best holdout metric; on a tie the later point (so t = 0 is chosen only when it
    is strictly better than every trained point). None without holdout scores."""
    points = [p for p in in_budget(curve, budget) if p.get("holdout") is not None]
    return max(points, key=lambda p: (p["holdout"], p["t"])) if points else None
