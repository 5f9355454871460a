r"""Summary of one training run for the benchmark results: how far it got, how long it took, its final BPC.

``benchmarks/gpu_check.sh`` trains the paper's 20-epoch default configuration (``prob-attention train``) into a
scratch folder under a time limit, then calls this with that folder, the command, its exit status and its wall
time. The JSON records the epochs finished (a run stopped by the time limit keeps the epochs it finished),
seconds per epoch, the last epoch's train / validation (and, for a finished run, test) BPC, and the same
figures of a committed reference run of the same configuration (``--reference``, e.g. the CPU run under
``results/train/``).

Example (after ``prob-attention train --preset tiny --lambda-m 0.02 --run-dir runs/tiny``)::

    python -m benchmarks.full_run --run-dir runs/tiny --command "prob-attention train --preset tiny --lambda-m 0.02" \
        --exit-status 0 --wall-seconds 12 --out runs/tiny-summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.report import write_json
from inference.map import resolve_device
from inference.map.trainer import HISTORY_FILE

from .barrier import run_metadata

SCORES = ("train_bpc", "val_bpc", "test_bpc", "val_barrier")
"""The last epoch's figures a summary keeps (``test_bpc`` only once the run has finished)."""


def read_history(run_dir: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The run config and per-epoch records a run folder's ``history.json`` holds; ``(None, [])`` without one
    (a run stopped before its first epoch ended)."""
    path = run_dir / HISTORY_FILE
    if not path.exists():
        return None, []
    data = json.loads(path.read_text())
    return data["config"], list(data["history"])


def run_scores(run_dir: Path) -> dict[str, Any]:
    """Epochs finished out of those configured, seconds per epoch, the device, and the last epoch's :data:`SCORES`."""
    config, history = read_history(run_dir)
    last = history[-1] if history else {}
    return {
        "epochs_done": len(history),
        "epochs": None if config is None else config["run"]["train"]["epochs"],
        "seconds_per_epoch": [r["seconds"] for r in history],
        "device": last.get("device"),
        "final": {k: last[k] for k in SCORES if k in last},
    }


def summarise(run_dir: Path, command: str, exit_status: int, wall_seconds: float,
              reference: Path | None = None) -> dict[str, Any]:
    """The ``run`` entry of the summary: the command, how it ended, and :func:`run_scores` of the run (and of
    ``reference``). ``completed``: the command exited with 0 and every configured epoch was trained."""
    scores = run_scores(run_dir)
    summary = {"command": command, "exit_status": exit_status, "wall_seconds": wall_seconds,
               "completed": exit_status == 0 and scores["epochs_done"] == scores["epochs"], **scores}
    if reference is not None:
        summary["reference"] = {"run": str(reference), **run_scores(reference)}
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.full_run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="the run folder the training command wrote")
    p.add_argument("--command", required=True, help="the training command, as run")
    p.add_argument("--exit-status", type=int, required=True, help="its exit status (124: stopped by the time limit)")
    p.add_argument("--wall-seconds", type=float, required=True, help="its wall time")
    p.add_argument("--reference", type=Path, default=None, help="a committed run of the same configuration")
    p.add_argument("--out", type=Path, required=True, help="JSON path")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Summarise the run, print one line, write the JSON; returns what was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    meta = run_metadata(resolve_device("auto"), "python -m benchmarks.full_run", argv)
    run = summarise(args.run_dir, args.command, args.exit_status, args.wall_seconds, args.reference)
    result = {"meta": meta, "run": run}
    write_json(args.out, result)
    final = ", ".join(f"{k} {v:.4f}" for k, v in run["final"].items())
    print(f"{run['epochs_done']} of {run['epochs']} epochs in {args.wall_seconds:.0f} s (exit status "
          f"{args.exit_status}); last epoch: {final or 'none finished'}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
