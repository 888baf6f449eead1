"""edge-run bundle: one ONNX graph whose logits equal edge-run predict's, run by Python ONNX Runtime
without the project installed and by onnxruntime-node; bad sides refused with exit 2.

The equality test is the guard on the feed recipe: a change to how predict feeds the side network
(edge_runtime/predict.py SideFeed) that the bundle does not follow fails here."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_side

pytest.importorskip("onnx", exc_type=ModuleNotFoundError)

from mobillm.edge_runtime import cli  # noqa: E402
from mobillm.edge_runtime.bundle import BundleModel  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "bench" / "ci" / "node"
TEXTS = ["a gripping, funny film", "the most boring two hours of my life", "ok",
         "  spaces around and\ta tab  ", "an utterly forgettable, if well-meaning, attempt at a long comedy"]


def predict_logits(engine: Path, side: Path, tmp_path: Path, batch_size: int = 2) -> np.ndarray:
    out = tmp_path / "predict.jsonl"
    assert cli.main(["predict", "--engine", str(engine), "--side", str(side), "--out", str(out), "-q",
                     "--batch-size", str(batch_size), *TEXTS]) == 0
    return np.array([json.loads(line)["logits"] for line in out.read_text().splitlines()], np.float32)


def make_bundle(engine: Path, side: Path, out: Path, *extra: str) -> Path:
    assert cli.main(["bundle", "--engine", str(engine), "--side", str(side), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def last_bundle(tiny_engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    side = write_side(tiny_engine, tmp / "side.onnx", "last")
    return side, make_bundle(tiny_engine, side, tmp / "bundle")


@pytest.mark.parametrize("pooling,mode,ensemble", [("last", "pooled", 1), ("mean", "tokens", 1), ("mean", "summary", 1),
                                                   ("mean", "summary", 3)])
def test_bundle_logits_equal_predict(tiny_engine, tmp_path, pooling, mode, ensemble):
    """... for every readout, and for a side network of 3 averaged members (trainer serve --ensemble)."""
    side = write_side(tiny_engine, tmp_path / "side.onnx", pooling, mode=mode, ensemble=ensemble)
    want = predict_logits(tiny_engine, side, tmp_path)
    model = BundleModel(make_bundle(tiny_engine, side, tmp_path / "bundle"))
    rows = [model.tokenize((t,)) for t in TEXTS]
    batched = model.logits(rows)  # one padded batch, unlike predict's batches of 2
    alone = np.concatenate([model.logits([r]) for r in rows])
    assert np.abs(batched - want).max() < 1e-4 and np.abs(alone - want).max() < 1e-4
    assert np.ptp(want[:, 0]) > 1e-3, "the side network gives every text the same logits: the test would prove little"
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["labels"] == ["negative", "positive"] and meta["task"] == "sst2" and meta["max_length"] == 128
    assert meta["feed"][0] == f"rows:{mode}" and meta["tokenizer"]["strip"] is True


@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(quant="int8", block_size=0), dict(quant="fp16"),
                                     dict(quant="int4", weights="int8")])
def test_bundle_equals_predict_on_other_engines(tiny_engine_factory, tmp_path, variant):
    engine = tiny_engine_factory(**variant)
    side = write_side(engine, tmp_path / "side.onnx", "last")
    # One text per batch: int8 weights' dynamic kernel quantizes activations per tensor, so padding would
    # change every row a little, in predict and in the bundle alike (one text a batch works for every kernel).
    want = predict_logits(engine, side, tmp_path, batch_size=1)
    model = BundleModel(make_bundle(engine, side, tmp_path / "bundle"))
    got = np.concatenate([model.logits([model.tokenize((t,))]) for t in TEXTS])
    assert np.abs(got - want).max() < 1e-4


STANDALONE = r'''
import importlib.util, json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
assert importlib.util.find_spec("mobillm") is None, "the project is importable: the test proves nothing"
folder, texts = sys.argv[1], json.loads(sys.argv[2])
meta = json.load(open(f"{folder}/bundle.json"))
rules = meta["tokenizer"]
tok = Tokenizer.from_file(f"{folder}/{rules['file']}")
rows = []
for text in texts:
    text = text.strip() if rules["strip"] else text
    ids = ([rules["bos_id"]] if rules["bos_id"] is not None else []) + tok.encode(text, add_special_tokens=False).ids
    ids += [rules["eos_id"]] if rules["eos_id"] is not None else []
    rows.append(ids[: meta["max_length"]])
width = max(map(len, rows))
input_ids = np.full((len(rows), width), rules["pad_id"], np.int64)
mask = np.zeros((len(rows), width), np.int64)
for i, r in enumerate(rows):
    input_ids[i, : len(r)], mask[i, : len(r)] = r, 1
session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
logits, probs = session.run(["logits", "probabilities"], {"input_ids": input_ids, "attention_mask": mask})
print(json.dumps({"logits": logits.tolist(), "labels": [meta["labels"][k] for k in probs.argmax(-1)]}))
'''


def test_bundle_runs_in_python_ort_without_the_project(last_bundle, tiny_engine, tmp_path):
    side, bundle = last_bundle
    copy = shutil.copytree(bundle, tmp_path / "moved")  # nothing outside the folder is needed
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    env = {"PYTHONPATH": os.pathsep.join(deps), "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-S", "-s", "-c", STANDALONE, str(copy), json.dumps(TEXTS)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = predict_logits(tiny_engine, side, tmp_path)
    assert np.abs(np.array(got["logits"]) - want).max() < 1e-4
    assert got["labels"] == [["negative", "positive"][k] for k in want.argmax(-1)]


def node_modules() -> Path:
    """bench/ci/node's onnxruntime-node, installed from its lock file on first use. Node and npm are test
    requirements (.ci/run): their absence fails this test, it does not skip it."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is not installed: the bundle's Node.js check cannot run (install Node 20+)"
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"npm ci in {NODE_DIR} failed:\n{proc.stderr[-2000:]}"
    return NODE_DIR / "node_modules"


def test_bundle_runs_in_node(last_bundle, tiny_engine, tmp_path):
    node_modules()
    side, bundle = last_bundle
    model = BundleModel(bundle)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([model.tokenize((t,)).tolist() for t in TEXTS]))
    proc = subprocess.run(["node", str(NODE_DIR / "run_bundle.mjs"), str(bundle), str(ids)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = predict_logits(tiny_engine, side, tmp_path)
    assert np.abs(np.array(got["logits"]) - want).max() < 1e-4
    probs = np.array(got["probabilities"])
    assert np.allclose(probs.sum(-1), 1, atol=1e-5) and (probs.argmax(-1) == want.argmax(-1)).all()


def test_side_for_another_engine_or_task_is_refused(tiny_engine_factory, tiny_engine, tmp_path, capsys):
    other = tiny_engine_factory(quant="int8")  # same widths, another engine
    side = write_side(other, tmp_path / "side.onnx", "last")
    for argv in (["bundle", "--engine", str(tiny_engine), "--side", str(side), "--out", str(tmp_path / "b")],
                 ["predict", "--engine", str(tiny_engine), "--side", str(side), "hi"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "trained for engine" in err and str(other) in err and str(tiny_engine) in err, err
    side = write_side(tiny_engine, tmp_path / "prep.onnx", "last")
    meta = json.loads(side.with_suffix(".json").read_text())
    side.with_suffix(".json").write_text(json.dumps({**meta, "preparation": {**meta["preparation"], "tap_norm": "x"}}))
    assert cli.main(["bundle", "--engine", str(tiny_engine), "--side", str(side), "--out", str(tmp_path / "b")]) == 2
    assert "trained on taps prepared as" in capsys.readouterr().err
    side = write_side(tiny_engine, tmp_path / "cola.onnx", "last", task="cola")
    assert cli.main(["predict", "--engine", str(tiny_engine), "--side", str(side), "--task", "sst2", "hi"]) == 2
    err = capsys.readouterr().err
    assert "trained for task cola, not sst2" in err
    assert not (tmp_path / "b").exists()


def test_regression_bundle_has_logits_only(tiny_engine, tmp_path):
    side = write_side(tiny_engine, tmp_path / "side.onnx", "last", task="stsb", out_dim=1)
    bundle = make_bundle(tiny_engine, side, tmp_path / "bundle")
    model = BundleModel(bundle)
    assert [o.name for o in model.session.get_outputs()] == ["logits"]
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["kind"] == "regression" and meta["labels"] == [] and meta["tokenizer"]["segments"] == 2
