"""Attention for diffusion networks: softmax(q k^T * scale) v over (B, H, N, D).

The Triton flash-attention kernels land here; until then every tensor runs the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` in plain torch; ``q, k, v: (B, H, N, D)``; float64-capable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(logits.float() if q.dtype in (torch.float16, torch.bfloat16)
                                      else logits, dim=-1).to(v.dtype), v)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Non-causal multi-head attention, ``q, k, v: (B, H, N, D)`` -> ``(B, H, N, D)``."""
    return attention_ref(q, k, v, scale=scale)
