"""Simple diffusion's multiscale loss: the fused kernel lands here; until then, the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def multiscale_mse_ref(pred: Tensor, target: Tensor, *, base: int = 32) -> Tensor:
    """``sum_s (1/s) (1/s^2) || D_s[pred - target] ||^2`` over s = d, d/2, ..., base; ``[B]``."""
    diff = (pred - target).to(torch.float64 if pred.dtype == torch.float64 else torch.float32)
    d = pred.shape[-1]
    total = diff.new_zeros(pred.shape[0])
    s = d
    while True:
        pooled = F.avg_pool2d(diff, d // s) if s != d else diff
        total = total + pooled.pow(2).sum(dim=(1, 2, 3)) / (s**3)
        if s // 2 < base or s % 2:
            break
        s //= 2
    return total


def multiscale_mse(pred: Tensor, target: Tensor, *, base: int = 32) -> Tensor:
    return multiscale_mse_ref(pred, target, base=base)
