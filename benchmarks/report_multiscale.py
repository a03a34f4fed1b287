"""Fused multiscale loss, forward + backward: providers, shapes and the table for ``benchmarks.report``.

Providers: ``triton`` (CUDA) / ``numba`` (CPU) through ``kdiff.kernels.multiscale_mse``; ``torch``, the
eager reference ``multiscale_mse_ref``; ``compile``, ``torch.compile`` of that reference. One step is
``pred.grad = None; loss(pred, target).sum().backward()``. Bytes: ``pred`` and ``target`` read once,
``d loss / d pred`` written once (the minimum; the fused path moves 5/3 of it: its backward reads the stored
gradient and writes it scaled).

On CUDA the table adds, for the fused provider, the GPU busy time of one step (sum of its kernels'
device durations, from the CUDA profiler), wall / busy (host overhead: goal <= 1.3), and the fused
kernel's own time and its bandwidth (pred + target read, gradient written) as a fraction of copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kdiff.kernels import multiscale_mse, multiscale_mse_ref

from .report import copy_bandwidth, forced_backend, gpu_busy_us, peak_memory_bytes, time_ms

TITLE = "Multiscale loss (simple diffusion), forward + backward, base 32"
SHAPES = [(64, 3, 64), (32, 3, 256), (8, 3, 512)]  # (B, C, d)
DTYPES = [torch.bfloat16, torch.float32]
BASE = 32


def providers(device: torch.device) -> list[str]:
    """On CUDA also ``triton-graph``: the same fused step captured once in a CUDA graph and replayed (no
    Python host work per step: the kernel's own cost, to set against ``triton``'s eager wall time)."""
    if device.type == "cuda":
        return ["triton", "triton-graph", "torch", "compile"]
    return ["numba", "torch", "compile"]


def backend_env(provider: str) -> str:
    """The ``KDIFF_KERNELS`` value a provider runs under."""
    return {"triton": "triton", "triton-graph": "triton", "numba": "numba"}.get(provider, "auto")


def _ref(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return multiscale_mse_ref(pred, target, base=BASE)


def _fused(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return multiscale_mse(pred, target, base=BASE)


def inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    pred = torch.randn(b, c, d, d, generator=gen, device=device).to(dtype).requires_grad_()
    target = torch.randn(b, c, d, d, generator=gen, device=device).to(dtype)
    return pred, target


def make_step(provider: str, pred: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One forward + backward with ``provider``; compilation happens here, not in the timed step."""
    loss_fn = {"triton": _fused, "triton-graph": _fused, "numba": _fused, "torch": _ref, "compile": None}[provider]
    if provider == "compile":
        loss_fn = torch.compile(_ref)

    def step() -> None:
        pred.grad = None
        loss_fn(pred, target).sum().backward()

    step()
    if provider != "triton-graph":
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    pred.grad = None
    with torch.cuda.graph(graph):
        loss_fn(pred, target).sum().backward()
    return graph.replay


def bytes_moved(pred: torch.Tensor) -> int:
    """``pred`` and ``target`` read once, the gradient (pred's dtype) written once."""
    return 3 * pred.numel() * pred.element_size()


KERNEL_NAME = "_multiscale_mse_kernel"


def kernel_bytes(pred: torch.Tensor) -> int:
    """The fused kernel's traffic: pred and target read, the stored gradient (float32 for float16) written."""
    grad_size = 4 if pred.dtype == torch.float16 else pred.element_size()
    return pred.numel() * (2 * pred.element_size() + grad_size)


def measure(provider: str, pred: torch.Tensor, target: torch.Tensor, *,
            repeats: int) -> tuple[float, int | None, tuple[float, float | None] | None]:
    """``(median ms, peak bytes, GPU (busy us, kernel us) or None)`` of one forward + backward with ``provider``."""
    with forced_backend(backend_env(provider)):
        step = make_step(provider, pred, target)
        ms = time_ms(step, pred.device, repeats=repeats)
        busy = gpu_busy_us(step, kernel=KERNEL_NAME) if pred.is_cuda and provider.startswith("triton") else None
        pred.grad = None
        return ms, peak_memory_bytes(step, pred.device), busy


def rows(device: torch.device, quick: bool) -> tuple[list[str], Iterator[list[str]]]:
    """Columns, and the rows as each shape and dtype is measured."""
    columns = ["(B, C, d)", "dtype", "provider", "ms", "GB/s", "% of copy BW", "speed-up vs torch", "peak MiB"]
    if device.type == "cuda":
        columns += ["GPU busy us", "wall / busy", "kernel us", "kernel % of copy"]
    roofline = copy_bandwidth(device)

    def measured_rows() -> Iterator[list[str]]:
        for shape in SHAPES:
            for dtype in DTYPES:
                pred, target = inputs(shape, dtype, device)
                measured = {p: measure(p, pred, target, repeats=3 if quick else 50) for p in providers(device)}
                torch._dynamo.reset()
                for provider, (ms, peak, busy) in measured.items():
                    gbs = bytes_moved(pred) / (ms * 1e6)
                    row = [str(shape), str(dtype).removeprefix("torch."), provider, f"{ms:.2f}", f"{gbs:.2f}",
                           f"{100 * gbs / roofline:.0f}%", f"{measured['torch'][0] / ms:.2f}x",
                           "n/a" if peak is None else f"{peak / 2**20:.0f}"]
                    if device.type == "cuda":
                        row += ["-"] * 4 if busy is None else [
                            f"{busy[0]:.1f}", f"{1e3 * ms / busy[0]:.2f}", f"{busy[1]:.1f}",
                            f"{100 * kernel_bytes(pred) / (busy[1] * 1e3) / roofline:.0f}%"]
                    yield row
    return columns, measured_rows()
