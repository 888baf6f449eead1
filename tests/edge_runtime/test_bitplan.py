"""Adaptive bitwidth: the greedy allocation respects the budget and follows importance."""

from mobillm.edge_runtime.bitplan import BitPlanner, allocate
from mobillm.kernels import codec

HIDDEN = [1024] * 6


def plan_bytes(plan, tokens=16):
    return sum(codec.bytes_per_row(f, h, 64) * tokens for f, h in zip(plan, HIDDEN))


def test_budget_is_respected_and_more_budget_buys_more_bits():
    imp = [1.0] * 6
    plans = [allocate(HIDDEN, 16, imp, budget) for budget in (1e3, 6e4, 1.5e5, 1e9)]
    assert plans[0] == ["nf4"] * 6  # below the cheapest plan: cheapest
    assert plans[-1] == ["fp16"] * 6
    for budget, plan in zip((6e4, 1.5e5), plans[1:3]):
        assert plan_bytes(plan) <= budget
    assert plan_bytes(plans[1]) < plan_bytes(plans[2])


def test_important_taps_get_bits_first():
    imp = [0.1, 0.1, 5.0, 0.1, 0.1, 0.1]
    budget = plan_bytes(["nf4"] * 6) + (codec.bytes_per_row("int8", 1024, 64) - codec.bytes_per_row("nf4", 1024, 64)) * 16
    plan = allocate(HIDDEN, 16, imp, budget)
    assert plan[2] == "int8" and plan.count("nf4") == 5


def test_planner_follows_measured_bandwidth():
    planner = BitPlanner(HIDDEN, 64, latency_target_s=0.1, every=1)
    planner.meter.record(10_000_000, 1.0)  # 10 MB/s -> 1 MB budget: everything fp16
    assert planner.next_plan(16) == ["fp16"] * 6
    for _ in range(8):
        planner.meter.record(10_000, 1.0)  # link collapses to 10 kB/s
    assert planner.next_plan(16) == ["nf4"] * 6
    assert [h["plan"] for h in planner.history] == [["fp16"] * 6, ["nf4"] * 6]
