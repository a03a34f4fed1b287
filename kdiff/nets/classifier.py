"""ADM's noisy classifier for classifier guidance: the U-Net's downsampling trunk and an attention pool.

The classifier ``p(y | x_t)`` [ADM Sec. 4.1, App. C] is the downsampling half of the U-Net (with
its middle block), conditioned on the noise level through the same embedding, followed by
GroupNorm, SiLU and attention pooling over the final (8x8 in the paper) feature map: the spatial
mean is prepended as an extra token, a learned positional embedding is added, multi-head
attention runs over the ``N + 1`` tokens, and the mean token's output is projected to class logits.

``(x, noise_cond) -> logits``: ``x: (B, C, image_size, image_size)``, ``noise_cond``: a float or
``(B,)``; ``logits: (B, num_classes)``. The positional embedding fixes the input size to ``image_size``.

References:
    [ADM] Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Sec. 4.1, App. C.
    [CLIP] Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
        Supervision", Sec. 2.4 (attention pooling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import check_image_input, group_norm, multihead_self_attention, resolve_heads
from .unet import Trunk, TrunkConfig, level_resolutions

__all__ = ["ClassifierConfig", "AttentionPool2d", "NoisyClassifier"]


@dataclass(frozen=True)
class ClassifierConfig(TrunkConfig):
    """A noisy classifier: the :class:`TrunkConfig` fields plus the number of classes."""

    num_classes: int = 1000  # logits out


class AttentionPool2d(nn.Module):
    """``logits = W_c MHA([mean(h); h] + pos)[0]`` [ADM App. C, CLIP Sec. 2.4]; ``(B, C, S, S) -> (B, out)``."""

    def __init__(self, size: int, channels: int, out_dim: int, *, num_heads: int = 1,
                 head_channels: int | None = None, attention: str = "kdiff"):
        super().__init__()
        self.heads = resolve_heads(channels, num_heads=num_heads, head_channels=head_channels)
        self.impl = attention
        self.pos = nn.Parameter(torch.randn(size * size + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, h: Tensor) -> Tensor:
        tokens = h.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos.to(tokens.dtype)
        return self.proj(multihead_self_attention(tokens, self.qkv, self.heads, self.impl)[:, 0])


class NoisyClassifier(nn.Module):
    """ADM's noise-conditioned classifier ``(x, noise_cond) -> logits (B, num_classes)``."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if isinstance(cfg.num_classes, bool) or not isinstance(cfg.num_classes, int) or cfg.num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {cfg.num_classes!r}")
        self.cfg = cfg
        self.trunk = Trunk(cfg, in_channels=cfg.in_channels)
        ch = self.trunk.out_channels
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.pool = AttentionPool2d(level_resolutions(cfg)[-1], ch, cfg.num_classes, num_heads=cfg.num_heads,
                                    head_channels=cfg.head_channels, attention=cfg.attention)

    def forward(self, x: Tensor, noise_cond: Tensor | float) -> Tensor:
        size = self.cfg.image_size
        check_image_input(x, channels=self.cfg.in_channels, factor=1, dtype=self.norm_out.weight.dtype)
        if x.shape[-2:] != (size, size):
            raise ValueError(f"x: expected {size}x{size} images (the classifier's image_size), "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        h, _, _ = self.trunk(x, noise_cond)
        return self.pool(F.silu(self.norm_out(h)))
