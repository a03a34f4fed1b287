"""The training loop every recipe drives: resumable data order, torchrun/DDP, logging, checkpoints, exact resume.

A recipe provides a model, a dataset and a per-sample loss::

    loss_fn(model, batch, rand) -> (loss [b], noise_position [b])

``noise_position`` in [0, 1] (0 clean, 1 pure noise: ``t``, or the CDF of the sampled sigma) is only
used to log the loss per quarter of the noise range. ``rand`` draws the training noise so that it
does not depend on how the global batch is split across ranks (see :class:`~recipes.distributed.Rand`).

What a recipe may add (all optional):

- ``state={"name": obj}``: recipe-owned objects with ``state_dict()`` / ``load_state_dict()`` (a loss-history
  importance sampler, a counter); saved in every checkpoint and restored on resume, bitwise.
- ``extra_models={"name": Trainable(module, loss_fn)}``: more models trained on the same batches, each with
  its own optimizer, gradient clipping and EMA (a noisy-image classifier beside the diffusion model).
- ``optimizer_fn(params) -> Optimizer`` and ``lr_fn(step) -> lr``: replace the config's Adam/AdamW and schedule.
- ``recipe="edm"`` and ``info={...}``: recorded in every checkpoint, so tools rebuild the model from the file.

:func:`train` does the rest: warm-up, EMA, autocast, clipping, TensorBoard, a progress bar, periodic atomic
checkpoints with every RNG state, exact resume, a wall-clock budget (``max_seconds``), and a clean stop on
NaN/inf before anything non-finite is written. The loop never waits on the device between logs: losses are
summed on the device and read every ``log_every`` steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import (
    RunLock,
    checkpoint_path,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    seed_globals,
    set_rng_state,
)
from .config import config_to_dict, run_local_fields
from .distributed import Dist, Rand, ResumableBatchSampler, all_reduce, gather_objects, init_distributed, rank_seed
from .grids import write_grid
from .optim import autocast, ema_decay, ema_update, lr_at, make_optimizer, set_lr
from .train_config import TrainConfig

LossFn = Callable[[nn.Module, Any, Rand], tuple[Tensor, Tensor]]
SampleFn = Callable[[nn.Module, torch.Generator, Mapping[str, nn.Module]], Tensor]
_NONE_BAD = 2**62


class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)`` (torch modules and optimizers qualify)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclasses.dataclass
class Trainable:
    """A further model trained on the same batches as the main one, with its own loss, optimizer and EMA.

    ``optimizer_fn`` defaults to the config's optimizer (``make_optimizer``); ``lr_fn(step)`` sets the learning
    rate each step; without it an ``optimizer_fn``'s own learning rate is kept as built, and with neither the
    main model's schedule applies. ``grad_clip`` defaults to the config's. Its loss is logged as ``NAME/loss``.
    """

    module: nn.Module
    loss_fn: LossFn
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    lr_fn: Callable[[int], float] | None = None
    grad_clip: float | None = None
    ema: bool = True


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or inf; training stopped without writing them."""

    def __init__(self, step: int, stopped_at: int, checkpoint: Path | None, what: str = "loss or gradient norm"
                 ) -> None:
        self.step, self.stopped_at, self.checkpoint = step, stopped_at, checkpoint
        kept = f"the last good checkpoint, {checkpoint}, is intact" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite {what} (nan or inf) at step {step} (stopped at step {stopped_at}); {kept}. "
                         "Lower the learning rate, enable --grad-clip, or resume from the checkpoint with another "
                         "seed.")


NonFiniteLossError = NonFiniteError


@dataclasses.dataclass
class TrainResult:
    """The trained state: ``model`` (the raw module, not the DDP wrapper) and its fp32 ``ema`` copy.

    ``extra`` maps each extra model's name to ``(module, ema or module)``; ``stopped_early`` is True when
    ``max_seconds`` ended training before ``config.steps``.
    """

    step: int
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    checkpoint: Path | None
    metrics: dict[str, float]
    extra: dict[str, tuple[nn.Module, nn.Module]] = dataclasses.field(default_factory=dict)
    stopped_early: bool = False


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

    def reduce(self, dist: Dist, name: str = "loss_fn") -> tuple[dict[str, float], int | None]:
        """Means over ranks and steps since the last reset, and the first non-finite step (or None)."""
        sums = all_reduce(self.sums.clone(), dist).tolist()
        first_bad = int(all_reduce(self.first_bad.clone(), dist, op="min"))
        if sums[10] > 0:
            raise ValueError(f"{name}: expected noise positions in [0, 1], got {int(sums[10])} outside")
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        out = {"loss": sums[0] / max(sums[1], 1), "grad_norm": float(self.grad_norm) / max(self.steps, 1),
               "images_per_s": self.images / elapsed}
        for q in range(4):
            if sums[6 + q] > 0:
                out[f"loss/noise_q{q + 1}"] = sums[2 + q] / sums[6 + q]
        return out, (None if first_bad == _NONE_BAD else first_bad)


def _batches(loader: DataLoader, sampler: ResumableBatchSampler, dataset: Dataset) -> Iterator[Any]:
    """Batches forever, one DataLoader pass per epoch; ``dataset.set_epoch(epoch)`` (when it exists) is called
    before each pass, so epoch-dependent augmentation reaches fresh worker processes."""
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(sampler.epoch)
        yield from loader


@dataclasses.dataclass
class _Member:
    """One trained model inside the loop: the module, its (DDP/compiled) forward, optimizer, EMA, metrics."""

    name: str
    model: nn.Module
    net: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    lr_fn: Callable[[int], float] | None  # None: keep the optimizer's own learning rate
    clip: float
    ema: nn.Module | None
    metrics: _Metrics

    def step(self, step: int, batch: Any, rand: Rand, *, device: torch.device, local_batch: int, bf16: bool
             ) -> tuple[Tensor, Tensor, Tensor, float]:
        """One optimizer step on ``mean(loss)``: (per-sample loss [b], position [b], grad norm before clipping, lr)."""
        if self.lr_fn is not None:
            lr = self.lr_fn(step)
            set_lr(self.optimizer, lr)
        else:
            lr = float(self.optimizer.param_groups[0]["lr"])
        self.model.train()
        with autocast(device, enabled=bf16):
            loss, position = self.loss_fn(self.net, batch, rand)
        if loss.shape != (local_batch,) or position.shape != (local_batch,):
            raise ValueError(f"{'loss_fn' if self.name == 'model' else self.name + ' loss_fn'}: expected (loss, noise "
                             f"position) of shapes ({local_batch},) and ({local_batch},), got {tuple(loss.shape)} and "
                             f"{tuple(position.shape)}")
        loss = loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return loss, position, grad_norm, lr

    def update_ema(self, decay: float) -> None:
        if self.ema is None:
            return
        ema_update(list(self.ema.parameters()), list(self.model.parameters()), decay)
        for e, m in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(m)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])

    @property
    def sampling_module(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model


def _write_samples(sample_fn: SampleFn, ema: nn.Module, extras: Mapping[str, nn.Module], *, seed: int,
                   out_dir: Path, writer: Any, step: int) -> None:
    """A grid from ``sample_fn`` with a fixed generator; the global RNGs are left as they were."""
    device = next(ema.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        images = sample_fn(ema, torch.Generator(device).manual_seed(seed), extras)
    grid = write_grid(images, out_dir / "samples" / f"step-{step:08d}.png")
    writer.add_image("samples", grid.numpy(), step, dataformats="HWC")


_STATE_KEYS = ("model", "ema", "optimizer", "sampler", "generator", "rng", "extra_models", "recipe_state")


def _restore(path: Path, *, main: _Member, extras: list[_Member], state: Mapping[str, Stateful],
             sampler: ResumableBatchSampler, generator: torch.Generator, config: TrainConfig, recipe: str | None,
             dist: Dist) -> int:
    ckpt = load_checkpoint(path)
    missing = [k for k in _STATE_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"resume: {str(path)!r} lacks {missing}; not a training checkpoint of this loop")
    if recipe is not None and ckpt.get("recipe") not in (None, recipe):
        raise ValueError(f"resume: expected a checkpoint of recipe {recipe!r}, got one of {ckpt['recipe']!r} "
                         f"({str(path)!r})")
    names = sorted(m.name for m in extras)
    if sorted(ckpt["extra_models"]) != names or sorted(ckpt["recipe_state"]) != sorted(state):
        raise ValueError(f"resume: {str(path)!r} holds extra models {sorted(ckpt['extra_models'])} and recipe state "
                         f"{sorted(ckpt['recipe_state'])}; this run has {names} and {sorted(state)}")
    local = set(run_local_fields(type(config)))  # this run's own by design: not worth a warning
    changed = sorted(k for k, v in config_to_dict(config).items() if ckpt["config"].get(k, v) != v and k not in local)
    if changed and dist.is_main:
        warnings.warn(f"resume: config fields differ from the checkpoint's: {changed}", stacklevel=3)
    try:
        main.load({k: ckpt[k] for k in ("model", "ema", "optimizer")})
        for member in extras:
            member.load(ckpt["extra_models"][member.name])
    except (RuntimeError, KeyError, ValueError) as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise ValueError(f"resume: the weights in {str(path)!r} do not fit the network this config describes "
                         f"({type(e).__name__}: {first})") from None
    for name, obj in state.items():
        obj.load_state_dict(ckpt["recipe_state"][name])
    sampler.load_state_dict(ckpt["sampler"])
    generator.set_state(ckpt["generator"])
    if len(ckpt["rng"]) == dist.world_size:
        set_rng_state(ckpt["rng"][dist.rank], dist.device)
    else:
        if dist.is_main:
            warnings.warn(f"resume: the checkpoint has RNG states for {len(ckpt['rng'])} ranks, this run has "
                          f"{dist.world_size}; global RNGs are reseeded (data order and training noise are exact)",
                          stacklevel=3)
        seed_globals(rank_seed(config.seed + int(ckpt["step"]), dist.rank))
    return int(ckpt["step"])


def _wrap(model: nn.Module, config: TrainConfig, dist: Dist) -> nn.Module:
    net: nn.Module = model
    if dist.world_size > 1:
        device = dist.device
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiles(config, dist.device):
        net = torch.compile(net, mode=config.compile_mode)
    return net


def compiles(config: TrainConfig, device: torch.device) -> bool:
    """Whether the loop compiles the network: ``config.compile``, or when it is None, whether it trains on CUDA."""
    return config.compile if config.compile is not None else device.type == "cuda"


def _non_finite_weights(members: list[_Member]) -> list[str]:
    """Names of the members whose weights or EMA hold NaN/inf (one device sync for all of them)."""
    flags = []
    for m in members:
        tensors = [p for p in m.model.parameters()] + ([p for p in m.ema.parameters()] if m.ema is not None else [])
        flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors
                     else torch.ones((), dtype=torch.bool))
    ok = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [m.name for m, good in zip(members, ok) if not good]


def train(config: TrainConfig, *, model: nn.Module, loss_fn: LossFn, dataset: Dataset,
          collate_fn: Callable[[list[Any]], Any] | None = None, sample_fn: SampleFn | None = None,
          resume: str | Path | None = None, dist: Dist | None = None,
          extra_models: Mapping[str, Trainable] | None = None, state: Mapping[str, Stateful] | None = None,
          optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
          lr_fn: Callable[[int], float] | None = None, recipe: str | None = None,
          info: Mapping[str, Any] | None = None, lock: bool = True) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps on ``mean(loss_fn(...)[0])``; see the module docstring.

    ``sample_fn(ema_model, generator, extra_emas) -> images (N, C, H, W) in [-1, 1]`` makes the sample grids
    (rank 0, a fixed generator, global RNGs untouched; ``extra_emas`` maps each extra model's name to its EMA).
    ``resume``: a checkpoint written by this function. ``lock``: take the run directory's lock (pass False
    when the caller holds it). Raises :class:`NonFiniteError` when the loss or gradient norm (checked at
    the next log) or the weights (checked before every checkpoint) become NaN/inf; nothing non-finite is written.
    """
    dist = dist or init_distributed(config.device)
    device, out_dir = dist.device, Path(config.out_dir)
    state = dict(state or {})
    extra_models = dict(extra_models or {})
    if "model" in extra_models:
        raise ValueError("extra_models: expected names other than 'model' (the main model's)")
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format

    def schedule(step: int) -> float:
        return lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps, schedule=config.lr_schedule,
                     total_steps=config.steps)

    def member(name: str, module: nn.Module, fn: LossFn, make_opt: Callable | None, lr: Callable | None,
               clip: float | None, with_ema: bool) -> _Member:
        module = module.to(device, memory_format=memory_format)
        ema = copy.deepcopy(module).float().eval().requires_grad_(False) if with_ema else None
        optimizer = (make_opt or (lambda p: make_optimizer(p, config)))(module.parameters())
        clip = clip if clip is not None else config.grad_clip
        step_lr = lr if lr is not None else (None if make_opt is not None and name != "model" else lr_fn or schedule)
        return _Member(name, module, _wrap(module, config, dist), fn, optimizer, step_lr,
                       clip if clip is not None else math.inf, ema, _Metrics(device))

    main = member("model", model, loss_fn, optimizer_fn, lr_fn, config.grad_clip, True)
    extras = [member(name, t.module, t.loss_fn, t.optimizer_fn, t.lr_fn, t.grad_clip, t.ema)
              for name, t in extra_models.items()]
    members = [main, *extras]
    sampler = ResumableBatchSampler(len(dataset), batch_size=config.batch_size, seed=config.seed,
                                    rank=dist.rank, world_size=dist.world_size)
    generator = torch.Generator(device).manual_seed(config.seed)
    rand = Rand(generator, dist.rank, dist.world_size)
    run_lock = RunLock(out_dir) if lock and dist.is_main else None
    if run_lock is not None:
        run_lock.acquire()
    writer, bar = None, None
    try:
        step, last_checkpoint = 0, None
        if resume is not None:
            step = _restore(Path(resume), main=main, extras=extras, state=state, sampler=sampler,
                            generator=generator, config=config, recipe=recipe, dist=dist)
            last_checkpoint = Path(resume)
        else:
            seed_globals(rank_seed(config.seed, dist.rank))
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out_dir)

        # the loader's own generator (worker seeds) keeps it off the global RNG, whose state is checkpointed;
        # workers are not persistent, so each epoch's workers get the dataset after set_epoch
        loader_seed = int(np.random.SeedSequence([config.seed, dist.rank, step]).generate_state(1)[0])
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=config.num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(loader_seed))
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=step if resume is not None else None)
            writer.add_text("config", "```\n" + json.dumps(config_to_dict(config), indent=2) + "\n```", step)
            bar = tqdm(total=config.steps, initial=step, disable=not config.progress, dynamic_ncols=True,
                       unit="step")

        logged: dict[str, float] = {}
        batches = _batches(loader, sampler, dataset)
        local_batch = config.batch_size // dist.world_size
        graphs = compiles(config, device) and config.compile_mode in ("reduce-overhead", "max-autotune")
        started = time.monotonic()
        out_of_time = False
        while step < config.steps and not out_of_time:
            batch = _to_device(next(batches), device)
            if graphs:  # CUDA-graph trees: a new iteration starts here (outputs of the last one may be reused)
                torch.compiler.cudagraph_mark_step_begin()
            lrs = []
            for m in members:
                loss, position, grad_norm, lr = m.step(step, batch, rand, device=device, local_batch=local_batch,
                                                       bf16=config.bf16)
                lrs.append(lr)
                m.metrics.add(step + 1, loss, position, grad_norm, config.batch_size)
            decay = config.ema_rate if config.ema_rate is not None else ema_decay(
                batch_size=config.batch_size, halflife_images=config.ema_halflife_kimg * 1000,
                images_seen=step * config.batch_size, rampup_ratio=config.ema_rampup_ratio)
            for m in members:
                m.update_ema(decay)
            sampler.advance()
            step += 1
            if bar is not None:
                bar.update(1)

            log_due = step % config.log_every == 0
            if config.max_seconds is not None and (dist.world_size == 1 or log_due):
                out_of_time = time.monotonic() - started >= config.max_seconds  # host clock: no device sync
                if dist.world_size > 1:  # every rank must stop at the same step
                    late = torch.tensor(float(out_of_time), device=device)
                    out_of_time = bool(all_reduce(late, dist, op="max"))
            final = step == config.steps or out_of_time
            checkpoint_due = final or step % config.checkpoint_every == 0
            sample_due = sample_fn is not None and (final or (config.sample_every > 0
                                                              and step % config.sample_every == 0))
            if log_due or checkpoint_due or sample_due:
                logged = {}
                for m, lr in zip(members, lrs):
                    values, first_bad = m.metrics.reduce(dist, "loss_fn" if m.name == "model" else m.name)
                    if first_bad is not None:
                        what = "loss or gradient norm" + ("" if m.name == "model" else f" of {m.name}")
                        raise NonFiniteError(first_bad, step, last_checkpoint, what)
                    values["lr"] = lr
                    m.metrics.reset()
                    logged.update(values if m.name == "model" else {f"{m.name}/{k}": v for k, v in values.items()})
                if writer is not None:
                    for name, value in logged.items():
                        writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
                    bar.set_postfix(loss=f"{logged['loss']:.4g}", lr=f"{lrs[0]:.3g}")
            if checkpoint_due:
                bad = _non_finite_weights(members)
                if bad:
                    raise NonFiniteError(step, step, last_checkpoint, f"weights of {', '.join(bad)}")
                rngs = gather_objects(rng_state(device), dist)  # a collective: every rank takes part
                if dist.is_main:
                    ckpt = {**main.state(), "sampler": sampler.state_dict(), "generator": generator.get_state(),
                            "rng": rngs, "world_size": dist.world_size,
                            "extra_models": {m.name: m.state() for m in extras},
                            "recipe_state": {name: obj.state_dict() for name, obj in state.items()},
                            "info": dict(info or {})}
                    save_checkpoint(ckpt, config_to_dict(config), out_dir=out_dir, step=step, recipe=recipe,
                                    keep=config.keep_checkpoints)
                last_checkpoint = checkpoint_path(out_dir, step)
            if sample_due and dist.is_main:  # after the checkpoint: a failing sampler never loses the run
                _write_samples(sample_fn, main.sampling_module, {m.name: m.sampling_module for m in extras},
                               seed=config.seed, out_dir=out_dir, writer=writer, step=step)
    finally:
        if writer is not None:
            writer.close()
            bar.close()
        if run_lock is not None:
            run_lock.release()
    if dist.world_size > 1:
        torch_dist.barrier()
    return TrainResult(step=step, model=main.model, ema=main.ema, optimizer=main.optimizer,
                       checkpoint=last_checkpoint, metrics=logged,
                       extra={m.name: (m.model, m.sampling_module) for m in extras},
                       stopped_early=out_of_time)
