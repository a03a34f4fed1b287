"""simple diffusion's U-ViT: a convolutional U-Net down to a base resolution, a transformer stack there.

Layout [SD Sec. 3.2, Fig. 4]: an optional lossless input downsampling (wavelet or pixel unshuffle,
[SD Sec. 3.4]); a conv stem; per convolutional level ``num_blocks`` residual blocks and a 2x
downsampling (no attention at these levels); at the base resolution (16x16 in the paper) the
feature map becomes ``N = base^2`` tokens, projected to ``width`` and summed with the projected
noise/class embedding, then ``depth`` pre-norm transformer blocks (self-attention + MLP, dropout);
then back up, each level a 2x upsampling followed by ``num_blocks + 1`` residual blocks fed
stored skips. ``conv_dropout`` sets dropout per convolutional level; the paper keeps it off at the
highest resolution [SD Sec. 3.3].

``(x, noise_cond, labels=None) -> out`` with the same shapes and label convention as
:class:`kdiff.nets.UNet`: ``x: (B, C, H, W)``, ``noise_cond``: float or ``(B,)``, ``labels: (B,)`` in
``[0, num_classes]`` or ``None``; ``out: (B, C_out, H, W)``.

References:
    [SD] Hoogeboom, Heek, Salimans 2023, "simple diffusion: End-to-end diffusion for high
        resolution images".
    [ADM] Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (residual blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dwt import TRANSFORMS, downsample_input, upsample_output
from .layers import (
    ATTENTION_IMPLS,
    Downsample,
    EmbedSequential,
    LabelEmbedding,
    NoiseEmbedding,
    ResBlock,
    TransformerBlock,
    Upsample,
    check_image_input,
    class_embedding,
    group_norm,
    noise_cond_vector,
    resolve_heads,
    zero_,
)

__all__ = ["UViTConfig", "UViT"]


@dataclass(frozen=True)
class UViTConfig:
    """A U-ViT; see the module docstring for the layout."""

    image_size: int = 128  # training resolution (pixels)
    in_channels: int = 3  # channels of x
    out_channels: int | None = None  # output channels (before learn_variance doubling); None = in_channels
    learn_variance: bool = False  # also output the variance interpolation v: 2x channels
    channels: tuple[int, ...] = (128, 256, 512)  # width of each convolutional level, highest resolution first
    num_blocks: int = 2  # residual blocks per convolutional level on the way down (+1 on the way up)
    conv_dropout: tuple[float, ...] = (0.0, 0.1, 0.1)  # dropout of each convolutional level
    width: int = 2048  # transformer width at the base resolution
    depth: int = 36  # transformer blocks
    num_heads: int = 1  # attention heads, unless head_channels is set
    head_channels: int | None = 128  # channels per head; overrides num_heads
    mlp_ratio: int = 4  # transformer MLP hidden width / width
    dropout: float = 0.1  # transformer dropout
    adagn: bool = True  # AdaGN in the residual blocks (else add-then-norm)
    biggan: bool = False  # BigGAN residual resampling (else strided conv / nearest + conv)
    num_classes: int | None = None  # class conditioning; label num_classes is the reserved "no label"
    embedding: str = "sinusoidal"  # noise-level features: "sinusoidal" or "fourier"
    fourier_scale: float = 16.0  # std of the random Fourier frequencies (embedding="fourier")
    input_transform: str | None = None  # lossless input downsampling: "legall53", "haar", "shuffle" or None
    input_levels: int = 1  # how many 2x input downsamplings (each: C -> 4C)
    norm_groups: int = 32  # GroupNorm groups; must divide every convolutional width
    attention: str = "kdiff"  # "kdiff" (kdiff.kernels.attention) or "sdpa" (F.scaled_dot_product_attention)
    use_checkpoint: bool = False  # recompute blocks in the backward pass (activation checkpointing)


def _check_config(cfg: UViTConfig, factor: int) -> None:
    for name in ("image_size", "in_channels", "num_blocks", "width", "depth", "num_heads", "mlp_ratio",
                 "input_levels", "norm_groups", "out_channels"):
        value = getattr(cfg, name)
        if value is None and name == "out_channels":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not cfg.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cfg.channels):
        raise ValueError(f"channels: expected a non-empty tuple of positive ints, got {cfg.channels!r}")
    if len(cfg.conv_dropout) != len(cfg.channels) or not all(0.0 <= p < 1.0 for p in cfg.conv_dropout):
        raise ValueError(f"conv_dropout: expected {len(cfg.channels)} probabilities in [0, 1) (one per level), "
                         f"got {cfg.conv_dropout!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {cfg.dropout}")
    if cfg.input_transform is not None and cfg.input_transform not in TRANSFORMS:
        raise ValueError(f"input_transform: expected None or one of {', '.join(TRANSFORMS)}, "
                         f"got {cfg.input_transform!r}")
    if cfg.attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_IMPLS)}, got {cfg.attention!r}")
    if cfg.image_size % factor:
        raise ValueError(f"image_size: expected a multiple of the total downsampling factor {factor}, "
                         f"got {cfg.image_size}")


class UViT(nn.Module):
    """simple diffusion's U-ViT ``(x, noise_cond, labels=None) -> out``; see the module docstring."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.cfg = cfg
        self.input_factor = 2**cfg.input_levels if cfg.input_transform else 1
        self.factor = self.input_factor * 2 ** len(cfg.channels)
        _check_config(cfg, self.factor)
        if cfg.num_classes is not None and (isinstance(cfg.num_classes, bool) or cfg.num_classes < 1):
            raise ValueError(f"num_classes: expected a positive int or None, got {cfg.num_classes!r}")
        resolve_heads(cfg.width, num_heads=cfg.num_heads, head_channels=cfg.head_channels)
        bands = self.input_factor**2
        out_channels = (cfg.out_channels or cfg.in_channels) * (2 if cfg.learn_variance else 1)
        emb_dim = 4 * cfg.channels[0]
        self.embed = NoiseEmbedding(cfg.channels[0], emb_dim, kind=cfg.embedding, fourier_scale=cfg.fourier_scale)
        self.labels = LabelEmbedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        seq = lambda blocks: EmbedSequential(blocks, use_checkpoint=cfg.use_checkpoint)

        def res(c_in: int, c_out: int, level: int, resample: str | None = None) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, dropout=cfg.conv_dropout[level], adagn=cfg.adagn,
                            resample=resample, groups=cfg.norm_groups)

        ch = cfg.channels[0]
        self.conv_in = nn.Conv2d(cfg.in_channels * bands, ch, 3, padding=1)
        skips = [ch]
        self.down = nn.ModuleList()
        for level, width in enumerate(cfg.channels):
            for _ in range(cfg.num_blocks):
                self.down.append(seq([res(ch, width, level)]))
                ch = width
                skips.append(ch)
            self.down.append(seq([res(ch, ch, level, "down") if cfg.biggan else Downsample(ch)]))
            skips.append(ch)
        skips.pop()  # the base-resolution features go through the transformer, not a skip

        self.proj_in = nn.Linear(ch, cfg.width)
        self.emb_in = nn.Linear(emb_dim, cfg.width)
        self.transformer = seq([TransformerBlock(cfg.width, num_heads=cfg.num_heads, head_channels=cfg.head_channels,
                                                 mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
                                                 attention=cfg.attention) for _ in range(cfg.depth)])
        self.norm_mid = nn.LayerNorm(cfg.width)
        self.proj_out = nn.Linear(cfg.width, ch)

        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.channels))):
            self.upsample.append(seq([res(ch, ch, level, "up") if cfg.biggan else Upsample(ch)]))
            blocks = nn.ModuleList()
            for _ in range(cfg.num_blocks + 1):
                blocks.append(seq([res(ch + skips.pop(), cfg.channels[level], level)]))
                ch = cfg.channels[level]
            self.up.append(blocks)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = zero_(nn.Conv2d(ch, out_channels * bands, 3, padding=1))

    def _transformer(self, h: Tensor, emb: Tensor) -> Tensor:
        """``(B, C, b, b) -> (B, C, b, b)`` through ``depth`` blocks on ``b^2`` tokens of ``width`` channels."""
        B, C, H, W = h.shape
        tokens = self.proj_in(h.flatten(2).transpose(1, 2)) + self.emb_in(F.silu(emb))[:, None]
        tokens = self.proj_out(self.norm_mid(self.transformer(tokens, emb)))
        return tokens.transpose(1, 2).reshape(B, C, H, W)

    def forward(self, x: Tensor, noise_cond: Tensor | float, labels: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        check_image_input(x, channels=cfg.in_channels, factor=self.factor, dtype=self.conv_out.weight.dtype)
        emb = self.embed(noise_cond_vector(noise_cond, x.shape[0], x.device)) + class_embedding(self.labels, labels, x)
        if cfg.input_transform:
            x = downsample_input(x, transform=cfg.input_transform, levels=cfg.input_levels)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self._transformer(skips.pop(), emb)
        for upsample, blocks in zip(self.upsample, self.up):
            h = upsample(h, emb)
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if cfg.input_transform:
            out = upsample_output(out, transform=cfg.input_transform, levels=cfg.input_levels)
        return out
