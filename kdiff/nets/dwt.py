"""Lossless 2x downsampling of images: the 5/3 (LeGall) and Haar wavelet transforms, and pixel unshuffle.

simple diffusion [SD, Sec. 3.4] feeds a high-resolution image to the network through an invertible
2x downsampling, so that no feature map lives at the full resolution. One level maps
``(B, C, H, W) -> (B, 4C, H/2, W/2)`` with the four bands stacked band-major: channels
``[LL | LH | HL | HH]``, the first letter for the vertical (H) filter, the second for the horizontal
(W) one. ``levels=L`` applies the transform L times to every channel (C -> 4^L C).

Normalization: both wavelets scale the low band by sqrt(2) and the high band by 1/sqrt(2) per
dimension, the gains of the orthonormal Haar transform. A constant image ``c`` then has
``LL = 2c`` and zero high bands. The Haar low band is exactly ``2 * avg_pool2d(x, 2)``; the 5/3 low
band is the separable 5-tap filter ``(-1, 2, 6, 2, -1) / 8`` at even samples (times 2 in 2-D).

The 5/3 transform is computed by lifting [Daubechies & Sweldens 1998] with whole-sample symmetric
extension at the borders (as in JPEG 2000):
    d[n] = x[2n+1] - (x[2n] + x[2n+2]) / 2        (predict)
    s[n] = x[2n]   + (d[n-1] + d[n]) / 4          (update)
and inverted by running the two steps backwards, which is exact up to floating-point rounding.

References:
    [SD] Hoogeboom, Heek, Salimans 2023, "simple diffusion: End-to-end diffusion for high
        resolution images".
    [LG] Le Gall, Tabatabai 1988, "Sub-band coding of digital images using symmetric short kernel
        filters and arithmetic coding techniques".
    [DS] Daubechies, Sweldens 1998, "Factoring wavelet transforms into lifting steps".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._util import check_float, check_int

__all__ = ["WAVELETS", "TRANSFORMS", "dwt", "idwt", "downsample_input", "upsample_output"]

WAVELETS = ("legall53", "haar")
TRANSFORMS = WAVELETS + ("shuffle",)

_SQRT2 = math.sqrt(2.0)


def _next(a: Tensor) -> Tensor:
    """``a[n+1]`` along the last dim, the last entry repeated (symmetric extension of the even samples)."""
    return torch.cat([a[..., 1:], a[..., -1:]], dim=-1)


def _prev(a: Tensor) -> Tensor:
    """``a[n-1]`` along the last dim, the first entry repeated (symmetric extension of the odd samples)."""
    return torch.cat([a[..., :1], a[..., :-1]], dim=-1)


def _split_last(x: Tensor, wavelet: str) -> tuple[Tensor, Tensor]:
    """One 1-D analysis step along the last dim: ``x: (..., 2N) -> (low, high): (..., N)`` each."""
    even, odd = x[..., 0::2], x[..., 1::2]
    if wavelet == "haar":
        return (even + odd) / _SQRT2, (even - odd) / _SQRT2
    d = odd - 0.5 * (even + _next(even))
    s = even + 0.25 * (_prev(d) + d)
    return s * _SQRT2, d / _SQRT2


def _merge_last(low: Tensor, high: Tensor, wavelet: str) -> Tensor:
    """The inverse of :func:`_split_last`: ``(low, high): (..., N) -> (..., 2N)``."""
    if wavelet == "haar":
        even, odd = (low + high) / _SQRT2, (low - high) / _SQRT2
    else:
        s, d = low / _SQRT2, high * _SQRT2
        even = s - 0.25 * (_prev(d) + d)
        odd = d + 0.5 * (even + _next(even))
    return torch.stack([even, odd], dim=-1).flatten(-2)


def _dwt_level(x: Tensor, wavelet: str) -> Tensor:
    """One 2-D level: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, bands ``[LL | LH | HL | HH]``."""
    low_w, high_w = _split_last(x, wavelet)
    ll, hl = (b.transpose(-1, -2) for b in _split_last(low_w.transpose(-1, -2), wavelet))
    lh, hh = (b.transpose(-1, -2) for b in _split_last(high_w.transpose(-1, -2), wavelet))
    return torch.cat([ll, lh, hl, hh], dim=1)


def _idwt_level(y: Tensor, wavelet: str) -> Tensor:
    """The inverse of :func:`_dwt_level`: ``(B, 4C, H, W) -> (B, C, 2H, 2W)``."""
    ll, lh, hl, hh = (b.transpose(-1, -2) for b in y.chunk(4, dim=1))
    low_w = _merge_last(ll, hl, wavelet).transpose(-1, -2)
    high_w = _merge_last(lh, hh, wavelet).transpose(-1, -2)
    return _merge_last(low_w, high_w, wavelet)


def _check_transform(transform: str, choices: tuple[str, ...], name: str) -> None:
    if transform not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {transform!r}")


def _check_image(x: Tensor, name: str, *, factor: int) -> None:
    check_float(x, name)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"{name}: expected height and width divisible by {factor}, "
                         f"got {x.shape[-2]}x{x.shape[-1]}")


def dwt(x: Tensor, *, wavelet: str = "legall53", levels: int = 1) -> Tensor:
    """``x -> [LL | LH | HL | HH]`` per level [SD Sec. 3.4, LG]; ``(B, C, H, W) -> (B, 4^L C, H/2^L, W/2^L)``."""
    _check_transform(wavelet, WAVELETS, "wavelet")
    check_int(levels, "levels", low=1)
    _check_image(x, "x", factor=2**levels)
    for _ in range(levels):
        x = _dwt_level(x, wavelet)
    return x


def idwt(y: Tensor, *, wavelet: str = "legall53", levels: int = 1) -> Tensor:
    """Inverse of :func:`dwt`; ``(B, 4^L C, H, W) -> (B, C, 2^L H, 2^L W)``."""
    _check_transform(wavelet, WAVELETS, "wavelet")
    check_int(levels, "levels", low=1)
    _check_image(y, "y", factor=1)
    if y.shape[1] % 4**levels:
        raise ValueError(f"y: expected a channel count divisible by 4^levels = {4**levels}, got {y.shape[1]}")
    for _ in range(levels):
        y = _idwt_level(y, wavelet)
    return y


def downsample_input(x: Tensor, *, transform: str, levels: int = 1) -> Tensor:
    """Lossless ``(B, C, H, W) -> (B, 4^L C, H/2^L, W/2^L)`` by a wavelet or by pixel unshuffle [SD Sec. 3.4]."""
    _check_transform(transform, TRANSFORMS, "transform")
    if transform == "shuffle":
        check_int(levels, "levels", low=1)
        _check_image(x, "x", factor=2**levels)
        return F.pixel_unshuffle(x, 2**levels)
    return dwt(x, wavelet=transform, levels=levels)


def upsample_output(y: Tensor, *, transform: str, levels: int = 1) -> Tensor:
    """The inverse of :func:`downsample_input`: ``(B, 4^L C, H, W) -> (B, C, 2^L H, 2^L W)``."""
    _check_transform(transform, TRANSFORMS, "transform")
    if transform == "shuffle":
        check_int(levels, "levels", low=1)
        return F.pixel_shuffle(y, 2**levels)
    return idwt(y, wavelet=transform, levels=levels)
