"""Writing an experiment's results: JSON numbers, markdown tables, and the provenance every table carries
(the command, device, seed, corpus, wall time, commit) so that each number names what produced it."""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference.checkpoint import write_text_atomic

__all__ = ["provenance", "markdown_table", "write_json", "write_markdown", "fmt"]


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


def write_markdown(path: Path, title: str, sections: Sequence[str], meta: dict[str, Any]) -> Path:
    """A results page: the title, the sections (tables, notes), and the provenance as a list."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [section, ""]
    lines += ["Produced by:", ""] + [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()]
    return write_text_atomic(path, "\n".join(lines) + "\n")
