"""Compile the Triton kernels for sm_90 without a GPU and print what the compiler made of them.

    python -m benchmarks.compile_sm90 [--op multiscale|attention|all]

For each kernel variant: registers per thread and spilled bytes (from the ptxas that ships with Triton),
shared memory, `bar.sync` barriers, warp shuffles and global loads/stores with how many are 16-byte-or-
narrower vectors. Pointer arguments and strides are declared 16-byte divisible, as Triton specializes them
at a real launch on contiguous tensors. This checks the structure of the code (spills, vector width,
cross-thread traffic), not its speed.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_info(ptx: str) -> tuple[int, int]:
    """``(registers, spill store bytes)`` from the first bundled ptxas that accepts this PTX version."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for name in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([os.path.join(_BIN, name), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", run.stderr + run.stdout)
            spills = re.search(r"(\d+) bytes spill stores", run.stderr + run.stdout)
            if run.returncode == 0 and regs and spills:
                return int(regs.group(1)), int(spills.group(1))
        raise RuntimeError("no bundled ptxas compiled the PTX for sm_90a")
    finally:
        os.unlink(f.name)


def compile_sm90(fn: triton.JITFunction, signature: dict[str, str], constexprs: dict[str, object],
                 divisible: Sequence[str], *, num_warps: int, num_stages: int = 3) -> dict[str, int]:
    names = list(signature)
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    regs, spills = _ptxas_info(ptx)
    return {"regs": regs, "spill_bytes": spills, "shared": kernel.metadata.shared, "bar": ptx.count("bar.sync"),
            "shfl": ptx.count("shfl.sync"), "ld": ptx.count("ld.global"),
            "ld_vec": len(re.findall(r"ld\.global[^\n]*\.v[248]", ptx)), "st": ptx.count("st.global"),
            "st_vec": len(re.findall(r"st\.global[^\n]*\.v[248]", ptx))}


def multiscale_rows() -> Iterator[tuple[str, dict[str, int]]]:
    ms = importlib.import_module("kdiff.kernels.multiscale")
    for dt, size, width in (("bf16", 2, 64), ("bf16", 2, 256), ("bf16", 2, 512), ("fp32", 4, 256), ("fp32", 4, 512)):
        levels = ms.multiscale_levels(width, width)
        warps = ms._num_warps(levels, size)
        v, a = ms._launch_shape(width, levels, size, warps)
        ints = ["n_units", "C", "H", "W", "n_chunks"] + [f"s_{x}{y}" for x in "ptg" for y in "bch"]
        sig = {"pred_ptr": f"*{dt}", "target_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "partial_ptr": "*fp32",
               "gamma_ptr": "*fp32"}
        sig.update({n: "i32" for n in ints[:5]})
        for x in "ptg":
            sig.update({f"s_{x}b": "i32", f"s_{x}c": "i32", f"s_{x}h": "i32", f"s_{x}w": "constexpr"})
        sig.update({n: "constexpr" for n in ("LEVELS", "K", "V", "A", "WRITE_GRAD", "ACC")})
        const = {"s_pw": 1, "s_tw": 1, "s_gw": 1, "LEVELS": levels, "K": 2 ** (levels - 1), "V": v, "A": a,
                 "WRITE_GRAD": True, "ACC": tl.float32}
        divisible = ["pred_ptr", "target_ptr", "grad_ptr", "partial_ptr", "gamma_ptr", "H", "W"] + [
            f"s_{x}{y}" for x in "ptg" for y in "bch"]
        stats = compile_sm90(ms._multiscale_mse_kernel, sig, const, divisible, num_warps=warps)
        yield f"multiscale {dt} d={width} levels={levels} V={v} A={a} warps={warps}", stats


def attention_rows() -> Iterator[tuple[str, dict[str, int]]]:
    at = importlib.import_module("kdiff.kernels.attention")
    kernels = {"fwd": at._attention_fwd_kernel, "dq": at._attention_bwd_dq_kernel,
               "dkdv": at._attention_bwd_dkdv_kernel}
    for name, fn in kernels.items():
        sig, divisible = {}, []
        for arg in fn.arg_names:
            if arg in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "EVEN_N", "PRECISION"):
                sig[arg] = "constexpr"
            elif arg in ("LSE", "DELTA"):
                sig[arg], divisible = "*fp32", divisible + [arg]
            elif arg.isupper() and arg not in ("N", "H"):
                sig[arg], divisible = "*bf16", divisible + [arg]
            elif arg in ("qk_scale", "scale"):
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
                divisible += [arg] if arg.startswith("s_") else []
        for d in (64, 128):
            for m, n, w, s in at._CONFIGS[name][f"mma16-{d}"]:
                for even in (True, False):
                    const = {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_M": m, "BLOCK_N": n, "EVEN_N": even,
                             "PRECISION": "ieee"}
                    stats = compile_sm90(fn, sig, const, divisible, num_warps=w, num_stages=s)
                    yield f"attention {name} bf16 D={d} ({m}, {n}, {w}, {s}) {'even' if even else 'ragged'} N", stats


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("multiscale", "attention", "all"), default="all")
    args = parser.parse_args(argv)
    rows = itertools.chain(multiscale_rows() if args.op in ("multiscale", "all") else (),
                           attention_rows() if args.op in ("attention", "all") else ())
    keys = ["regs", "spill_bytes", "shared", "bar", "shfl", "ld", "ld_vec", "st", "st_vec"]
    print(f"Triton {triton.__version__}, target sm_90a\n")
    print("| kernel | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, stats in rows:
        print(f"| {label} | " + " | ".join(str(stats[k]) for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
