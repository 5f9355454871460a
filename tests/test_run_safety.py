"""A run is never lost or silently wrong: run directories are locked and never overwritten unasked, refused
commands change nothing, checkpoints survive a kill anywhere in their swap and are verified on load, every
number is checked before work starts, and every command fails with one clear line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from experiments import noise_robustness, reproduce
from experiments.ce_vs_margin import run_dirs
from experiments.cli import main as cli_main
from experiments.cli import parse
from experiments.evaluation import NOISE_DRAWS, NOISE_SEED
from experiments.runs import default_run_dir
from inference import checkpoint
from inference.checkpoint import (
    CheckpointCorruptError,
    DirectoryLockedError,
    lock_directory,
)
from inference.map import MAPTrainer, RunConfig, TrainingDiverged, load_trained
from inference.map.trainer import IncompleteCheckpointError, RunExistsError
from prob_attention.corpus import bundled_articles

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus folder (``--corpus <folder>``): training a tiny run on it takes about a second."""
    folder = tmp_path_factory.mktemp("corpus")
    articles = bundled_articles()
    for split, text in (("train", "".join(articles[:3])[:40_000]), ("valid", articles[3][:3_000]),
                        ("test", articles[4][:3_000])):
        (folder / f"wiki.{split}.raw").write_text(text)
    return folder


def tiny(corpus_dir: Path, **train: object) -> RunConfig:
    return RunConfig.preset("tiny", train={"corpus": str(corpus_dir), **train})


def train(corpus_dir: Path, run_dir: Path, *extra: str) -> int:
    """``prob-attention train`` of the tiny preset on the small corpus."""
    return cli_main(["train", "--preset", "tiny", "--corpus", str(corpus_dir), "--run-dir", str(run_dir),
                     "--no-progress", *extra])


SHORT = {"epochs": 3, "steps_per_epoch": 2}
"""Three epochs of two steps: the shortest run with a middle epoch to stop in."""


def fit(corpus_dir: Path, run_dir: Path | None, log: list[str] | None = None, **kwargs: object) -> MAPTrainer:
    """A :data:`SHORT` tiny run, fitted in-process (``kwargs`` go to ``fit``; log lines to ``log``)."""
    trainer = MAPTrainer(tiny(corpus_dir, **SHORT), run_dir, progress=False,
                         log=(lambda _: None) if log is None else log.append)
    trainer.fit(**kwargs)
    return trainer


def crash_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next fit stop (as if killed) when its second epoch starts."""
    real_epoch = MAPTrainer._train_epoch

    def crash(self, *args):  # type: ignore[no-untyped-def]
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, *args)

    monkeypatch.setattr(MAPTrainer, "_train_epoch", crash)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too), relative path -> SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rehash(ckpt: Path) -> None:
    """Rewrite a checkpoint's manifest to its files' current hashes (an edit the manifest cannot catch)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"] = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest() for name in manifest["sha256"]
                          if (ckpt / name).exists()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def without_test_scores(ckpt: Path) -> None:
    """Drop the test scores from a checkpoint's last epoch (rehashed): the checkpoint a run saves after its last
    epoch and before it scores the test split."""
    state = json.loads((ckpt / "state.json").read_text())
    state["history"][-1] = {k: v for k, v in state["history"][-1].items() if not k.startswith("test_")}
    (ckpt / "state.json").write_text(json.dumps(state))
    rehash(ckpt)


def history_file(run_dir: Path) -> list[dict[str, object]]:
    """The history in a run's ``history.json``."""
    return json.loads((run_dir / "history.json").read_text())["history"]


def same_values(a: object, b: object) -> bool:
    """Whether two nested structures of dicts, sequences, tensors and scalars hold equal values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return a == b


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The command's stderr, checked to be a single line naming the command, without a traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prob-attention {command}: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def finished(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (copied by tests that change it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train(corpus_dir, run_dir) == 0
    return run_dir


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- data loss
def test_train_refuses_a_directory_that_holds_a_run_and_leaves_it_unchanged(
        corpus_dir: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run_copy)
    assert train(corpus_dir, run_copy) == 2
    line = one_error_line(capsys, "train")
    assert "already holds a run (checkpoint at epoch 2 of 2)" in line and "--resume" in line and "--overwrite" in line
    with pytest.raises(RunExistsError):
        fit(corpus_dir, run_copy)
    assert snapshot(run_copy) == before


def test_the_refusal_states_the_epoch_count_of_the_saved_run_not_of_the_command(
        corpus_dir: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(corpus_dir, run_copy, "--epochs", "20") == 2
    assert "already holds a run (checkpoint at epoch 2 of 2)" in one_error_line(capsys, "train")


def test_the_readme_command_run_twice_keeps_the_first_result(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert train(corpus_dir, default_run_dir("runs", "tiny", 0.0)) == 0
    first = snapshot(tmp_path / "runs")
    assert cli_main(["train", "--preset", "tiny", "--corpus", str(corpus_dir), "--no-progress"]) == 2
    assert snapshot(tmp_path / "runs") == first


def test_overwrite_replaces_the_run_and_keeps_other_files(corpus_dir: Path, run_copy: Path) -> None:
    (run_copy / "notes.txt").write_text("mine")
    assert train(corpus_dir, run_copy, "--overwrite", "--lambda-m", "0.1") == 0
    assert load_trained(run_copy).config.train.lambda_m == 0.1
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_exclude_each_other(corpus_dir: Path, run_copy: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert train(corpus_dir, run_copy, "--resume", "--overwrite") == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exclude each other"):
        MAPTrainer(tiny(corpus_dir), run_copy, progress=False).fit(resume=True, overwrite=True)


def test_a_run_directory_in_use_is_refused_with_a_clear_error(
        corpus_dir: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run_copy)
    with lock_directory(run_copy):  # another process training there
        assert train(corpus_dir, run_copy, "--resume") == 2
        assert "in use by another process" in one_error_line(capsys, "train")
        with pytest.raises(DirectoryLockedError):
            fit(corpus_dir, run_copy, overwrite=True)
    assert snapshot(run_copy) == before
    assert [p.name for p in run_copy.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_two_train_processes_on_one_run_directory_leave_one_complete_run(corpus_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.cli", "train", "--preset", "tiny", "--corpus", str(corpus_dir),
               "--run-dir", str(run_dir), "--no-progress"]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert sorted(p.returncode for p in processes) == [0, 2], errors
    refused = errors[[p.returncode for p in processes].index(2)]
    assert "in use by another process" in refused or "already holds a run" in refused
    assert [r["epoch"] for r in load_trained(run_dir).history] == [1, 2]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


def test_the_lock_is_released_when_its_process_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from inference.checkpoint import lock_directory\n"
         "with lock_directory(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLockedError), lock_directory(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with lock_directory(tmp_path):  # the kernel released it with the process
        pass


def test_a_resume_rejected_for_its_config_changes_nothing(
        corpus_dir: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run_copy)
    assert train(corpus_dir, run_copy, "--resume", "--lambda-m", "0.3") == 2
    assert "run.train.lambda_m: saved 0.0, given 0.3" in one_error_line(capsys, "train")
    assert snapshot(run_copy) == before


def test_a_checkpoint_config_of_an_empty_object_is_refused(corpus_dir: Path, run_copy: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    (run_copy / "checkpoint" / "config.json").write_text("{}")
    assert train(corpus_dir, run_copy, "--resume") == 2
    assert "config.json: its SHA-256 differs" in one_error_line(capsys, "train")
    rehash(run_copy / "checkpoint")  # even when the manifest agrees, the config must be the run's
    assert train(corpus_dir, run_copy, "--resume") == 2
    assert "config.json: not the config of a training run (KeyError: 'run')" in one_error_line(capsys, "train")
    saved = json.loads((run_copy / "config.json").read_text())
    (run_copy / "checkpoint" / "config.json").write_text(json.dumps({"run": saved["run"]}))
    rehash(run_copy / "checkpoint")
    assert train(corpus_dir, run_copy, "--resume") == 2
    assert "corpus: saved (missing)" in one_error_line(capsys, "train")


def test_a_config_field_added_since_a_checkpoint_was_written_counts_with_its_default(
        corpus_dir: Path, run_copy: Path) -> None:
    for path in (run_copy / "config.json", run_copy / "checkpoint" / "config.json"):
        saved = json.loads(path.read_text())
        del saved["run"]["train"]["amp"]  # as if written before the field existed
        path.write_text(json.dumps(saved))
    rehash(run_copy / "checkpoint")
    assert train(corpus_dir, run_copy, "--resume") == 0


def test_killed_between_the_renames_of_the_swap_resume_continues_from_the_newer_checkpoint(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = fit(corpus_dir, tmp_path / "straight")
    real_swap = checkpoint._swap_into_place

    def killed_after_first_rename(tmp: Path, target: Path) -> None:
        if json.loads((tmp / "state.json").read_text())["epoch"] != 2:
            return real_swap(tmp, target)
        os.replace(target, target.with_name(f".{target.name}.old-killed"))
        shutil.copytree(tmp, target.with_name(f".{target.name}.tmp-killed"))  # a kill would leave tmp itself
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_swap_into_place", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        fit(corpus_dir, tmp_path / "killed")
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "checkpoint").exists()
    assert load_trained(tmp_path / "killed").history[-1]["epoch"] == 2  # readers find the complete copy

    logged: list[str] = []
    resumed = fit(corpus_dir, tmp_path / "killed", logged, resume=True)
    assert any("2 of 3 epochs done" in line for line in logged)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")) == []
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    assert resumed.history == load_trained(tmp_path / "killed").history


def test_a_resume_that_only_scores_the_test_split_keeps_one_optimizer_state_per_parameter(
        corpus_dir: Path, run_copy: Path) -> None:
    ckpt = run_copy / "checkpoint"
    without_test_scores(ckpt)  # killed after the last epoch's checkpoint, before the test scores were saved
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert train(corpus_dir, run_copy, "--resume") == 0
    assert "test_bpc" in load_trained(run_copy).history[-1]
    resumed = torch.load(ckpt / "optimizer.pt", weights_only=True)
    parameters = sum(1 for _ in load_trained(run_copy).net.parameters())
    assert len(resumed) == parameters
    assert same_values(resumed, saved)  # no step was taken: the state is the one resumed


@pytest.mark.parametrize("killed", ["during the final history.json write", "between the final renames"])
def test_a_resume_of_a_run_killed_in_its_final_save_brings_history_json_up_to_date(
        corpus_dir: Path, run_copy: Path, capsys: pytest.CaptureFixture[str], killed: str) -> None:
    ckpt = run_copy / "checkpoint"
    history = json.loads((run_copy / "history.json").read_text())
    history["history"][-1] = {k: v for k, v in history["history"][-1].items() if not k.startswith("test_")}
    (run_copy / "history.json").write_text(json.dumps(history))  # the write that was killed never landed
    if killed == "between the final renames":
        old = Path(shutil.copytree(ckpt, run_copy / ".checkpoint.old-killed"))
        without_test_scores(old)
        os.replace(ckpt, run_copy / ".checkpoint.tmp-killed")
    assert train(corpus_dir, run_copy, "--resume") == 0
    assert "2 of 2 epochs done" in capsys.readouterr().out
    assert "test_bpc" in history_file(run_copy)[-1]
    assert history_file(run_copy) == load_trained(run_copy).history
    assert ckpt.is_dir() and sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".")) == []


def test_resume_refuses_a_run_whose_checkpoint_is_gone_and_keeps_its_history(
        corpus_dir: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(run_copy / "checkpoint")
    before = snapshot(run_copy)
    assert train(corpus_dir, run_copy, "--resume") == 2
    line = one_error_line(capsys, "train")
    assert "holds a run (history.json) but no checkpoint" in line and "--overwrite" in line
    with pytest.raises(RunExistsError):
        MAPTrainer(tiny(corpus_dir), run_copy, progress=False).fit(resume=True)
    assert snapshot(run_copy) == before


def test_stale_temporary_history_files_are_removed_when_a_run_starts_or_resumes(
        corpus_dir: Path, run_copy: Path, tmp_path: Path) -> None:
    others = [".config.json.tmp-1234abcd", ".history.json.old", "history.json.tmp-1234abcd"]
    for name in [".history.json.tmp-1234abcd", ".history.json.tmp-ffff0000", *others]:
        (run_copy / name).write_text('{"hist')  # left by a kill during an atomic write
    assert train(corpus_dir, run_copy) == 2  # a refused run changes nothing
    assert (run_copy / ".history.json.tmp-1234abcd").exists()
    assert train(corpus_dir, run_copy, "--resume") == 0
    assert sorted(p.name for p in run_copy.iterdir() if "tmp" in p.name or p.name.endswith(".old")) == sorted(others)

    new = tmp_path / "new"
    new.mkdir()
    (new / ".history.json.tmp-1234abcd").write_text('{"hist')
    assert train(corpus_dir, new, "--epochs", "1", "--steps-per-epoch", "1") == 0
    assert not (new / ".history.json.tmp-1234abcd").exists()


def test_reproduce_quick_never_writes_into_the_committed_results() -> None:
    args = parse(["reproduce", "--quick"])
    assert reproduce.out_dir(args) == Path("runs/reproduce-quick")
    for argv in reproduce.steps(args):
        outs = [Path(argv[i + 1]) for i, a in enumerate(argv) if a == "--out"]
        assert outs and all(out.parts[0] == "runs" for out in outs), argv
    assert reproduce.out_dir(parse(["reproduce"])) == Path("results")


# ---------------------------------------------------------------------------------------------- silently wrong
@pytest.mark.parametrize("flag, value, field", [
    ("--lambda-m", "nan", "TrainConfig.lambda_m must be a finite number"),
    ("--grad-clip", "nan", "TrainConfig.grad_clip must be a finite number"),
    ("--prior-sigma", "nan", "PriorConfig.sigma must be a finite number"),
    ("--prior-barrier-floor", "nan", "PriorConfig.barrier_floor must be a finite number"),
    ("--lr", "inf", "TrainConfig.lr must be a finite number"),
    ("--max-eval-windows", "0", "TrainConfig.max_eval_windows must lie in [1, inf)"),
    ("--beta2", "1", "TrainConfig.beta2 must lie in [0, 1)"),
])
def test_bad_numbers_are_refused_before_any_work(corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 flag: str, value: str, field: str) -> None:
    assert train(corpus_dir, tmp_path / "run", flag, value) == 2
    assert field in one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["decode", "--run-dir", "x", "--prompt", "a", "--mi-threshold", "nan"],
    ["decode", "--run-dir", "x", "--prompt", "a", "--sigma", "-1"],
    ["decode", "--run-dir", "x", "--prompt", "a", "--sigma", "1e30"],
    ["decode", "--run-dir", "x", "--prompt", "a", "--sigma", "1e-300"],
    ["decoding-study", "--run-dirs", "x", "--sigma", "1e30"],
    ["noise-robustness", "--runs", "x", "--sigma-max", "inf"],
    ["regularization-path", "--sigma", "nan"],
    ["support-tokens", "--runs", "x", "--tol", "nan"],
    ["decoding-study", "--run-dirs", "x", "--particles", "0"],
    ["scalar-geometry", "--context", "nan"],
])
def test_numeric_flags_of_every_command_refuse_nan_and_out_of_range_values(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(argv) == 2
    assert re.search(f"error: argument {argv[-2]}: must (be a finite|lie in)", capsys.readouterr().err)


def test_resume_refuses_a_checkpoint_without_optimizer_state_unless_told_to_start_it_afresh(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    crash_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(corpus_dir, run_dir)
    monkeypatch.undo()
    ckpt = run_dir / "checkpoint"
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):  # listed in the manifest, so missing
        fit(corpus_dir, run_dir, resume=True)
    (ckpt / "manifest.json").unlink()  # a legacy checkpoint saved without optimiser state
    before = snapshot(run_dir)
    with pytest.raises(IncompleteCheckpointError, match="--fresh-optimizer"):
        fit(corpus_dir, run_dir, resume=True)
    assert train(corpus_dir, run_dir, "--epochs", "3", "--steps-per-epoch", "2", "--resume") == 2
    assert "has no optimiser state" in one_error_line(capsys, "train")
    assert snapshot(run_dir) == before
    assert train(corpus_dir, run_dir, "--epochs", "3", "--steps-per-epoch", "2", "--resume", "--fresh-optimizer") == 0
    assert "fresh optimiser" in capsys.readouterr().out
    assert [r["epoch"] for r in load_trained(run_dir).history] == [1, 2, 3]


def test_flipped_weight_bytes_are_caught_by_the_manifest_and_named(
        run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = run_copy / "checkpoint" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="model.safetensors: its SHA-256 differs"):
        load_trained(run_copy)
    assert cli_main(["decode", "--run-dir", str(run_copy), "--prompt", "The ", "--length", "2", "--sigma", "0.05"]) == 2
    assert "model.safetensors" in one_error_line(capsys, "decode")


def test_non_finite_weights_are_refused_with_or_without_a_manifest(
        run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = run_copy / "checkpoint" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors["net.gpt.wte.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    rehash(run_copy / "checkpoint")
    with pytest.raises(CheckpointCorruptError, match=r"non-finite weights .*net\.gpt\.wte\.weight"):
        load_trained(run_copy)
    (run_copy / "checkpoint" / "manifest.json").unlink()  # legacy, unverified: still checked for finiteness
    assert cli_main(["noise-robustness", "--runs", str(run_copy), str(run_copy), "--out", str(tmp_path / "out")]) == 2
    assert "non-finite weights" in one_error_line(capsys, "noise-robustness")
    assert not (tmp_path / "out").exists()


def test_decode_reading_a_run_while_a_save_swaps_its_checkpoint_reads_the_complete_checkpoint(
        run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = run_copy / "checkpoint"
    newer = Path(shutil.copytree(ckpt, tmp_path / "newer"))  # the next epoch's checkpoint: other weights
    tensors = {k: t + 0.01 if t.is_floating_point() else t
               for k, t in safetensors.torch.load_file(newer / "model.safetensors").items()}
    safetensors.torch.save_file(tensors, newer / "model.safetensors", metadata={"format": "pt"})
    rehash(newer)
    real_read = checkpoint._VerifiedFiles.read
    swaps: list[str] = []

    def read_while_a_save_swaps(self, name):  # type: ignore[no-untyped-def]
        if name == "model.safetensors" and not swaps:  # the reader holds the old manifest: the trainer swaps now
            swaps.append(name)
            checkpoint._swap_into_place(newer, ckpt)
        return real_read(self, name)

    monkeypatch.setattr(checkpoint._VerifiedFiles, "read", read_while_a_save_swaps)
    assert cli_main(["decode", "--run-dir", str(run_copy), "--prompt", "The ", "--length", "2", "--particles", "4",
                     "--sigma", "0.05", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert swaps and "text: The " in capsys.readouterr().out
    monkeypatch.undo()
    assert torch.equal(load_trained(run_copy).net.gpt.wte.weight, tensors["net.gpt.wte.weight"])


def test_committed_legacy_checkpoints_load_without_rewriting_them() -> None:
    run_dir = REPO / "results" / "train" / "ce-lambda0"
    before = snapshot(run_dir)
    trained = load_trained(run_dir)
    assert trained.history[-1]["epoch"] == trained.config.train.epochs
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------- unclear failures
@pytest.mark.parametrize("argv", [
    ["noise-robustness", "--runs", "{missing}", "{missing}"],
    ["support-tokens", "--runs", "{missing}"],
    ["decoding-study", "--run-dirs", "{missing}"],
    ["decode", "--run-dir", "{missing}", "--prompt", "a"],
    ["regularization-path", "--finished-only", "--runs-dir", "{missing}", "--lambdas", "0"],
    ["ce-vs-margin", "--ce-run", "{corrupt}", "--margin-run", "{corrupt}", "--preset", "tiny"],
    ["results-page", "--results", "{broken_results}", "--out", "{missing}/page.md"],
])
def test_user_errors_end_in_one_line_and_a_non_zero_status(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt" / "checkpoint"
    corrupt.mkdir(parents=True)
    (corrupt / "state.json").write_text('{"epoch": ')
    (corrupt / "config.json").write_text('{"run": {"train": {"epochs": 2')
    (tmp_path / "broken" / "ce_vs_margin").mkdir(parents=True)
    (tmp_path / "broken" / "ce_vs_margin" / "results.json").write_text('{"models": ')
    paths = {"missing": tmp_path / "missing", "corrupt": tmp_path / "corrupt", "broken_results": tmp_path / "broken"}
    argv = [a.format(**paths) for a in argv]
    assert cli_main(argv) == 2
    line = one_error_line(capsys, argv[0])
    assert str(tmp_path) in line  # the file or folder at fault is named
    with pytest.raises((ValueError, OSError)):
        cli_main(["--debug", *argv])  # --debug lets the error through, with its traceback


def test_truncated_json_and_corrupt_safetensors_name_their_file(run_copy: Path) -> None:
    ckpt = run_copy / "checkpoint"
    (ckpt / "manifest.json").unlink()  # legacy: the parsers, not the hashes, find the damage
    state = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(state[:15])
    with pytest.raises(CheckpointCorruptError, match=r"state\.json: not valid JSON"):
        load_trained(run_copy)
    (ckpt / "state.json").write_text(state)
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointCorruptError, match=r"model\.safetensors: not a readable safetensors file"):
        load_trained(run_copy)


def test_loading_for_evaluation_never_reads_the_optimizer_state(run_copy: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (run_copy / "checkpoint" / "optimizer.pt").write_bytes(b"truncated")
    load_trained(run_copy)
    assert cli_main(["decode", "--run-dir", str(run_copy), "--prompt", "The ", "--length", "2", "--particles", "4",
                     "--sigma", "0.05", "--device", "cpu"]) == 0
    assert "text: The " in capsys.readouterr().out


def test_a_huge_learning_rate_stops_as_training_diverged_and_keeps_no_bad_checkpoint(
        corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(corpus_dir, tmp_path / "run", "--lr", "1e6") == 1
    line = one_error_line(capsys, "train")
    assert "training diverged: non-finite" in line and "no checkpoint was written" in line
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_non_finite_logits_raise_training_diverged_before_pyro_sees_them(corpus_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = MAPTrainer(tiny(corpus_dir, **SHORT), tmp_path, progress=False, log=lambda _: None)
    real_epoch = MAPTrainer._train_epoch

    def poison_second_epoch(self, *args):  # type: ignore[no-untyped-def]
        if self.epoch == 1:
            with torch.no_grad():
                self.net.gpt.lm_head.weight.fill_(float("inf"))
        return real_epoch(self, *args)

    monkeypatch.setattr(MAPTrainer, "_train_epoch", poison_second_epoch)
    with pytest.raises(TrainingDiverged, match=r"non-finite forward pass .* epoch 2: .*checkpoint \(epoch 1\) is kept"):
        trainer.fit()
    assert [r["epoch"] for r in load_trained(tmp_path).history] == [1]


def test_a_full_disk_while_saving_stops_in_one_line_and_keeps_the_previous_checkpoint(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    real_write = checkpoint._write_bytes

    def full_from_the_second_checkpoint(path: Path, data: bytes) -> None:
        if path.parent.name.startswith(".checkpoint.tmp-") and (run_dir / "checkpoint").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_bytes", full_from_the_second_checkpoint)
    assert train(corpus_dir, run_dir, "--epochs", "3", "--steps-per-epoch", "2") == 2
    line = one_error_line(capsys, "train")
    assert "the disk is full" in line and "the checkpoint at epoch 1 is kept" in line and "--resume" in line
    monkeypatch.undo()
    assert [r["epoch"] for r in load_trained(run_dir).history] == [r["epoch"] for r in history_file(run_dir)] == [1]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_during_training_exits_130_saying_how_to_resume(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    crash_after_first_epoch(monkeypatch)
    assert train(corpus_dir, run_dir, "--epochs", "3", "--steps-per-epoch", "2") == 130
    assert one_error_line(capsys, "train") == "prob-attention train: interrupted; resume with --resume"
    monkeypatch.undo()
    assert train(corpus_dir, run_dir, "--epochs", "3", "--steps-per-epoch", "2", "--resume") == 0
    assert [r["epoch"] for r in load_trained(run_dir).history] == [1, 2, 3]


@pytest.mark.parametrize("problem, split, message", [
    ("empty", "valid", "the validation split is empty"),
    ("binary", "test", "the test split is not UTF-8 text"),
    ("nul", "train", "the training split holds NUL characters"),
    ("short", "valid", "the validation split (FILE) holds 10 characters, fewer than one window"),
    ("unseen", "test", "the test split (FILE): 1 character(s) not in the vocabulary: '\u2603'"),
])
def test_a_bad_corpus_folder_is_refused_in_one_line_naming_the_file_and_split(
        corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str, split: str,
        message: str) -> None:
    folder = Path(shutil.copytree(corpus_dir, tmp_path / "corpus"))
    path = folder / f"wiki.{split}.raw"
    text = path.read_text()
    path.write_bytes({"empty": b"", "binary": b"\x89PNG\r\n\x1a\n\x00\x00", "nul": text.encode() + b"\x00",
                      "short": text[:10].encode(), "unseen": (text + "\u2603").encode()}[problem])
    assert train(folder, tmp_path / "run", "--on-unknown", "error") == 2
    line = one_error_line(capsys, "train")
    assert str(path) in line and message.replace("FILE", str(path)) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train", "--preset", "tiny"], ["decode", "--prompt", "a"]])
def test_an_empty_run_dir_is_refused_rather_than_read_as_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main([*command, "--run-dir", ""]) == 2
    assert "argument --run-dir: must not be empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_decode_reports_a_collapsed_posterior_in_one_line(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["decode", "--run-dir", str(finished), "--prompt", "The ", "--length", "2", "--particles", "4",
                     "--sigma", "1e-30", "--device", "cpu"]) == 2
    assert "the posterior collapsed" in one_error_line(capsys, "decode")


@pytest.mark.parametrize("kind", ["fifo", "symlink to a device", "directory"])
def test_results_page_refuses_an_out_that_is_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 kind: str) -> None:
    out = tmp_path / "page.md"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "directory":
        out.mkdir()
    else:
        out.symlink_to("/dev/zero")
    before = os.lstat(out)
    assert cli_main(["results-page", "--results", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "not a regular file" in one_error_line(capsys, "results-page")
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


# ---------------------------------------------------------------------------------------------- defined once
def test_a_renamed_flag_stops_reproduce_before_its_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    real = noise_robustness.add_arguments

    def renamed(parser) -> None:  # type: ignore[no-untyped-def]
        real(parser)
        parser._option_string_actions.pop("--sigma-max")  # as if the flag were renamed

    monkeypatch.setattr(noise_robustness, "add_arguments", renamed)
    argv = ["reproduce", "--quick", "--sigma-max", "0.1", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    line = one_error_line(capsys, "reproduce")
    assert "step `noise-robustness" in line and "unrecognized arguments: --sigma-max 0.1" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["reproduce"],
                                  ["reproduce", "--quick", "--sigma-max", "0.1", "--path-sigma", "0.02"]])
def test_every_reproduce_step_parses_with_its_commands_own_parser(argv: list[str]) -> None:
    planned = reproduce.plan(parse(argv))
    assert [step[0] for step, _ in planned] == ["scalar-geometry", "ce-vs-margin", "noise-robustness",
                                                "noise-robustness", "regularization-path", "support-tokens"]


def test_run_directories_and_noise_defaults_have_one_definition(tmp_path: Path) -> None:
    args = parse(["reproduce", "--quick", "--runs-dir", str(tmp_path)])
    planned = {step[0]: ns for step, ns in reproduce.plan(args)}
    pair = [default_run_dir(tmp_path, "tiny", 0.0), default_run_dir(tmp_path, "tiny", 0.02)]
    assert planned["noise-robustness"].runs == pair == list(run_dirs(planned["ce-vs-margin"]))
    assert pair[1].name == "tiny-lambda0.02"
    robustness = parse(["noise-robustness", "--runs", "x"])
    path = parse(["regularization-path"])
    assert (robustness.draws, robustness.seed) == (path.draws, path.noise_seed) == (NOISE_DRAWS, NOISE_SEED)
