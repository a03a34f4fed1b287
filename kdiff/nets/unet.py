"""The ADM U-Net family: DDPM's U-Net and its Improved-DDPM and ADM refinements, one configurable module.

Layout [DDPM App. B; ADM Sec. 3]: a conv stem; per resolution level ``num_blocks`` residual blocks
(self-attention after each at the resolutions in ``attn_resolutions``), then a 2x downsampling;
a middle of residual block, attention, residual block; the mirror image going up with
``num_blocks + 1`` blocks per level, each fed the concatenation of the running features and one
stored skip; GroupNorm, SiLU and a zero-initialized conv out. The knobs are the papers' ablations:
AdaGN or "add then norm" (``adagn``, ADM Table 3), BigGAN residual resampling or plain resampling
(``biggan``), heads or channels per head (ADM Table 2), dropout, class conditioning with a
reserved "no label" row for classifier-free guidance, a learned variance output (2x channels,
[iDDPM Sec. 3.1]), and an optional lossless input downsampling (wavelet or pixel unshuffle [SD]).
simple diffusion's U-Net [SD Sec. 3.2-3.3] is two more knobs: ``level_blocks`` (a block count per
level, to put the depth at 16x16) and ``dropout_max_resolution`` (dropout only at feature maps of
that size or smaller, none on the highest resolutions). Their defaults build the ADM network unchanged.

The network maps ``(x, noise_cond, labels=None) -> out``: ``x: (B, C, H, W)``; ``noise_cond``: a float
or ``(B,)`` tensor (EDM's ``c_noise``, the log-SNR, or a timestep) fed to the embedding as is;
``labels: (B,)`` integers in ``[0, num_classes]`` or ``None`` (= all "no label");
``out: (B, C_out, H, W)``. H and W need only be divisible by the total downsampling factor.

References:
    [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", App. B.
    [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
    [ADM] Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Sec. 3 and App. C.
    [SD] Hoogeboom, Heek, Salimans 2023, "simple diffusion", Sec. 3.2-3.4.
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
    SelfAttention2d,
    Upsample,
    check_image_input,
    class_embedding,
    group_norm,
    noise_cond_vector,
    zero_,
)

__all__ = ["TrunkConfig", "UNetConfig", "UNet", "check_image_input", "blocks_per_level", "dropout_per_level"]


@dataclass(frozen=True)
class TrunkConfig:
    """What the U-Net and the noisy classifier share: the downsampling trunk and its middle."""

    image_size: int = 32  # training resolution (pixels); fixes which levels carry attention
    in_channels: int = 3  # channels of x
    channels: int = 128  # width of the first level; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # one multiplier per resolution level
    num_blocks: int = 2  # residual blocks per level on the way down (num_blocks + 1 on the way up)
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes (pixels) with self-attention
    num_heads: int = 1  # attention heads, unless head_channels is set
    head_channels: int | None = None  # channels per head; overrides num_heads [ADM Table 2]
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    dropout: float = 0.0  # dropout inside every residual block
    adagn: bool = False  # AdaGN (scale and shift from the embedding) instead of add-then-norm [ADM Table 3]
    biggan: bool = False  # BigGAN residual blocks for up/down-sampling instead of plain resampling
    conv_resample: bool = True  # plain resampling with a 3x3 conv (else pooling / nearest only)
    embedding: str = "sinusoidal"  # noise-level features: "sinusoidal" or "fourier"
    fourier_scale: float = 16.0  # std of the random Fourier frequencies (embedding="fourier")
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count
    attention: str = "kdiff"  # "kdiff" (kdiff.kernels.attention) or "sdpa" (F.scaled_dot_product_attention)
    use_checkpoint: bool = False  # recompute blocks in the backward pass (activation checkpointing)
    level_blocks: tuple[int, ...] | None = None  # blocks per level going down (+1 up), overriding num_blocks [SD 3.2]
    dropout_max_resolution: int | None = None  # dropout only at feature maps this size or smaller [SD 3.3]; None: all


@dataclass(frozen=True)
class UNetConfig(TrunkConfig):
    """A U-Net of the ADM family; see the module docstring for the layout."""

    out_channels: int | None = None  # output channels (before learn_variance doubling); None = in_channels
    learn_variance: bool = False  # also output the variance interpolation v: 2x channels [iDDPM Eq. 15]
    num_classes: int | None = None  # class conditioning; label num_classes is the reserved "no label"
    input_transform: str | None = None  # lossless input downsampling: "legall53", "haar", "shuffle" or None
    input_levels: int = 1  # how many 2x input downsamplings (each: C -> 4C)


def _check_positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def level_resolutions(cfg: TrunkConfig, *, input_factor: int = 1) -> list[int]:
    """Feature-map size of each level: ``image_size / input_factor / 2^i``."""
    base = cfg.image_size // input_factor
    return [base // 2**i for i in range(len(cfg.channel_mult))]


def blocks_per_level(cfg: TrunkConfig) -> tuple[int, ...]:
    """Residual blocks of each level on the way down: ``level_blocks``, else ``num_blocks`` everywhere.

    simple diffusion scales the U-Net at the 16x16 level only [SD Sec. 3.2]: more blocks there, the
    standard few elsewhere. The way up has one more block per level, as in the ADM U-Net.
    """
    return cfg.level_blocks if cfg.level_blocks is not None else (cfg.num_blocks,) * len(cfg.channel_mult)


def dropout_per_level(cfg: TrunkConfig, *, input_factor: int = 1) -> tuple[float, ...]:
    """Dropout of each level: ``dropout`` where the feature map is at most ``dropout_max_resolution`` pixels
    (all levels when it is None), else 0 [SD Sec. 3.3: dropout, but not on the highest resolutions]."""
    limit = cfg.dropout_max_resolution
    return tuple(cfg.dropout if limit is None or r <= limit else 0.0
                 for r in level_resolutions(cfg, input_factor=input_factor))


def check_trunk_config(cfg: TrunkConfig, *, input_factor: int = 1) -> None:
    """ValueError naming the field for an inconsistent configuration."""
    for name in ("image_size", "in_channels", "channels", "num_blocks", "num_heads", "norm_groups"):
        _check_positive(getattr(cfg, name), name)
    if not cfg.channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in cfg.channel_mult):
        raise ValueError(f"channel_mult: expected a non-empty tuple of positive ints, got {cfg.channel_mult!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {cfg.dropout}")
    if cfg.level_blocks is not None and (
            not isinstance(cfg.level_blocks, tuple) or len(cfg.level_blocks) != len(cfg.channel_mult)
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in cfg.level_blocks)):
        raise ValueError(f"level_blocks: expected None or {len(cfg.channel_mult)} positive ints (one per level of "
                         f"channel_mult), got {cfg.level_blocks!r}")
    if cfg.dropout_max_resolution is not None:
        _check_positive(cfg.dropout_max_resolution, "dropout_max_resolution")
    if cfg.attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_IMPLS)}, got {cfg.attention!r}")
    factor = input_factor * 2 ** (len(cfg.channel_mult) - 1)
    if cfg.image_size % factor:
        raise ValueError(f"image_size: expected a multiple of the total downsampling factor {factor}, "
                         f"got {cfg.image_size}")
    levels = level_resolutions(cfg, input_factor=input_factor)
    unknown = sorted(set(cfg.attn_resolutions) - set(levels))
    if unknown:
        raise ValueError(f"attn_resolutions: expected sizes among the levels' {levels}, got {unknown}")


class Trunk(nn.Module):
    """Noise embedding, conv stem, downsampling levels and middle.

    ``forward(x, noise_cond, class_emb) -> (h, emb, skips)``: ``emb = NoiseEmbedding(noise_cond) + class_emb``,
    ``skips`` the stem's and every downsampling block's output, ``h`` the middle's output.
    """

    def __init__(self, cfg: TrunkConfig, *, in_channels: int, input_factor: int = 1):
        super().__init__()
        check_trunk_config(cfg, input_factor=input_factor)
        self.emb_dim = emb_dim = 4 * cfg.channels
        self.embed = NoiseEmbedding(cfg.channels, emb_dim, kind=cfg.embedding, fourier_scale=cfg.fourier_scale)
        res_kw = dict(emb_dim=emb_dim, dropout=cfg.dropout, adagn=cfg.adagn, groups=cfg.norm_groups)
        attn_kw = dict(num_heads=cfg.num_heads, head_channels=cfg.head_channels, groups=cfg.norm_groups,
                       attention=cfg.attention)
        self.res_kw, self.attn_kw = res_kw, attn_kw
        seq = lambda blocks: EmbedSequential(blocks, use_checkpoint=cfg.use_checkpoint)

        ch = cfg.channels * cfg.channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        self.skip_channels = [ch]
        resolutions = level_resolutions(cfg, input_factor=input_factor)
        self.level_dropout = dropout_per_level(cfg, input_factor=input_factor)
        for level, (mult, n_blocks) in enumerate(zip(cfg.channel_mult, blocks_per_level(cfg))):
            level_kw = {**res_kw, "dropout": self.level_dropout[level]}
            for _ in range(n_blocks):
                blocks: list[nn.Module] = [ResBlock(ch, cfg.channels * mult, **level_kw)]
                ch = cfg.channels * mult
                if resolutions[level] in cfg.attn_resolutions:
                    blocks.append(SelfAttention2d(ch, **attn_kw))
                self.down.append(seq(blocks))
                self.skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:  # a BigGAN block's dropout acts on its output: the next level
                down_kw = {**res_kw, "dropout": self.level_dropout[level + 1]}
                self.down.append(seq([ResBlock(ch, ch, resample="down", **down_kw) if cfg.biggan
                                      else Downsample(ch, conv=cfg.conv_resample)]))
                self.skip_channels.append(ch)
        mid_kw = {**res_kw, "dropout": self.level_dropout[-1]}
        middle: list[nn.Module] = [ResBlock(ch, ch, **mid_kw)]
        if cfg.mid_attention:
            middle.append(SelfAttention2d(ch, **attn_kw))
        self.middle = seq(middle + [ResBlock(ch, ch, **mid_kw)])
        self.out_channels = ch

    def forward(self, x: Tensor, noise_cond: Tensor | float,
                class_emb: Tensor | float = 0.0) -> tuple[Tensor, Tensor, list[Tensor]]:
        emb = self.embed(noise_cond_vector(noise_cond, x.shape[0], x.device)) + class_emb
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        return self.middle(h, emb), emb, skips


class UNet(nn.Module):
    """The ADM-family U-Net ``(x, noise_cond, labels=None) -> out``; see the module docstring for shapes."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.input_transform is not None and cfg.input_transform not in TRANSFORMS:
            raise ValueError(f"input_transform: expected None or one of {', '.join(TRANSFORMS)}, "
                             f"got {cfg.input_transform!r}")
        _check_positive(cfg.input_levels, "input_levels")
        if cfg.num_classes is not None:
            _check_positive(cfg.num_classes, "num_classes")
        if cfg.out_channels is not None:
            _check_positive(cfg.out_channels, "out_channels")
        self.cfg = cfg
        self.input_factor = 2**cfg.input_levels if cfg.input_transform else 1
        bands = self.input_factor**2
        self.factor = self.input_factor * 2 ** (len(cfg.channel_mult) - 1)
        out_channels = (cfg.out_channels or cfg.in_channels) * (2 if cfg.learn_variance else 1)

        self.trunk = Trunk(cfg, in_channels=cfg.in_channels * bands, input_factor=self.input_factor)
        self.labels = LabelEmbedding(cfg.num_classes, self.trunk.emb_dim) if cfg.num_classes else None
        res_kw, attn_kw = self.trunk.res_kw, self.trunk.attn_kw
        seq = lambda blocks: EmbedSequential(blocks, use_checkpoint=cfg.use_checkpoint)

        skips = list(self.trunk.skip_channels)
        resolutions = level_resolutions(cfg, input_factor=self.input_factor)
        ch = self.trunk.out_channels
        self.up = nn.ModuleList()
        level_blocks = blocks_per_level(cfg)
        for level in reversed(range(len(cfg.channel_mult))):
            level_kw = {**res_kw, "dropout": self.trunk.level_dropout[level]}
            for i in range(level_blocks[level] + 1):
                out_ch = cfg.channels * cfg.channel_mult[level]
                blocks: list[nn.Module] = [ResBlock(ch + skips.pop(), out_ch, **level_kw)]
                ch = out_ch
                if resolutions[level] in cfg.attn_resolutions:
                    blocks.append(SelfAttention2d(ch, **attn_kw))
                if level > 0 and i == level_blocks[level]:  # dropout on the upsampled output: the level above
                    up_kw = {**res_kw, "dropout": self.trunk.level_dropout[level - 1]}
                    blocks.append(ResBlock(ch, ch, resample="up", **up_kw) if cfg.biggan
                                  else Upsample(ch, conv=cfg.conv_resample))
                self.up.append(seq(blocks))
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = zero_(nn.Conv2d(ch, out_channels * bands, 3, padding=1))

    def forward(self, x: Tensor, noise_cond: Tensor | float, labels: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        check_image_input(x, channels=cfg.in_channels, factor=self.factor, dtype=self.conv_out.weight.dtype)
        if cfg.input_transform:
            x = downsample_input(x, transform=cfg.input_transform, levels=cfg.input_levels)
        h, emb, skips = self.trunk(x, noise_cond, class_embedding(self.labels, labels, x))
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if cfg.input_transform:
            out = upsample_output(out, transform=cfg.input_transform, levels=cfg.input_levels)
        return out

