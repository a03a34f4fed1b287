"""pytest-benchmark: one training step of ``unet_fashion`` and ``ddpm_cifar10`` per variant (see train_step.py).

    python -m pytest benchmarks/test_bench_train.py [--benchmark-json out.json]

On a GPU: full size (batch 256 and 128), variants ``eager``, ``bf16``, ``bf16+cl+fused``,
``bf16+cl+fused+compile`` and ``bf16+cl+fused+graphs``; on a CPU: toy size (32 channels, batch 2), ``eager`` and
``cl+fused`` (``KDIFF_BENCH_TRAIN_VARIANTS=v1,v2`` overrides either). CUDA is synchronized inside the timed function,
so these times include one sync per step; ``python -m benchmarks.report --op train`` times back-to-back
steps instead. ``extra_info``: images/s, GFLOP per step (FlopCounterMode), achieved TFLOP/s, the measured
matmul peak and the fraction of it, peak memory on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_DEFAULT = train_step.GPU_VARIANTS if DEVICE.type == "cuda" else train_step.CPU_VARIANTS
VARIANTS = [v for v in os.environ.get("KDIFF_BENCH_TRAIN_VARIANTS", ",".join(_DEFAULT)).split(",") if v]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("net", list(train_step.NETS))
def test_train_step(benchmark, net: str, variant: str):
    batch = train_step.default_batch(net, DEVICE)
    step, count_flops = train_step.make_step(net, batch, DEVICE, variant)
    flops = count_flops()
    for _ in range(3):  # compilation, autotuning, allocator
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def timed() -> None:
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"train-step {net} bs{batch} {DEVICE.type}"
    benchmark.pedantic(timed, rounds=10 if DEVICE.type == "cuda" else 2, iterations=1, warmup_rounds=0)
    torch._dynamo.reset()
    seconds = benchmark.stats.stats.mean
    dtype = torch.bfloat16 if "bf16" in train_step.parse_variant(variant) else torch.float32
    peak = train_step.matmul_peak_tflops(DEVICE, dtype)
    tflops = flops / seconds / 1e12
    benchmark.extra_info.update({
        "device": str(DEVICE), "batch": batch, "variant": variant, "images_per_s": batch / seconds,
        "gflop_per_step": flops / 1e9, "tflops": tflops, "matmul_peak_tflops": peak,
        "fraction_of_matmul_peak": tflops / peak,
        "peak_MiB": torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None,
    })
