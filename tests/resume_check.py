"""A run trained straight through beside the same run interrupted in its second epoch and resumed: shared by the
CPU and CUDA resume tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.map import MAPTrainer, RunConfig
from prob_attention.corpus import CharCorpus


def straight_and_resumed(config: RunConfig, corpus: CharCorpus, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> tuple[MAPTrainer, MAPTrainer, list[dict], list[str]]:
    """``(straight, resumed, resumed history, resumed log)``: ``config`` trained without a break in
    ``tmp_path/straight``, and in ``tmp_path/resumed`` stopped by Ctrl-C at the start of its second epoch, then
    resumed."""
    straight = MAPTrainer(config, tmp_path / "straight", corpus, progress=False, log=lambda _: None)
    straight.fit()
    interrupted = MAPTrainer(config, tmp_path / "resumed", corpus, progress=False, log=lambda _: None)
    real_epoch = MAPTrainer._train_epoch
    calls = {"n": 0}

    def crash_in_second_epoch(self, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(self, *args)

    monkeypatch.setattr(MAPTrainer, "_train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(MAPTrainer, "_train_epoch", real_epoch)
    logged: list[str] = []
    resumed = MAPTrainer(config, tmp_path / "resumed", corpus, progress=False, log=logged.append)
    return straight, resumed, resumed.fit(resume=True), logged


def assert_same_run(straight: MAPTrainer, resumed: MAPTrainer, history: list[dict], logged: list[str]) -> None:
    """The resumed run picked up after its first epoch and ended bit for bit where the straight one did."""
    assert any("1 of 3 epochs done" in line for line in logged)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    assert history[-1]["val_bpc"] == straight.history[-1]["val_bpc"]
