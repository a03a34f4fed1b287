"""Hypothesis strategies shared by the property tests of the math core."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

LOGSNR_BOUND = {torch.float32: 15.0, torch.float64: 30.0}
SHAPES = st.sampled_from([(), (3,), (2, 3), (3, 4, 5)])  # trailing dims after the batch


def floats_for(dtype: torch.dtype, lo: float, hi: float) -> st.SearchStrategy[float]:
    """Floats in [lo, hi] exactly representable in ``dtype`` (float32 bounds rounded inwards)."""
    if dtype != torch.float32:
        return st.floats(lo, hi)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    lo32 = lo32 if lo32 >= lo else np.nextafter(lo32, np.float32(np.inf))
    hi32 = hi32 if hi32 <= hi else np.nextafter(hi32, np.float32(-np.inf))
    return st.floats(float(lo32), float(hi32), width=32)


@st.composite
def cases(draw, dtype: torch.dtype, *, n: int = 2, bound: float | None = None):
    """``n`` standard-normal tensors of one shape (B, ...) and a logsnr of shape [B]."""
    shape = (draw(st.integers(1, 4)), *draw(SHAPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors = tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(n))
    b = LOGSNR_BOUND[dtype] if bound is None else bound
    l = torch.tensor(draw(st.lists(floats_for(dtype, -b, b), min_size=shape[0], max_size=shape[0])), dtype=dtype)
    return (*tensors, l)
