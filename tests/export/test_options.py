"""ExportOptions (export/options.py): declared once, validated once, the CLI flags derived from it,
saved in manifest.json. Pure option logic: no model is built here."""

import dataclasses

import pytest

from mobillm.common.errors import BadInput
from mobillm.export import families
from mobillm.export.cli import build_parser
from mobillm.export.options import ExportError, ExportOptions, default_blocks, resolve_taps
from mobillm.common.options import from_args

OPT = families.family_for("opt")


@pytest.mark.parametrize("blocks_in, expected", [
    (1, [1]), (4, [1, 1, 1, 1]), (6, [2, 1, 1, 1, 1]), (12, [4, 2, 2, 1, 1, 1, 1]),
    (24, [8, 4, 4, 2, 2, 1, 1, 1, 1]), (32, [8, 8, 4, 4, 2, 2, 1, 1, 1, 1]),
])
def test_default_blocks_coarse_at_bottom_fine_at_top(blocks_in, expected):
    assert default_blocks(blocks_in) == expected


def test_default_blocks_always_sum_to_layers_and_never_grow_upwards():
    for n in range(1, 97):
        blocks = default_blocks(n)
        assert sum(blocks) == n
        assert all(a >= b for a, b in zip(blocks, blocks[1:])), (n, blocks)


def test_taps_and_blocks_resolve_both_ways():
    assert resolve_taps(12, taps=[4, 8]) == ([4, 4, 4], [4, 8, 12])  # final layer added
    assert resolve_taps(12, blocks=[6, 6]) == ([6, 6], [6, 12])


@pytest.mark.parametrize("fields, message", [
    ({"dtype": "fp16", "weights": "int8"}, "--dtype fp16 needs fp16 weights"),
    ({"dtype": "bf16"}, "--dtype 'bf16' unknown"),
    ({"block_size": -1}, "--block-size -1: must be >= 1, or 0 for one scale per tap tensor"),
    ({"block_size": 0, "quant_op": "custom"}, "--block-size 0 .* has no fused quantizer"),
    ({"exporter": "jit"}, "--exporter 'jit' unknown"),
    ({"quant_op": "fused"}, "--quant-op .fused. unknown"),
    ({"tap_norm": "max"}, "--tap-norm 'max' unknown"),
    ({"blocks": [2, 2], "taps": [2]}, "give either --blocks or --taps"),
    ({"quant": "nf4,int3"}, "unknown quant format 'int3'"),
])
def test_options_are_checked_when_built(fields, message):
    with pytest.raises(ExportError, match=message) as exc:
        ExportOptions(model="opt-125m", out="engine", **fields)
    assert isinstance(exc.value, BadInput) and isinstance(exc.value, ValueError)  # exit 2; old callers catch ValueError


def test_resolved_makes_every_default_explicit_and_is_a_fixed_point():
    opts = ExportOptions(model="opt-125m", out="engine", taps=[2], quant="int8,fp16")
    resolved = opts.resolved(OPT, 4)
    assert (resolved.blocks, resolved.taps, resolved.quant) == ([2, 2], None, "int8,fp16")
    assert (resolved.weights, resolved.tap_norm) == ("fp32", "none")
    assert resolved.tap_layers == [2, 4] and resolved.formats == ["int8", "fp16"]
    assert resolved.resolved(OPT, 4) == resolved
    with pytest.raises(ExportError, match="--quant lists 2 formats but there are 7 taps"):
        ExportOptions(model="opt-125m", out="engine", quant="nf4,int8").resolved(OPT, 12)


def test_tap_norm_layer_needs_the_family_input_norms():
    bare = dataclasses.replace(OPT, name="bare", input_norms=None)
    with pytest.raises(ExportError, match="the bare family row names no input norms"):
        ExportOptions(model="opt-125m", out="engine", tap_norm="layer").resolved(bare, 4)
    assert ExportOptions(model="opt-125m", out="engine", tap_norm="layer").resolved(OPT, 4).tap_norm == "layer"


def test_dict_round_trip_as_manifest_json_stores_it(tmp_path):
    opts = ExportOptions(model="opt-125m", out=tmp_path / "engine", tokenizer=str(tmp_path), overrides={"a": 1},
                         blocks=[3, 1], verify=True).resolved(OPT, 4)
    data = opts.to_dict()
    assert data["out"] == str(tmp_path / "engine") and data["tokenizer"] == str(tmp_path)
    assert ExportOptions.from_dict({**data, "from_a_newer_mobillm": 1}) == opts


def test_cli_flags_are_the_fields_with_their_defaults():
    args = build_parser().parse_args(["opt-125m", "--out", "engine"])
    assert from_args(ExportOptions, args, overrides={}, progress=True) == ExportOptions(model="opt-125m", out="engine")
    args = build_parser().parse_args(["m", "--out", "e", "--blocks", "2,2", "--quant-op", "custom", "--tap-norm",
                                      "rms", "--weights", "fp16", "--block-size", "32", "--seed", "5", "--force"])
    opts = from_args(ExportOptions, args, overrides={}, progress=False)
    assert (opts.blocks, opts.quant_op, opts.tap_norm, opts.weights, opts.block_size, opts.seed, opts.force) == \
        ([2, 2], "custom", "rms", "fp16", 32, 5, True)


def test_fp4_with_per_tensor_scales_from_the_cli():
    opts = from_args(ExportOptions, build_parser().parse_args(["opt-125m", "--out", "e", "--quant", "fp4",
                                                               "--block-size", "0"]))
    assert (opts.quant, opts.block_size) == ("fp4", 0)
