"""Atomic, pickle-free checkpoints: weights in safetensors, config and training state in JSON.

A checkpoint is a directory::

    model.safetensors   every module's state dict, keys prefixed "{module name}."
    config.json         the config the modules were built from
    state.json          epoch, step, metrics history: any JSON-serialisable dict
    optimizer.pt        optional optimiser state dict (torch.save; loaded with weights_only=True)

:func:`save_checkpoint` writes everything into a temporary sibling directory, fsyncs it and only
then swaps it onto the target, so a crash leaves either the previous checkpoint or the new one,
never a half-written one. :func:`load_checkpoint` checks the config and every tensor name and shape
before touching a module, and reports differences as :class:`CheckpointMismatchError`.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> model = torch.nn.Linear(2, 3)
    >>> path = Path(tempfile.mkdtemp()) / "ckpt"
    >>> _ = save_checkpoint(path, modules={"model": model}, config={"width": 3}, state={"step": 10})
    >>> load_checkpoint(path, modules={"model": torch.nn.Linear(2, 3)}, config={"width": 3})
    ({'step': 10}, None)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

__all__ = ["CheckpointMismatchError", "save_checkpoint", "load_checkpoint", "read_config", "write_text_atomic"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"
CHECKPOINT_FILES = frozenset({WEIGHTS, CONFIG, STATE, OPTIMIZER})


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the given config or modules (differing keys, names or shapes)."""


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    modules: dict[str, nn.Module],
    config: dict[str, Any],
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically to ``directory``, replacing a previous checkpoint there.

    Args:
        directory: the checkpoint directory. If it exists it must hold only checkpoint files (or
            nothing); anything else raises ``FileExistsError`` rather than being deleted.
        modules: name -> module; names must be non-empty and contain no ``"."``.
        config: JSON-serialisable config, written to ``config.json``.
        state: JSON-serialisable training state (epoch, step, metrics history), ``state.json``.
        optimizer_state: e.g. ``optimizer.state_dict()``, written with ``torch.save``.

    Returns:
        the checkpoint directory.
    """
    target = Path(directory)
    if not modules:
        raise ValueError("modules must name at least one module")
    for name in modules:
        if not name or "." in name:
            raise ValueError(f"module names must be non-empty and contain no '.', got {name!r}")
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"checkpoint path exists and is not a directory: {target}")
        foreign = sorted(p.name for p in target.iterdir() if p.name not in CHECKPOINT_FILES)
        if foreign:
            raise FileExistsError(f"{target} holds non-checkpoint files {foreign}; refusing to replace it")
    config_text = json.dumps(config, indent=2, sort_keys=True)  # fail on bad JSON before writing anything
    state_text = json.dumps(state, indent=2, sort_keys=True)
    tensors = _collect_tensors(modules)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a checkpoint is an ordinary directory
        safetensors.torch.save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        _fsync(tmp / WEIGHTS)
        _write_text(tmp / CONFIG, config_text)
        _write_text(tmp / STATE, state_text)
        if optimizer_state is not None:
            with open(tmp / OPTIMIZER, "wb") as f:
                torch.save(optimizer_state, f)
                f.flush()
                os.fsync(f.fileno())
        _fsync(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    modules: dict[str, nn.Module],
    config: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load weights into ``modules`` (in place) and return ``(state, optimizer_state)``.

    Every check runs before any module is modified, so a failed load leaves the modules unchanged.

    Args:
        directory: a directory written by :func:`save_checkpoint`.
        modules: name -> module, the same names as at save time; every saved tensor must be
            claimed and every module key present, with equal shapes (strict).
        config: if given, every key present both here and in ``config.json`` must have the same
            (JSON-normalised) value.
        map_location: device for the loaded tensors and the optimiser state.

    Returns:
        the ``state.json`` dict and the optimiser state dict (``None`` if none was saved).

    Raises:
        FileNotFoundError: the directory or one of its required files is missing.
        CheckpointMismatchError: config values, tensor names or tensor shapes differ.
    """
    root = _require_dir(directory)
    saved_config = read_config(root)
    if config is not None:
        _check_config(saved_config, config)
    state = json.loads(_require_file(root / STATE).read_text())
    tensors = safetensors.torch.load_file(_require_file(root / WEIGHTS), device=str(torch.device(map_location)))
    per_module = _split_and_check(tensors, modules)
    for name, module in modules.items():
        module.load_state_dict(per_module[name], strict=True)
    optimizer_path = root / OPTIMIZER
    optimizer_state = None
    if optimizer_path.is_file():
        optimizer_state = torch.load(optimizer_path, map_location=map_location, weights_only=True)
    return state, optimizer_state


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory."""
    return json.loads(_require_file(_require_dir(directory) / CONFIG).read_text())


def _collect_tensors(modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """All state dicts in one flat dict ``"{name}.{key}"``, tensors contiguous, on the CPU, storage unshared.

    Tied weights appear under several keys with one storage; safetensors refuses shared storage,
    so every repeat of a storage is cloned.
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            t = value.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            elif t.numel() > 0:
                seen.add(ptr)
            tensors[f"{name}.{key}"] = t
    return tensors


def _split_and_check(tensors: dict[str, Tensor], modules: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    """Split the saved dict per module; one readable error lists every missing, unexpected or misshaped key."""
    per_module: dict[str, dict[str, Tensor]] = {name: {} for name in modules}
    unexpected: list[str] = []
    for full_key, tensor in tensors.items():
        name, _, key = full_key.partition(".")
        if name in per_module:
            per_module[name][key] = tensor
        else:
            unexpected.append(full_key)
    missing: list[str] = []
    shapes: list[str] = []
    for name, module in modules.items():
        expected = module.state_dict()
        saved = per_module[name]
        missing += [f"{name}.{k}" for k in expected if k not in saved]
        unexpected += [f"{name}.{k}" for k in saved if k not in expected]
        shapes += [
            f"{name}.{k}: saved {tuple(saved[k].shape)}, model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in saved and saved[k].shape != v.shape
        ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {sorted(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the modules: {sorted(unexpected)}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    if problems:
        raise CheckpointMismatchError("checkpoint weights do not fit the modules: " + " | ".join(problems))
    return per_module


def _check_config(saved: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` naming each shared key whose JSON-normalised values differ."""
    given = json.loads(json.dumps(given))
    shared = sorted(saved.keys() & given.keys())
    diffs = [f"{k}: saved {saved[k]!r}, given {given[k]!r}" for k in shared if saved[k] != given[k]]
    if diffs:
        raise CheckpointMismatchError("checkpoint config differs: " + "; ".join(diffs))


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` directory onto ``target``; an old ``target`` is renamed aside, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous checkpoint back
        raise
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # the new checkpoint is in place; a leftover is harmless


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a fsynced temporary sibling and a rename, creating the folder:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_text(tmp, text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a written file, or a directory's entries (POSIX only), to disk."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require_dir(directory: str | os.PathLike[str]) -> Path:
    """``directory`` as a Path; ``FileNotFoundError`` naming it if it is not a directory."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    return root


def _require_file(path: Path) -> Path:
    """``path`` itself; ``FileNotFoundError`` naming it if it is not a file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path
