"""Optimization pieces a training loop reaches for: EMA of the weights, learning-rate schedules, Adam/AdamW, autocast.

:func:`ema_update` and :func:`ema_decay` are plain functions usable in any loop::

    decay = ema_decay(batch_size=128, halflife_images=500_000, images_seen=step * 128, rampup_ratio=0.05)
    ema_update(ema.parameters(), model.parameters(), decay)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def ema_update(ema_params: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * param``, in place, in the EMA's own dtype (keep it fp32).

    Polyak averaging of the weights; ``decay = 0`` copies ``params``. Shapes match pairwise.
    """
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"params: expected {len(ema_params)} tensors (one per EMA tensor), got {len(params)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a float in [0, 1], got {decay}")
    with torch.no_grad():
        for i, (e, p) in enumerate(zip(ema_params, params)):
            if e.shape != p.shape:
                raise ValueError(f"params[{i}]: expected shape {tuple(e.shape)}, got {tuple(p.shape)}")
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


def ema_decay(*, batch_size: int, halflife_images: float, images_seen: float,
              rampup_ratio: float | None = None) -> float:
    """``0.5 ** (batch_size / h)``, ``h = min(halflife_images, rampup_ratio * images_seen)``.

    EDM (Karras et al., 2022), App. F: the EMA weight of a sample halves every ``h`` images; the
    ramp-up keeps ``h`` below a fraction of the images seen, so early EMAs forget the initialization.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    if not halflife_images >= 0 or not images_seen >= 0:
        raise ValueError(f"halflife_images, images_seen: expected >= 0, got {halflife_images}, {images_seen}")
    h = halflife_images if rampup_ratio is None else min(halflife_images, rampup_ratio * images_seen)
    return 0.5 ** (batch_size / max(h, 1e-8))


def lr_at(step: int, *, lr: float, warmup_steps: int, schedule: str = "constant", total_steps: int | None = None
          ) -> float:
    """The learning rate of step ``step`` (counting from 0): a linear warm-up, then ``schedule``.

    ``lr * min(1, (step + 1) / warmup_steps)`` times a decay factor ``d(p)`` of the progress after the warm-up,
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1]: ``constant`` d = 1 (DDPM,
    ADM, EDM), ``linear`` d = 1 - p, ``cosine`` d = (1 + cos(pi p)) / 2 (Loshchilov & Hutter 2017, SGDR Eq. 5
    without restarts). The decaying schedules need ``total_steps``.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step, warmup_steps: expected ints >= 0, got {step}, {warmup_steps}")
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule: expected 'constant', 'linear' or 'cosine', got {schedule!r}")
    warm = lr if warmup_steps == 0 else lr * min(1.0, (step + 1) / warmup_steps)
    if schedule == "constant":
        return warm
    if total_steps is None or total_steps < 1:
        raise ValueError(f"total_steps: expected an int >= 1 with schedule {schedule!r}, got {total_steps!r}")
    p = min(1.0, max(0.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1)))
    return warm * (1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (the schedule is a plain function of the step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) with weight decay on matrices/kernels only, fused on CUDA."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)


def adam(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
         eps: float = 1e-8) -> torch.optim.Adam:
    """Adam (Kingma & Ba, 2015) without weight decay, as DDPM and improved DDPM train; fused on CUDA."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused)


def make_optimizer(params: Iterable[torch.nn.Parameter], config: Any) -> torch.optim.Optimizer:
    """The optimizer a :class:`~recipes.train_config.TrainConfig` names: ``adamw`` or ``adam``, with its settings."""
    if config.optimizer == "adamw":
        return adamw(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                     weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return adam(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    raise ValueError(f"optimizer: expected 'adamw' or 'adam', got {config.optimizer!r}")


def autocast(device: torch.device, *, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
