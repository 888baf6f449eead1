"""`export-backbone --trt`: checked before any work here; built and loaded wherever TensorRT imports.

No machine this project is tested on has TensorRT, so the build tests skip with that reason."""

import pytest

from mobillm.common.manifest import Manifest
from mobillm.export import trt as trt_plan
from mobillm.export.cli import main

try:
    import tensorrt
except ImportError:
    tensorrt = None
needs_tensorrt = pytest.mark.skipif(tensorrt is None, reason="TensorRT's Python bindings are not installed here "
                                                             "(no machine this project is tested on has them)")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_trt_with_quantized_weights_is_a_clear_exit_2(tmp_path, capsys, weights):
    rc = main(["opt-125m", "--random-init", "--out", str(tmp_path / "e"), "--trt", "--weights", weights, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"--weights {weights}" in err[0] and "fp16" in err[0]
    assert not (tmp_path / "e").exists()


def test_trt_subcommand_checks_the_engine_before_tensorrt(tiny_engine_factory, tmp_path, capsys):
    engine = tiny_engine_factory(weights="int4")
    before = (engine / "manifest.json").read_text()
    assert main(["trt", str(engine)]) == 2
    assert "--weights int4" in capsys.readouterr().err
    assert main(["trt", str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert (engine / "manifest.json").read_text() == before and not (engine / trt_plan.PLAN_NAME).exists()


@pytest.mark.skipif(tensorrt is not None, reason="TensorRT is installed here")
def test_trt_subcommand_without_tensorrt_is_a_clear_exit_2(tiny_engine, capsys):
    assert main(["trt", str(tiny_engine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trt needs TensorRT" in err[0]
    assert Manifest.load(tiny_engine).tensorrt is None


def test_profile_covers_batch_seq_inputs_and_token_positions():
    assert trt_plan.profile_shapes(2, "input_ids", 2048) == ((1, 1), (16, 128), (64, 2048))
    assert trt_plan.profile_shapes(2, "attention_mask", 64) == ((1, 1), (16, 64), (64, 64))
    assert trt_plan.profile_shapes(1, "tap_rows", 64) == ((1,), (16,), (64 * 64,))
    with pytest.raises(trt_plan.ExportError, match="rank 3"):
        trt_plan.profile_shapes(3, "pixels", 64)


def test_engines_without_a_plan_record_none(tiny_engine):
    assert Manifest.load(tiny_engine).tensorrt is None


@needs_tensorrt
@pytest.mark.slow
@pytest.mark.parametrize("quant_op", ["onnx", "custom"])
def test_trt_plan_is_built_recorded_and_deserializes(tmp_path, tokenizer_dir, quant_op):
    from mobillm.common.sample import TINY_OPT

    out = tmp_path / "engine"
    sets = [x for k, v in TINY_OPT.items() for x in ("--set", f"{k}={v}")]
    rc = main(["opt-125m", "--random-init", "--tokenizer", str(tokenizer_dir), "--out", str(out), *sets,
               "--quant-op", quant_op, "--trt", "--quiet"])
    assert rc == 0
    manifest = Manifest.load(out)  # checks the plan's sha256 too
    record = manifest.tensorrt
    assert record["plan"] == trt_plan.PLAN_NAME and record["plan"] in manifest.files
    assert record["tensorrt"] == tensorrt.__version__ and (record["plugin_library"] is not None) == (quant_op == "custom")
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    if record["plugin_library"]:
        from mobillm.kernels import native
        runtime.get_plugin_registry().load_library(str(native.ensure_library("trt_plugin")))
    engine = runtime.deserialize_cuda_engine((out / record["plan"]).read_bytes())
    assert engine is not None
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert {o for t in manifest.taps for o in (t.codes_output, t.scales_output)} <= names


@needs_tensorrt
@pytest.mark.slow
def test_trt_subcommand_adds_a_plan_to_an_existing_engine(tiny_engine_factory):
    engine = tiny_engine_factory(seed=3)  # its own engine: the subcommand rewrites the manifest
    assert main(["trt", str(engine)]) == 0
    manifest = Manifest.load(engine)
    assert manifest.tensorrt["plan"] == trt_plan.PLAN_NAME and trt_plan.PLAN_NAME in manifest.files
