"""A residual MLP denoiser for tiny images (the 8x8 digits on a CPU), with the U-Nets' calling convention.

``out = W_out(h_L)``, ``h_0 = W_in flatten(x)``, ``h_{l+1} = h_l + W2 dropout(silu(W1 LN(h_l) + emb))``, where
``emb`` is the noise-level embedding (:class:`~kdiff.nets.layers.NoiseEmbedding`) plus a label embedding. The
output layer starts at zero. On 8x8 images it is ~20x faster per image than the smallest U-Net on a CPU,
which is what makes whole-chain bounds over 1000 steps and sampling sweeps affordable there.

The network maps ``(x, noise_cond, labels=None) -> out`` like :class:`~kdiff.nets.unet.UNet`: ``x: (B, C, H, W)``
with ``H = W = image_size``; ``out: (B, C_out, H, W)``, ``C_out = 2 C`` with ``learn_variance`` [iDDPM Sec. 3.1].
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .._util import check_float
from .layers import LabelEmbedding, NoiseEmbedding, noise_cond_vector, zero_

__all__ = ["MLPConfig", "MLP"]


@dataclass(frozen=True)
class MLPConfig:
    """A residual MLP over flattened images."""

    image_size: int = 8  # H = W of the input
    in_channels: int = 1  # channels of x
    width: int = 512  # hidden width
    depth: int = 3  # residual blocks
    emb_dim: int = 128  # sinusoidal features of the noise level
    dropout: float = 0.0  # dropout inside each block
    learn_variance: bool = False  # also output the variance interpolation v: 2x channels [iDDPM Eq. 15]
    num_classes: int | None = None  # class conditioning; label num_classes is the reserved "no label"


class _Block(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.drop(nn.functional.silu(self.fc1(self.norm(h)) + emb)))


class MLP(nn.Module):
    """The residual MLP ``(x, noise_cond, labels=None) -> out``; see the module docstring."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        for name in ("image_size", "in_channels", "width", "depth", "emb_dim"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(cfg, name)}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {cfg.dropout}")
        self.cfg = cfg
        dims = cfg.in_channels * cfg.image_size**2
        self.out_channels = cfg.in_channels * (2 if cfg.learn_variance else 1)
        self.embed = NoiseEmbedding(cfg.emb_dim, cfg.width)
        self.labels = LabelEmbedding(cfg.num_classes, cfg.width) if cfg.num_classes else None
        self.inp = nn.Linear(dims, cfg.width)
        self.blocks = nn.ModuleList([_Block(cfg.width, cfg.dropout) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(cfg.width)
        self.out = zero_(nn.Linear(cfg.width, self.out_channels * cfg.image_size**2))

    def forward(self, x: Tensor, noise_cond: Tensor | float, labels: Tensor | None = None) -> Tensor:
        check_float(x, "x")
        size, c = self.cfg.image_size, self.cfg.in_channels
        if x.ndim != 4 or x.shape[1:] != (c, size, size):
            raise ValueError(f"x: expected shape (B, {c}, {size}, {size}), got {tuple(x.shape)}")
        b = x.shape[0]
        emb = self.embed(noise_cond_vector(noise_cond, b, x.device))
        if self.labels is not None:
            emb = emb + self.labels(labels, b, x.device)
        elif labels is not None:
            raise ValueError("labels: this network has no class conditioning (num_classes=None), got labels")
        h = self.inp(x.flatten(1).to(emb.dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.norm_out(h))).view(b, self.out_channels, size, size).to(x.dtype)
