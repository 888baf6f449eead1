"""The engine's tokenizer as the device runs it: `tokenizers` only, framed by the manifest's rules.

Both the device (edge_runtime) and the exporter's verifier tokenize through this one class, so
an engine is checked on exactly the ids the device will feed it.
"""

from __future__ import annotations

from pathlib import Path

from mobillm.common.errors import BadInput


class TokenizerFilesMissing(BadInput, ValueError):
    """The engine folder has no tokenizer the device can load."""


class EngineTokenizer:
    """Text segments -> ids: each segment's ids without specials, framed by `rules`.

    `rules` is the manifest's `token_rules`: {"bos_id", "bos_each_segment", "eos_id"}. OPT and
    Gemma both put BOS before every segment, so a pair reads BOS a BOS b, as their HF tokenizers do.
    """

    def __init__(self, folder: Path | str, rules: dict):
        from tokenizers import ByteLevelBPETokenizer
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            self._tok.no_padding()
            self._tok.no_truncation()
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            self._tok = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
        else:
            raise TokenizerFilesMissing(f"{folder}: no tokenizer.json or vocab.json+merges.txt; re-export the "
                                        f"engine with --tokenizer")
        self.bos_id = rules.get("bos_id")
        self.bos_each_segment = bool(rules.get("bos_each_segment", True))
        self.eos_id = rules.get("eos_id")

    def encode(self, texts: tuple[str, ...] | list[str]) -> list[int]:
        """Ids of one example (one or more text segments)."""
        ids: list[int] = []
        for k, text in enumerate(texts):
            if self.bos_id is not None and (k == 0 or self.bos_each_segment):
                ids.append(self.bos_id)
            ids += self._tok.encode(text.strip(), add_special_tokens=False).ids  # manifest.TEXT_HYGIENE
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids
