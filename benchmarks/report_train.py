"""Training-step throughput table for ``benchmarks.report --op train`` (see ``benchmarks/train_step.py``).

    python -m benchmarks.report --op train [--nets unet_fashion,ddpm_cifar10] [--variants eager,bf16+cl+fused+compile]

Rows: network, batch, variant, ms per step, images/s, GFLOP per step, achieved TFLOP/s and its fraction of
the measured matmul peak (bf16 for bf16 variants, else float32), peak memory on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from benchmarks import train_step

TITLE = "Training step (forward, backward, AdamW): images/s and fraction of the matmul peak"


def rows(device: torch.device, quick: bool, *, nets: Sequence[str] | None = None,
         variants: Sequence[str] | None = None) -> tuple[list[str], Iterator[list[str]]]:
    nets = list(train_step.NETS) if nets is None else list(nets)
    if variants is None:
        variants = train_step.GPU_VARIANTS if device.type == "cuda" else train_step.CPU_VARIANTS
    for name in nets:
        if name not in train_step.NETS:
            raise ValueError(f"nets: expected names from {', '.join(train_step.NETS)}, got {name!r}")
    for variant in variants:
        train_step.parse_variant(variant)
    columns = ["net", "batch", "variant", "ms/step", "img/s", "GFLOP/step", "TFLOP/s", "% of matmul peak",
               "peak TFLOP/s (dtype)", "peak MiB"]
    steps = (5 if device.type == "cuda" else 2) if quick else None

    def measured_rows() -> Iterator[list[str]]:
        for name in nets:
            for variant in variants:
                r = train_step.measure(name, device, variant, steps=steps)
                torch._dynamo.reset()
                dtype = "bf16" if "bf16" in train_step.parse_variant(variant) else "fp32"
                yield [name, str(r.batch), variant, f"{r.ms:.1f}", f"{r.images_per_s:.3g}", f"{r.flops / 1e9:.1f}",
                       f"{r.tflops:.3g}", f"{100 * r.fraction_of_peak:.1f}%", f"{r.peak_tflops:.3g} ({dtype})",
                       "n/a" if r.peak_mib is None else f"{r.peak_mib:.0f}"]

    return columns, measured_rows()
