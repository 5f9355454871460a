"""Checkpoints: exact round trip, config and shape mismatches, atomic replacement that survives a kill anywhere,
hashes and finiteness verified on load, no pickle for weights, directory locks."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from inference.checkpoint import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    DirectoryLockedError,
    find_checkpoint,
    load_checkpoint,
    lock_directory,
    read_config,
    recover_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from prob_attention.gpt import GPTConfig, SmallGPT

REPO = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
STATE = {"epoch": 3, "step": 120, "history": {"val_bpc": [2.5, 2.3, 2.2]}}


def build(seed: int, config: GPTConfig = CONFIG) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"model": SmallGPT(config), "prior": torch.nn.Linear(config.n_embd, config.n_embd)}


def trained_optimizer(modules: dict[str, torch.nn.Module]) -> torch.optim.Optimizer:
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    idx = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    _, loss = modules["model"](idx, targets=idx)
    (loss + modules["prior"].weight.square().sum()).backward()
    opt.step()
    return opt


def assert_same_weights(a: dict[str, torch.nn.Module], b: dict[str, torch.nn.Module]) -> None:
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def rehash(directory: Path) -> None:
    """Rewrite a checkpoint's manifest to the files' current hashes."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["sha256"] = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
                          for name in manifest["sha256"]}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def save(path, modules, state=STATE, **kw):
    return save_checkpoint(path, modules=modules, config=CONFIG.to_dict(), state=state, **kw)


def test_round_trip_restores_weights_state_and_optimizer(tmp_path):
    modules = build(0)
    opt = trained_optimizer(modules)
    save(tmp_path / "ckpt", modules, optimizer_state=opt.state_dict())
    fresh = build(1)
    state, opt_state = load_checkpoint(tmp_path / "ckpt", modules=fresh, config=CONFIG.to_dict())
    assert_same_weights(modules, fresh)
    assert state == STATE
    new_opt = torch.optim.AdamW([p for m in fresh.values() for p in m.parameters()], lr=1e-2)
    new_opt.load_state_dict(opt_state)
    for key, value in opt.state_dict()["state"].items():
        for field, tensor in value.items():
            assert torch.equal(new_opt.state_dict()["state"][key][field], tensor)
    assert read_config(tmp_path / "ckpt") == CONFIG.to_dict()


def test_tied_weights_stay_tied_and_equal_after_load(tmp_path):
    modules = build(0)
    save(tmp_path / "ckpt", modules)
    saved = safetensors.torch.load_file(tmp_path / "ckpt" / "model.safetensors")
    assert torch.equal(saved["model.lm_head.weight"], saved["model.wte.weight"])
    fresh = build(1)
    load_checkpoint(tmp_path / "ckpt", modules=fresh)
    assert fresh["model"].lm_head.weight is fresh["model"].wte.weight
    assert torch.equal(fresh["model"].wte.weight, modules["model"].wte.weight)


def test_without_optimizer_state_returns_none(tmp_path):
    save(tmp_path / "ckpt", build(0))
    assert not (tmp_path / "ckpt" / "optimizer.pt").exists()
    assert load_checkpoint(tmp_path / "ckpt", modules=build(1))[1] is None


def test_config_mismatch_names_every_differing_or_missing_key_and_both_values(tmp_path):
    save(tmp_path / "ckpt", build(0))
    given = {**CONFIG.to_dict(), "dropout": 0.1, "only_here": 1}
    del given["bias"]
    with pytest.raises(CheckpointMismatchError, match=r"dropout: saved 0\.0, given 0\.1") as info:
        load_checkpoint(tmp_path / "ckpt", modules=build(1), config=given)
    assert "only_here: saved (missing), given 1" in str(info.value)
    assert "bias: saved True, given (missing)" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_an_empty_saved_config_matches_no_config(tmp_path):
    save_checkpoint(tmp_path / "ckpt", modules=build(0), config={}, state={})
    with pytest.raises(CheckpointMismatchError, match="vocab_size: saved \\(missing\\)"):
        load_checkpoint(tmp_path / "ckpt", modules=build(1), config=CONFIG.to_dict())


def test_config_is_compared_after_json_normalisation(tmp_path):
    modules = build(0)
    save_checkpoint(tmp_path / "ckpt", modules=modules, config={"sigmas": (0.1, 0.2)}, state={})
    fresh = build(1)
    assert load_checkpoint(tmp_path / "ckpt", modules=fresh, config={"sigmas": [0.1, 0.2]}) == ({}, None)
    assert_same_weights(modules, fresh)  # the tuple saved as a JSON list matches the list
    with pytest.raises(CheckpointMismatchError, match=r"sigmas: saved \[0\.1, 0\.2\], given \[0\.1, 0\.3\]"):
        load_checkpoint(tmp_path / "ckpt", modules=build(1), config={"sigmas": (0.1, 0.3)})


def test_different_shapes_raise_mismatch_and_leave_modules_untouched(tmp_path):
    save(tmp_path / "ckpt", build(0))
    other = build(1, GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=32))
    before = {k: v.clone() for k, v in other["model"].state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"model\.wte\.weight: saved \(11, 16\), model \(11, 32\)"):
        load_checkpoint(tmp_path / "ckpt", modules=other)
    assert all(torch.equal(before[k], v) for k, v in other["model"].state_dict().items())


def test_missing_and_unexpected_keys_raise_mismatch(tmp_path):
    save(tmp_path / "ckpt", build(0))
    deeper = build(1, GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(CheckpointMismatchError, match=r"missing.*model\.blocks\.1\.ln_1\.weight"):
        load_checkpoint(tmp_path / "ckpt", modules=deeper)
    with pytest.raises(CheckpointMismatchError, match=r"not in the modules.*prior\.weight"):
        load_checkpoint(tmp_path / "ckpt", modules={"model": build(1)["model"]})


def test_missing_directory_or_file_raises_file_not_found_with_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere", modules=build(0))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_config(tmp_path / "nowhere")
    save(tmp_path / "ckpt", build(0))
    (tmp_path / "ckpt" / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match="state.json"):
        load_checkpoint(tmp_path / "ckpt", modules=build(0))


def test_saving_again_replaces_the_checkpoint_and_leaves_no_stray_directories(tmp_path):
    save(tmp_path / "ckpt", build(0), optimizer_state=trained_optimizer(build(0)).state_dict())
    newer = build(2)
    save(tmp_path / "ckpt", newer, state={"epoch": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (tmp_path / "ckpt" / "optimizer.pt").exists()  # the new checkpoint has none
    fresh = build(1)
    assert load_checkpoint(tmp_path / "ckpt", modules=fresh) == ({"epoch": 4}, None)
    assert_same_weights(newer, fresh)


def _raise(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("target", ["safetensors", "torch.save"])
def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, target):
    old = build(0)
    save(tmp_path / "ckpt", old)
    if target == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save", _raise)
    else:
        monkeypatch.setattr(torch, "save", _raise)  # fails after the weights and JSON files are written
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path / "ckpt", build(2), state={"epoch": 99}, optimizer_state={"state": {}})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the temporary directory is gone
    fresh = build(1)
    assert load_checkpoint(tmp_path / "ckpt", modules=fresh, config=CONFIG.to_dict()) == (STATE, None)
    assert_same_weights(old, fresh)


def test_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    old = build(0)
    save(tmp_path / "ckpt", old)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".ckpt.tmp-"):  # the old checkpoint is already aside at this point
            raise OSError("rename failed (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path / "ckpt", build(2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    fresh = build(1)
    assert load_checkpoint(tmp_path / "ckpt", modules=fresh)[0] == STATE
    assert_same_weights(old, fresh)


def test_refuses_to_replace_a_directory_with_other_files(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save(tmp_path / "runs", build(0))
    assert (tmp_path / "runs" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["", "a.b"])
def test_bad_module_names_raise(tmp_path, name):
    with pytest.raises(ValueError, match="module names"):
        save(tmp_path / "ckpt", {name: torch.nn.Linear(2, 2)})


def test_unserialisable_config_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ckpt", modules=build(0), config={"f": object()}, state={})
    assert list(tmp_path.iterdir()) == []


def test_weights_load_without_pickle_and_optimizer_state_only_with_weights_only(tmp_path, monkeypatch):
    save(tmp_path / "ckpt", build(0), optimizer_state=trained_optimizer(build(0)).state_dict())
    calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(pickle, "load", _raise)
    monkeypatch.setattr(pickle, "loads", _raise)
    monkeypatch.setattr(pickle, "Unpickler", _raise)
    load_checkpoint(tmp_path / "ckpt", modules=build(1))
    assert calls == [True]  # only optimizer.pt goes through torch.load, always weights_only
    with open(tmp_path / "ckpt" / "model.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        assert "model.wte.weight" in json.loads(f.read(header_len))  # a safetensors header, not a pickle


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_optimizer_file_with_code_is_refused_even_with_a_matching_manifest(tmp_path):
    save(tmp_path / "ckpt", build(0), optimizer_state={"state": {}})
    torch.save({"state": Payload()}, tmp_path / "ckpt" / "optimizer.pt")
    rehash(tmp_path / "ckpt")  # whoever planted the file also rewrote the manifest
    with pytest.raises(CheckpointCorruptError, match="optimizer.pt") as info:
        load_checkpoint(tmp_path / "ckpt", modules=build(1))
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_atomic_text_write_replaces_the_file_or_leaves_it_whole(tmp_path, monkeypatch):
    path = write_text_atomic(tmp_path / "new" / "history.json", "first")
    assert path.read_text() == "first"
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    monkeypatch.setattr(os, "replace", _raise)
    with pytest.raises(OSError, match="simulated"):
        write_text_atomic(path, "third")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["history.json"]  # no temporary file left behind


def test_the_manifest_records_the_sha256_of_every_file(tmp_path):
    save(tmp_path / "ckpt", build(0), optimizer_state=trained_optimizer(build(0)).state_dict())
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name != "manifest.json")
    assert sorted(manifest["sha256"]) == files == ["config.json", "model.safetensors", "optimizer.pt", "state.json"]
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((tmp_path / "ckpt" / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "state.json", "optimizer.pt"])
def test_a_changed_byte_in_any_file_is_refused_naming_the_file(tmp_path, name):
    save(tmp_path / "ckpt", build(0), optimizer_state=trained_optimizer(build(0)).state_dict())
    path = tmp_path / "ckpt" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = build(1)
    before = {k: v.clone() for k, v in fresh["model"].state_dict().items()}
    with pytest.raises(CheckpointCorruptError, match=f"{name}: its SHA-256 differs"):
        load_checkpoint(tmp_path / "ckpt", modules=fresh, config=CONFIG.to_dict())
    assert all(torch.equal(before[k], v) for k, v in fresh["model"].state_dict().items())


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    modules = build(0)
    with torch.no_grad():
        modules["prior"].weight[0, 0] = float("inf")
    save(tmp_path / "ckpt", modules)
    with pytest.raises(CheckpointCorruptError, match=r"model\.safetensors: non-finite weights .*prior\.weight"):
        load_checkpoint(tmp_path / "ckpt", modules=build(1))


def test_without_a_manifest_a_checkpoint_loads_as_legacy_and_unverified(tmp_path):
    modules = build(0)
    save(tmp_path / "ckpt", modules, optimizer_state=trained_optimizer(build(0)).state_dict())
    (tmp_path / "ckpt" / "manifest.json").unlink()
    fresh = build(1)
    state, optimizer_state = load_checkpoint(tmp_path / "ckpt", modules=fresh, config=CONFIG.to_dict())
    assert state == STATE and optimizer_state is not None
    assert_same_weights(modules, fresh)


def test_the_optimizer_state_is_not_opened_unless_asked_for(tmp_path):
    save(tmp_path / "ckpt", build(0), optimizer_state=trained_optimizer(build(0)).state_dict())
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"truncated")
    assert load_checkpoint(tmp_path / "ckpt", modules=build(1), optimizer=False) == (STATE, None)
    with pytest.raises(CheckpointCorruptError, match="optimizer.pt"):
        load_checkpoint(tmp_path / "ckpt", modules=build(1))


KILLED_SAVE = """
import os, shutil, sys
import torch
from inference import checkpoint

path, point = sys.argv[1], sys.argv[2]
real_replace, real_rmtree, real_manifest = os.replace, shutil.rmtree, checkpoint._write_manifest
renames = []

def replace(src, dst):
    renames.append(src)
    if point == f"before rename {len(renames)}":
        os._exit(9)  # killed: no cleanup runs
    real_replace(src, dst)

def rmtree(p, *args, **kwargs):
    if point == "before removing the old copy":
        os._exit(9)
    real_rmtree(p, *args, **kwargs)

def manifest(directory):
    if point == "before the manifest":
        os._exit(9)
    real_manifest(directory)

os.replace, shutil.rmtree, checkpoint._write_manifest = replace, rmtree, manifest
torch.manual_seed(2)
checkpoint.save_checkpoint(path, modules={"m": torch.nn.Linear(3, 3)}, config={"c": 1}, state={"epoch": 2})
"""


@pytest.mark.parametrize("point, epoch", [("before the manifest", 1), ("before rename 1", 1), ("before rename 2", 2),
                                          ("before removing the old copy", 2)])
def test_a_save_killed_anywhere_leaves_a_complete_checkpoint_that_recovery_puts_in_place(tmp_path, point, epoch):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, modules={"m": torch.nn.Linear(3, 3)}, config={"c": 1}, state={"epoch": 1})
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(ckpt), point], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert find_checkpoint(ckpt) is not None
    assert load_checkpoint(ckpt, modules={"m": torch.nn.Linear(3, 3)}, config={"c": 1})[0] == {"epoch": epoch}
    recover_checkpoint(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # in place, leftovers gone
    assert load_checkpoint(ckpt, modules={"m": torch.nn.Linear(3, 3)}, config={"c": 1})[0] == {"epoch": epoch}


def test_an_incomplete_hidden_copy_is_never_recovered(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, modules={"m": torch.nn.Linear(3, 3)}, config={}, state={"epoch": 1})
    os.replace(ckpt, tmp_path / ".ckpt.tmp-partial")
    (tmp_path / ".ckpt.tmp-partial" / "state.json").write_text('{"epoch": 7}')
    assert find_checkpoint(ckpt) is None
    assert recover_checkpoint(ckpt) is None
    assert list(tmp_path.iterdir()) == []


def test_a_locked_directory_refuses_a_second_owner_until_released(tmp_path):
    with lock_directory(tmp_path / "run"):
        with pytest.raises(DirectoryLockedError, match="in use by another process"):
            with lock_directory(tmp_path / "run"):
                pass
    with lock_directory(tmp_path / "run"):
        pass
    assert list((tmp_path / "run").iterdir()) == []  # no lock file left behind


def test_atomic_text_write_refuses_anything_but_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "folder").mkdir()
    for name in ("fifo", "link", "folder"):
        with pytest.raises(FileExistsError, match="not a regular file"):
            write_text_atomic(tmp_path / name, "text")
    assert not (tmp_path / "target").exists() and (tmp_path / "link").is_symlink()
