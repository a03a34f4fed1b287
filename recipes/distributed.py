"""Where this process sits in a torchrun job, and the randomness that must not depend on it.

:class:`Dist` / :func:`init_distributed` read torchrun's environment and join the process group;
:class:`ResumableBatchSampler` deals global batches whose order is a pure function of (seed, epoch, position);
:class:`Rand` draws training noise for the whole global batch, so 1 process and k processes see the same noise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor
from torch.utils.data import Sampler

# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------


class ResumableBatchSampler(Sampler[list[int]]):
    """Global batches in a fresh permutation each epoch; this rank's contiguous share of each.

    The whole state is ``(epoch, position, seed)``: the permutation of epoch ``e`` is drawn from its
    own generator seeded by ``(seed, e)``, and ``position`` indexes into it; no global RNG is used.
    The last ``n mod batch_size`` samples of each permutation are dropped. Iterating yields the rest
    of the current epoch without changing the state; call :meth:`advance` once per batch actually
    consumed, so a DataLoader that prefetches does not move the state ahead of training.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size: expected a positive multiple of world_size={world_size}, got {batch_size}")
        if n < batch_size:
            raise ValueError(f"dataset: expected at least batch_size={batch_size} samples, got {n}")
        if seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: a permutation of ``range(n)`` from a generator seeded by (seed, epoch)."""
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def global_batch(self, epoch: int, position: int) -> list[int]:
        return self.permutation(epoch)[position:position + self.batch_size].tolist()

    def _next(self, epoch: int, position: int) -> tuple[int, int]:
        position += self.batch_size
        return (epoch + 1, 0) if position + self.batch_size > self.n else (epoch, position)

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size // self.world_size
        epoch, position = self.epoch, self.position
        while True:
            yield self.global_batch(epoch, position)[self.rank * share:(self.rank + 1) * share]
            next_epoch, position = self._next(epoch, position)
            if next_epoch != epoch:
                return

    def advance(self) -> None:
        self.epoch, self.position = self._next(self.epoch, self.position)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "n", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state: expected {key}={getattr(self, key)}, got {state[key]} "
                                 "(the run being resumed used another dataset, batch size or seed)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer environment variable, got {text!r}") from None


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; join the process group (NCCL on CUDA, gloo on CPU).

    ``device``: ``auto`` (CUDA when present), ``cuda`` or ``cpu``; rank r uses ``cuda:LOCAL_RANK``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: expected 'cpu' or 'auto' on this machine ('cuda' requested, but torch sees no "
                         "CUDA device)")
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK: expected 0 <= RANK < WORLD_SIZE={world_size}, got {rank}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def close_distributed(dist: Dist) -> None:
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce(x: Tensor, dist: Dist, *, op: str = "sum") -> Tensor:
    """``x`` reduced over ranks (``sum``, ``min`` or ``max``), in place; unchanged on one process."""
    if dist.world_size > 1:
        torch_dist.all_reduce(x, op={"sum": torch_dist.ReduceOp.SUM, "min": torch_dist.ReduceOp.MIN,
                                     "max": torch_dist.ReduceOp.MAX}[op])
    return x


def gather_objects(obj: Any, dist: Dist) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if dist.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for rank ``rank`` of a run seeded ``seed`` (distinct per rank, stable across runs)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Rand:
    """Training noise that does not depend on how the global batch is sharded.

    ``generator`` is seeded identically on every rank; each draw makes the noise of the whole global
    batch (``world_size * b`` rows) and returns this rank's ``b`` rows, so 1 process with batch B and
    k processes with batch B/k see the same noise per sample. The draws cost ``world_size`` times
    one rank's share.
    """

    generator: torch.Generator
    rank: int = 0
    world_size: int = 1

    def _share(self, draw: Callable[..., Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if not shape:
            raise ValueError("shape: expected at least the batch dimension, got ()")
        full = draw((self.world_size * shape[0], *shape[1:]), generator=self.generator,
                    device=self.generator.device, dtype=dtype)
        return full[self.rank * shape[0]:(self.rank + 1) * shape[0]]

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normals, shape ``(b, ...)``."""
        return self._share(torch.randn, shape, dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniforms on [0, 1), shape ``(b, ...)``."""
        return self._share(torch.rand, shape, dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(*x.shape, dtype=x.dtype).to(x.device)
