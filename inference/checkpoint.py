"""Atomic, verified, pickle-free checkpoints: weights in safetensors, config and training state in JSON.

A checkpoint is a directory::

    model.safetensors   every module's state dict, keys prefixed "{module name}."
    config.json         the config the modules were built from
    state.json          epoch, step, metrics history: any JSON-serialisable dict
    optimizer.pt        optional optimiser state dict (torch.save; loaded with weights_only=True)
    manifest.json       the SHA-256 of every file above, written last

:func:`save_checkpoint` writes everything into a temporary sibling directory, fsyncs it and only
then swaps it onto the target (the old checkpoint is renamed aside, the new one renamed in, the old
one removed). A crash at any point leaves a complete checkpoint: the target, or, killed between the
two renames, a complete hidden sibling that :func:`load_checkpoint` reads and :func:`recover_checkpoint`
moves back into place. A reader that meets a swap (it reads a run while it trains) reads again from
the complete checkpoint. :func:`load_checkpoint` verifies every file it reads against the manifest, checks
that the weights are finite, the config and every tensor name and shape before touching a module, and
names the file at fault. A checkpoint without a manifest (written before manifests existed) loads as
legacy and unverified; its weights are still checked for finiteness, names and shapes.

:func:`lock_directory` holds an OS lock on a directory while one process owns it (a run directory).

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

import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "DirectoryLockedError",
    "config_differences",
    "find_checkpoint",
    "load_checkpoint",
    "lock_directory",
    "read_config",
    "read_state",
    "recover_checkpoint",
    "remove_checkpoint",
    "require_regular_or_new",
    "save_checkpoint",
    "write_bytes_atomic",
    "write_text_atomic",
]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"
MANIFEST = "manifest.json"
CHECKPOINT_FILES = frozenset({WEIGHTS, CONFIG, STATE, OPTIMIZER, MANIFEST})
MANIFEST_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the given config or modules (differing keys, names or shapes)."""


class CheckpointCorruptError(ValueError):
    """A checkpoint file is unreadable, differs from the hash its manifest records, or holds non-finite weights."""


class DirectoryLockedError(RuntimeError):
    """Another process holds the directory's lock (:func:`lock_directory`)."""


# ---------------------------------------------------------------------------------------------- saving
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
        # serialised in memory, written by Python: a full disk is an OSError (ENOSPC), whatever the format
        _write_bytes(tmp / WEIGHTS, safetensors.torch.save(tensors, metadata={"format": "pt"}))
        _write_text(tmp / CONFIG, config_text)
        _write_text(tmp / STATE, state_text)
        if optimizer_state is not None:
            _write_bytes(tmp / OPTIMIZER, _torch_bytes(optimizer_state))
        _write_manifest(tmp)
        _fsync(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_manifest(directory: Path) -> None:
    """``manifest.json``: the SHA-256 of every file in ``directory``, written (and fsynced) after them all."""
    hashes = {p.name: _sha256(p.read_bytes()) for p in sorted(directory.iterdir())}
    manifest = {"format": MANIFEST_FORMAT, "sha256": hashes}
    _write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


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


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` directory onto ``target``; an old ``target`` is renamed aside, then removed.

    Killed between the two renames, ``target`` is missing and both hidden siblings are complete:
    :func:`find_checkpoint` then reads the newer one and :func:`recover_checkpoint` moves it into place.
    """
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


# ---------------------------------------------------------------------------------------------- loading
def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    modules: dict[str, nn.Module],
    config: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    optimizer: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load weights into ``modules`` (in place) and return ``(state, optimizer_state)``.

    Every check runs before any module is modified, so a failed load leaves the modules unchanged.
    When ``directory`` is missing because a save was interrupted, the complete copy it left is read
    (:func:`find_checkpoint`); a read that a concurrent save's swap spoils is read again from the complete
    checkpoint, up to :data:`READ_ATTEMPTS` times.

    Args:
        directory: a directory written by :func:`save_checkpoint`.
        modules: name -> module, the same names as at save time; every saved tensor must be
            claimed and every module key present, with equal shapes (strict).
        config: if given, it must equal ``config.json`` (after JSON normalisation), key for key.
        map_location: device for the optimiser state.
        optimizer: read the optimiser state; ``False`` never opens ``optimizer.pt`` (evaluation, inference).

    Returns:
        the ``state.json`` dict and the optimiser state dict (``None`` if none was saved or asked for).

    Raises:
        FileNotFoundError: the directory or one of its required files is missing.
        CheckpointCorruptError: a file differs from its manifest hash, cannot be parsed, or the weights
            hold NaN or inf.
        CheckpointMismatchError: config values, tensor names or tensor shapes differ.
    """

    def read(files: _VerifiedFiles) -> tuple[Any, dict[str, dict[str, Tensor]], dict[str, Any] | None]:
        if config is not None:
            _check_config(files.json(CONFIG), config, files.path(CONFIG))
        return (files.json(STATE), _split_and_check(files.weights(), modules),
                files.optimizer_state(map_location) if optimizer else None)

    state, per_module, optimizer_state = _read_verified(directory, read)
    for name, module in modules.items():
        module.load_state_dict(per_module[name], strict=True)
    return state, optimizer_state


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory (verified against its manifest)."""
    return _read_verified(directory, lambda files: files.json(CONFIG))


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint directory (verified against its manifest)."""
    return _read_verified(directory, lambda files: files.json(STATE))


READ_ATTEMPTS = 3
"""How often a checkpoint is read before a missing file or a hash that differs from the manifest is reported: a
save that swaps the checkpoint while a reader is between its manifest and its files causes both."""

_Read = TypeVar("_Read")


def _read_verified(directory: str | os.PathLike[str], read: Callable[[_VerifiedFiles], _Read]) -> _Read:
    """``read`` of the checkpoint of ``directory``, its files checked against the manifest. When a file is missing
    or differs from the manifest, the complete checkpoint is found afresh (:func:`find_checkpoint`) and read again,
    up to :data:`READ_ATTEMPTS` times: a damaged file fails every time and is reported, a save that swapped the
    checkpoint during a read is not."""
    for _ in range(READ_ATTEMPTS - 1):
        try:
            return read(_VerifiedFiles(_existing(directory)))
        except (FileNotFoundError, CheckpointCorruptError):
            continue
    return read(_VerifiedFiles(_existing(directory)))


def find_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """Where the checkpoint of ``directory`` can be read: ``directory`` itself, or, when a save was killed
    between its two renames, the newest complete hidden copy beside it; ``None`` when there is neither."""
    target = Path(directory)
    if target.is_dir():
        return target
    complete = [copy for copy in _hidden_copies(target) if _is_complete(copy)]
    return max(complete, key=_recency) if complete else None


class _VerifiedFiles:
    """A checkpoint directory's files, each read once and checked against the manifest (when there is one)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hashes = self._manifest()

    def _manifest(self) -> dict[str, str] | None:
        path = self.root / MANIFEST
        if not path.exists():
            return None  # legacy: written before manifests existed, unverified
        manifest = _parse_json(path, path.read_bytes())
        hashes = manifest.get("sha256") if isinstance(manifest, dict) else None
        if not isinstance(hashes, dict):
            raise CheckpointCorruptError(f"{path}: not a checkpoint manifest (no 'sha256' table)")
        return hashes

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return name in self.hashes if self.hashes is not None else self.path(name).is_file()

    def read(self, name: str) -> bytes:
        """The bytes of ``name``, after checking them against the manifest."""
        path = _require_file(self.path(name))
        data = path.read_bytes()
        if self.hashes is not None:
            if name not in self.hashes:
                raise CheckpointCorruptError(f"{path}: not listed in {MANIFEST}, so not written with this checkpoint")
            if _sha256(data) != self.hashes[name]:
                raise CheckpointCorruptError(f"{path}: its SHA-256 differs from {MANIFEST} (the file was changed or "
                                             "damaged)")
        return data

    def json(self, name: str) -> Any:
        return _parse_json(self.path(name), self.read(name))

    def weights(self) -> dict[str, Tensor]:
        """The saved tensors (on the CPU), every floating tensor checked for finiteness."""
        path = self.path(WEIGHTS)
        try:
            tensors = safetensors.torch.load(self.read(WEIGHTS))
        except safetensors.SafetensorError as err:
            raise CheckpointCorruptError(f"{path}: not a readable safetensors file ({err})") from err
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointCorruptError(f"{path}: non-finite weights (NaN or inf) in {sorted(bad)}")
        return tensors

    def optimizer_state(self, map_location: str | torch.device) -> dict[str, Any] | None:
        """The optimiser state dict, unpickled with ``weights_only=True`` (no code runs); ``None`` if none was saved."""
        if not self.has(OPTIMIZER):
            return None
        path = self.path(OPTIMIZER)
        data = self.read(OPTIMIZER)
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as err:  # torch.load raises many types for a damaged or hostile file
            problem = f"{type(err).__name__}: {err}"
            raise CheckpointCorruptError(f"{path}: not a loadable optimiser state ({problem})") from err


def _parse_json(path: Path, data: bytes) -> Any:
    """``data`` as JSON; :class:`CheckpointCorruptError` naming ``path`` if it is not."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointCorruptError(f"{path}: not valid JSON ({err})") from err


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


def _check_config(saved: Any, given: dict[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointMismatchError` listing :func:`config_differences` when there are any."""
    if not isinstance(saved, dict):
        raise CheckpointCorruptError(f"{path}: a config must be a JSON object, got {type(saved).__name__}")
    diffs = config_differences(saved, given)
    if diffs:
        raise CheckpointMismatchError(f"checkpoint config {path} differs: " + "; ".join(diffs))


def config_differences(saved: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key (nested keys dotted, ``run.train.lambda_m``) whose JSON-normalised values differ or that one
    side lacks, as ``"key: saved X, given Y"``."""
    given = json.loads(json.dumps(given))
    diffs = []
    for key in sorted(saved.keys() | given.keys()):
        was, now = saved.get(key, _MISSING), given.get(key, _MISSING)
        if isinstance(was, dict) and isinstance(now, dict):
            diffs += config_differences(was, now, f"{prefix}{key}.")
        elif was != now:
            diffs.append(f"{prefix}{key}: saved {_shown(was)}, given {_shown(now)}")
    return diffs


_MISSING = object()


def _shown(value: Any) -> str:
    return "(missing)" if value is _MISSING else repr(value)


# ---------------------------------------------------------------------------------------------- recovery
def recover_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """Finish an interrupted save: move the newest complete hidden copy into place when ``directory`` is
    missing, then remove every other hidden copy. Call it while holding the lock of the folder above.

    Returns:
        the copy moved into place, or ``None`` when ``directory`` needed no recovery.
    """
    target = Path(directory)
    restored = None if target.exists() else find_checkpoint(target)
    if restored is not None:
        os.replace(restored, target)
        _fsync(target.parent)
    for copy in _hidden_copies(target):
        shutil.rmtree(copy, ignore_errors=True)
    return restored


def remove_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Delete the checkpoint ``directory`` and every hidden copy an interrupted save left beside it."""
    target = Path(directory)
    for path in [target, *_hidden_copies(target)]:
        if path.is_dir():
            shutil.rmtree(path)


def _hidden_copies(target: Path) -> list[Path]:
    """The temporary (``.name.tmp-*``) and set-aside (``.name.old-*``) directories saves leave beside ``target``."""
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir())


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` has a manifest (written last) and every file it lists, with the listed hashes."""
    try:
        files = _VerifiedFiles(directory)
        if files.hashes is None or not {WEIGHTS, CONFIG, STATE} <= files.hashes.keys() <= CHECKPOINT_FILES:
            return False
        for name in files.hashes:
            files.read(name)
    except (OSError, CheckpointCorruptError):
        return False
    return True


def _recency(directory: Path) -> tuple[bool, int]:
    """Sort key of complete copies: a finished temporary directory (the newer checkpoint) before a set-aside one,
    then by the manifest's modification time."""
    return ".tmp-" in directory.name, (directory / MANIFEST).stat().st_mtime_ns


# ---------------------------------------------------------------------------------------------- locking
@contextmanager
def lock_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on ``directory``, created if missing, for the ``with`` block.

    The lock is on the directory itself (no lock file is left behind) and the kernel releases it when the
    process exits, however it exits. POSIX only.

    Raises:
        DirectoryLockedError: another process holds it.
    """
    import fcntl

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise DirectoryLockedError(
                f"{path} is in use by another process (it holds the directory's lock); wait for it to "
                "finish or choose another directory") from err
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------------------------- files
def require_regular_or_new(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a regular file or does not exist; ``FileExistsError`` for anything else (a device,
    a directory, a pipe, a symbolic link), which is never read or replaced."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise FileExistsError(f"{path} exists and is not a regular file; refusing to read or replace it")
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` as :func:`write_bytes_atomic` does."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temporary sibling and a rename, creating the folder:
    a reader (or a crash) sees the old file or the new one, never half of one. ``path`` must be a regular
    file or new (:func:`require_regular_or_new`)."""
    path = require_regular_or_new(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) and fsync it."""
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj: Any) -> bytes:
    """``obj`` as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: Path) -> None:
    """Flush a written file, or a directory's entries (POSIX only), to disk."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _existing(directory: str | os.PathLike[str]) -> Path:
    """The directory to read the checkpoint ``directory`` from (:func:`find_checkpoint`); ``FileNotFoundError``
    naming it when there is none."""
    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"checkpoint directory not found: {Path(directory)}")
    return found


def _require_file(path: Path) -> Path:
    """``path`` itself; ``FileNotFoundError`` naming it if it is not a file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path
