"""Why the readout and the tap conditioning matter on the real Gemma 3 270M: a probe study.

    python -m mobillm.bench.micro.tap_conditioning --train-rows 1500 --holdout-rows 500 --out docs/runs/tap_conditioning.json

For the first rows of SST-2's train file (never the dev set) it takes each tap the way the engine
does (export/tapped.py `prepare_tap`: per-token RMS, then with `--tap-norm channel` per-channel
standardization by statistics of the first `--calibration-rows` rows) and reports, per tap:
- the share of values that nf4 (block 32, the engine's default) decodes to exactly zero at the last
  token, without and with channel conditioning (the zeroing the issue measured at 32-69 %);
- a linear probe's accuracy on held-out train rows (logistic regression, trained on the first
  `--train-rows`, scored on the next `--holdout-rows`), fed: the fp32 last-token tap, the nf4 wire
  tap as today (rms), the nf4 wire tap after channel conditioning, and the conditioned last-token
  row with the conditioned masked-mean (summary) row beside it.
Texts are stripped (manifest.TEXT_HYGIENE) except in the `raw text` column, which keeps GLUE's
trailing space (the lone "▁" that used to be every row's last token).
Exits non-zero when a row it was asked for could not be measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mobillm.bench.paths import GLUE, ROOT

SST2 = GLUE / "SST-2"


def load_rows(n: int) -> tuple[list[str], np.ndarray]:
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:n + 1]
    texts, labels = zip(*(line.rsplit("\t", 1) for line in lines))
    return list(texts), np.array([int(y) for y in labels])


def tap_arrays(model, family, layers, tok, texts, strip: bool, batch: int = 16, max_len: int = 64):
    """Per tap: (last-token rows [N, H], masked-mean rows [N, H]) of the rms-normalized taps, fp32."""
    import torch

    from mobillm.export.tapped import TappedDecoder

    wrapper = TappedDecoder(model, family, layers, torch.float32, "rms", summary_row=True).eval()
    last = [[] for _ in layers]
    mean = [[] for _ in layers]
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        # EngineTokenizer strips; the raw-text column bypasses it to show what the trailing space did.
        rows = [tok.encode((t,))[:max_len] if strip else _raw_ids(tok, t)[:max_len] for t in chunk]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        lengths = mask.sum(1)
        with torch.no_grad():
            for k, tap in enumerate(wrapper(ids, mask)):
                last[k].append(tap[torch.arange(len(rows)), lengths - 1].numpy())
                mean[k].append(tap[:, width].numpy())
    return [(np.concatenate(a), np.concatenate(b)) for a, b in zip(last, mean)]


def _raw_ids(tok, text: str) -> list[int]:
    ids = [tok.bos_id] if tok.bos_id is not None else []
    return ids + tok._tok.encode(text, add_special_tokens=False).ids


def nf4(x: np.ndarray) -> np.ndarray:
    from mobillm.kernels import codec

    enc = codec.encode(x.astype(np.float32), "nf4", 32)
    return codec.decode_arrays(enc.codes, enc.scales, "nf4", x.shape[-1], 32)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy of an L2-regularized logistic regression on standardized features (torch LBFGS)."""
    import torch

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = torch.from_numpy((train_x - mu) / sd).float()
    xte = torch.from_numpy((test_x - mu) / sd).float()
    ytr = torch.from_numpy(train_y).long()
    torch.manual_seed(seed)
    lin = torch.nn.Linear(xtr.shape[1], 2)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + 1e-2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(1).numpy() == test_y).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-rows", type=int, default=1500)
    p.add_argument("--holdout-rows", type=int, default=500)
    p.add_argument("--calibration-rows", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "runs" / "tap_conditioning.json")
    a = p.parse_args(argv)

    import torch

    from mobillm.common.tokenize import EngineTokenizer
    from mobillm.export.options import ExportOptions
    from mobillm.export.pipeline import make_plan
    from mobillm.export.source import build_model, install_tokenizer, token_rules

    torch.set_num_threads(a.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(ExportOptions(model="gemma-3-270m", out=Path(tmp) / "unused", tap_norm="rms", progress=False))
        model = build_model(plan.source, plan.config, 0, "fp32").eval()
        install_tokenizer(plan.tokenizer, plan.tokenizer_from, Path(tmp) / "tok")
        tok = EngineTokenizer(Path(tmp) / "tok", token_rules(plan.family, plan.tokenizer, plan.config))
        layers = plan.options.tap_layers
        texts, labels = load_rows(a.train_rows + a.holdout_rows)
        taps = tap_arrays(model, plan.family, layers, tok, texts, strip=True)
        raw = tap_arrays(model, plan.family, layers, tok, texts, strip=False)
    n, c = a.train_rows, a.calibration_rows
    ytr, yte = labels[:n], labels[n:]
    rows = []
    for k, (layer, (last, mean), (raw_last, _)) in enumerate(zip(layers, taps, raw)):
        mu, sd = last[:c].mean(0), last[:c].std(0)
        sd = np.maximum(sd, np.median(sd) * 1e-3 + 1e-6)
        mmu, msd = mean[:c].mean(0), mean[:c].std(0)
        msd = np.maximum(msd, np.median(msd) * 1e-3 + 1e-6)
        wire_rms, wire_channel = nf4(last), nf4((last - mu) / sd)
        wire_mean = nf4((mean - mmu) / msd)
        row = {"tap": k, "layer": layer,
               "zeros_rms": float((wire_rms == 0).mean()), "zeros_channel": float((wire_channel == 0).mean()),
               "probe_fp32_raw_text": probe(raw_last[:n], ytr, raw_last[n:], yte),
               "probe_fp32": probe(last[:n], ytr, last[n:], yte),
               "probe_wire_rms": probe(wire_rms[:n], ytr, wire_rms[n:], yte),
               "probe_wire_channel": probe(wire_channel[:n], ytr, wire_channel[n:], yte),
               "probe_wire_channel_summary": probe(np.hstack([wire_channel, wire_mean])[:n], ytr,
                                                   np.hstack([wire_channel, wire_mean])[n:], yte)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["zeros_rms", "zeros_channel", "probe_fp32_raw_text", "probe_fp32", "probe_wire_rms", "probe_wire_channel",
            "probe_wire_channel_summary"]
    print("\n| tap (layer) | nf4 zeros, rms | nf4 zeros, channel | probe: fp32, raw text | fp32 | nf4 rms (today) | "
          "nf4 channel | nf4 channel + summary row |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tap']} ({r['layer']}) | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": " ".join(sys.argv), "train_rows": n, "holdout_rows": a.holdout_rows,
                                 "calibration_rows": c, "seconds": time.time() - t0, "taps": rows}, indent=1))
    missing = [r["tap"] for r in rows if any(not np.isfinite(r[c]) for c in cols)]
    if len(rows) != len(layers) or missing:
        print(f"tap_conditioning: rows not measured: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
