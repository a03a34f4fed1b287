"""One training step of a kdiff network, timed, with its FLOPs and the fraction of the device's matmul peak.

A step is forward (under optional bf16 autocast), an eps-prediction MSE, backward and an AdamW update, on
fixed random data (the speed does not depend on the values), with no host synchronization inside: the
loss is never read back. Variants are ``+``-joined options, ``eager`` for none:

    bf16      torch.autocast(dtype=torch.bfloat16) around forward and loss
    cl        channels_last network and input
    fused     torch.optim.AdamW(fused=True) (else torch's default, the foreach implementation)
    compile   torch.compile of the network (the kdiff kernels stay custom ops inside the graph)
    graphs    compile in mode "reduce-overhead": forward and backward replayed from CUDA graphs (implies compile)

FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward + backward with the
attention on its SDPA path (``KDIFF_KERNELS=torch``, whose FLOPs the counter knows; the math is the same):
matmuls, convolutions and attention, not elementwise work or the optimizer. The matmul peak is measured
like the copy bandwidth of ``benchmarks.report``: a large square matmul in bf16 (variants with ``bf16``)
or float32 at torch's current float32 matmul precision.

Full size on a GPU: ``unet_fashion`` at batch 256 and ``ddpm_cifar10`` at batch 128 (their presets'
batches). On a CPU, toy size: the same architectures at 32 channels, 8 normalization groups, batch 2.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.report import forced_backend
from kdiff.nets import build

NETS = {"unet_fashion": 256, "ddpm_cifar10": 128}  # network config -> its preset's batch on a GPU
CPU_BATCH = 2
CPU_OVERRIDES = {"channels": 32, "norm_groups": 8}  # toy width on a CPU, same layout of levels and attention
OPTIONS = ("bf16", "cl", "fused", "compile", "graphs")
GPU_VARIANTS = ("eager", "bf16", "bf16+cl+fused", "bf16+cl+fused+compile", "bf16+cl+fused+graphs")
CPU_VARIANTS = ("eager", "cl+fused")


def parse_variant(variant: str) -> frozenset[str]:
    """``"bf16+cl"`` -> ``{"bf16", "cl"}``; ``"eager"`` -> no option."""
    if variant == "eager":
        return frozenset()
    options = frozenset(variant.split("+"))
    unknown = sorted(options - set(OPTIONS))
    if unknown or not variant:
        raise ValueError(f"variant: expected 'eager' or '+'-joined options from {', '.join(OPTIONS)}, "
                         f"got {variant!r}")
    return options


@dataclass(frozen=True)
class StepResult:
    net: str
    batch: int
    variant: str
    ms: float  # mean milliseconds per step, host clock around many steps (CUDA: events)
    flops: float  # FLOPs of one forward + backward (FlopCounterMode)
    peak_tflops: float  # measured matmul peak of the device in the variant's dtype
    peak_mib: float | None  # CUDA peak memory of a step

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.ms * 1e-3)

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12

    @property
    def fraction_of_peak(self) -> float:
        return self.tflops / self.peak_tflops


def default_batch(net: str, device: torch.device) -> int:
    return NETS[net] if device.type == "cuda" else CPU_BATCH


def make_step(net_name: str, batch: int, device: torch.device, variant: str) -> tuple[Callable[[], None], Callable]:
    """``(step, count_flops)``: one optimizer step, and a function returning the FLOPs of forward + backward."""
    options = parse_variant(variant)
    torch.manual_seed(0)
    net = build(net_name, **({} if device.type == "cuda" else CPU_OVERRIDES)).to(device)
    cfg = net.cfg
    fmt = torch.channels_last if "cl" in options else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device).contiguous(memory_format=fmt)
    eps = torch.randn_like(x)
    noise_cond = torch.randn(batch, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device) if cfg.num_classes else None
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True if "fused" in options else None)
    graphs = "graphs" in options
    forward = torch.compile(net, mode="reduce-overhead" if graphs else "default") if graphs or "compile" in options \
        else net
    amp = "bf16" in options

    def loss_of(model: Callable) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, noise_cond, labels)
            return (out[:, : x.shape[1]].float() - eps).square().mean()

    def step() -> None:
        if graphs:  # a new iteration for CUDA-graph trees
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_of(forward)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def count_flops() -> float:
        with forced_backend("torch"), FlopCounterMode(display=False) as counter:
            loss_of(net).backward()
        opt.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    return step, count_flops


@functools.cache
def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a large square matmul in ``dtype`` (8192 on CUDA, 1024 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = mean_ms(lambda: torch.mm(a, b), device, steps=20 if device.type == "cuda" else 5, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def mean_ms(fn: Callable[[], object], device: torch.device, *, steps: int, warmup: int) -> float:
    """Mean milliseconds per call over ``steps`` back-to-back calls (after ``warmup``): throughput, host
    overhead included, as a training loop sees it. CUDA: events around the whole run."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / steps
    begin = time.perf_counter()
    for _ in range(steps):
        fn()
    return 1e3 * (time.perf_counter() - begin) / steps


def measure(net_name: str, device: torch.device, variant: str, *, batch: int | None = None,
            steps: int | None = None) -> StepResult:
    """Time ``steps`` training steps (after 3 warm-up steps: compilation, autotuning, allocator)."""
    batch = default_batch(net_name, device) if batch is None else batch
    steps = (20 if device.type == "cuda" else 3) if steps is None else steps
    step, count_flops = make_step(net_name, batch, device, variant)
    flops = count_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = mean_ms(step, device, steps=steps, warmup=3)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    dtype = torch.bfloat16 if "bf16" in parse_variant(variant) else torch.float32
    return StepResult(net_name, batch, variant, ms, flops, matmul_peak_tflops(device, dtype), peak_mib)


@dataclass(frozen=True)
class ProfileRow:
    kind: str  # "gpu": a device kernel, memcpy or memset; "cpu": a host op (self time)
    name: str
    calls_per_step: float
    us_per_step: float
    share: float  # of the GPU busy time ("gpu") or of the host time of a step ("cpu")


@dataclass(frozen=True)
class StepProfile:
    net: str
    batch: int
    variant: str
    wall_ms: float  # per step, unprofiled, back to back (as in :func:`measure`)
    device_busy_ms: float | None  # per step: sum of the device durations of kernels, memcpy and memset (CUDA)
    launches: float | None  # device kernels, memcpys and memsets per step (CUDA)
    host_ms: float  # per step: host time of the profiled steps, profiler overhead included
    rows: tuple[ProfileRow, ...]


def profile_step(net_name: str, device: torch.device, variant: str, *, batch: int | None = None, steps: int = 3,
                 top: int = 12) -> StepProfile:
    """Where a training step's time goes: the ``top`` device kernels by time (CUDA) and host ops by self time.

    ``torch.profiler`` over ``steps`` steps after 3 warm-up steps. Device rows group kernels by name; the GPU
    busy time against the wall time of a step says whether the step is bound by the GPU or by the host (launches,
    Python, autograd), and the kernel rows which work dominates the GPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    batch = default_batch(net_name, device) if batch is None else batch
    step, _ = make_step(net_name, batch, device, variant)
    wall_ms = mean_ms(step, device, steps=steps, warmup=3)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    begin = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    host_ms = 1e3 * (time.perf_counter() - begin) / steps
    kernels: dict[str, list[float]] = {}
    if cuda:
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                entry = kernels.setdefault(event.name, [0, 0.0])
                entry[0] += 1
                entry[1] += event.device_time
    busy_us = sum(t for _, t in kernels.values())
    rows = [ProfileRow("gpu", name, n / steps, t / steps, t / busy_us if busy_us else 0.0)
            for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]]
    host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    host_total = sum(e.self_cpu_time_total for e in host)
    rows += [ProfileRow("cpu", e.key, e.count / steps, e.self_cpu_time_total / steps,
                        e.self_cpu_time_total / host_total if host_total else 0.0)
             for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top]]
    return StepProfile(net_name, batch, variant, wall_ms, busy_us / steps / 1e3 if cuda else None,
                       sum(n for n, _ in kernels.values()) / steps if cuda else None, host_ms, tuple(rows))
