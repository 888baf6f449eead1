"""From wire batches to training tensors, and the on-disk cache of quantized taps.

`Rows` is the unit both the stream and the cache produce: the quantized rows the model needs
(one per sample for last-token pooling, every token for mean pooling), still in wire format.
Dequantization happens once, on the training device, through `mobillm.kernels.torch_codec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mobillm.common import wire
from mobillm.kernels import codec, torch_codec

from mobillm.common.taps import TapSpec

from .protocol import last_token_rows


@dataclass
class Rows:
    """Quantized rows for one training step. Sample i owns lengths[i] consecutive rows in each tap."""

    sample_ids: np.ndarray  # uint64 [n]
    labels: np.ndarray  # int64 or float32 [n]
    lengths: np.ndarray  # int64 [n]; all 1 for last-token pooling
    codes: list[np.ndarray]  # per tap [rows, code width] (uint8; fp16 format: float16)
    scales: list[np.ndarray]  # per tap fp16 [rows, n_blocks]
    fmts: list[str]  # per tap: the format these rows arrived in (it may change batch to batch)

    def __len__(self) -> int:
        return len(self.sample_ids)


def rows_for_model(batch: wire.Batch, pooling: str) -> Rows:
    """The rows the head reads. With last-token pooling only each sample's last token is kept,
    so a `tokens` batch, a `summary` batch and the `pooled` batch of the same samples yield identical Rows."""
    lengths = batch.lengths.astype(np.int64)
    if pooling == "last":
        # A summary sample's rows are (last token, tokens' mean): a last-token head reads the first.
        pick = last_token_rows(lengths) - (1 if batch.mode == "summary" else 0)
        codes = [np.ascontiguousarray(t.codes[pick]) for t in batch.taps]
        scales = [np.ascontiguousarray(t.scales[pick]) for t in batch.taps]
        lengths = np.ones_like(lengths)
    else:
        codes = [np.array(t.codes) for t in batch.taps]
        scales = [np.array(t.scales) for t in batch.taps]
    return Rows(batch.sample_ids.copy(), batch.labels.copy(), lengths, codes, scales, [t.fmt for t in batch.taps])


DECODE_CHUNK = 1 << 20  # tap values dequantized at once: bounds the decoder's int64/fp32 temporaries (~40 MB)


def decode_rows(rows: Rows, taps: list[TapSpec], device: torch.device) -> list[torch.Tensor]:
    """fp32 [rows, hidden] per tap, dequantized on `device` (codes travel there still packed).

    Each tap is decoded a few rows at a time into its preallocated output, so the peak is the
    output plus one chunk's temporaries, not ~3x the output (the server's memory budget counts it)."""
    out = []
    for info, fmt, codes, scales in zip(taps, rows.fmts, rows.codes, rows.scales):
        n = len(codes)
        step = max(1, DECODE_CHUNK // max(info.hidden, 1))
        if n <= step:
            c, s = torch.from_numpy(codes).to(device), torch.from_numpy(scales).to(device)
            out.append(torch_codec.decode(c, s, fmt, info.hidden, info.block_size))
            continue
        buf = torch.empty((n, info.hidden), dtype=torch.float32, device=device)
        for i in range(0, n, step):
            c = torch.from_numpy(codes[i:i + step]).to(device)
            s = torch.from_numpy(scales[i:i + step]).to(device)
            buf[i:i + step] = torch_codec.decode(c, s, fmt, info.hidden, info.block_size)
        out.append(buf)
    return out


class TapCache:
    """Every sample's quantized rows from the first epoch, on disk, keyed by sample id.

    Rows are appended to one raw file per tap (codes and scales); the index (sample id, label,
    first row, row count) lives in memory and in every checkpoint, so a resumed run truncates
    the files back to the rows its checkpoint knew. Reads go through read-only numpy memmaps.
    Each tap's rows must arrive in one format (the tap's `fmt`): fixed-width records.
    """

    def __init__(self, folder: Path, taps: list[TapSpec], label_dtype: np.dtype, state: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.taps = taps
        self.code_width = [codec.code_bytes(t.fmt, t.hidden) for t in taps]
        self.n_scales = [0 if t.fmt == "fp16" else codec.n_blocks(t.hidden, t.block_size) for t in taps]
        self.sample_ids: list[int] = []
        self.labels: list = []
        self.first_row: list[int] = []
        self.row_count: list[int] = []
        self.rows = 0
        self.label_dtype = np.dtype(label_dtype)
        if state is not None:
            self.sample_ids = [int(x) for x in state["sample_ids"]]
            self.labels = list(np.asarray(state["labels"]).astype(self.label_dtype))
            self.first_row = [int(x) for x in state["first_row"]]
            self.row_count = [int(x) for x in state["row_count"]]
            self.rows = int(state["rows"])
        for i in range(len(taps)):
            for kind, width in (("codes", self.code_width[i]), ("scales", 2 * self.n_scales[i])):
                path = self._path(i, kind)
                with open(path, "ab") as f:  # create, then cut back to what the index covers
                    f.truncate(self.rows * width)
        self._files = [(open(self._path(i, "codes"), "ab"), open(self._path(i, "scales"), "ab"))
                       for i in range(len(taps))]
        self._maps: list | None = None

    def _path(self, i: int, kind: str) -> Path:
        return self.folder / f"tap{i}.{kind}"

    def __len__(self) -> int:
        return len(self.sample_ids)

    def append(self, rows: Rows) -> None:
        for tap, fmt in zip(self.taps, rows.fmts):
            if fmt != tap.fmt:
                raise ValueError(f"cache holds {tap.fmt} rows for this tap, got {fmt}")
        for (fc, fs), codes, scales in zip(self._files, rows.codes, rows.scales):
            fc.write(np.ascontiguousarray(codes).tobytes())
            fs.write(np.ascontiguousarray(scales, dtype="<f2").tobytes())
        for sid, label, n in zip(rows.sample_ids, rows.labels, rows.lengths):
            self.sample_ids.append(int(sid))
            self.labels.append(label)
            self.first_row.append(self.rows)
            self.row_count.append(int(n))
            self.rows += int(n)
        self._maps = None

    def flush(self) -> None:
        for fc, fs in self._files:
            fc.flush()
            fs.flush()

    def state(self) -> dict:
        """The index as tensors, for the checkpoint."""
        self.flush()
        return {"sample_ids": torch.tensor(self.sample_ids, dtype=torch.int64),
                "labels": torch.from_numpy(np.asarray(self.labels, dtype=self.label_dtype).reshape(-1)),
                "first_row": torch.tensor(self.first_row, dtype=torch.int64),
                "row_count": torch.tensor(self.row_count, dtype=torch.int64), "rows": self.rows}

    def _memmaps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._maps is None:
            self.flush()
            maps = []
            for i, t in enumerate(self.taps):
                dtype = np.dtype("<f2") if t.fmt == "fp16" else np.uint8
                per_row = t.hidden if t.fmt == "fp16" else self.code_width[i]
                codes = (np.memmap(self._path(i, "codes"), dtype=dtype, mode="r", shape=(self.rows, per_row))
                         if self.rows else np.zeros((0, per_row), dtype))
                scales = (np.memmap(self._path(i, "scales"), dtype="<f2", mode="r", shape=(self.rows, self.n_scales[i]))
                          if self.rows and self.n_scales[i] else np.zeros((self.rows, self.n_scales[i]), "<f2"))
                maps.append((codes, scales))
            self._maps = maps
        return self._maps

    def gather(self, entries: np.ndarray) -> Rows:
        """Rows of the cache entries `entries` (positions in the index), in that order."""
        first = np.asarray(self.first_row, dtype=np.int64)[entries]
        count = np.asarray(self.row_count, dtype=np.int64)[entries]
        pick = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count)])
        maps = self._memmaps()
        return Rows(np.asarray(self.sample_ids, dtype=np.uint64)[entries],
                    np.asarray(self.labels, dtype=self.label_dtype)[entries], count,
                    [np.ascontiguousarray(c[pick]) for c, _ in maps],
                    [np.ascontiguousarray(s[pick]) for _, s in maps], [t.fmt for t in self.taps])

    def close(self) -> None:
        for fc, fs in self._files:
            fc.close()
            fs.close()
        self._maps = None
