"""A small byte-level BPE tokenizer in OPT's style, for machines without the OPT tokenizer files.

    python -m mobillm.export.fallback_tokenizer OUT_DIR [TEXT_FILE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build_fallback_tokenizer(folder: Path | str, texts: list[str] | None = None, vocab_size: int = 400) -> Path:
    """Train a tiny BPE (BOS '</s>' = 2, pad '<pad>' = 1, as OPT) on `texts`; save it in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = texts or ["A photo of a cat sitting on a warm windowsill.", "Hello world", "The quick brown fox jumps."]
    tok.train_from_iterator(texts * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python -m mobillm.export.fallback_tokenizer OUT_DIR [TEXT_FILE]`, under the error policy (exit 2, one line)."""
    from mobillm.common.errors import BadInput, run_command
    from mobillm.common.options import Parser

    p = Parser(prog="python -m mobillm.export.fallback_tokenizer",
               description="Train a tiny OPT-style BPE tokenizer and save it in OUT_DIR.")
    p.add_argument("out", type=Path, help="folder to write tokenizer.json and tokenizer_config.json into")
    p.add_argument("texts", type=Path, nargs="?", help="text file to train on, one text a line (default: built-in)")
    args = p.parse_args(argv)

    def build() -> None:
        try:
            lines = args.texts.read_text().splitlines() if args.texts else None
            build_fallback_tokenizer(args.out, lines)
        except OSError as exc:
            raise BadInput(f"{exc.filename or args.out}: {exc.strerror or exc}") from None

    return run_command(p.prog, build)


if __name__ == "__main__":
    sys.exit(main())
