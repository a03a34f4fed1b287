"""Input checks and broadcasting shared by every kdiff module.

Conventions (see the package docstring): per-sample scalars (``logsnr``, ``sigma``, ``t``) may be
Python floats, 0-d tensors or ``[B]`` tensors; they are right-padded to the data's rank.
Coefficient math runs in float32, or float64 when any input is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

Scalar = float | int | Tensor


def _checking() -> bool:
    """Value checks (which sync the GPU) are skipped while torch.compile traces."""
    return not torch.compiler.is_compiling()


def check_float(x: Tensor, name: str) -> Tensor:
    """Raise TypeError unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (the shape of {name_a}), "
                         f"got {tuple(b.shape)}")


def coef_dtype(*values: object) -> torch.dtype:
    """float64 if any tensor among ``values`` is float64, else float32 (never bf16/fp16)."""
    for v in values:
        if isinstance(v, Tensor) and v.dtype == torch.float64:
            return torch.float64
    return torch.float32


def as_coef(value: Scalar, name: str, *, dtype: torch.dtype | None = None,
            device: torch.device | None = None) -> Tensor:
    """``value`` as a float32/float64 tensor; TypeError for integer or boolean tensors."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor or a Python float, "
                            f"got dtype {value.dtype}")
        dtype = dtype or coef_dtype(value)
        return value.to(device=device if device is not None else value.device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (float, int)):
        raise TypeError(f"{name}: expected a float or a floating-point tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=dtype or torch.float32, device=device)


def per_sample(value: Scalar, name: str, x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """A per-sample scalar (float, ``[]`` or ``[B]``) checked against ``x`` and padded to its rank.

    Returns a tensor of shape ``[]`` or ``[B, 1, ..., 1]`` on ``x``'s device, in float32 or float64.
    """
    c = as_coef(value, name, dtype=dtype or coef_dtype(value, x), device=x.device)
    if c.ndim == 0:
        return c
    if c.ndim != 1:
        raise ValueError(f"{name}: expected a scalar or a 1-D tensor of length B={x.shape[0] if x.ndim else '?'}, "
                         f"got shape {tuple(c.shape)}")
    if x.ndim == 0 or c.shape[0] != x.shape[0]:
        batch = x.shape[0] if x.ndim else "a scalar"
        raise ValueError(f"{name}: expected length B={batch} (the batch of the data), got {c.shape[0]}")
    return c.reshape(c.shape + (1,) * (x.ndim - 1))


def append_dims(c: Tensor, ndim: int) -> Tensor:
    """Right-pad ``c`` with singleton dims up to ``ndim`` (``[B] -> [B, 1, 1, 1]``)."""
    if c.ndim > ndim:
        raise ValueError(f"cannot pad a tensor of rank {c.ndim} to rank {ndim}")
    return c.reshape(c.shape + (1,) * (ndim - c.ndim))


def check_range(c: Tensor, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """ValueError naming ``name`` if any value leaves [low, high] (``(low, high]`` if low_open)."""
    if not _checking():
        return
    if torch.isnan(c).any():
        raise ValueError(f"{name}: contains NaN")
    if low is not None:
        bad = (c <= low) if low_open else (c < low)
        if bad.any():
            op = ">" if low_open else ">="
            raise ValueError(f"{name}: expected values {op} {low}, got min {c.min().item():.6g}")
    if high is not None and (c > high).any():
        raise ValueError(f"{name}: expected values <= {high}, got max {c.max().item():.6g}")


def check_int(value: object, name: str, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return value
