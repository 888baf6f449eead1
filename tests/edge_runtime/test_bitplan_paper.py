"""The paper's Algorithm 2 (`--bits auto:paper`) on a worked example, and the `--bits` rule names."""

import pytest

from mobillm.common.errors import BadInput
from mobillm.edge_runtime.bitplan import PAPER_RUNGS, BitPlanner, allocate, allocate_paper, auto_rule
from mobillm.edge_runtime.batches import fixed_formats

# The worked example of docs/edge_runtime.md: three taps, one token per tap, block 64.
# Bytes per row: H=64: int4/nf4 34, fp8/int8 66, fp16 128; H=128: 68, 132, 256.
HIDDEN = [64, 64, 128]
EPS = [{"int4": 0.10, "nf4": 0.08, "fp8": 0.03, "int8": 0.010, "fp16": 0.0},
       {"int4": 0.12, "nf4": 0.09, "fp8": 0.02, "int8": 0.016, "fp16": 0.0},
       {"int4": 0.09, "nf4": 0.085, "fp8": 0.04, "int8": 0.005, "fp16": 0.0}]
IMPORTANCE = [1.0, 2.0, 0.5]
BUDGET = 300


def test_worked_example_pins_every_upgrade_and_the_stop():
    trace = []
    plan = allocate_paper(HIDDEN, 1, IMPORTANCE, BUDGET, 64, PAPER_RUNGS, EPS, trace)
    steps = [(tap, a, b, cost) for tap, a, b, _, cost in trace[:-1]]
    assert steps == [(1, "int4", "nf4", 136),   # dU 0.03 x 2 = 0.06, free (same bytes)
                     (1, "nf4", "fp8", 168),    # 0.07 x 2 = 0.14
                     (0, "int4", "nf4", 168),   # 0.02 x 1
                     (0, "nf4", "fp8", 200),    # 0.05 x 1
                     (0, "fp8", "int8", 200),   # 0.02 x 1
                     (0, "int8", "fp16", 262),  # 0.01 x 1 beats tap 1's 0.004 x 2
                     (1, "fp8", "int8", 262)]   # 0.008
    assert [round(gain, 6) for *_, gain, _ in trace[:-1]] == [0.06, 0.14, 0.02, 0.05, 0.02, 0.01, 0.008]
    # Next best: tap 1 int8 -> fp16 (dU 0.032, +62 B -> 324 > 300): the allocation stops there, even
    # though tap 2's free int4 -> nf4 would still fit.
    assert trace[-1] == ("stop", 1, 262)
    assert plan == ["fp16", "int8", "int4"]


def test_the_utility_rule_skips_what_does_not_fit_where_the_paper_stops():
    utility = allocate(HIDDEN, 1, IMPORTANCE, BUDGET, 64, PAPER_RUNGS, EPS)
    assert utility[2] != "int4"  # it goes on past the upgrade that does not fit
    assert allocate_paper(HIDDEN, 1, IMPORTANCE, 1e9, 64, PAPER_RUNGS, EPS) == ["fp16"] * 3
    # Budget = the all-int4 plan: tap 1's free int4 -> nf4, then its nf4 -> fp8 does not fit: stop.
    assert allocate_paper(HIDDEN, 1, IMPORTANCE, 136, 64, PAPER_RUNGS, EPS) == ["int4", "nf4", "int4"]
    assert allocate_paper(HIDDEN, 1, IMPORTANCE, 0, 64, PAPER_RUNGS, EPS) == ["int4"] * 3  # over budget: cheapest


def test_bits_rules_parse_and_unknown_ones_list_the_choices():
    assert auto_rule("auto") == "utility" and auto_rule("auto:utility") == "utility"
    assert auto_rule("auto:paper") == "paper" and auto_rule("nf4") is None
    assert fixed_formats("auto:paper", 3) is None and fixed_formats("int8", 2) == ["int8", "int8"]
    with pytest.raises(BadInput, match="rule .greedy.; choose one of auto, auto:utility, auto:paper$"):
        fixed_formats("auto:greedy", 3)
    with pytest.raises(BadInput, match="engine, auto, auto:utility, auto:paper"):
        fixed_formats("fp5", 3)


def test_planner_runs_the_chosen_rule_with_measured_eps():
    planner = BitPlanner(HIDDEN, 64, latency_target_s=1.0, every=1, rule="paper", eps=EPS)
    planner.importance = IMPORTANCE
    planner.meter.record(BUDGET, 1.0)  # 300 B/s x 1 s = the example's budget
    assert planner.next_plan(1) == ["fp16", "int8", "int4"]
    assert planner.history[0]["rule"] == "paper"
