"""Sample grids a person can look at: images tiled row-major, small images enlarged by nearest neighbour."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor


def enlarge(pixels: Tensor, *, min_size: int) -> Tensor:
    """Nearest-neighbour enlargement of (N, C, H, W) by the integer ``k = ceil(min_size / min(H, W))`` (k >= 1):
    each pixel becomes a k x k block, so both sides end up at least ``min_size`` (unchanged when already there)."""
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size: expected an int >= 0, got {min_size!r}")
    k = max(1, math.ceil(min_size / min(pixels.shape[-2:])))
    return pixels if k == 1 else pixels.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def make_grid(images: Tensor, *, nrow: int | None = None, padding: int = 2, min_size: int = 32) -> Tensor:
    """Tile ``images`` (N, C, H, W) in [-1, 1] row-major, ``nrow`` per row, into a uint8 (H', W', C) picture.

    Pixels are ``round(127.5 * (x + 1))`` clipped to [0, 255] (8-bit quantization); padding is black.
    Images smaller than ``min_size`` are enlarged first by :func:`enlarge` (nearest neighbour, an integer factor),
    so every cell is at least ``min_size`` pixels (0: never enlarge). ``nrow`` defaults to ``ceil(sqrt(N))``.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (N, C, H, W) tensor with C in (1, 3, 4), got {got}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a floating-point tensor in [-1, 1], got dtype {images.dtype}")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow, padding: expected nrow >= 1 and padding >= 0, got {nrow}, {padding}")
    pixels = (127.5 * (images.detach().float().cpu() + 1)).round().clamp(0, 255).to(torch.uint8)
    pixels = enlarge(pixels, min_size=min_size)
    n, c, h, w = pixels.shape
    rows = max(1, math.ceil(n / nrow))
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid.permute(1, 2, 0)


def write_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, padding: int = 2,
               min_size: int = 32) -> Tensor:
    """:func:`make_grid`, also written to ``path`` as a PNG (grayscale for C = 1); returns the grid.

    ``write_grid(samples, "grid.png")`` with samples (N, C, H, W) in [-1, 1] is all a training loop needs.
    """
    grid = make_grid(images, nrow=nrow, padding=padding, min_size=min_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    array = grid.numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path, format="PNG")
    return grid
