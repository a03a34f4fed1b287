"""``python -m benchmarks.gpu_session.autocast_run MODULE ARGS...``: run ``python -m MODULE ARGS...`` inside a bf16
autocast region on CUDA (cuDNN autotuning on), unchanged on a CPU.

Used to sample from a trained recipe in bf16 through its own command line: convolutions and matmuls run in bf16,
while the samplers keep their state in float64 and the preconditioning in float32 (kdiff's precision rule), since
autocast leaves float64 tensors and elementwise ops alone.
"""

from __future__ import annotations

import contextlib
import runpy
import sys

import torch


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m benchmarks.gpu_session.autocast_run MODULE [ARGS...]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    region = contextlib.nullcontext()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        region = torch.autocast("cuda", dtype=torch.bfloat16)
    with region:
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
