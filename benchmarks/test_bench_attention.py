"""pytest-benchmark suite for attention: forward and forward+backward per provider and shape.

Run with ``python -m pytest benchmarks/test_bench_attention.py --benchmark-only``. On a GPU the
providers are the Triton kernel, each SDPA backend (flash, efficient, cuDNN), the eager reference
and ``torch.compile`` of the reference, in bf16 at U-Net/U-ViT shapes; CUDA is synchronized inside
the timed function, and ``extra_info`` records the median ms (``triton.testing.do_bench`` on CUDA,
the host clock on CPU), TFLOP/s from it, and the peak memory on CUDA. On a CPU only the reference,
its compiled form and SDPA run, at small N in float32.
"""

from __future__ import annotations

import pytest
import torch
from kdiff.kernels import attention_ref

from benchmarks import report_attention as report
from benchmarks.report import forced_backend, peak_memory_bytes, time_ms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
PROVIDERS = {**report.providers(DEVICE), "reference-compiled": torch.compile(attention_ref)}
SHAPES = report.shapes(DEVICE, quick=False)


def _synchronized(run):
    if DEVICE.type != "cuda":
        return run

    def synced():
        out = run()
        torch.cuda.synchronize()
        return out
    return synced


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_attention(benchmark, provider: str, shape: tuple[int, int, int, int], backward: bool):
    b, h, n, d = shape
    if provider.startswith("reference") and DEVICE.type == "cuda" and n >= 4096:
        pytest.skip("the eager reference stores B*H*N^2 logits: tens of GB at N=4096")
    q, k, v, do = report.make_inputs(shape, DEVICE, DTYPE, backward=backward)
    run = report.step(PROVIDERS[provider], q, k, v, do, backward=backward)
    with forced_backend(report.backend_env(provider)):
        try:
            run()
        except RuntimeError as err:  # an SDPA backend without a kernel for this shape, dtype or GPU
            pytest.skip(f"{provider} cannot run {shape}: {str(err).splitlines()[0]}")
        flops = report.attention_flops(b, h, n, d, backward=backward)
        ms = time_ms(run, DEVICE)
        peak = peak_memory_bytes(run, DEVICE) if DEVICE.type == "cuda" else None
        benchmark.extra_info.update(median_ms=ms, tflops=flops / (ms * 1e-3) / 1e12, flops=flops,
                                    peak_memory_mb=None if peak is None else peak / 2**20)
        benchmark.pedantic(_synchronized(run), rounds=20 if DEVICE.type == "cuda" else 5, warmup_rounds=2)
