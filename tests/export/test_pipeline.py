"""export_engine (export/pipeline.py) on tiny random OPTs: real ONNX Runtime sessions, real files,
verify against torch."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from mobillm.edge_runtime.backbone import row_indices

from mobillm.kernels import codec

pytest.importorskip("torch", exc_type=ModuleNotFoundError)
pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from mobillm.export import graph  # noqa: E402
from mobillm.export.options import ExportOptions  # noqa: E402
from mobillm.export.pipeline import export_engine, remove_stale_partials  # noqa: E402
from mobillm.export.source import (apply_overrides, build_model, load_config, release_weights,  # noqa: E402
                                   resolve_source)
from mobillm.common.manifest import Manifest  # noqa: E402
from mobillm.export.verify import verify_engine  # noqa: E402

TOKENS = np.array([[2, 250, 1345, 9, 10, 4758], [2, 31414, 232, 1, 1, 1]], dtype=np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=np.int64)


def run(engine, ids=TOKENS, mask=MASK) -> dict:
    manifest = Manifest.load(engine)
    session = ort.InferenceSession(str(engine / manifest.graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ids = np.minimum(ids, manifest.config["vocab_size"] - 1)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if manifest.row_input:  # every token position, in batch x seq order: the outputs reshape to [batch, seq, ...]
        feeds[manifest.row_input] = row_indices(np.full(len(ids), ids.shape[1]), ids.shape[1], "all",
                                                manifest.summary_row)
    return {name: out.reshape(ids.shape + out.shape[1:]) if manifest.row_input else out
            for name, out in zip(names, session.run(None, feeds))}


def test_every_quant_format_runs_in_ort_and_verifies(tiny_engine_factory):
    # One engine, one format per tap (one layer per format -> one tap each), keeps the suite fast.
    n = len(codec.FORMATS)
    engine = tiny_engine_factory(",".join(codec.FORMATS), overrides={"num_hidden_layers": n},
                                 taps=list(range(1, n + 1)))
    manifest = Manifest.load(engine)
    assert [t.fmt for t in manifest.taps] == list(codec.FORMATS)
    outputs = run(engine)
    assert list(outputs) == [n for i in range(len(manifest.taps)) for n in (f"tap{i}_codes", f"tap{i}_scales")]
    for tap in manifest.taps:
        codes, scales = outputs[tap.codes_output], outputs[tap.scales_output]
        fp16 = tap.fmt == "fp16"
        assert codes.shape == (2, 6, tap.hidden if fp16 else codec.code_bytes(tap.fmt, tap.hidden))
        assert codes.dtype == (np.float16 if fp16 else np.uint8)
        assert scales.shape == (2, 6, 0 if fp16 else codec.n_blocks(tap.hidden, tap.block_size))
        assert scales.dtype == np.float16
    report = verify_engine(engine)
    assert report.ok, report.table()
    assert [c.layer for c in report.checks] == list(range(1, n + 1))


def test_manifest_describes_the_graph(tiny_engine):
    manifest = Manifest.load(tiny_engine)  # checks every sha256
    assert manifest.family == "opt" and manifest.num_layers == 4
    assert manifest.layer_groups == [1, 1, 1, 1] and manifest.tap_layers == [1, 2, 3, 4]
    assert manifest.source == "random-init" and manifest.seed == 0
    assert manifest.max_length == 256 and manifest.pad_token_id == 1
    assert manifest.config["hidden_size"] == 64 and manifest.overrides["hidden_size"] == 64
    assert set(manifest.files) >= {"backbone.onnx", "tokenizer/tokenizer.json"}
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest.exporter)
    assert manifest.inputs == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                               {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
                               {"name": "tap_rows", "dtype": "int64", "shape": ["rows"]}]
    session = ort.InferenceSession(str(tiny_engine / manifest.graph), providers=["CPUExecutionProvider"])
    graph_outputs = [{"name": o.name, "shape": o.shape} for o in session.get_outputs()]
    assert graph_outputs == [{"name": o["name"], "shape": o["shape"]} for o in manifest.outputs]
    assert manifest.outputs[0] == {"name": "tap0_codes", "dtype": "uint8", "shape": ["rows", 32]}
    assert manifest.outputs[1] == {"name": "tap0_scales", "dtype": "float16", "shape": ["rows", 1]}
    assert manifest.bytes_per_token() == 4 * (32 + 2)


def test_manifest_records_the_resolved_export_options(tiny_engine):
    manifest = Manifest.load(tiny_engine)
    opts = ExportOptions.from_dict(manifest.export_options)
    assert (opts.model, opts.random_init, opts.seed, opts.quant) == ("opt-125m", True, 0, "nf4,nf4,nf4,nf4")
    assert (opts.blocks, opts.taps, opts.weights, opts.tap_norm) == ([1, 1, 1, 1], None, "fp32", "none")
    assert opts.overrides == manifest.overrides and opts.overrides["hidden_size"] == 64  # typed, as applied
    assert opts.tap_layers == manifest.tap_layers


def test_a_manifest_from_before_export_options_still_loads(tiny_engine, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    data = json.loads((engine / "manifest.json").read_text())
    del data["export_options"]
    (engine / "manifest.json").write_text(json.dumps(data))
    manifest = Manifest.load(engine)
    assert manifest.export_options is None and manifest.tap_layers == [1, 2, 3, 4]
    assert verify_engine(engine).ok


def test_padding_does_not_change_real_tokens(tiny_engine):
    alone = run(tiny_engine, TOKENS[1:, :3], MASK[1:, :3])
    padded = run(tiny_engine)
    for name, value in alone.items():
        assert np.array_equal(value[0], padded[name][1, :3]), name


@pytest.mark.slow  # fast-tier budget: a post-LN export of its own
def test_opt350m_style_post_ln_and_projection_widths(tiny_engine_factory):
    engine = tiny_engine_factory("int8", model="opt-350m", overrides={
        "do_layer_norm_before": False, "word_embed_proj_dim": 32, "num_hidden_layers": 6})
    manifest = Manifest.load(engine)
    assert manifest.config["do_layer_norm_before"] is False
    assert manifest.layer_groups == [2, 1, 1, 1, 1]
    assert [t.hidden for t in manifest.taps] == [64, 64, 64, 64, 32]
    assert manifest.head_hidden == 32
    assert run(engine)["tap4_codes"].shape == (2, 6, 32)
    report = verify_engine(engine)
    assert report.ok, report.table()


@pytest.mark.slow  # fast-tier budget: an export of its own
def test_per_tap_quant_list_and_explicit_taps(tiny_engine_factory):
    engine = tiny_engine_factory("int8,fp16", taps=[2], block_size=32)
    manifest = Manifest.load(engine)
    assert manifest.tap_layers == [2, 4] and manifest.layer_groups == [2, 2]
    assert [t.fmt for t in manifest.taps] == ["int8", "fp16"]
    outputs = run(engine)
    assert outputs["tap0_codes"].dtype == np.uint8 and outputs["tap0_scales"].shape[-1] == 2
    assert outputs["tap1_codes"].dtype == np.float16 and outputs["tap1_codes"].shape[-1] == 64
    assert verify_engine(engine).ok


@pytest.mark.parametrize("weights", [pytest.param("fp16", marks=pytest.mark.slow),
                                     pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_weight_only_quantization_loads_in_ort_and_shrinks_the_file(tiny_engine_factory, tiny_engine, weights):
    engine = tiny_engine_factory(weights=weights)
    manifest = Manifest.load(engine)
    assert manifest.weights == weights and manifest.compute_dtype == "fp32"
    def weight_bytes(folder):  # every engine keeps its weights in backbone.onnx.data beside the graph
        assert Manifest.load(folder).external_data == "backbone.onnx.data"
        return sum((folder / name).stat().st_size for name in ("backbone.onnx", "backbone.onnx.data"))

    assert weight_bytes(engine) < 0.6 * weight_bytes(tiny_engine)
    assert run(engine)["tap3_codes"].shape == (2, 6, 32)
    report = verify_engine(engine)
    assert report.ok, report.table()


def test_fp16_weights_keep_the_embedding_fp16_in_the_session(tiny_engine_factory):
    import onnx

    engine = tiny_engine_factory(weights="fp16")
    graph = onnx.load(str(engine / "backbone.onnx")).graph
    fp16 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in fp16]
    assert gathers, "the embedding table should be read as fp16 by its Gather"
    for g in gathers:  # widened right after the lookup: only the rows read are ever fp32
        assert any(n.op_type == "Cast" and n.input[0] == g.output[0] for n in graph.node)
    assert not any(n.op_type == "Cast" and n.input[0] == g.input[0] for g in gathers for n in graph.node)


def test_fp16_compute(tiny_engine_factory):
    engine = tiny_engine_factory("fp16", dtype="fp16")
    manifest = Manifest.load(engine)
    assert manifest.compute_dtype == "fp16" and manifest.weights == "fp16"
    report = verify_engine(engine)
    assert report.ok, report.table()


def test_checkpoint_folder_round_trip(tmp_path, tokenizer_dir):
    import shutil

    source = resolve_source("opt-125m", random_init=True)
    config = load_config(source)
    apply_overrides(config, {"hidden_size": 32, "num_hidden_layers": 3, "ffn_dim": 64,
                             "num_attention_heads": 2, "word_embed_proj_dim": 32})
    checkpoint = tmp_path / "checkpoint"
    build_model(source, config, seed=7).save_pretrained(checkpoint)
    for f in tokenizer_dir.iterdir():  # a checkpoint that ships its tokenizer needs no --tokenizer
        shutil.copy2(f, checkpoint / f.name)
    out = tmp_path / "engine"
    manifest = export_engine(str(checkpoint), out, quant="fp8", progress=False)
    assert manifest.source == "checkpoint" and manifest.model_id == str(checkpoint.resolve())
    assert manifest.seed is None and manifest.tap_layers == [1, 2, 3]
    report = verify_engine(out)  # reloads the weights from the checkpoint folder
    assert report.ok, report.table()


def test_verify_catches_a_different_model(tiny_engine, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    data = json.loads((engine / "manifest.json").read_text())
    data["seed"] = 1  # the torch reference now has other weights than the graph
    (engine / "manifest.json").write_text(json.dumps(data))
    report = verify_engine(engine)
    assert not report.ok
    assert all(c.engine_err > 0.5 for c in report.checks)


def test_fallback_tokenizer_exports(tmp_path, fallback_tokenizer_dir):
    out = tmp_path / "engine"
    export_engine("opt-125m", out, random_init=True, tokenizer=fallback_tokenizer_dir, progress=False,
                  overrides={"hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 64,
                             "num_attention_heads": 2, "word_embed_proj_dim": 32, "vocab_size": 512},
                  verify=True)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_dynamo_exporter_and_external_data(tmp_path, tokenizer_dir, monkeypatch):
    # Models over 2 GB take this path: the weights file the dynamo exporter streams out is kept
    # and never loaded. A threshold of 0 sends the tiny model down it too.
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "engine"
    manifest = export_engine("opt-125m", out, random_init=True, tokenizer=tokenizer_dir, progress=False,
                             overrides={"hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 64,
                                        "num_attention_heads": 2, "word_embed_proj_dim": 32},
                             quant="int4", exporter="auto")
    assert manifest.exporter["exporter"] == "torch.onnx.export (dynamo)"
    assert manifest.external_data == "backbone.onnx.data"
    assert sorted(p.name for p in out.iterdir()) == ["backbone.onnx", "backbone.onnx.data", "manifest.json",
                                                     "tokenizer"]
    assert "backbone.onnx.data" in manifest.files
    assert run(out)["tap1_codes"].shape == (2, 6, 16)
    report = verify_engine(out)
    assert report.ok, report.table()


def test_engine_tokenizer_matches_the_reference_ids(tiny_engine, tokenizer_dir):
    from tokenizers import Tokenizer

    if not (tokenizer_dir / "vocab.json").is_file():
        pytest.skip("the real OPT tokenizer (../shared/data/tokenizer/opt) is absent")
    tok = Tokenizer.from_file(str(tiny_engine / "tokenizer" / "tokenizer.json"))
    assert tok.encode("A photo of a cat").ids == [2, 250, 1345, 9, 10, 4758]
    assert tok.encode("Hello world").ids == [2, 31414, 232]


def test_streamed_gemm_rewrite_keeps_the_outputs(tiny_engine, tmp_path):
    # The int8/int4 path for weights still on disk (opt-1.3b): Gemm -> MatMul, weights copied
    # and transposed tensor by tensor into one backbone.onnx.data.
    import onnx

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    onnx.save_model(onnx.load(str(tiny_engine / "backbone.onnx")), str(src / "backbone.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                    size_threshold=1024)
    model = onnx.load(str(src / "backbone.onnx"), load_external_data=False)
    transposed = graph.gemm_to_matmul(model, weights_dir=src)
    assert len(transposed) == 8  # fc1 and fc2 of 4 layers
    graph.copy_external_data(model, src, dst, transposed)
    onnx.save_model(model, str(dst / "backbone.onnx"))
    assert not any(n.op_type == "Gemm" for n in model.graph.node)
    assert sorted(p.name for p in dst.iterdir()) == ["backbone.onnx", "backbone.onnx.data"]

    manifest = Manifest.load(tiny_engine)
    feed = {"input_ids": TOKENS, "attention_mask": MASK, manifest.row_input: np.flatnonzero(MASK)}
    before = ort.InferenceSession(str(tiny_engine / "backbone.onnx")).run(None, feed)
    after = ort.InferenceSession(str(dst / "backbone.onnx")).run(None, feed)
    for i, tap in enumerate(manifest.taps):
        a, b = (codec.decode_arrays(o[2 * i], o[2 * i + 1], tap.fmt, tap.hidden, tap.block_size)
                for o in (before, after))
        assert np.sqrt(np.mean((a - b) ** 2) / np.mean(a**2)) < 1e-2


def test_leftovers_of_a_killed_export_are_removed_but_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "engine"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)  # the process has exited: its folders are leftovers
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".engine.partial-{dead_pid}-abc", tmp_path / f".engine.old-{dead_pid}-xyz"]
        kept = [tmp_path / f".engine.partial-{live.pid}-def",  # an export still running
                tmp_path / ".engine.partial-qq",  # not ours to judge
                tmp_path / f".other.partial-{dead_pid}-abc"]  # another engine's
        for path in stale + kept:
            path.mkdir()
            (path / "model.onnx").write_bytes(b"x")
        removed = remove_stale_partials(out)
        assert sorted(removed) == sorted(stale)
        assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


def test_release_weights_frees_what_another_object_still_references():
    source = resolve_source("opt-125m", random_init=True)
    config = load_config(source)
    apply_overrides(config, {"hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 64,
                             "num_attention_heads": 2, "word_embed_proj_dim": 32})
    model = build_model(source, config, seed=0)
    held = list(model.parameters())  # as the dynamo exporter's graph holds them after the export
    assert sum(p.numel() for p in held) > 0
    release_weights(model)
    assert sum(p.numel() for p in held) == 0 and all(b.numel() == 0 for b in model.buffers())
