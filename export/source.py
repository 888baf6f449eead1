"""Where an export's model comes from, and its tokenizer.

`resolve_source` maps a short name, GGUF, Hugging Face id or checkpoint folder to a `Source`
(cheap, no download); `prepare_source` converts a GGUF once; `load_config` + `apply_overrides`
give the config with --set applied; `build_model` the torch decoder. The tokenizer is loaded from
--tokenizer or beside the weights and copied into the engine; `token_rules` is how the device
frames a row. `verify` rebuilds its torch reference through the same functions.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import families
from . import gguf as gguf_source
from .options import ExportError

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")


@dataclass
class Source:
    """Where the config and weights come from."""

    kind: str  # "hub" | "checkpoint" | "gguf" | "random-init"
    model_id: str  # Hugging Face id or absolute checkpoint folder (gguf: the converted checkpoint's folder)
    config_path: Path | None = None  # random-init: the config file to start from
    gguf: "gguf_source.GGUFSource | None" = None  # gguf: the file the checkpoint is converted from

    @property
    def local_dir(self) -> Path | None:
        path = Path(self.model_id)
        return path if path.is_absolute() and path.is_dir() else None


_HF_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", re.ASCII)  # org/name, checked whole (fullmatch)


def resolve_source(model: str, random_init: bool) -> Source:
    """Map a short name, GGUF, Hugging Face id or checkpoint folder to a Source; ExportError if none fits.

    A GGUF is only described here (header, architecture, size); `prepare_source` converts it."""
    shorts = families.SHORT_NAMES
    kind = "random-init" if random_init else None
    shipped = resources.files("mobillm.export.configs") / f"{model}.json"
    if random_init and (model in shorts or model in families.GGUF_SHORT_NAMES) and shipped.is_file():
        return Source("random-init", shorts.get(model, model), Path(str(shipped)))
    if model in shorts:
        return Source("hub", shorts[model])
    if gguf_source.is_gguf_name(model):
        if random_init:
            raise ExportError(f"{model}: --random-init takes a short name or a checkpoint folder, not a GGUF file")
        src = gguf_source.resolve(model)  # GGUFError is an ExportError
        return Source("gguf", str(gguf_source.checkpoint_dir(src)), gguf=src)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{model}: checkpoint folder has no config.json; point at the folder written by "
                              f"save_pretrained()")
        path = path.resolve()
        return Source(kind or "checkpoint", str(path), path / "config.json" if random_init else None)
    if _HF_ID.fullmatch(model) and not path.exists():
        return Source(kind or "hub", model)
    names = [*shorts, *families.GGUF_SHORT_NAMES]
    raise ExportError(f"unknown model {model!r}; use one of {', '.join(names)}, a .gguf file, a Hugging Face id "
                      f"(org/name) or a checkpoint folder with config.json")


def prepare_source(source: Source, progress: bool) -> None:
    """Convert a GGUF into its cached checkpoint folder (once; later calls return at once)."""
    if source.gguf is None:
        return
    if progress and source.gguf.licence is not None:
        print(f"{source.gguf.short_name}: licensed under the terms in {source.gguf.licence}", file=sys.stderr)
    gguf_source.materialize(source.gguf, progress)


def load_config(source: Source):
    """The transformers config of `source` (its family must have a table entry)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        if source.config_path is not None:
            data = json.loads(Path(source.config_path).read_text())
            config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
        else:
            config = AutoConfig.from_pretrained(source.model_id)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load the config of {source.model_id} ({_first_line(exc)}); no network here: "
                          f"pass a checkpoint folder, or a short name with --random-init") from None
    try:
        families.family_for(config.model_type)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return config


def config_from_dict(data: dict):
    """Rebuild a transformers config from the dict a manifest stores."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[data["model_type"]].from_dict(dict(data))


def apply_overrides(config, overrides: dict) -> dict:
    """Set each key=value on config, typed like the current value; return the typed overrides."""
    known = config.to_dict()
    typed = {}
    for key, value in overrides.items():
        if key not in known:
            close = [k for k in known if key.lower() in k.lower() or k.lower() in key.lower()]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ExportError(f"--set {key}: no such config field{hint}; see the model's config.json for valid keys")
        typed[key] = _typed_value(key, value, known[key])
        setattr(config, key, typed[key])
    return typed


def _typed_value(key: str, value, current):
    if not isinstance(value, str):
        return value
    try:
        if isinstance(current, bool):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, str):
            return value
        return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        if current is None:
            return value
        raise ExportError(f"--set {key}={value}: expected a {type(current).__name__} "
                          f"like the current value {current!r}") from None


def model_from_manifest(manifest, dtype: str = "fp32"):
    """The torch model an engine was exported from, rebuilt from its manifest: random init from its
    seed, a checkpoint from its folder, a GGUF from the file's cached conversion (converted again
    if the cache is gone)."""
    config = config_from_dict(manifest.config)
    source = Source(manifest.source, manifest.model_id)
    if manifest.gguf:
        source.gguf = gguf_source.describe(Path(manifest.gguf["file"]), manifest.gguf.get("short_name"))
        source.model_id = str(gguf_source.checkpoint_dir(source.gguf))
        prepare_source(source, progress=False)
    return build_model(source, config, manifest.seed, dtype)


def build_model(source: Source, config, seed: int | None, dtype: str = "fp32"):
    """The base decoder (`AutoModel`, no LM head) in eval mode, eager attention, in `dtype`."""
    import torch
    from transformers import AutoModel

    try:
        if source.kind == "random-init":
            torch.manual_seed(0 if seed is None else seed)
            model = AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32)
        else:
            model = AutoModel.from_pretrained(source.model_id, config=config, attn_implementation="eager",
                                              dtype=torch.float32)
    except OSError as exc:
        raise ExportError(f"cannot load weights of {source.model_id} ({_first_line(exc)}); no network here: "
                          f"pass a checkpoint folder, or --random-init") from None
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"cannot build {source.model_id} from its config ({_first_line(exc)}); "
                          f"check --set values") from exc
    model = model.to(torch.float16 if dtype == "fp16" else torch.float32)
    return model.eval()


def release_weights(model) -> None:
    """Free the storage of every parameter and buffer of `model`, once its weights are on disk.

    The dynamo exporter's graph still references the Parameters after the export returns (found
    with gc.get_referrers), so `del model` alone kept ~5.5 GB of opt-1.3b through the int4/int8
    quantizer, which then passed 12 GB. Emptying each tensor frees it whoever holds it."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(source: Source, tokenizer: Path | None):
    """(transformers tokenizer, folder or hub id it came from); ExportError when there is none."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        where = Path(tokenizer).expanduser()
        if not where.is_dir() or not any((where / f).is_file() for f in TOKENIZER_FILES):
            raise ExportError(f"--tokenizer {tokenizer}: not a folder with tokenizer files "
                              f"(tokenizer.json, or vocab.json + merges.txt)")
    elif source.local_dir is not None and any((source.local_dir / f).is_file() for f in TOKENIZER_FILES):
        where = source.local_dir
    else:
        where = source.model_id
    try:
        return AutoTokenizer.from_pretrained(str(where)), where
    except (OSError, ValueError) as exc:
        raise ExportError(f"no tokenizer for {source.model_id} ({_first_line(exc)}); pass --tokenizer DIR, "
                          f"e.g. --tokenizer ../shared/data/tokenizer/opt") from None


def install_tokenizer(tok, where, dest: Path) -> None:
    """Copy the tokenizer's files into dest, and add tokenizer.json (what the device loads) if missing."""
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(where, Path):
        for name in TOKENIZER_FILES:
            if (where / name).is_file():
                shutil.copy2(where / name, dest / name)
    else:
        tok.save_pretrained(str(dest))
    if not (dest / "tokenizer.json").is_file():
        tok.backend_tokenizer.save(str(dest / "tokenizer.json"))



def token_rules(family, tok, config) -> dict:
    """The family's tokenizer rules with this tokenizer's ids, as the device applies them."""
    rules = family.tokens
    bos = tok.bos_token_id if tok.bos_token_id is not None else config.bos_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else config.eos_token_id
    return {"bos_id": int(bos) if rules.bos and bos is not None else None,
            "bos_each_segment": rules.bos_each_segment,
            "eos_id": int(eos) if rules.eos and eos is not None else None}

