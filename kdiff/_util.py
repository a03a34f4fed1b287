"""Input checks and broadcasting shared by every kdiff module.

Conventions (see the package docstring): per-sample scalars (``logsnr``, ``sigma``, ``t``) may be
Python floats, 0-d tensors or ``[B]`` tensors; they are right-padded to the data's rank.
Coefficient math runs in float32, or float64 when any input is float64.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor

Scalar = float | int | Tensor


_VALUE_CHECK_MODES = ("auto", "sync", "async", "off")
_value_checks = os.environ.get("KDIFF_VALUE_CHECKS", "auto")


def set_value_checks(mode: str) -> str:
    """How NaN/inf/range checks of tensor *values* run; returns the previous mode.

    ``"sync"``: read the verdict on the host and raise ``ValueError`` naming the argument (one device sync
    per checked tensor on a GPU). ``"async"``: queue a device-side assertion with the same message
    (``torch._assert_async``): no host sync, so a CUDA training step keeps the GPU fed, but a failure
    surfaces later as a ``RuntimeError`` that ends the CUDA context. ``"off"``: no value checks.
    ``"auto"`` (default): ``"sync"`` for CPU tensors, ``"async"`` for accelerator tensors. The environment
    variable ``KDIFF_VALUE_CHECKS`` sets the initial mode. Shape, dtype and device checks always run.
    """
    global _value_checks
    if mode not in _VALUE_CHECK_MODES:
        raise ValueError(f"mode: expected one of {', '.join(_VALUE_CHECK_MODES)}, got {mode!r}")
    previous, _value_checks = _value_checks, mode
    return previous


def _value_check_mode(t: Tensor | None) -> str:
    """The mode for ``t``: 'off' while torch.compile traces and on the meta device (shapes, no values)."""
    if (t is not None and t.device.type == "meta") or torch.compiler.is_compiling():
        return "off"
    mode = _value_checks
    if mode == "auto":
        return "sync" if t is None or t.device.type == "cpu" else "async"
    return mode


def _checking(t: Tensor | None = None) -> bool:
    """Whether a host-side (synchronizing) value check runs for ``t``."""
    return _value_check_mode(t) == "sync"


def _assert_queued(c: Tensor, bad: Tensor, message: str) -> bool:
    """In 'async' mode, queue ``assert not bad.any()`` on the device and return True (nothing to do on the host).
    Returns False when the caller must check on the host ('sync'), and True as well when checks are 'off'."""
    mode = _value_check_mode(c)
    if mode == "async":
        torch._assert_async(~bad.any(), message)
    return mode != "sync"


def check_float(x: Tensor, name: str) -> Tensor:
    """Raise TypeError unless ``x`` is a real floating-point tensor (int, bool and complex are rejected)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """ValueError naming ``name_b`` unless ``b`` has ``a``'s shape and lives on ``a``'s device."""
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (the shape of {name_a}), "
                         f"got {tuple(b.shape)}")
    check_same_device(a, b, name_a, name_b)


def check_same_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """ValueError naming ``name_b`` unless ``b`` is on ``a``'s device."""
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected a tensor on {a.device} (the device of {name_a}), got {b.device}")


def coef_dtype(*values: object) -> torch.dtype:
    """float64 if any tensor among ``values`` is float64, else float32 (never bf16/fp16)."""
    for v in values:
        if isinstance(v, Tensor) and v.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _describe_bad(c: Tensor) -> str:
    flat = c.detach().flatten()
    bad = flat[~torch.isfinite(flat)]
    kinds = [k for k, present in (("NaN", torch.isnan(bad).any()), ("+inf", (bad == math.inf).any()),
                                  ("-inf", (bad == -math.inf).any())) if bool(present)]
    return ", ".join(kinds)


def check_values(c: Tensor, name: str, *, posinf: bool = False, neginf: bool = False) -> Tensor:
    """ValueError naming ``name`` if ``c`` holds NaN, or ``+inf`` / ``-inf`` where not allowed.

    NaN is never a valid input. Infinities are legal only where the math defines the limit (a log-SNR of
    ``+inf`` is clean data, ``-inf`` pure noise); the caller says which with ``posinf`` / ``neginf``.
    One device sync in 'sync' mode (see :func:`set_value_checks`); skipped under torch.compile and on the
    meta device.
    """
    if _value_check_mode(c) == "off":
        return c
    if posinf and neginf:
        bad = torch.isnan(c)
    elif posinf:
        bad = torch.isnan(c) | (c == -math.inf)
    elif neginf:
        bad = torch.isnan(c) | (c == math.inf)
    else:
        bad = ~torch.isfinite(c)
    allowed = {(False, False): "finite values", (True, False): "finite values or +inf",
               (False, True): "finite values or -inf", (True, True): "values that are not NaN"}[(posinf, neginf)]
    if _assert_queued(c, bad, f"{name}: expected {allowed}"):
        return c
    if bool(bad.any()):
        raise ValueError(f"{name}: expected {allowed}, got {_describe_bad(c)}")
    return c


def as_coef(value: Scalar, name: str, *, dtype: torch.dtype | None = None,
            device: torch.device | None = None, posinf: bool = False, neginf: bool = False) -> Tensor:
    """``value`` as a float32/float64 tensor, checked by :func:`check_values` (finite unless ``posinf`` /
    ``neginf``).

    TypeError for integer, boolean or complex tensors and for non-numbers. A tensor on another device than
    ``device`` is a ValueError, except a 0-d CPU tensor (moved, as torch itself mixes CPU scalars in).
    """
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor or a Python float, "
                            f"got dtype {value.dtype}")
        if device is not None and value.device != torch.device(device):
            if value.ndim != 0 or value.device.type != "cpu":
                raise ValueError(f"{name}: expected a tensor on {torch.device(device)} (the device of the data), "
                                 f"got {value.device}")
        dtype = dtype or coef_dtype(value)
        c = value.to(device=device if device is not None else value.device, dtype=dtype)
    else:
        if isinstance(value, bool) or not isinstance(value, (float, int)):
            raise TypeError(f"{name}: expected a float or a floating-point tensor, got {type(value).__name__}")
        c = torch.tensor(float(value), dtype=dtype or torch.float32, device=device)
    return check_values(c, name, posinf=posinf, neginf=neginf)


def per_sample(value: Scalar, name: str, x: Tensor, *, dtype: torch.dtype | None = None,
               posinf: bool = False, neginf: bool = False) -> Tensor:
    """A per-sample scalar (float, ``[]`` or ``[B]``) checked against ``x`` and padded to its rank.

    Values must be finite unless ``posinf`` / ``neginf`` allow an infinity (:func:`check_values`).
    Returns a tensor of shape ``[]`` or ``[B, 1, ..., 1]`` on ``x``'s device, in float32 or float64.
    """
    c = as_coef(value, name, dtype=dtype or coef_dtype(value, x), device=x.device, posinf=posinf, neginf=neginf)
    if c.ndim == 0:
        return c
    if c.ndim != 1:
        raise ValueError(f"{name}: expected a scalar or a 1-D tensor of length B={x.shape[0] if x.ndim else '?'}, "
                         f"got shape {tuple(c.shape)}")
    if x.ndim == 0 or c.shape[0] != x.shape[0]:
        batch = x.shape[0] if x.ndim else "a scalar"
        raise ValueError(f"{name}: expected length B={batch} (the batch of the data), got {c.shape[0]}")
    return c.reshape(c.shape + (1,) * (x.ndim - 1))


def check_number(value: object, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """A hyper-parameter (``rho``, ``sigma_data``, ``eta``, ``p_std``...) as a Python float.

    TypeError unless a real number (an int, a float, or a 0-d real tensor; bool rejected); ValueError for
    NaN, for an infinity when ``finite``, and outside ``[low, high]`` (``(low, ...`` if ``low_open``,
    ``..., high)`` if ``high_open``).
    """
    if isinstance(value, Tensor) and value.ndim == 0 and value.dtype != torch.bool and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name}: expected {'>' if low_open else '>='} {low:g}, got {value}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name}: expected {'<' if high_open else '<='} {high:g}, got {value}")
    return v


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """ValueError naming ``name`` unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_callable(fn: object, name: str) -> None:
    """TypeError naming ``name`` unless ``fn`` can be called (a function, a module, a closure)."""
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")


def check_generator(generator: object, name: str = "generator") -> None:
    """TypeError naming ``name`` unless ``generator`` is None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: expected a torch.Generator or None, got {type(generator).__name__}")


def per_sample_flat(t: Tensor) -> Tensor:
    """``(B, ...) -> (B, D)`` with ``D`` the product of the non-batch dims; works for ``B = 0``."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def append_dims(c: Tensor, ndim: int) -> Tensor:
    """Right-pad ``c`` with singleton dims up to ``ndim`` (``[B] -> [B, 1, 1, 1]``)."""
    if c.ndim > ndim:
        raise ValueError(f"cannot pad a tensor of rank {c.ndim} to rank {ndim}")
    return c.reshape(c.shape + (1,) * (ndim - c.ndim))


def check_range(c: Tensor, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """ValueError naming ``name`` if any value is NaN or leaves [low, high] (``(low, high]`` if low_open).

    One device sync; skipped under torch.compile and on the meta device."""
    if _value_check_mode(c) == "off":
        return
    bad = torch.isnan(c)
    if low is not None:
        bad = bad | ((c <= low) if low_open else (c < low))
    if high is not None:
        bad = bad | (c > high)
    lo_text = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi_text = "" if high is None else f"<= {high}"
    if _assert_queued(c, bad, f"{name}: expected values {' and '.join(p for p in (lo_text, hi_text) if p)}"):
        return
    if not bool(bad.any()):
        return
    if bool(torch.isnan(c).any()):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name}: expected values {' and '.join(p for p in (lo, hi) if p) or 'that are not NaN'}, "
                         "got NaN")
    if low is not None and bool(((c <= low) if low_open else (c < low)).any()):
        raise ValueError(f"{name}: expected values {'>' if low_open else '>='} {low}, got min {c.min().item():.6g}")
    raise ValueError(f"{name}: expected values <= {high}, got max {c.max().item():.6g}")


def check_int(value: object, name: str, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return value
