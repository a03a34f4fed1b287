"""pytest-benchmark: fused multiscale loss, forward + backward, against the torch reference and torch.compile of it.

    python -m pytest benchmarks/test_bench_multiscale.py [--benchmark-json out.json]

Providers: ``triton`` (CUDA only), ``triton-graph`` (the same step replayed from a CUDA graph), ``numba``
(CPU only), ``torch`` (eager reference), ``compile``
(``torch.compile`` of the reference). ``extra_info``: median ms (``triton.testing.do_bench`` on CUDA,
host clock on CPU), achieved GB/s (inputs read once + gradient written once), the measured copy
bandwidth of the device, and peak memory.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.report import copy_bandwidth, peak_memory_bytes, time_ms
from benchmarks.report_multiscale import DTYPES, SHAPES, backend_env, bytes_moved, forced_backend, inputs, make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("provider", ["triton", "triton-graph", "numba", "torch", "compile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-d{}".format(*s))
def test_multiscale_fwd_bwd(benchmark, provider, dtype, shape):
    if provider.startswith("triton") and DEVICE.type != "cuda":
        pytest.skip("triton runs on CUDA tensors")
    if provider == "numba" and DEVICE.type != "cpu":
        pytest.skip("numba runs on CPU tensors")
    pred, target = inputs(shape, dtype, DEVICE)
    with forced_backend(backend_env(provider)):
        step = make_step(provider, pred, target)

        def timed() -> None:
            step()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=20 if DEVICE.type == "cuda" else 5, iterations=1, warmup_rounds=1)
        ms = time_ms(step, DEVICE, repeats=5)
        pred.grad = None  # the peak counts the gradient this step allocates
        peak = peak_memory_bytes(step, DEVICE)
    torch._dynamo.reset()
    gbs = bytes_moved(pred) / (ms * 1e6)
    benchmark.extra_info.update({
        "device": str(DEVICE), "median_ms": ms, "GB/s": gbs, "bytes": bytes_moved(pred),
        "copy_GB/s": copy_bandwidth(DEVICE), "fraction_of_copy": gbs / copy_bandwidth(DEVICE),
        "peak_MiB": None if peak is None else peak / 2**20,
    })
