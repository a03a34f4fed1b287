"""Checkpoints: atomic writes, every RNG state, the newest checkpoint of a run, pruning, the run-directory lock.

A run directory holds ``ckpt-<step>.pt`` (a dict: the training state, ``step``, ``recipe`` and ``config``) with a
``ckpt-<step>.json`` beside it (recipe, step and config, for people and tools). Files are written to a temporary
``.NAME.tmp-PID`` first, fsynced and renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

CHECKPOINT_GLOB = "ckpt-*.pt"


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------


def seed_globals(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG's state: torch CPU, CUDA (when ``device`` is CUDA), numpy, Python ``random``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: typing.Callable[[typing.BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content; the temporary
    file is removed on exceptions (after a kill it stays behind as ``.NAME.tmp-PID``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def checkpoint_steps(out_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``out_dir``, ascending (temporary files are ignored)."""
    steps = []
    for p in Path(out_dir).glob(CHECKPOINT_GLOB):
        with contextlib.suppress(ValueError):
            steps.append(int(p.stem.removeprefix("ckpt-")))
    return sorted(steps)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    steps = checkpoint_steps(out_dir)
    return checkpoint_path(out_dir, steps[-1]) if steps else None


def find_checkpoint(path: str | Path, *, name: str = "checkpoint") -> Path:
    """``path`` itself when it is a file, or the newest checkpoint of the run directory ``path``; a ValueError
    naming the argument ``name`` when there is none."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"{name}: expected a directory holding {CHECKPOINT_GLOB}, got {str(path)!r} (none there)")
        return found
    if not path.is_file():
        raise ValueError(f"{name}: expected a checkpoint file or a run directory, got {str(path)!r} (does not exist)")
    return path


def non_finite_tensors(state: Any, where: str = "state") -> list[str]:
    """Paths (``state['model']['w']``) of the floating-point tensors in a nested dict/list holding NaN or inf."""
    if isinstance(state, Tensor):
        return [where] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        return [p for k, v in state.items() for p in non_finite_tensors(v, f"{where}[{k!r}]")]
    if isinstance(state, (list, tuple)):
        return [p for i, v in enumerate(state) for p in non_finite_tensors(v, f"{where}[{i}]")]
    return []


def save_checkpoint(state: dict[str, Any], config: dict[str, Any], *, out_dir: str | Path, step: int,
                    recipe: str | None = None, keep: int | None = None) -> Path:
    """Write ``ckpt-<step>.pt`` (``state``, ``step``, ``recipe`` and ``config``) then ``ckpt-<step>.json`` (the
    recipe and resolved config, for people and tools), each atomically; then delete all but the ``keep`` newest.

    ``config`` is the JSON form of the run's config (:func:`recipes.config.config_to_dict`); ``recipe`` names
    the module that wrote it (``"edm"`` for ``recipes/edm.py``), so tools can rebuild the model from the file.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config: expected the JSON dict of a config, got {type(config).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(out_dir, step)
    text = json.dumps({"recipe": recipe, "step": step, "config": config}, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: torch.save({**state, "step": step, "recipe": recipe, "config": config}, f))
    atomic_write(path.with_suffix(".json"), lambda f: f.write(text.encode()))
    if keep is not None:
        prune_checkpoints(out_dir, keep=keep)
    return path


def prune_checkpoints(out_dir: str | Path, *, keep: int) -> list[int]:
    """Delete all but the ``keep`` newest ``ckpt-<step>.pt`` (and their ``.json``); returns the deleted steps."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    old = checkpoint_steps(out_dir)[:-keep]
    for step in old:
        checkpoint_path(out_dir, step).unlink(missing_ok=True)
        checkpoint_path(out_dir, step).with_suffix(".json").unlink(missing_ok=True)
    return old


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete ``.*.tmp-PID`` files a killed writer left in ``out_dir`` (call from one process only)."""
    stale = list(Path(out_dir).glob(".*.tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state dict, on CPU (``mmap``: tensors read lazily); ValueError naming a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: expected an existing file, got {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any unpickling failure means a bad file
        raise ValueError(f"checkpoint: {str(path)!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise ValueError(f"checkpoint: {str(path)!r} lacks a step and a config; not written by save_checkpoint")
    return state


# ----------------------------------------------------------------------------------------------
# The run-directory lock
# ----------------------------------------------------------------------------------------------

LOCK_NAME = ".lock"


class RunDirectoryLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``OUT_DIR/.lock``, held while a run writes there; the file names the holder.

    The kernel drops the lock when the holder exits, even on SIGKILL, so a killed run never blocks its resume.
    A second run on the same directory (another process, or another ``RunLock`` in this one) raises
    :class:`RunDirectoryLockedError` naming the holder (pid, host, command). POSIX only (``fcntl``).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl
        import socket
        import sys

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunDirectoryLockedError(
                f"out_dir: {str(self.path.parent)!r} is in use by another run ({holder}); wait for it to finish "
                "or choose another --out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
