"""Command-line flags generated from config dataclasses, so the CLI stays a thin map onto the configs.

Every field ``name`` of a dataclass becomes ``--{prefix}{name}`` (underscores as dashes) with the
field's type; booleans get ``--flag/--no-flag``; optional numbers accept ``none``. Unset flags are
``None`` and leave the config's (or the preset's) value alone.

Example:
    >>> import argparse
    >>> from inference.map import TrainConfig
    >>> parser = argparse.ArgumentParser()
    >>> add_dataclass_flags(parser, TrainConfig, "Training")
    >>> set_fields(parser.parse_args(["--lambda-m", "0.02", "--no-amp"]), TrainConfig)
    {'lambda_m': 0.02, 'amp': False}
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def _parser_for(kind: Any) -> tuple[Any, dict[str, Any]]:
    """``(type converter, extra add_argument kwargs)`` for a field annotation."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        convert, extra = _parser_for(inner)
        return (lambda text: None if text.lower() == "none" else convert(text)), {**extra, "metavar": "X|none"}
    if typing.get_origin(kind) is Literal:
        return str, {"choices": list(args)}
    if kind is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return kind, {}


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, title: str, prefix: str = "", skip: tuple[str, ...] = ()
) -> None:
    """Add one flag per field of ``cls`` (except ``skip``), in an argument group ``title``."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        convert, extra = _parser_for(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"default": None, "dest": prefix + f.name, "help": f"(default: {default})", **extra}
        if convert is not None:
            kwargs["type"] = convert
        group.add_argument("--" + (prefix + f.name).replace("_", "-"), **kwargs)


def set_fields(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (flags left unset are omitted)."""
    given = {f.name: getattr(args, prefix + f.name, None) for f in dataclasses.fields(cls)}
    return {name: value for name, value in given.items() if value is not None}
