"""Where a training step's time goes, for ``benchmarks.report --op profile`` (see ``benchmarks/train_step.py``).

    python -m benchmarks.report --op profile [--nets unet_fashion] [--variants bf16+cl+fused,...] [--quick]

Per network and variant: a summary row (wall ms per step unprofiled, GPU busy ms per step and its share of the
wall time, device launches per step), then the top device kernels by time and the top host ops by self time
(``torch.profiler``). Default: ``unet_fashion`` at its preset's batch, ``bf16+cl+fused`` (and the compiled
variant without ``--quick``) on a GPU; the toy size, ``eager``, on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from benchmarks import train_step

TITLE = "Training step profile: GPU busy time against wall time, top kernels and host ops"
NAME_CHARS = 90


def rows(device: torch.device, quick: bool, *, nets: Sequence[str] | None = None,
         variants: Sequence[str] | None = None) -> tuple[list[str], Iterator[list[str]]]:
    nets = ["unet_fashion"] if nets is None else list(nets)
    if variants is None:
        cuda = device.type == "cuda"
        variants = (["bf16+cl+fused"] + ([] if quick else ["bf16+cl+fused+compile"])) if cuda else ["eager"]
    for name in nets:
        if name not in train_step.NETS:
            raise ValueError(f"nets: expected names from {', '.join(train_step.NETS)}, got {name!r}")
    for variant in variants:
        train_step.parse_variant(variant)
    columns = ["net (batch)", "variant", "kind", "name", "calls/step", "us/step", "share"]

    def measured_rows() -> Iterator[list[str]]:
        for name in nets:
            for variant in variants:
                p = train_step.profile_step(name, device, variant, steps=3 if quick else 5)
                torch._dynamo.reset()
                label = f"{name} ({p.batch})"
                if p.device_busy_ms is not None:
                    summary = (f"wall {p.wall_ms:.2f} ms/step; GPU busy {p.device_busy_ms:.2f} ms/step "
                               f"({100 * p.device_busy_ms / p.wall_ms:.0f}% of wall); {p.launches:.0f} launches/step")
                else:
                    summary = f"wall {p.wall_ms:.2f} ms/step (no device timeline on a CPU)"
                yield [label, variant, "summary", summary, "", "", ""]
                for r in p.rows:
                    short = r.name if len(r.name) <= NAME_CHARS else r.name[: NAME_CHARS - 3] + "..."
                    yield [label, variant, r.kind, short.replace("|", "/"), f"{r.calls_per_step:.0f}",
                           f"{r.us_per_step:.0f}", f"{100 * r.share:.1f}%"]

    return columns, measured_rows()
