"""The training loop a recipe drives: resumable data order, torchrun/DDP, logging, checkpoints.

A recipe provides a model, a dataset and a per-sample loss::

    loss_fn(model, batch, rand) -> (loss [b], noise_position [b])

``noise_position`` in [0, 1] (0 clean, 1 pure noise: ``t``, or the CDF of the sampled sigma) is only
used to log the loss per quarter of the noise range. ``rand`` draws the training noise so that it
does not depend on how the global batch is split across ranks (see :class:`Rand`).
:func:`train` does the rest: AdamW with warm-up, EMA, autocast, clipping, TensorBoard, a progress
bar, periodic atomic checkpoints with every RNG state, exact resume, and a clean stop on NaN/inf.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .common import (
    TrainConfig,
    adamw,
    autocast,
    checkpoint_path,
    config_to_dict,
    ema_decay,
    ema_update,
    load_checkpoint,
    lr_at,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    seed_globals,
    set_lr,
    set_rng_state,
)

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


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------


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
        raise ValueError("device: 'cuda' requested, but torch sees no CUDA device")
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


# ----------------------------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------------------------


def make_grid(images: Tensor, *, nrow: int | None = None, padding: int = 2) -> Tensor:
    """Tile ``images`` (N, C, H, W) in [-1, 1] row-major, ``nrow`` per row, into a uint8 (H', W', C) picture.

    Pixels are ``round(127.5 * (x + 1))`` clipped to [0, 255] (8-bit quantization); padding is black.
    ``nrow`` defaults to ``ceil(sqrt(N))``.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (N, C, H, W) tensor with C in (1, 3, 4), got {got}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a floating-point tensor in [-1, 1], got dtype {images.dtype}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow, padding: expected nrow >= 1 and padding >= 0, got {nrow}, {padding}")
    rows = max(1, math.ceil(n / nrow))
    pixels = (127.5 * (images.detach().float().cpu() + 1)).round().clamp(0, 255).to(torch.uint8)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid.permute(1, 2, 0)


def write_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, padding: int = 2) -> Tensor:
    """:func:`make_grid`, also written to ``path`` as a PNG (grayscale for C = 1); returns the grid."""
    grid = make_grid(images, nrow=nrow, padding=padding)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    array = grid.numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path, format="PNG")
    return grid


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Any, Rand], tuple[Tensor, Tensor]]
SampleFn = Callable[[nn.Module, torch.Generator], Tensor]
_NONE_BAD = 2**62


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or inf; training stopped without writing a checkpoint."""

    def __init__(self, step: int, stopped_at: int, checkpoint: Path | None) -> None:
        self.step, self.stopped_at, self.checkpoint = step, stopped_at, checkpoint
        kept = f"the last good checkpoint, {checkpoint}, is intact" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite loss or gradient norm (nan or inf) at step {step} (stopped at step "
                         f"{stopped_at}); {kept}. Lower the learning rate, enable --grad-clip, or resume "
                         "from the checkpoint with another seed.")


@dataclasses.dataclass
class TrainResult:
    """The trained state: ``model`` (the raw module, not the DDP wrapper) and its fp32 ``ema`` copy."""

    step: int
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    checkpoint: Path | None
    metrics: dict[str, float]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class _Metrics:
    """Sums kept on the device between logs (no sync per step); reduced over ranks at each log."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad = torch.full((), _NONE_BAD, dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        # [loss sum, count, 4 quarter sums, 4 quarter counts, positions outside [0, 1]]
        self.sums = torch.zeros(11, dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps, self.images, self.since = 0, 0, time.perf_counter()

    def add(self, step: int, loss: Tensor, position: Tensor, grad_norm: Tensor, images: int) -> None:
        loss, position = loss.detach().double(), position.detach().double()
        inside = (position >= 0) & (position <= 1)
        quarter = (position * 4).floor().clamp(0, 3).long()
        self.sums[0] += loss.sum()
        self.sums[1] += loss.numel()
        self.sums[2:6].index_add_(0, quarter, torch.where(inside, loss, 0))
        self.sums[6:10].index_add_(0, quarter, inside.double())
        self.sums[10] += (~inside).sum()
        self.grad_norm += grad_norm.detach().double()
        bad = ~(torch.isfinite(loss.sum()) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad == _NONE_BAD), step, self.first_bad)
        self.steps, self.images = self.steps + 1, self.images + images

    def reduce(self, dist: Dist) -> tuple[dict[str, float], int | None]:
        """Means over ranks and steps since the last reset, and the first non-finite step (or None)."""
        sums = all_reduce(self.sums.clone(), dist).tolist()
        first_bad = int(all_reduce(self.first_bad.clone(), dist, op="min"))
        if sums[10] > 0:
            raise ValueError(f"loss_fn: expected noise positions in [0, 1], got {int(sums[10])} outside")
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        out = {"loss": sums[0] / max(sums[1], 1), "grad_norm": float(self.grad_norm) / max(self.steps, 1),
               "images_per_s": self.images / elapsed}
        for q in range(4):
            if sums[6 + q] > 0:
                out[f"loss/noise_q{q + 1}"] = sums[2 + q] / sums[6 + q]
        return out, (None if first_bad == _NONE_BAD else first_bad)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _batches(loader: DataLoader, sampler: ResumableBatchSampler, dataset: Dataset) -> Iterator[Any]:
    """Batches forever, one DataLoader pass per epoch; ``dataset.set_epoch(epoch)`` (when it exists) is called
    before each pass, so epoch-dependent augmentation reaches fresh worker processes."""
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(sampler.epoch)
        yield from loader


def _optimizer_step(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                    batch: Any, rand: Rand, *, device: torch.device, local_batch: int, clip: float, bf16: bool
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """One step on ``mean(loss)``: returns (per-sample loss [b], noise position [b], gradient norm before clipping)."""
    model.train()
    with autocast(device, enabled=bf16):
        loss, position = loss_fn(net, batch, rand)
    if loss.shape != (local_batch,) or position.shape != (local_batch,):
        raise ValueError(f"loss_fn: expected (loss, noise position) of shapes ({local_batch},) and ({local_batch},), "
                         f"got {tuple(loss.shape)} and {tuple(position.shape)}")
    loss = loss.float()
    optimizer.zero_grad(set_to_none=True)
    loss.mean().backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss, position, grad_norm


def _write_samples(sample_fn: SampleFn, ema: nn.Module, *, seed: int, out_dir: Path, writer: Any, step: int) -> None:
    """A grid from ``sample_fn`` with a fixed generator; the global RNGs are left as they were."""
    device = next(ema.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        images = sample_fn(ema, torch.Generator(device).manual_seed(seed))
    grid = write_grid(images, out_dir / "samples" / f"step-{step:08d}.png")
    writer.add_image("samples", grid.numpy(), step, dataformats="HWC")


def _restore(path: Path, *, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
             sampler: ResumableBatchSampler, generator: torch.Generator, config: TrainConfig, dist: Dist) -> int:
    state = load_checkpoint(path)
    missing = [k for k in ("model", "ema", "optimizer", "sampler", "generator", "rng") if k not in state]
    if missing:
        raise ValueError(f"resume: {str(path)!r} lacks {missing}; not a training checkpoint")
    changed = sorted(k for k, v in config_to_dict(config).items() if state["config"].get(k, v) != v)
    if changed and dist.is_main:
        warnings.warn(f"resume: config fields differ from the checkpoint's: {changed}", stacklevel=3)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    generator.set_state(state["generator"])
    if len(state["rng"]) == dist.world_size:
        set_rng_state(state["rng"][dist.rank], dist.device)
    else:
        if dist.is_main:
            warnings.warn(f"resume: the checkpoint has RNG states for {len(state['rng'])} ranks, this run has "
                          f"{dist.world_size}; global RNGs are reseeded (data order and training noise are exact)",
                          stacklevel=3)
        seed_globals(rank_seed(config.seed + int(state["step"]), dist.rank))
    return int(state["step"])


def train(config: TrainConfig, *, model: nn.Module, loss_fn: LossFn, dataset: Dataset,
          collate_fn: Callable[[list[Any]], Any] | None = None, sample_fn: SampleFn | None = None,
          resume: str | Path | None = None, dist: Dist | None = None) -> TrainResult:
    """Train ``model`` for ``config.steps`` AdamW steps on ``mean(loss_fn(...)[0])``; see the module docstring.

    ``sample_fn(ema_model, generator) -> images (N, C, H, W) in [-1, 1]`` makes the sample grids
    (rank 0, a fixed generator, global RNGs untouched). ``resume``: a checkpoint written by this
    function. Raises :class:`NonFiniteLossError` when the loss or the gradient norm becomes NaN/inf;
    it is detected at the next log or checkpoint step, before anything is written.
    """
    dist = dist or init_distributed(config.device)
    device, out_dir = dist.device, Path(config.out_dir)
    model = model.to(device)
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    optimizer = adamw(model.parameters(), lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                      weight_decay=config.weight_decay)
    sampler = ResumableBatchSampler(len(dataset), batch_size=config.batch_size, seed=config.seed,
                                    rank=dist.rank, world_size=dist.world_size)
    generator = torch.Generator(device).manual_seed(config.seed)
    rand = Rand(generator, dist.rank, dist.world_size)
    step, last_checkpoint = 0, None
    if resume is not None:
        step = _restore(Path(resume), model=model, ema=ema, optimizer=optimizer, sampler=sampler,
                        generator=generator, config=config, dist=dist)
        last_checkpoint = Path(resume)
    else:
        seed_globals(rank_seed(config.seed, dist.rank))
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)

    net: nn.Module = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    # the loader's own generator (worker seeds) keeps it off the global RNG, whose state is checkpointed;
    # workers are not persistent, so each epoch's workers get the dataset after set_epoch
    loader_seed = int(np.random.SeedSequence([config.seed, dist.rank, step]).generate_state(1)[0])
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=config.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(loader_seed))
    writer, bar = None, None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=step if resume is not None else None)
        writer.add_text("config", "```\n" + json.dumps(config_to_dict(config), indent=2) + "\n```", step)
        bar = tqdm(total=config.steps, initial=step, disable=not config.progress, dynamic_ncols=True, unit="step")

    metrics, logged = _Metrics(device), {}
    clip = config.grad_clip if config.grad_clip is not None else math.inf
    batches = _batches(loader, sampler, dataset)
    try:
        while step < config.steps:
            lr = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps)
            set_lr(optimizer, lr)
            loss, position, grad_norm = _optimizer_step(
                net, model, optimizer, loss_fn, _to_device(next(batches), device), rand, device=device,
                local_batch=config.batch_size // dist.world_size, clip=clip, bf16=config.bf16)
            decay = config.ema_rate if config.ema_rate is not None else ema_decay(
                batch_size=config.batch_size, halflife_images=config.ema_halflife_kimg * 1000,
                images_seen=step * config.batch_size, rampup_ratio=config.ema_rampup_ratio)
            ema_update(list(ema.parameters()), list(model.parameters()), decay)
            for e, m in zip(ema.buffers(), model.buffers()):
                e.copy_(m)
            sampler.advance()
            step += 1
            metrics.add(step, loss, position, grad_norm, config.batch_size)
            if bar is not None:
                bar.update(1)

            checkpoint_due = _due(step, config.checkpoint_every, config.steps)
            sample_due = sample_fn is not None and _due(step, config.sample_every, config.steps)
            if _due(step, config.log_every, config.steps) or checkpoint_due or sample_due:
                logged, first_bad = metrics.reduce(dist)
                if first_bad is not None:
                    raise NonFiniteLossError(first_bad, step, last_checkpoint)
                logged["lr"] = lr
                metrics.reset()
                if writer is not None:
                    for name, value in logged.items():
                        writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
                    bar.set_postfix(loss=f"{logged['loss']:.4g}", lr=f"{lr:.3g}")
            if sample_due and dist.is_main:
                _write_samples(sample_fn, ema, seed=config.seed, out_dir=out_dir, writer=writer, step=step)
            if checkpoint_due:
                rngs = gather_objects(rng_state(device), dist)  # a collective: every rank takes part
                if dist.is_main:
                    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "sampler": sampler.state_dict(), "generator": generator.get_state(), "rng": rngs,
                             "world_size": dist.world_size}
                    save_checkpoint(state, config, out_dir=out_dir, step=step, keep=config.keep_checkpoints)
                last_checkpoint = checkpoint_path(out_dir, step)
    finally:
        if writer is not None:
            writer.close()
            bar.close()
    if dist.world_size > 1:
        torch_dist.barrier()
    return TrainResult(step=step, model=model, ema=ema, optimizer=optimizer, checkpoint=last_checkpoint,
                       metrics=logged)
