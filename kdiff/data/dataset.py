"""Pixels as model inputs: ``x = u / 127.5 - 1`` in [-1, 1], channels first; padding, resizing, flips, and
the torch Dataset over a kdiff HDF5 file."""

from __future__ import annotations

import os
from collections.abc import Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .._util import check_float, check_int
from .layout import IN_MEMORY_MAX_BYTES, _open_h5, _read_rows, read_h5, read_info


def x_from_uint8(u: Tensor) -> Tensor:
    """x = u / 127.5 - 1: uint8 pixels to float32 in [-1, 1], elementwise on any shape (the layout stores
    channels last, (N, H, W, C); models take channels first, (B, C, H, W): permute before or after)."""
    if not isinstance(u, Tensor) or u.dtype != torch.uint8:
        raise TypeError(f"u: expected a uint8 tensor, got {getattr(u, 'dtype', type(u).__name__)}")
    return u.to(torch.float32) / 127.5 - 1.0


def uint8_from_x(x: Tensor) -> Tensor:
    """u = round(127.5 (x + 1)), clamped to [0, 255] (samples may overshoot [-1, 1]); elementwise on any shape
    (the one conversion back to pixels: model outputs are (B, C, H, W), the layout stores (N, H, W, C))."""
    check_float(x, "x")
    return torch.round((x.to(torch.float32) + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)


def pad_to(x: Tensor, size: int, *, value: float = -1.0) -> Tensor:
    """Pad (..., C, H, W) to (..., C, size, size) with ``value`` (background -1 = black), centred, odd pixel last."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"size: expected >= the image size {h}x{w} to pad, got {size} (use fit='resize' to shrink)")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=value)


def resize_to(x: Tensor, size: int) -> Tensor:
    """Centre-crop (..., C, H, W) to a square, then resize to (..., C, size, size), bilinear with antialiasing."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    if s == size:
        return x
    batch = x.reshape(-1, *x.shape[-3:])
    y = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.reshape(*x.shape[:-2], size, size)


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators")."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash_uniform(seed: int, epoch: int, index: int) -> float:
    """A uniform number in [0, 1) that is a pure function of (seed, epoch, index): the same in every
    DataLoader worker, process and resumed run, with no generator state to share or save."""
    z = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return (z >> 11) * 2.0**-53


class H5Dataset(Dataset):
    """The images of a kdiff HDF5 file as (x, label): x float32 (C, S, S) = u / 127.5 - 1 in [-1, 1], label int.

    Files with at most ``IN_MEMORY_MAX_BYTES`` of pixels are read into memory (``in_memory=None``); larger ones are
    read image by image, each process opening its own handle on first use (never in ``__init__``), so DataLoader
    workers are safe. ``size`` pads with the background -1 (``fit="pad"``, e.g. 28 -> 32) or centre-crops and
    resizes (``fit="resize"``). An image is flipped left-right when ``hash_uniform(seed, epoch, index) < flip_p``;
    call :meth:`set_epoch` before each epoch (its iterator copies the dataset into the workers; with
    ``persistent_workers=True`` the workers keep the epoch they started with).
    """

    def __init__(self, path: str | os.PathLike, *, size: int | None = None, fit: str = "pad", flip_p: float = 0.0,
                 seed: int = 0, in_memory: bool | None = None) -> None:
        self.info = read_info(path)
        self.path = self.info.path
        if size is not None:
            check_int(size, "size", low=1)
        if fit not in ("pad", "resize"):
            raise ValueError(f"fit: expected 'pad' or 'resize', got {fit!r}")
        if fit == "pad" and size is not None and size < max(self.info.image_shape[:2]):
            raise ValueError(f"size: expected >= the image size {self.info.image_shape[:2]} with fit='pad', got {size}")
        if isinstance(flip_p, bool) or not isinstance(flip_p, (int, float)) or not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p: expected a probability in [0, 1], got {flip_p!r}")
        self.size, self.fit, self.flip_p, self.seed, self.epoch = size, fit, float(flip_p), check_int(seed, "seed"), 0
        nbytes = self.info.n * int(np.prod(self.info.image_shape))
        self.in_memory = nbytes <= IN_MEMORY_MAX_BYTES if in_memory is None else bool(in_memory)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        if self.in_memory:
            self.images, self.labels, _ = read_h5(self.path)
        else:
            self.images = None
            with _open_h5(self.path) as f:
                self.labels = _read_rows(f, self.path, "labels", slice(None)).astype(np.int64)
        k = self.num_classes
        if len(self.labels) and (self.labels.min() < 0 or (k and self.labels.max() >= k)):
            # A label equal to num_classes would be read as the classifier-free "no label" index.
            raise ValueError(f"path: {str(self.path)!r} has labels in [{self.labels.min()}, {self.labels.max()}], "
                             f"expected [0, {k - 1}] (one per class name)" if k else
                             f"path: {str(self.path)!r} has negative labels (min {self.labels.min()})")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    def set_epoch(self, epoch: int) -> None:
        """Select the flips of epoch ``epoch`` (deterministic given ``seed``)."""
        self.epoch = check_int(epoch, "epoch", low=0)

    def __len__(self) -> int:
        return self.info.n

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None  # a handle never crosses a process boundary
        return state

    def _pixels(self, index: int) -> np.ndarray:
        if self.images is not None:
            return self.images[index]
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = _open_h5(self.path), os.getpid()
        return _read_rows(self._file, self.path, "images", index)

    def _transform(self, u: np.ndarray, indices: Sequence[int]) -> Tensor:
        """uint8 (B, H, W, C) -> float32 (B, C, S, S): scale, pad or resize, flip."""
        x = x_from_uint8(torch.from_numpy(np.ascontiguousarray(u)).permute(0, 3, 1, 2))
        if self.size is not None:
            x = pad_to(x, self.size) if self.fit == "pad" else resize_to(x, self.size)
        if self.flip_p > 0.0:
            flip = torch.tensor([hash_uniform(self.seed, self.epoch, i) < self.flip_p for i in indices])
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous()

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index: expected in [-{len(self)}, {len(self)}), got {index}")
        return int(index) % len(self)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        index = self._index(index)
        return self._transform(self._pixels(index)[None], [index])[0], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Many items at once (the DataLoader calls this for a batch): one gather and one conversion."""
        indices = [self._index(i) for i in indices]
        if self.images is None:
            return [self[i] for i in indices]
        x = self._transform(self.images[indices], indices)
        return list(zip(x.unbind(0), self.labels[indices].tolist()))
