"""Markdown benchmark tables on whatever device this runs on.

    python -m benchmarks.report [--op multiscale|attention|all] [--quick] [--device cuda|cpu]
    python -m benchmarks.report --op train [--nets unet_fashion,ddpm_cifar10] [--variants V1,V2,...] [--quick]
    python -m benchmarks.report --op profile [--nets unet_fashion] [--variants V1,...] [--quick]

``--op all`` (the default) prints the kernel tables (multiscale, attention). ``--op train`` prints the
training-step table of ``benchmarks/report_train.py``: images/s and the fraction of the measured matmul
peak for ``unet_fashion`` (batch 256 on a GPU) and ``ddpm_cifar10`` (batch 128); ``--variants`` takes
``eager`` or ``+``-joined options from ``bf16``, ``cl`` (channels_last), ``fused`` (fused AdamW),
``compile`` (torch.compile of the network), ``graphs`` (compiled with CUDA graphs), default
``eager,bf16,bf16+cl+fused,bf16+cl+fused+compile,bf16+cl+fused+graphs``
on a GPU and ``eager,cl+fused`` (toy size) on a CPU. ``--op profile`` prints where one training step's
time goes (``benchmarks/report_profile.py``): GPU busy time against wall time, launches per step, the top
kernels by device time and host ops by self time. A full GPU run, for example::

    python -m benchmarks.report --op all
    python -m benchmarks.report --op train

Each op has a module ``benchmarks/report_<op>.py`` with ``TITLE: str`` and
``rows(device, quick) -> (columns, rows)`` (the train op also takes ``nets`` and ``variants``). The
header names the device, the date, the torch / triton / numba versions and the measured device copy
bandwidth (the roofline of a memory-bound kernel): ``dst.copy_(src)`` of a large tensor, counted as
bytes read + bytes written.

Timing: ``triton.testing.do_bench`` (median) on CUDA; the median of repeated host-clock runs on CPU.
The measuring functions here are shared by the per-op modules.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch

OPS = ("multiscale", "attention")  # --op all
EXTRA_OPS = ("train", "profile")  # only by name: minutes per table on a GPU with compilation


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """``KDIFF_KERNELS=name`` for the duration (restored afterwards)."""
    old = os.environ.get("KDIFF_KERNELS")
    os.environ["KDIFF_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["KDIFF_KERNELS"]
        else:
            os.environ["KDIFF_KERNELS"] = old


def time_ms(fn: Callable[[], object], device: torch.device, *, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` on CUDA, ``repeats`` host-clock runs on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up: JIT compilation, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@functools.cache
def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s: ``dst.copy_(src)``, bytes read + bytes written."""
    n = 2**28 if device.type == "cuda" else 2**24  # 1 GiB or 64 MiB of float32
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=20)
    return 2 * n * 4 / (ms * 1e6)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was live before it.

    CUDA: the caching allocator's peak. CPU: torch allocations as recorded by the profiler (memory
    outside torch's allocator, e.g. numba scratch rows, is not seen); None if that is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action, MemoryProfile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        live = peak = 0
        for _, action, (key, _version), size in MemoryProfile(prof.profiler.kineto_results).timeline:
            if key.device.type != "cpu":
                continue
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak
    except Exception:  # a private profiler API: report nothing rather than a wrong number
        return None


def gpu_busy_us(fn: Callable[[], object], *, kernel: str | None = None, calls: int = 20) -> tuple[float, float | None]:
    """``(GPU busy us per call, us per call of kernels whose name contains kernel)`` from the CUDA profiler.

    Busy time is the sum of the device durations of every kernel and memcpy/memset ``fn`` launches
    (idle gaps between them excluded): compare it with the wall time of ``fn`` to see host overhead.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    busy = named = 0.0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        busy += event.device_time
        if kernel is not None and kernel in event.name:
            named += event.device_time
    return busy / calls, (named / calls if kernel is not None else None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for name in ("triton", "numba"):
        try:
            out.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def header(device: torch.device) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Device: {device_name(device)} | {date} | {versions()} | "
            f"measured copy bandwidth: {copy_bandwidth(device):.1f} GB/s")


def report_lines(op: str, device: torch.device, *, quick: bool, **options: object) -> Iterator[str]:
    """The markdown section of one op, line by line as its rows are measured (a run cut short keeps the rows it
    printed), or a note when its report module does not exist."""
    module_name = f"benchmarks.report_{op}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        yield f"### {op}\n\n_skipped: benchmarks/report_{op}.py does not exist yet._"
        return
    columns, rows = module.rows(device, quick, **options)
    yield f"### {module.TITLE}\n"
    yield "| " + " | ".join(columns) + " |"
    yield "|" + "|".join("---" for _ in columns) + "|"
    for row in rows:
        yield "| " + " | ".join(row) + " |"


def report(op: str, device: torch.device, *, quick: bool, **options: object) -> str:
    """The markdown section of one op (see :func:`report_lines`)."""
    return "\n".join(report_lines(op, device, quick=quick, **options))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=(*OPS, *EXTRA_OPS, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for BENCHMARKS.md)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nets", help="train, profile: comma-separated network configs (train's default "
                        "unet_fashion,ddpm_cifar10, profile's unet_fashion)")
    parser.add_argument("--variants", help="train, profile: comma-separated variants, e.g. eager,bf16+cl+fused+compile")
    args = parser.parse_args(argv)
    if args.op not in ("train", "profile") and (args.nets or args.variants):
        parser.error("--nets and --variants go with --op train or --op profile")
    device = torch.device(args.device)
    print(header(device))
    options = {}
    if args.op in ("train", "profile"):
        options = {"nets": args.nets.split(",") if args.nets else None,
                   "variants": args.variants.split(",") if args.variants else None}
    for op in OPS if args.op == "all" else (args.op,):
        print()
        for line in report_lines(op, device, quick=args.quick, **options):
            print(line, flush=True)


if __name__ == "__main__":
    main()
