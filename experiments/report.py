"""Writing an experiment's results: JSON numbers, markdown tables, and the provenance every table carries
(the command, device, seed, corpus, wall time, commit) so that each number names what produced it."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from inference.checkpoint import write_text_atomic

__all__ = ["SEAL", "fmt", "markdown_table", "provenance", "read_sealed_json", "write_json", "write_markdown",
           "write_sealed_json"]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        # code and configuration only: an experiment writes its own results (and figures) before it
        # records its provenance, and results/ or docs/ being rewritten does not change what ran
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)results", ":(top,exclude)docs"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def provenance(device: str, seconds: float, **extra: Any) -> dict[str, Any]:
    """Who made these numbers: the command line, device, wall time, commit and date, plus ``extra``."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {
        "command": " ".join(shlex.quote(a) for a in argv),
        "device": device,
        "wall_seconds": round(seconds, 1),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **extra,
    }


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals, ``None`` as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


SEAL = "content_sha256"
"""The field of a sealed JSON record that holds the SHA-256 of the rest of it."""


def _seal(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_sealed_json(path: Path, record: dict[str, Any]) -> Path:
    """:func:`write_json` of ``record`` with its own hash added under :data:`SEAL`, so that
    :func:`read_sealed_json` can tell it from a copy edited by hand or cut short."""
    return write_json(path, {**record, SEAL: _seal(record)})


def read_sealed_json(path: Path, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The record :func:`write_sealed_json` wrote at ``path``; ``None`` (saying why through ``log``, naming the
    file) when there is none, it is not complete JSON, it carries no seal, or its contents no longer match it."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log(f"{path} is not complete JSON (truncated?); recomputing it")
        return None
    if not isinstance(record, dict) or SEAL not in record:
        log(f"{path} carries no content hash; recomputing it")
        return None
    if record[SEAL] != _seal(record):
        log(f"{path} does not match its content hash (changed after it was written); recomputing it")
        return None
    return record


def write_markdown(path: Path, title: str, sections: Sequence[str], meta: dict[str, Any]) -> Path:
    """A results page: the title, the sections (tables, notes), and the provenance as a list."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [section, ""]
    lines += ["Produced by:", ""] + [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()]
    return write_text_atomic(path, "\n".join(lines) + "\n")
