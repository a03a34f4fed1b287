"""One dispatch rule for every kernel (see the package docstring)."""

from __future__ import annotations

import os

from torch import Tensor

_CHOICES = ("auto", "triton", "numba", "torch")


def backend(x: Tensor, *, has_numba: bool) -> str:
    """Pick ``"triton" | "numba" | "torch"`` for an op whose first input is ``x``.

    ``KDIFF_KERNELS`` (``auto|triton|numba|torch``) overrides; under ``auto`` a CUDA tensor goes to
    Triton, a CPU tensor to Triton when ``TRITON_INTERPRET=1``, else to numba where the op has a
    numba kernel, else to the torch reference.
    """
    choice = os.environ.get("KDIFF_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"KDIFF_KERNELS: expected one of {', '.join(_CHOICES)}, got {choice!r}")
    if choice == "numba" and not has_numba:
        choice = "torch"
    if choice != "auto":
        return choice
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "numba" if has_numba else "torch"
