"""Building blocks of the ADM U-Net family, the U-ViT and the noisy classifier.

Every block takes ``(h, emb)``: ``h: (B, C, H, W)`` feature maps and ``emb: (B, E)`` the noise-level
(plus class) embedding, ignored by blocks that do not use it. Attention runs through
:func:`kdiff.kernels.attention` on ``(B, heads, N, D)`` tensors (``attention="sdpa"`` selects
``F.scaled_dot_product_attention`` instead, for comparisons). Parameters are initialized from
torch's global generator like any ``nn.Module``; the last layer of every residual branch starts at
zero [ADM App. A], so each block starts as the identity.

References:
    [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", App. B.
    [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
    [ADM] Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Sec. 3, Tables 1-3.
    [BigGAN] Brock, Donahue, Simonyan 2019, "Large Scale GAN Training for High Fidelity Natural
        Image Synthesis", Fig. 15 (residual up/down-sampling blocks).
    [Transformer] Vaswani et al. 2017, "Attention Is All You Need", Sec. 3.5 (sinusoidal features).
    [FF] Tancik et al. 2020, "Fourier Features Let Networks Learn High Frequency Functions".
    [CFG] Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", Alg. 1 (label dropout).
    [SD] Hoogeboom, Heek, Salimans 2023, "simple diffusion", Sec. 3.2 (U-ViT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from .._util import _assert_queued, as_coef, check_float, check_generator, check_int, check_values
from ..kernels.attention import _MAX_HEAD_DIM

__all__ = [
    "ATTENTION_IMPLS", "sinusoidal_embedding", "NoiseEmbedding", "LabelEmbedding", "drop_labels", "null_labels",
    "noise_cond_vector", "GroupNorm32", "group_norm", "AdaGN", "ResBlock", "Downsample", "Upsample", "resolve_heads",
    "KERNEL_MAX_HEAD_DIM", "attend",
    "multihead_self_attention", "SelfAttention2d", "TransformerBlock", "EmbedSequential", "zero_",
]

ATTENTION_IMPLS = ("kdiff", "sdpa")


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero, in place [ADM App. A]; returns ``module``."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ----------------------------------------------------------------------------------------------
# Noise-level and class embeddings


def sinusoidal_embedding(c: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """``[cos(c f_i), sin(c f_i)]``, ``f_i = max_period^(-2i / dim)`` [Transformer Sec. 3.5]; ``(B,) -> (B, dim)``.

    ``dim`` must be even (half cosines, half sines)."""
    check_int(dim, "dim", low=2)
    if dim % 2:
        raise ValueError(f"dim: expected an even number (cos and sin halves), got {dim}")
    if not isinstance(c, Tensor) or c.ndim != 1 or c.is_complex() or c.dtype == torch.bool:
        raise TypeError(f"c: expected a real 1-D tensor (B,), got "
                        f"{tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=c.device) / half)
    args = c.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseEmbedding(nn.Module):
    """``emb = W2 silu(W1 phi(c) + b1) + b2`` with ``phi`` sinusoidal or random Fourier features [ADM, FF].

    ``c: (B,)`` is whatever noise conditioning the parametrization uses (EDM's ``c_noise``, the
    log-SNR, or a timestep). Fourier features are ``[cos(2 pi f c), sin(2 pi f c)]`` with
    ``f ~ N(0, fourier_scale^2)`` drawn once at construction. Output ``(B, out_dim)``.
    """

    def __init__(self, dim: int, out_dim: int, *, kind: str = "sinusoidal", fourier_scale: float = 16.0):
        super().__init__()
        if kind not in ("sinusoidal", "fourier"):
            raise ValueError(f"embedding: expected 'sinusoidal' or 'fourier', got {kind!r}")
        if dim % 2:
            raise ValueError(f"embedding dim: expected an even number, got {dim}")
        self.dim, self.kind = dim, kind
        if kind == "fourier":
            self.register_buffer("freqs", 2 * math.pi * fourier_scale * torch.randn(dim // 2))
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def features(self, c: Tensor) -> Tensor:
        if self.kind == "sinusoidal":
            return sinusoidal_embedding(c, self.dim)
        args = c.float()[:, None] * self.freqs.float()[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, c: Tensor) -> Tensor:
        return self.mlp(self.features(c))


def null_labels(batch: int, num_classes: int, *, device: torch.device | str | None = None) -> Tensor:
    """The reserved "no label" index ``num_classes`` for every sample [CFG]; ``(batch,)`` int64."""
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def _check_labels(labels: Tensor, *, num_classes: int, batch: int | None = None) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected an integer torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if labels.ndim != 1 or (batch is not None and labels.shape[0] != batch):
        raise ValueError(f"labels: expected shape ({batch if batch is not None else 'B'},), "
                         f"got {tuple(labels.shape)}")
    if labels.numel() and not _assert_queued(labels, (labels < 0) | (labels > num_classes),
                                             f"labels: expected values in [0, {num_classes}]") \
            and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(f"labels: expected values in [0, {num_classes}] ({num_classes} = no label), "
                         f"got min {labels.min().item()}, max {labels.max().item()}")


def drop_labels(labels: Tensor, u: Tensor | None = None, *, p: float, num_classes: int,
                generator: torch.Generator | None = None) -> Tensor:
    """``where(u < p, num_classes, labels)``, ``u ~ U[0, 1)`` per sample [CFG Alg. 1]; ``labels, u: (B,)``.

    Pass the uniforms ``u`` (as :func:`kdiff.schedules.sigma_lognormal` takes its normals), or leave ``u`` None
    to draw them from ``generator`` (torch's global generator when both are None).
    """
    check_int(num_classes, "num_classes", low=1)
    if isinstance(p, bool) or not isinstance(p, (float, int)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
    _check_labels(labels, num_classes=num_classes)
    if u is None:
        check_generator(generator)
        u = torch.rand(labels.shape, generator=generator, device=labels.device)
    else:
        if generator is not None:
            raise ValueError("generator: expected None when the uniforms u are given")
        check_float(u, "u")
        if u.shape != labels.shape or u.device != labels.device:
            raise ValueError(f"u: expected shape {tuple(labels.shape)} on {labels.device} (as labels), "
                             f"got {tuple(u.shape)} on {u.device}")
        check_values(u, "u")
    return torch.where(u < p, torch.full_like(labels, num_classes), labels)


class LabelEmbedding(nn.Module):
    """A table of ``num_classes + 1`` rows; row ``num_classes`` is "no label" [CFG]. ``(B,) -> (B, dim)``."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if labels is None:
            labels = null_labels(batch, self.num_classes, device=device)
        _check_labels(labels, num_classes=self.num_classes, batch=batch)
        return self.table(labels)


def noise_cond_vector(noise_cond: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """``noise_cond`` as a float32 ``(B,)`` tensor; a float or ``[]`` tensor is repeated B times.

    Integer tensors (discrete timesteps) are accepted and converted; booleans are a TypeError.
    """
    if isinstance(noise_cond, Tensor) and noise_cond.is_complex():
        raise TypeError(f"noise_cond: expected a real tensor, got dtype {noise_cond.dtype}")
    if isinstance(noise_cond, Tensor) and not noise_cond.is_floating_point() and noise_cond.dtype != torch.bool:
        noise_cond = noise_cond.float()
    c = as_coef(noise_cond, "noise_cond", dtype=torch.float32, device=device)
    if c.ndim == 0:
        return c.expand(batch)
    if c.shape != (batch,):
        raise ValueError(f"noise_cond: expected a scalar or shape ({batch},) (the batch of x), got {tuple(c.shape)}")
    return c


def class_embedding(table: LabelEmbedding | None, labels: Tensor | None, x: Tensor) -> Tensor | float:
    """The class embedding ``(B, E)`` of ``labels`` (``None`` = "no label"); ``0.`` without conditioning."""
    if table is None:
        if labels is not None:
            raise ValueError("labels: this network has no class conditioning (num_classes=None), got labels")
        return 0.0
    return table(labels, x.shape[0], x.device)


def check_image_input(x: Tensor, *, channels: int, factor: int, dtype: torch.dtype | None = None) -> None:
    """ValueError unless ``x`` is ``(B, channels, H, W)`` with H, W divisible by ``factor``.

    With ``dtype`` (the network's parameter dtype), a TypeError unless ``x`` has that dtype or autocast is
    on for ``x``'s device: cast the input (``x.float()``) or run the network under ``torch.autocast``.
    """
    check_float(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D tensor (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"x: expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"x: expected height and width divisible by the network's downsampling factor {factor}, "
                         f"got {x.shape[-2]}x{x.shape[-1]}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x: expected dtype {dtype} (the network's parameters), got {x.dtype}; cast the input "
                        f"or run the network under torch.autocast")


# ----------------------------------------------------------------------------------------------
# Normalization and residual blocks


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics [ADM], result in the input dtype.

    float16 and float32 inputs are normalized in float32 (float64 stays float64). bfloat16 inputs (bf16
    autocast, where autocast itself would otherwise run group_norm in float32) go to torch's native
    bfloat16 kernel with autocast off: its mean, variance and parameter-gradient sums accumulate in
    float32, as the float32 path's do, and no float32 copy of the activations is written or read, forward
    or backward. On CPU the kernel takes the float32 weight and bias as they are; CUDA's needs them in the
    input's dtype, so there they are rounded to bfloat16 first, as autocast rounds every conv and linear
    weight.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16:
            w, b = self.weight, self.bias
            if x.device.type != "cpu":  # CUDA's kernel needs the parameters in the input's dtype
                w = None if w is None else w.to(x.dtype)
                b = None if b is None else b.to(x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, w, b, self.eps)
        dtype = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, w, b, self.eps).to(x.dtype)


def group_norm(channels: int, groups: int) -> GroupNorm32:
    if channels % groups:
        raise ValueError(f"norm_groups: expected a divisor of every channel count, "
                         f"got {groups} for {channels} channels")
    return GroupNorm32(groups, channels)


class AdaGN(nn.Module):
    """``AdaGN(h, y) = (1 + y_s) GroupNorm(h) + y_b``, ``[y_s, y_b] = W silu(emb)`` [ADM Sec. 3, Table 3].

    ``h: (B, C, H, W)``, ``emb: (B, E)``. ADM writes ``y_s GroupNorm(h) + y_b``; the ``1 +`` makes a
    zero-initialized projection start from the plain norm.
    """

    def __init__(self, channels: int, emb_dim: int, *, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.proj = nn.Linear(emb_dim, 2 * channels)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y_s, y_b = self.proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        return self.norm(h) * (1 + y_s) + y_b


class Downsample(nn.Module):
    """``(B, C, H, W) -> (B, C, H/2, W/2)``: a 3x3 conv with stride 2, or 2x2 average pooling [DDPM]."""

    def __init__(self, channels: int, *, conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if conv else None

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(h) if self.conv is not None else F.avg_pool2d(h, 2)


class Upsample(nn.Module):
    """``(B, C, H, W) -> (B, C, 2H, 2W)``: nearest-neighbour, then a 3x3 conv if ``conv`` [DDPM]."""

    def __init__(self, channels: int, *, conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if conv else None

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.conv(h) if self.conv is not None else h


class ResBlock(nn.Module):
    """``x -> skip(x) + conv(drop(silu(norm(conv(silu(GN(x))), emb))))`` [DDPM App. B, ADM Sec. 3].

    ``norm`` is AdaGN when ``adagn`` (the embedding scales and shifts), else "add then norm"
    (``GN(h + W silu(emb))``). ``resample="down"|"up"`` makes it a BigGAN residual block that
    average-pools or nearest-upsamples both branches before the first conv [BigGAN Fig. 15, ADM
    Sec. 3]. ``x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, dropout: float = 0.0,
                 adagn: bool = False, resample: str | None = None, groups: int = 32):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample: expected None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if adagn:
            self.norm2: nn.Module = AdaGN(out_channels, emb_dim, groups=groups)
        else:
            self.emb_proj = nn.Linear(emb_dim, out_channels)
            self.norm2 = group_norm(out_channels, groups)
        self.adagn = adagn
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _resample(self, h: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(h, 2)
        if self.resample == "up":
            return F.interpolate(h, scale_factor=2.0, mode="nearest")
        return h

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        if self.adagn:
            h = self.norm2(h, emb)
        else:
            h = self.norm2(h + self.emb_proj(F.silu(emb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(self._resample(x)) + h


# ----------------------------------------------------------------------------------------------
# Attention


def resolve_heads(channels: int, *, num_heads: int = 1, head_channels: int | None = None) -> int:
    """Heads of an attention layer: ``channels // head_channels`` if given, else ``num_heads`` [ADM Table 2]."""
    if head_channels is not None:
        if channels % head_channels:
            raise ValueError(f"head_channels: expected a divisor of {channels} channels, got {head_channels}")
        return channels // head_channels
    if channels % num_heads:
        raise ValueError(f"num_heads: expected a divisor of {channels} channels, got {num_heads}")
    return num_heads


KERNEL_MAX_HEAD_DIM = _MAX_HEAD_DIM  # the widest head kdiff.kernels.attention takes (defined there)


def attend(q: Tensor, k: Tensor, v: Tensor, *, impl: str = "kdiff") -> Tensor:
    """``softmax(q k^T / sqrt(D)) v``; ``q, k, v: (B, heads, N, D) -> (B, heads, N, D)``.

    ``impl="kdiff"`` calls :func:`kdiff.kernels.attention`; heads wider than its
    ``KERNEL_MAX_HEAD_DIM`` channels (ADM-128's 4 heads of 192 and 256 channels) and
    ``impl="sdpa"`` call ``F.scaled_dot_product_attention``.
    """
    if impl == "sdpa" or q.shape[-1] > KERNEL_MAX_HEAD_DIM:
        return F.scaled_dot_product_attention(q, k, v)
    return kernels.attention(q, k, v)


def _check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    return impl


def multihead_self_attention(tokens: Tensor, qkv: nn.Linear, heads: int, impl: str) -> Tensor:
    """Multi-head self-attention of ``tokens: (B, N, C)`` from one fused projection; ``-> (B, N, C)``."""
    B, N, C = tokens.shape
    q, k, v = qkv(tokens).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return attend(q, k, v, impl=impl).transpose(1, 2).reshape(B, N, C)


class SelfAttention2d(nn.Module):
    """``x + W_o MHA(GN(x))`` over the ``H W`` positions [DDPM App. B, ADM Table 2]; ``(B, C, H, W)``."""

    def __init__(self, channels: int, *, num_heads: int = 1, head_channels: int | None = None,
                 groups: int = 32, attention: str = "kdiff"):
        super().__init__()
        self.heads = resolve_heads(channels, num_heads=num_heads, head_channels=head_channels)
        self.impl = _check_impl(attention)
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2)
        out = self.proj(multihead_self_attention(tokens, self.qkv, self.heads, self.impl))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class TransformerBlock(nn.Module):
    """Pre-norm block ``h += drop(MHA(LN(h))); h += drop(MLP(LN(h)))`` [Transformer, SD Sec. 3.2]; ``(B, N, C)``."""

    def __init__(self, width: int, *, num_heads: int = 1, head_channels: int | None = None,
                 mlp_ratio: int = 4, dropout: float = 0.0, attention: str = "kdiff"):
        super().__init__()
        self.heads = resolve_heads(width, num_heads=num_heads, head_channels=head_channels)
        self.impl = _check_impl(attention)
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = zero_(nn.Linear(width, width))
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout),
                                 zero_(nn.Linear(mlp_ratio * width, width)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        h = h + self.dropout(self.proj(multihead_self_attention(self.norm1(h), self.qkv, self.heads, self.impl)))
        return h + self.dropout(self.mlp(self.norm2(h)))


class EmbedSequential(nn.ModuleList):
    """Apply blocks in turn as ``h = block(h, emb)``; with ``use_checkpoint`` each block is recomputed
    in the backward pass instead of storing its activations (dropout masks are replayed)."""

    def __init__(self, blocks: list[nn.Module], *, use_checkpoint: bool = False):
        super().__init__(blocks)
        self.use_checkpoint = use_checkpoint

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, use_reentrant=False)
            else:
                h = block(h, emb)
        return h
