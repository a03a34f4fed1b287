"""Training-step throughput of the networks: kdiff attention kernels vs ``F.scaled_dot_product_attention``.

One step = forward, backward and an AdamW update, at a fixed batch of random data (the network's
speed does not depend on the values). On a GPU: ADM ImageNet-64 and the U-ViT ImageNet-128 shape
under bf16 autocast, the batch set by ``KDIFF_BENCH_BATCH_<CONFIG>`` (defaults below); on a CPU:
the tiny configurations in float32. Each result records images/s and, on a GPU, peak memory in
``extra_info``; compare the ``kdiff`` and ``sdpa`` rows of the same configuration.

    pytest benchmarks/test_bench_nets.py --benchmark-columns=mean,stddev,rounds
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from kdiff.nets import build

CUDA = torch.cuda.is_available()

# (config, default batch): batches meant to fill one 80 GB GPU under bf16 autocast; override per config
GPU_CASES = [("adm_imagenet64", 64), ("uvit_imagenet128", 32)]
CPU_CASES = [("unet_tiny", 16), ("uvit_tiny", 16)]


def _batch(name: str, default: int) -> int:
    return int(os.environ.get(f"KDIFF_BENCH_BATCH_{name.upper()}", default))


def _train_step(name: str, batch: int, impl: str, device: str) -> Callable[[], None]:
    """A closure running one optimizer step of ``build(name, attention=impl)`` on ``device``."""
    torch.manual_seed(0)
    net = build(name, attention=impl).to(device)
    cfg = net.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    noise_cond = torch.randn(batch, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device) if cfg.num_classes else None
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device == "cuda")
    amp = device == "cuda"

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            out = net(x, noise_cond, labels)
        loss = (out.float()[:, : x.shape[1]] - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def _run(benchmark, step: Callable[[], None], batch: int, *, rounds: int, warmup: int) -> None:
    for _ in range(warmup):  # kernel autotuning, allocator warm-up
        step()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["batch"] = batch
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.mean
    if CUDA:
        benchmark.extra_info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["kdiff", "sdpa"])
@pytest.mark.parametrize("name,default_batch", GPU_CASES)
def test_train_step_gpu(benchmark, name, default_batch, impl):
    batch = _batch(name, default_batch)
    benchmark.group = f"train-step {name} bs{batch} bf16"
    _run(benchmark, _train_step(name, batch, impl, "cuda"), batch, rounds=20, warmup=3)


@pytest.mark.parametrize("impl", ["kdiff", "sdpa"])
@pytest.mark.parametrize("name,default_batch", CPU_CASES)
def test_train_step_cpu(benchmark, name, default_batch, impl):
    batch = _batch(name, default_batch)
    benchmark.group = f"train-step {name} bs{batch} fp32 cpu"
    _run(benchmark, _train_step(name, batch, impl, "cpu"), batch, rounds=10, warmup=2)
