"""The shifts beyond substitutions and embedding noise: case flips, deletions, the out-of-domain text, and
scoring at several temperatures in one pass."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experiments.out_of_domain import out_of_domain_text
from experiments.perturbations import (
    Perturbation,
    delete_characters,
    flip_case,
    swapcase_ids,
    window_bpc,
    window_scores,
)
from experiments.report import read_sealed_json, write_sealed_json
from inference.map import RunConfig, build_net
from prob_attention.corpus import CharVocab, eval_windows

CHARS = tuple(sorted("aAbBc. \nDé"))


def test_a_case_flip_maps_each_letter_to_its_other_case_where_the_vocabulary_holds_it() -> None:
    swap = swapcase_ids(CHARS)
    decoded = {CHARS[i - 1]: CHARS[int(swap[i]) - 1] for i in range(1, len(CHARS) + 1)}
    assert decoded["a"] == "A" and decoded["B"] == "b" and decoded["A"] == "a"
    assert decoded["c"] == "c" and decoded["D"] == "D" and decoded["."] == "."  # no other case in the vocabulary
    assert int(swap[0]) == 0  # the unknown symbol stays


def test_case_flips_touch_only_letters_and_grow_with_the_rate_as_nested_sets() -> None:
    vocab = CharVocab(CHARS)
    idx = vocab.encode("aAbB. c\n" * 200).view(8, 200)
    swap = swapcase_ids(CHARS)
    assert torch.equal(flip_case(idx, 0.0, swap, seed=0, draw=0), idx)
    everything = flip_case(idx, 1.0, swap, seed=0, draw=0)
    assert torch.equal(everything, swap[idx])
    low, high = (flip_case(idx, r, swap, seed=1, draw=0) != idx for r in (0.05, 0.2))
    assert bool((low <= high).all()) and int(low.sum()) < int(high.sum())
    letters = swap[idx] != idx
    assert float(high.sum() / letters.sum()) == pytest.approx(0.2, abs=0.03)


def test_after_deletions_each_kept_character_is_scored_against_its_clean_successor() -> None:
    data = torch.arange(1, 1001)
    inputs, targets = eval_windows(data, 10)
    kept_inputs, kept_targets = delete_characters(inputs, targets, 0.3, seed=0, draw=0)
    assert kept_inputs.shape[1] == 10 and kept_inputs.shape[0] < inputs.shape[0]
    assert torch.equal(kept_targets, kept_inputs + 1)  # the clean text counts up: a successor is the id plus one
    assert bool((kept_inputs.flatten().diff() >= 1).all())  # order kept, some characters skipped
    assert torch.equal(delete_characters(inputs, targets, 0.0, seed=0, draw=0)[0], inputs)


def test_deleting_everything_is_refused_with_a_message() -> None:
    inputs, targets = eval_windows(torch.arange(1, 101), 10)
    with pytest.raises(ValueError, match="less than one window"):
        delete_characters(inputs, targets, 1.0, seed=0, draw=0)


@pytest.mark.parametrize("kind", ["case", "deletion"])
def test_a_rate_above_one_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="at most 1"):
        Perturbation(kind, 1.5)


def test_one_pass_scores_every_temperature_as_the_logits_divided_by_it() -> None:
    config = RunConfig.preset("tiny")
    net = build_net(config, config.gpt_config(len(CHARS) + 1)).eval()
    g = torch.Generator().manual_seed(0)
    inputs, targets = (torch.randint(1, len(CHARS) + 1, (6, 32), generator=g) for _ in range(2))
    scores = window_scores(net, inputs, targets, Perturbation("case", 0.5), (1.0, 2.0), batch_size=4, chars=CHARS,
                           calibration=True)
    assert scores.bpc.shape == (2, 6)
    torch.testing.assert_close(scores.bpc[0], window_bpc(net, inputs, targets, Perturbation("case", 0.5),
                                                         batch_size=4, chars=CHARS))
    flipped = flip_case(inputs, 0.5, swapcase_ids(CHARS), seed=0, draw=0)
    with torch.no_grad():
        logits = net.gpt.decode(net.gpt.embed(flipped))
    nats = F.cross_entropy(logits.flatten(0, 1) / 2.0, targets.flatten(), reduction="none").view(6, 32).mean(-1)
    torch.testing.assert_close(scores.bpc[1], nats.double() / torch.log(torch.tensor(2.0, dtype=torch.float64)))
    assert set(scores.calibration) == {"ece", "entropy_bits", "top1_error"}


def test_flipping_case_needs_the_vocabulary() -> None:
    config = RunConfig.preset("tiny")
    net = build_net(config, config.gpt_config(12)).eval()
    idx = torch.randint(1, 12, (2, 32))
    with pytest.raises(ValueError, match="vocabulary"):
        window_bpc(net, idx, idx, Perturbation("case", 0.1))


def test_the_out_of_domain_text_is_the_file_its_source_note_describes() -> None:
    text = out_of_domain_text()
    source = (Path(__file__).parents[1] / "prob_attention" / "data" / "SOURCE-tempest.md").read_text()
    assert hashlib.sha256(text.encode()).hexdigest() in source
    assert f"{len(text):,}" in source and f"| {len(set(text))} |" in source
    assert text.startswith("THE TEMPEST")


@pytest.mark.parametrize("damage", ["edited", "truncated", "unsealed"])
def test_a_sealed_record_changed_after_it_was_written_is_refused_naming_its_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "scores.json"
    write_sealed_json(path, {"bpc": [1.5, 2.0]})
    assert read_sealed_json(path) == {"bpc": [1.5, 2.0], "content_sha256": json.loads(path.read_text())["content_sha256"]}
    record = json.loads(path.read_text())
    if damage == "edited":
        path.write_text(json.dumps(record | {"bpc": [1.0, 2.0]}))
    elif damage == "truncated":
        path.write_text(path.read_text()[:10])
    else:
        path.write_text(json.dumps({"bpc": [1.5, 2.0]}))
    said: list[str] = []
    assert read_sealed_json(path, log=said.append) is None
    assert len(said) == 1 and str(path) in said[0]
