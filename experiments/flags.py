"""Command-line flags: those generated from config dataclasses, and the ones every command shares, defined once.

Every field ``name`` of a dataclass becomes ``--{prefix}{name}`` (underscores as dashes) with the
field's type; booleans get ``--flag/--no-flag``; optional numbers accept ``none``. Unset flags are
``None`` and leave the config's (or the preset's) value alone; the dataclass checks the values.

The shared flags (``--out``, ``--device``, ``--seed``, ``--no-progress``, the noise draws) come from the
``add_*_flag`` helpers; numeric flags take the converters below (``positive_int``, ``finite_float``, ...),
which refuse NaN, infinities and out-of-range values while the command line is parsed, before any work.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from inference.map.config import number_problem

from .evaluation import NOISE_DRAWS, NOISE_SEED


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


def _number(kind: type, name: str, **bounds: Any) -> Callable[[str], Any]:
    """An argparse ``type`` reading a ``kind`` and refusing what :func:`number_problem` refuses."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        problem = number_problem(value, integer=kind is int, **bounds)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    convert.__name__ = name
    return convert


finite_float = _number(float, "finite_float")
positive_float = _number(float, "positive_float", low=0, low_open=True)
nonnegative_float = _number(float, "nonnegative_float", low=0)
positive_int = _number(int, "positive_int", low=1)
nonnegative_int = _number(int, "nonnegative_int", low=0)


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type`` reading a finite float in ``[low, high]``."""
    return _number(float, "float_in", low=low, high=high)


def nonempty_path(text: str) -> Path:
    """An argparse ``type`` reading a path; an empty one (which would mean the current directory) is refused."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty: give a directory (use '.' for the current one)")
    return Path(text)


def add_out_flag(parser: argparse.ArgumentParser, default: Path | None, help: str = "output directory") -> None:
    """``--out``: where a command writes its results."""
    parser.add_argument("--out", type=Path, default=default, help=f"{help} (default: {default})")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    """``--device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")


def add_seed_flag(parser: argparse.ArgumentParser, help: str = "random seed", flag: str = "--seed",
                  default: int = 0) -> None:
    """A non-negative integer seed flag (``--seed`` unless ``flag`` names another)."""
    parser.add_argument(flag, type=nonnegative_int, default=default, help=f"{help} (default {default})")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_noise_draw_flags(parser: argparse.ArgumentParser, seed_flag: str) -> None:
    """``--draws`` and the noise seed (``seed_flag``), with the defaults every noise measurement shares."""
    parser.add_argument("--draws", type=positive_int, default=NOISE_DRAWS,
                        help=f"noise draws per level (default {NOISE_DRAWS})")
    add_seed_flag(parser, "noise seed, shared by all models", seed_flag, NOISE_SEED)
