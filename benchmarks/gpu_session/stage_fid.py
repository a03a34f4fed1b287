"""Stage 2, ``--stage fid``: the FID of stage 1's samples against the Fashion-MNIST test split.

Reference statistics are computed here with the network in use (so an Inception stored in float16 is compared with
itself), the samples are centre-cropped back to the data's 28x28 (the recipe trains on images padded to 32x32), the
clean-fid resize runs in one process per core while the GPU runs the network, and the FID at 10,000 samples is
recorded before the 50,000-sample figure is attempted. Last, the precision check: the same 10,000 seeds sampled in
float32 against the bf16 ones, set beside the FID difference between two disjoint sets of 10,000 bf16 seeds (the noise
of an FID at 10k).
"""

from __future__ import annotations

from pathlib import Path

from .record import Session, Step, run_task


def steps(session: Session, *, work: Path, inception: str | None, smoke: bool) -> list[Step]:
    """Stage 2's steps in order, each with its share of the budget (seconds at the nominal 170 s)."""
    batch = 4 if smoke else 500
    limits = {"reference": 4, "part0": 4, "part1": 4, "real": 4} if smoke else dict.fromkeys(
        ("reference", "part0", "part1", "real"))
    common = {"work": str(work), "inception": inception}

    def task(name: str, task: str, **kwargs: object) -> Step:
        return Step(name, shares[name], lambda budget: run_task(session, name, task, {**common, **kwargs},
                                                                timeout=budget))

    shares = {"inception": 10, "fid-reference": 30, "fid-10k": 35, "fid-50k": 75, "fid-train-vs-test": 20,
              "fid-precision": 25}
    return [Step("inception", shares["inception"],
                 lambda budget: run_task(session, "inception", "inception", {"inception": inception}, timeout=budget)),
            task("fid-reference", "fid_reference", batch_size=batch, limit=limits["reference"]),
            task("fid-10k", "fid_samples", batch_size=batch, part=0, limit=limits["part0"]),
            task("fid-50k", "fid_samples", batch_size=batch, part=1, limit=limits["part1"]),
            task("fid-train-vs-test", "fid_real", batch_size=batch, limit=limits["real"]),
            task("fid-precision", "fid_precision", batch_size=batch, limit=limits["part0"])]
