"""Attention speed table: the Triton flash-attention kernel against PyTorch's attention backends.

``rows(device, quick)`` times forward and forward+backward at U-Net and U-ViT shapes, (B, H, N, D)
with N in {64, 256, 1024, 4096} and D in {64, 128}, bf16, B*N = 16384 tokens and H*D = 2048 channels,
plus (64, 8, 256, 64), the short-sequence case of the first H100 measurement. Providers on a GPU:
``triton``, the kernel at every N (``KDIFF_KERNELS=triton``); ``kdiff-auto``, ``kdiff.kernels.attention``
as shipped (SDPA below ``sdpa_below()``); ``sdpa``, PyTorch's own backend choice; each SDPA backend
forced; the eager reference.
FLOPs: ``4 B H N^2 D`` forward, 2.5 times that for the backward. On a GPU the times are medians of
``triton.testing.do_bench``; on a CPU (no Triton kernel there) only the eager reference and
``F.scaled_dot_product_attention`` run, at small N in float32, timed with the host clock.

    python -m benchmarks.report --op attention [--quick]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.report import forced_backend, time_ms
from kdiff.kernels import attention, attention_ref

TITLE = "Attention, forward and forward+backward: Triton flash-attention vs PyTorch SDPA backends"

Attn = Callable[[Tensor, Tensor, Tensor], Tensor]
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def attention_flops(b: int, h: int, n: int, d: int, *, backward: bool) -> float:
    """``4 B H N^2 D`` for the forward (two matmuls), times 3.5 with the backward (2.5x the forward)."""
    return 4.0 * b * h * n * n * d * (3.5 if backward else 1.0)


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(B, H, N, D): 16384 tokens of 2048 channels on a GPU; small batches of short sequences on a CPU."""
    if device.type == "cuda":
        return [(16384 // n, 2048 // d, n, d) for n in (64, 256, 1024, 4096) for d in (64, 128)] + [(64, 8, 256, 64)]
    return [(4, 4, n, 64) for n in ((64, 256) if quick else (64, 256, 1024))]


def _sdpa_with(backend: SDPBackend) -> Attn:
    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def backend_env(provider: str) -> str:
    """The ``KDIFF_KERNELS`` value a provider is timed under: ``triton`` forces the kernel at every N."""
    return "triton" if provider == "triton" else "auto"


def providers(device: torch.device) -> dict[str, Attn]:
    """The implementations compared: on a GPU the kernel, each SDPA backend and the eager reference."""
    if device.type == "cuda":
        return {"triton": attention, "kdiff-auto": attention, "sdpa": F.scaled_dot_product_attention,
                **{name: _sdpa_with(b) for name, b in SDPA_BACKENDS.items()}, "reference": attention_ref}
    return {"reference": attention_ref, "sdpa": F.scaled_dot_product_attention}


def make_inputs(shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype, *,
                backward: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v (requiring grad when ``backward``) and an upstream gradient, standard normal."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, do


def step(fn: Attn, q: Tensor, k: Tensor, v: Tensor, do: Tensor, *, backward: bool) -> Callable[[], object]:
    """One forward, or one forward and backward (gradients returned, not accumulated)."""
    if backward:
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    return lambda: fn(q, k, v)


def try_time_ms(run: Callable[[], object], device: torch.device, quick: bool) -> float | None:
    """Median ms per call (``benchmarks.report.time_ms``), or None when the backend cannot run the shape."""
    try:
        return time_ms(run, device, repeats=10 if quick else 30)
    except (RuntimeError, torch.cuda.OutOfMemoryError):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def rows(device: torch.device, quick: bool) -> tuple[list[str], Iterator[list[str]]]:
    """Column names, and one row per (pass, shape) as it is measured: ms per provider, TFLOP/s, kernel speed over
    the best SDPA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = providers(device)
    sdpa_names = [name for name in impls if name.startswith("sdpa")]
    columns = ["pass", "B", "H", "N", "D", "dtype", *[f"{name} ms" for name in impls],
               *(["triton TFLOP/s"] if "triton" in impls else []), "best SDPA TFLOP/s",
               *(["triton / best SDPA"] if "triton" in impls else [])]

    def measured_rows() -> Iterator[list[str]]:
        for backward in (False, True):
            for shape in shapes(device, quick):
                b, h, n, d = shape
                q, k, v, do = make_inputs(shape, device, dtype, backward=backward)
                skip_reference = device.type == "cuda" and quick and n >= 4096
                ms = {}
                for name, fn in impls.items():
                    with forced_backend(backend_env(name)):
                        ms[name] = None if name == "reference" and skip_reference else try_time_ms(
                            step(fn, q, k, v, do, backward=backward), device, quick)
                flops = attention_flops(b, h, n, d, backward=backward)
                tflops = {name: None if t is None else flops / (t * 1e-3) / 1e12 for name, t in ms.items()}
                sdpa_best = max((tflops[s] for s in sdpa_names if tflops[s] is not None), default=None)
                row = ["fwd+bwd" if backward else "fwd", str(b), str(h), str(n), str(d),
                       str(dtype).replace("torch.", ""), *[_fmt(ms[name]) for name in impls]]
                if "triton" in impls:
                    row.append(_fmt(tflops["triton"], 4))
                row.append(_fmt(sdpa_best, 4))
                if "triton" in impls:
                    ratio = None if tflops["triton"] is None or sdpa_best is None else tflops["triton"] / sdpa_best
                    row.append(_fmt(ratio))
                yield row

    return columns, measured_rows()

