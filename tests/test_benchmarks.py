"""The benchmark scripts run end to end on a tiny grid and write the JSON their README describes.

No timing is asserted: only that each ``main()`` finishes, prints, and writes valid JSON with the expected keys.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is a folder of the repo, not installed

from benchmarks import barrier, train_step

ROW_KEYS = {"d", "T", "d_k", "heads", "mode", "method", "batch", "status", "folded_frac"}
OK_KEYS = {"median_s", "min_s", "iqr_s", "repeats", "peak_mem_bytes", "rel_err", "max_abs_err", "grad_rel_err",
           "speedup_vs_full"}
META_KEYS = {"device", "device_name", "torch", "python", "threads", "command", "timestamp", "args"}


def test_barrier_main_writes_json(tmp_path, capsys):
    out = tmp_path / "barrier.json"
    result = barrier.main(["--dims", "16", "--lengths", "8", "--ranks", "4", "16", "--batch", "2", "--repeats", "2",
                           "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert META_KEYS <= set(data["meta"])
    assert data["meta"]["device"] == "cpu"
    rows = data["rows"]
    # 2 ranks x 2 modes x 4 methods, every row either measured or skipped with a reason
    assert len(rows) == 2 * 2 * len(barrier.METHODS)
    for row in rows:
        assert ROW_KEYS <= set(row)
        if row["status"] == "ok":
            assert OK_KEYS <= set(row)
            assert row["median_s"] > 0 and row["rel_err"] < 1e-3
            assert (row["grad_rel_err"] is None) == (row["mode"] == "fwd")
        else:
            assert row["reason"]
    measured = {(r["method"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert {("sylvester", "fwd"), ("full", "fwd"), ("autograd", "fwd"), ("loop", "fwd+bwd")} <= measured
    assert {"cell", "fwd", "fwd+bwd"} <= set(data["targets"])
    assert "target cell" in capsys.readouterr().out


def test_barrier_skips_what_does_not_fit(tmp_path):
    result = barrier.main(["--dims", "16", "--lengths", "8", "--ranks", "4", "--batch", "1", "--repeats", "1",
                           "--methods", "autograd", "loop", "--autograd-max-entries", "10", "--loop-max-length", "4",
                           "--device", "cpu", "--no-memory", "--out", str(tmp_path / "b.json")])
    assert all(r["status"] == "skipped" and r["reason"] for r in result["rows"])


def test_train_step_main_writes_json(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    result = train_step.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu",
                              "--lambda-m", "0.1", "--profile", "3", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert META_KEYS <= set(data["meta"])
    assert {"configs", "tokens_per_step", "rows", "ratio", "target_ratio", "target_ok", "profiles"} <= set(data)
    assert [r["lambda_m"] for r in data["rows"]] == [0.0, 0.1]
    for row in data["rows"]:
        assert {"median_s", "min_s", "iqr_s", "steps", "tokens_per_s", "peak_mem_bytes", "times_s"} <= set(row)
        assert row["steps"] == 2 and row["tokens_per_s"] > 0
    assert data["configs"]["0.1"]["train"]["lambda_m"] == 0.1
    assert {"0.0", "0.1", "added_by_prior_us"} <= set(data["profiles"])
    assert data["ratio"] == pytest.approx(data["rows"][1]["median_s"] / data["rows"][0]["median_s"])
    assert "ratio" in capsys.readouterr().out
