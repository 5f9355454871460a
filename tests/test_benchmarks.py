"""The benchmark scripts run end to end on a tiny grid and write the JSON their README describes; the results page
judges them against the scripts' targets; the GPU check refuses to run without a GPU.

No timing is asserted: only that each ``main()`` finishes, prints, and writes valid JSON with the expected keys.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repo, not installed

from benchmarks import barrier, full_run, train_step
from experiments.results_page import bench_section
from inference.map import MAPTrainer, RunConfig
from prob_attention.corpus import CharCorpus, bundled_articles

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


def test_train_step_cpu_clock_records_its_clock_and_note_in_a_command_that_reruns(tmp_path):
    note = "beside two other jobs"
    result = train_step.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--clock", "cpu",
                              "--no-memory", "--note", note, "--out", str(tmp_path / "step.json")])
    meta = result["meta"]
    assert meta["args"]["clock"] == "cpu" and meta["note"] == note
    assert shlex.split(meta["command"])[-3] == note  # the note stays one argument
    assert all(r["median_s"] > 0 for r in result["rows"])


def test_the_results_page_judges_the_step_ratio_against_the_benchmarks_one_target(tmp_path):
    result = train_step.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--no-memory",
                              "--out", str(tmp_path / "train_step-cpu-1thread-cputime.json")])
    assert result["target_ratio"] == train_step.TARGET_RATIO
    for ratio, verdict in ((train_step.TARGET_RATIO, "**met**"), (train_step.TARGET_RATIO + 0.01, "**missed**")):
        (tmp_path / "train_step-cpu-1thread-cputime.json").write_text(json.dumps({**result, "ratio": ratio,
                                                                                 "target_ok": None}))
        page = "\n".join(bench_section(tmp_path))
        assert f"target <= {train_step.TARGET_RATIO:g}: {verdict}" in page


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished two-epoch run of the tiny preset on a slice of the bundled corpus."""
    articles = bundled_articles()
    corpus = CharCorpus("slice", "".join(articles[:2])[:20_000], articles[3][:2_000], articles[4][:2_000])
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    MAPTrainer(RunConfig.preset("tiny", train={"lambda_m": 0.02}), run_dir, corpus, progress=False,
               log=lambda _: None).fit()
    return run_dir


def test_full_run_summarises_a_finished_run_beside_its_reference(tiny_run, tmp_path):
    out = tmp_path / "summary.json"
    result = full_run.main(["--run-dir", str(tiny_run), "--command", "prob-attention train --preset tiny",
                            "--exit-status", "0", "--wall-seconds", "3", "--reference", str(tiny_run), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    run = result["run"]
    assert run["completed"] and run["epochs_done"] == run["epochs"] == 2 and len(run["seconds_per_epoch"]) == 2
    assert set(run["final"]) == set(full_run.SCORES)
    assert run["reference"]["final"] == run["final"]


def test_full_run_marks_a_run_stopped_by_its_time_limit_as_not_completed(tiny_run, tmp_path, capsys):
    stopped = full_run.summarise(tiny_run, "prob-attention train", exit_status=124, wall_seconds=9.0)
    assert not stopped["completed"] and stopped["epochs_done"] == 2
    result = full_run.main(["--run-dir", str(tmp_path), "--command", "prob-attention train", "--exit-status", "124",
                            "--wall-seconds", "9", "--out", str(tmp_path / "summary.json")])
    assert result["run"]["epochs_done"] == 0 and not result["run"]["completed"] and result["run"]["final"] == {}
    assert "none finished" in capsys.readouterr().out


def test_gpu_check_is_valid_bash_and_refuses_to_run_without_cuda(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run")
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "nothing was run" in done.stderr
