"""MAP training through Pyro: the objective, the CE-only equivalence, checkpoints, resume, divergence, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from resume_check import assert_same_run, straight_and_resumed

from experiments.cli import main as cli_main
from inference.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from inference.map import (
    MAPTrainer,
    RunConfig,
    TrainingDiverged,
    build_net,
    empty_guide,
    load_trained,
    make_optimizer,
    map_model,
)
from prob_attention import safe_log_barrier
from prob_attention.corpus import CharCorpus, bundled_articles
from prob_attention.gpt import configure_param_groups

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus() -> CharCorpus:
    """A small slice of the bundled corpus; the validation split holds a character unseen in training."""
    articles = bundled_articles()
    return CharCorpus("slice", "".join(articles[:3])[:40_000], articles[3][:3_000] + "\u2603", articles[4][:3_000])


def tiny(**train: object) -> RunConfig:
    return RunConfig.preset("tiny", train=train)


def batches(vocab: int, shape: tuple[int, int], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, shape, generator=g), torch.randint(0, vocab, shape, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("shape", [(4, 32), (3, 20)])
def test_lambda_zero_svi_step_is_a_plain_pytorch_step_bit_for_bit(shape: tuple[int, int]) -> None:
    config = RunConfig.preset("tiny", gpt={"block_size": shape[1]})
    net = build_net(config, config.gpt_config(11))
    reference = copy.deepcopy(net.gpt)
    tc = config.train
    pyro.clear_param_store()
    optim = make_optimizer(net, tc, total_steps=10)
    svi = SVI(lambda i, t: map_model(net, net, i, t, 0.0, False), empty_guide, optim, loss=Trace_ELBO())
    adamw = torch.optim.AdamW(configure_param_groups(reference, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adamw, T_max=10, eta_min=tc.lr * tc.min_lr_ratio)
    for idx, tgt in batches(11, shape, 3):
        svi.step(idx, tgt)
        optim.step()
        adamw.zero_grad()
        F.cross_entropy(reference(idx)[0].reshape(-1, 11), tgt.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), tc.grad_clip)
        adamw.step()
        cosine.step()
        for (name, ours), theirs in zip(net.gpt.named_parameters(), reference.parameters()):
            assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("density", ["margin", "full"])
def test_the_pyro_loss_is_cross_entropy_plus_lambda_times_the_prior_loss(density: str) -> None:
    config = RunConfig.preset("tiny", prior={"density": density}, train={"lambda_m": 0.3})
    net = build_net(config, config.gpt_config(11))
    idx, tgt = batches(11, (2, 32), 1)[0]
    pyro.clear_param_store()
    loss = Trace_ELBO().differentiable_loss(lambda: map_model(net, net, idx, tgt, 0.3, False), empty_guide)
    x = net.gpt.embed(idx)
    ce = F.cross_entropy(net.gpt.decode(x).reshape(-1, 11), tgt.reshape(-1))
    terms, _ = safe_log_barrier(*net.transform.log_abs_det_blocks(x))
    if density == "full":
        z = net.transform.inv(x)
        terms = terms + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(loss, ce - 0.3 * terms.mean())


def test_a_few_map_steps_reduce_the_loss(corpus: CharCorpus) -> None:
    history = MAPTrainer(tiny(lambda_m=0.05, epochs=3, steps_per_epoch=10), None, corpus, progress=False,
                         log=lambda _: None).fit()
    assert history[-1]["train_bpc"] < history[0]["train_bpc"]
    assert history[-1]["val_bpc"] < history[0]["val_bpc"]
    assert all(r["train_prior_running"] is not None for r in history)
    assert "test_bpc" in history[-1]


def _weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_resume_gives_the_same_result_as_an_uninterrupted_run(corpus: CharCorpus, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same_run(*straight_and_resumed(tiny(lambda_m=0.05, epochs=3), corpus, tmp_path, monkeypatch))


def test_checkpoint_round_trip_and_mismatch(corpus: CharCorpus, tmp_path: Path) -> None:
    trainer = MAPTrainer(tiny(lambda_m=0.05, epochs=1), tmp_path, corpus, progress=False, log=lambda _: None)
    trainer.fit()
    loaded = load_trained(tmp_path)
    for key, value in trainer.net.state_dict().items():
        assert torch.equal(value, loaded.net.state_dict()[key]), key
    assert loaded.vocab == trainer.data.vocab and loaded.history == trainer.history
    assert loaded.corpus == "slice"

    config_path = tmp_path / "checkpoint" / "config.json"
    saved = json.loads(config_path.read_text())
    saved["gpt_config"]["n_embd"] = 48
    config_path.write_text(json.dumps(saved))
    with pytest.raises(CheckpointCorruptError, match="config.json: its SHA-256 differs"):
        load_trained(tmp_path)
    (tmp_path / "checkpoint" / "manifest.json").unlink()  # legacy, unverified: the weights must still fit the config
    with pytest.raises(CheckpointMismatchError, match="shape"):
        load_trained(tmp_path)


def test_unknown_characters_map_to_unk_or_raise(corpus: CharCorpus) -> None:
    trainer = MAPTrainer(tiny(on_unknown="unk"), None, corpus, progress=False)
    assert trainer.unseen == {"\u2603": 1}
    assert int(trainer.data.val[-1]) == 0  # the unknown symbol
    with pytest.raises(ValueError, match="not in the vocabulary"):
        MAPTrainer(tiny(on_unknown="error"), None, corpus, progress=False)


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(corpus: CharCorpus, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = MAPTrainer(tiny(lambda_m=0.05, epochs=3), tmp_path, corpus, progress=False, log=lambda _: None)
    real_epoch = MAPTrainer._train_epoch
    good: dict[str, torch.Tensor] = {}

    def poison_second_epoch(self, *args):  # type: ignore[no-untyped-def]
        if self.epoch == 1:
            good.update(_weights(self.net))
            self.net.gpt.wte.weight.register_hook(lambda g: g * float("nan"))
        return real_epoch(self, *args)

    monkeypatch.setattr(MAPTrainer, "_train_epoch", poison_second_epoch)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        trainer.fit()
    for key, value in good.items():  # the NaN gradient never reached the weights
        assert torch.equal(value, trainer.net.state_dict()[key]), key
    loaded = load_trained(tmp_path)
    assert [r["epoch"] for r in loaded.history] == [1]
    for key, value in good.items():
        assert torch.equal(value, loaded.net.state_dict()[key]), key


def test_the_train_command_writes_a_complete_run(tmp_path: Path) -> None:
    status = cli_main(["train", "--preset", "tiny", "--lambda-m", "0.05", "--run-dir", str(tmp_path), "--no-progress"])
    assert status == 0
    for name in ("config.json", "history.json", "curves.png", "checkpoint/model.safetensors", "checkpoint/config.json"):
        assert (tmp_path / name).is_file(), name
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert len(history) == 2 and history[0]["val_bpc"] > 0


@pytest.mark.slow
def test_data_parallel_training_on_two_cpu_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "experiments.train", "--preset", "tiny", "--lambda-m", "0.05", "--device", "cpu",
           "--run-dir", str(tmp_path), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout + done.stderr
    loaded = load_trained(tmp_path)
    assert [r["epoch"] for r in loaded.history] == [1, 2]


def test_the_epoch_line_prints_a_sequence_margin_of_zero_as_zero_and_a_missing_one_as_nan() -> None:
    from inference.map.trainer import _format_record

    record = {"epoch": 1, "train_clamped": 0, "seconds": 1.0, "val_informative_seq_margin_mean": 0.0}
    assert "seq margin (t>=3) +0.0000" in _format_record(record)
    del record["val_informative_seq_margin_mean"]
    assert "seq margin (t>=3) +nan" in _format_record(record)
