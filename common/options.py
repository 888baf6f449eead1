"""Command-line flags derived from config dataclasses, so each option is declared once.

A field becomes a flag when it is declared with `option(...)`: its name, default, type, choices
and help live on the field, and `add_options` / `from_args` are the only code between argparse
and the dataclass:

    @dataclass(frozen=True)
    class Opts:
        epochs: int = option(1, "passes over the data")
        bits: str = option("engine", "formats on the wire", choices=("engine", "auto"))

    add_options(parser, Opts)            # --epochs, --bits, with defaults and help
    opts = from_args(Opts, args)         # Opts(epochs=args.epochs, bits=args.bits)

Types come from the annotations: bool → a switch (`--x` when the default is False,
`--x/--no-x` otherwise), `T | None` → T with a None default, `list[int]` → "8,4,4",
`tuple[str, ...]` → "a,b". A field without a default is a required flag. The value rules
(`choices`, `min`, `max`, `check`) are those of `common/schema.py`, checked by `schema.check`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn

from mobillm.common import schema
from mobillm.common.errors import BAD_INPUT, BadInput

_META = "mobillm.option"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: typing.Sequence | None = None, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, cli: bool = True, default_factory: Any = dataclasses.MISSING,
           min: float | None = None, max: float | None = None, check: Callable[[Any], str | None] | None = None):
    """A dataclass field that is also a command-line flag (`cli=False`: a field documented the same way
    but set by code, not by a flag). `choices`, `min`, `max` and `check` are its `schema.rule`s:
    `schema.check` enforces them on the instance, argparse shows (and checks) the choices."""
    meta = {_META: {"help": help, "flag": flag, "metavar": metavar, "parse": parse, "cli": cli}}
    return schema.rule(default, choices=choices, min=min, max=max, check=check, default_factory=default_factory,
                       metadata=meta)


def option_fields(cls) -> list[tuple[dataclasses.Field, dict, Any]]:
    """(field, option metadata with its choices, resolved type) for every `option(...)` field of `cls`
    that is a flag."""
    hints = typing.get_type_hints(cls)
    return [(f, {**f.metadata[_META], "choices": schema.rules_of(f)["choices"]}, hints[f.name])
            for f in dataclasses.fields(cls) if _META in f.metadata and f.metadata[_META]["cli"]]


class Parser(argparse.ArgumentParser):
    """argparse under the one error policy (common/errors.py): a usage error is one line on stderr,
    `PROG: error: MESSAGE; see PROG --help`, and exit status 2, without the usage block. Every
    mobillm command parses with it; its subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(BAD_INPUT)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` that shows every flag's default as "(default: X)"; a flag whose default is None says
    in its own help what None means ("(default: all cores)"), and its help is shown as written."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def all_but(cls, *names: str) -> list[str]:
    """The `skip` list that keeps only `names` of `cls`'s flags (a command that needs a few of them)."""
    return [f.name for f, _meta, _tp in option_fields(cls) if f.name not in names]


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _csv_parser(item: type, container: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            return container(item(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {item.__name__} values") from None
    return parse


def _parser_for(tp) -> Callable[[str], Any] | None:
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        return _csv_parser(item, origin)
    return tp if tp in (int, float, str) else None


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_options(parser, cls, *, prefix: str = "", skip: typing.Iterable[str] = (),
                defaults: dict | None = None) -> None:
    """Add one flag per `option` field of `cls` to `parser` (a parser or an argument group).

    `prefix` namespaces both the flag and the dest (`prefix="fed"`: --fed-slots → args.fed_slots);
    `defaults` overrides shown/used defaults (e.g. a template instance's values)."""
    skip = set(skip)
    for f, meta, tp in option_fields(cls):
        if f.name in skip:
            continue
        name = meta["flag"] or f.name.replace("_", "-")
        flag = f"--{prefix}-{name}" if prefix else f"--{name}"
        dest = f"{prefix}_{f.name}" if prefix else f.name
        default = (defaults or {}).get(f.name, _default(f))
        kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": meta["help"]}
        if _required(f) and f.name not in (defaults or {}):
            # SUPPRESS: help shows no "(default: None)" for a flag that must be given.
            kwargs.update(required=True, default=argparse.SUPPRESS)
        if _strip_optional(tp) is bool:
            kwargs["action"] = "store_true" if not default else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["parse"] or _parser_for(tp)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"] or not meta["choices"]:
                # Named after the flag, not the field: --queue QUEUE, not --queue QUEUE_SIZE.
                kwargs["metavar"] = meta["metavar"] or name.upper().replace("-", "_")
        parser.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, *, prefix: str = "", skip: typing.Iterable[str] = (), **extra):
    """An instance of `cls` from the flags `add_options` added (same prefix/skip) plus `extra` fields."""
    skip = set(skip)
    values = {}
    for f, _meta, _tp in option_fields(cls):
        dest = f"{prefix}_{f.name}" if prefix else f.name
        if f.name not in skip and hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    values.update(extra)
    return cls(**values)


def read_token_file(path: Path | str, flag: str = "--token-file") -> str:
    """The bearer token held in the file a flag names, stripped; BadInput if it is missing or empty
    (an empty token would silently turn authentication off)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise BadInput(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if not token:
        raise BadInput(f"{flag} {path} is empty")
    return token
