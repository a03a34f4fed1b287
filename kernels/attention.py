"""Attention for diffusion networks: ``softmax(q k^T * scale) v`` over ``(B, H, N, D)``, non-causal.

FlashAttention (Dao et al. 2022, arXiv:2205.14135; FlashAttention-2, Dao 2023, arXiv:2307.08691):
the ``N x N`` score matrix is never stored. The forward pass streams key blocks through an online
softmax and keeps ``lse_i = log sum_j exp(s_ij)`` per query; the backward pass recomputes
``P = exp(S - lse)`` from it. With ``S = scale q k^T``, ``P = softmax(S)``, ``O = P v`` and
``dO = dL/dO`` (FlashAttention-2, Alg. 2):

    delta_i = sum_d dO_id O_id,   dP = dO v^T,   dS = P * (dP - delta),
    dv = P^T dO,   dk = scale dS^T q,   dq = scale dS k.

Exponents are base 2, ``exp(scale s) = exp2(log2(e) scale s)``: ``log2(e) * scale`` is folded into
one multiplier, ``s * multiplier - m`` is one fused multiply-add, and ``lse`` is kept in log2 units.
The ragged last block of queries and of keys is masked (N need not be a multiple of a block), and a
head dimension D <= 128 is padded to the next power of two >= 16 by masked loads. Every dot
accumulates in float32; its operands are fp16/bf16 for fp16/bf16 inputs. float32 inputs follow
``torch.get_float32_matmul_precision()``: ``"highest"`` (torch's default) gives IEEE float32 dots,
``"high"``/``"medium"`` TF32 tensor-core dots (10-bit mantissas), as torch's own matmuls do.

The backward pass has no atomics, so it is deterministic, and takes two launches: first a kernel
that owns a query block, computes its ``delta`` from its own O and dO rows (no separate pre-pass) and
loops over key blocks (dq), then one that owns a key block and loops over query blocks (dk, dv),
reading that ``delta``. The kernels take any B, H, N strides with unit stride along D, so views of a
fused qkv projection are not copied. Block sizes are autotuned on the first call per (N, D, dtype) on
a GPU (seconds; warm up before capturing CUDA graphs). On CUDA, sequences shorter than
``sdpa_below()`` (default 1024) go to ``F.scaled_dot_product_attention`` (see :func:`attention`).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._dispatch import backend

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_IN_INTERPRETER: tl.constexpr = tl.constexpr(_INTERPRET)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128
_MAX_GRID = 65535  # largest CUDA grid along axes 1 and 2, which carry the head and batch indices


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v``, scale ``1/sqrt(D)`` by default; ``q, k, v: (B, H, N, D)`` -> ``(B, H, N, D)``.

    Plain torch (Vaswani et al. 2017, Eq. 1). The softmax runs in float32 for fp16/bf16 inputs and
    in float64 for float64 inputs; the matmuls run in the inputs' dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    p = torch.softmax(logits, dim=-1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return torch.matmul(p.to(v.dtype), v)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Tensors are contiguous (B, H, N, D), seen as (B*H, N, D); lse and delta are
# contiguous float32 (B, H, N). Grid axes: (block of rows, head h, batch b).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, N, cols, HEAD_DIM: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, cols) tile as a dot operand, zero outside ``rows < N`` and ``cols < HEAD_DIM``.

    Upcast to float32 at the load, then back to the storage dtype for the tensor cores (the compiler
    folds the pair); the interpreter keeps float32, exact for loaded values, since its bf16 dot is wrong.
    """
    if EVEN_N and EVEN_D:
        x = tl.load(ptrs)
    elif EVEN_N:
        x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows[:, None] < N) & (cols[None, :] < HEAD_DIM), other=0.0)
    x = x.to(tl.float32)
    if not _IN_INTERPRETER:
        x = x.to(ptrs.dtype.element_ty)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, N, cols, HEAD_DIM: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """Store a (rows, cols) tile where ``rows < N`` and ``cols < HEAD_DIM``, cast to the pointer's dtype."""
    x = _cast(x, ptrs.dtype.element_ty)
    if EVEN_N and EVEN_D:
        tl.store(ptrs, x)
    elif EVEN_N:
        tl.store(ptrs, x, mask=cols[None, :] < HEAD_DIM)
    elif EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < N)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < N) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """float32 ``x`` to ``dtype``, rounding to nearest even; in the interpreter, whose bf16 cast truncates, the
    rounding is done on the bits first: add ``0x7FFF`` plus the kept lowest bit, clear the low 16 bits."""
    if _IN_INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _operand(x, dtype: tl.constexpr):
    """``x`` rounded to the dot operand dtype ``dtype``; in the interpreter held in float32 after rounding."""
    x = _cast(x, dtype)
    if _IN_INTERPRETER:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_vec(ptrs, rows, N, other, EVEN_N: tl.constexpr):
    """Load a (rows,) vector, ``other`` where ``rows >= N``; upcast to float32."""
    if EVEN_N:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=rows < N, other=other)
    return x.to(tl.float32)


@triton.jit
def _attention_fwd_kernel(
    Q, K, V,  # inputs (B, H, N, D), fp16/bf16/fp32, unit stride along D
    O,  # output (B, H, N, D), same dtype, unit stride along D
    LSE,  # output (B, H, N) float32, contiguous: log2 sum_j exp2(s_ij * qk_scale)
    N, H,  # sequence length, number of heads
    s_qb, s_qh, s_qn,  # strides of Q along B, H, N (elements)
    s_kb, s_kh, s_kn,  # strides of K
    s_vb, s_vh, s_vn,  # strides of V
    s_ob, s_oh, s_on,  # strides of O
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    EVEN_N: tl.constexpr,  # N is a multiple of BLOCK_M and BLOCK_N: no row masks
    PRECISION: tl.constexpr,  # tl.dot input_precision for float32 operands ("ieee" or "tf32")
):
    """One block of queries: ``O = softmax(scale q k^T) v`` by the online softmax (FlashAttention-2, Alg. 1)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    O += b * s_ob + h * s_oh
    LSE += (b * H + h) * N
    dot_dtype = Q.dtype.element_ty

    q = _load_tile(Q + offs_m[:, None] * s_qn + offs_d[None, :], offs_m, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of s * qk_scale
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s * qk_scale - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        rows_n = start_n + offs_n
        k = _load_tile(K + rows_n[:, None] * s_kn + offs_d[None, :], rows_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if not EVEN_N:
            s = tl.where(rows_n[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V + rows_n[:, None] * s_vn + offs_d[None, :], rows_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
        acc = tl.dot(_operand(p, dot_dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    _store_tile(O + offs_m[:, None] * s_on + offs_d[None, :], o, offs_m, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    lse = m_i + tl.math.log2(l_i)
    if EVEN_N:
        tl.store(LSE + offs_m, lse)
    else:
        tl.store(LSE + offs_m, lse, mask=offs_m < N)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, O, DO,  # inputs, output and output gradient (B, H, N, D), unit stride along D
    LSE,  # (B, H, N) float32 from the forward pass
    DELTA,  # output (B, H, N) float32: delta_i = sum_d dO_id O_id, read by the dK/dV kernel launched next
    DQ,  # output (B, H, N, D), unit stride along D
    N, H,  # sequence length, number of heads
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,  # strides of Q, K, V along B, H, N
    s_ob, s_oh, s_on, s_dob, s_doh, s_don,  # strides of O and DO
    s_gb, s_gh, s_gn,  # strides of DQ (DK and DV share them)
    qk_scale,  # scale * log2(e)
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program (resident)
    BLOCK_N: tl.constexpr,  # keys per loop step
    EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block of queries: ``delta = rowsum(dO * O)`` (FlashAttention-2, Alg. 2 line 4, no separate pass:
    the block's O rows are read once here) and ``dq = scale dS k``, looping over all keys."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    O += b * s_ob + h * s_oh
    DO += b * s_dob + h * s_doh
    DQ += b * s_gb + h * s_gh
    LSE += (b * H + h) * N
    DELTA += (b * H + h) * N
    dot_dtype = Q.dtype.element_ty

    q = _load_tile(Q + offs_m[:, None] * s_qn + offs_d[None, :], offs_m, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    do = _load_tile(DO + offs_m[:, None] * s_don + offs_d[None, :], offs_m, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    o = _load_tile(O + offs_m[:, None] * s_on + offs_d[None, :], offs_m, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if EVEN_N:
        tl.store(DELTA + offs_m, delta)
    else:
        tl.store(DELTA + offs_m, delta, mask=offs_m < N)
    lse = _load_vec(LSE + offs_m, offs_m, N, 0.0, EVEN_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        rows_n = start_n + offs_n
        k = _load_tile(K + rows_n[:, None] * s_kn + offs_d[None, :], rows_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(tl.fma(s, qk_scale, -lse[:, None]))
        if not EVEN_N:
            p = tl.where(rows_n[None, :] < N, p, 0.0)
        v = _load_tile(V + rows_n[:, None] * s_vn + offs_d[None, :], rows_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_operand(ds, dot_dtype), k, dq, input_precision=PRECISION)

    _store_tile(DQ + offs_m[:, None] * s_gn + offs_d[None, :], dq * scale, offs_m, N, offs_d, HEAD_DIM, EVEN_N,
                EVEN_D)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # inputs and output gradient (B, H, N, D), unit stride along D
    LSE, DELTA,  # (B, H, N) float32 from the forward pass and the dQ kernel
    DK, DV,  # outputs (B, H, N, D), unit stride along D, same strides
    N, H,  # sequence length, number of heads
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,  # strides of Q, K, V along B, H, N
    s_dob, s_doh, s_don,  # strides of DO
    s_gb, s_gh, s_gn,  # strides of DK and DV
    qk_scale,  # scale * log2(e)
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per loop step
    BLOCK_N: tl.constexpr,  # keys per program (resident)
    EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block of keys: ``dv = P^T dO``, ``dk = scale dS^T q``, looping over all queries (transposed tiles)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    DO += b * s_dob + h * s_doh
    DK += b * s_gb + h * s_gh
    DV += b * s_gb + h * s_gh
    LSE += (b * H + h) * N
    DELTA += (b * H + h) * N
    dot_dtype = Q.dtype.element_ty

    k = _load_tile(K + offs_n[:, None] * s_kn + offs_d[None, :], offs_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    v = _load_tile(V + offs_n[:, None] * s_vn + offs_d[None, :], offs_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows_m = start_m + offs_m
        q = _load_tile(Q + rows_m[:, None] * s_qn + offs_d[None, :], rows_m, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
        lse = _load_vec(LSE + rows_m, rows_m, N, 0.0, EVEN_N)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) = S^T
        p_t = tl.math.exp2(tl.fma(s_t, qk_scale, -lse[None, :]))
        if not EVEN_N:
            p_t = tl.where(rows_m[None, :] < N, p_t, 0.0)
        do = _load_tile(DO + rows_m[:, None] * s_don + offs_d[None, :], rows_m, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
        dv = tl.dot(_operand(p_t, dot_dtype), do, dv, input_precision=PRECISION)
        delta = _load_vec(DELTA + rows_m, rows_m, N, 0.0, EVEN_N)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(_operand(ds_t, dot_dtype), q, dk, input_precision=PRECISION)

    g_offs = offs_n[:, None] * s_gn + offs_d[None, :]
    _store_tile(DK + g_offs, dk * scale, offs_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    _store_tile(DV + g_offs, dv, offs_n, N, offs_d, HEAD_DIM, EVEN_N, EVEN_D)


# ----------------------------------------------------------------------------------------------
# Block sizes: autotuned per (N, D, dtype) on a GPU, one small config in the interpreter.
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and tile class: "mma16" for fp16/bf16
# tensor-core operands, "tf32" for float32 on TF32 tensor cores (twice the bytes and registers),
# "fma" for float32 IEEE dots on the CUDA cores (register-bound, so small tiles); "64" for D <= 64,
# "128" for 64 < D <= 128. Each listed config was compiled for sm_90 (Triton 3.9, ragged-N variant)
# and needs no stack: no register spills (the mma16-128 additions were checked with the strided
# kernels, even and ragged N; a 256-query, 16-warp forward spilled and is left out). These tables are
# the CUDA autotune space; the interpreter runs one config.
_CONFIGS = {
    # Forward: 128 queries per program on 1-2 warpgroups, key blocks of 64/128 pipelined 2-4 deep.
    "fwd": {
        "mma16-64": [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4),
                     (64, 64, 4, 3), (64, 128, 4, 3)],
        "mma16-128": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
                      (64, 128, 4, 3),
                      # Hopper candidates for the D = 128 gap: shallower / deeper pipelines, narrower key steps
                      (128, 64, 8, 2), (128, 64, 8, 5), (128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4)],
        "tf32-64": [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
        "tf32-128": [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
        "fma-64": [(32, 32, 4, 2), (32, 64, 4, 2), (16, 32, 4, 2)],
        "fma-128": [(32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
    },
    # dK/dV: a resident block of BLOCK_N keys and values, query steps of BLOCK_M.
    "dkdv": {
        "mma16-64": [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3),
                     (64, 64, 8, 3)],
        "mma16-128": [(32, 128, 8, 3), (32, 64, 4, 4), (64, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3),
                      (64, 128, 8, 2), (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 4, 2)],
        "tf32-64": [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 8, 3)],
        "tf32-128": [(16, 64, 4, 3)],
        "fma-64": [(16, 32, 4, 2)],
        "fma-128": [(16, 32, 8, 2), (16, 16, 4, 2)],
    },
    # dQ: a resident block of BLOCK_M queries and output gradients, key steps of BLOCK_N.
    "dq": {
        "mma16-64": [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3),
                     (64, 64, 8, 3)],
        "mma16-128": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 64, 8, 3),
                      (128, 64, 8, 2), (128, 32, 8, 4), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2)],
        "tf32-64": [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 8, 3)],
        "tf32-128": [(128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 8, 3), (64, 32, 8, 3)],
        "fma-64": [(32, 16, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
        "fma-128": [(32, 16, 8, 2), (16, 16, 4, 2)],
    },
}
# Rows of D elements held in shared memory: (resident, streamed per pipeline stage) for BLOCK_M, BLOCK_N.
_SHARED_ROWS = {
    "fwd": lambda m, n: (m, 2 * n),  # q; k, v
    "dkdv": lambda m, n: (2 * n, 2 * m),  # k, v; q, dO
    "dq": lambda m, n: (2 * m, 2 * n),  # q, dO; k, v
}
_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one program may use on an H100 (sm_90)
_INTERPRET_CONFIG = (64, 32, 4, 1)  # unequal block sides, so both ragged masks are exercised


def _tile_class(block_d: int, precision: str, itemsize: int) -> str:
    """The config table for these operands: ``"{mma16|tf32|fma}-{64|128}"``."""
    unit = "mma16" if itemsize == 2 else ("tf32" if precision == "tf32" else "fma")
    return f"{unit}-{64 if block_d <= 64 else 128}"


def _configs(kernel: str) -> list[triton.Config]:
    """Every config of ``kernel`` (the union of its tables); the one interpreter config under TRITON_INTERPRET."""
    rows = [_INTERPRET_CONFIG] if _INTERPRET else sorted({c for table in _CONFIGS[kernel].values() for c in table})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


def _pruner(kernel: str):
    """Keep the configs of the call's tile class whose blocks fit the sequence and whose tiles fit shared memory."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
        if _INTERPRET:
            return configs
        n_seq, block_d, itemsize = named_args["N"], kwargs["BLOCK_D"], named_args["Q"].element_size()
        listed = _CONFIGS[kernel][_tile_class(block_d, kwargs["PRECISION"], itemsize)]
        longest = max(64, triton.next_power_of_2(n_seq))
        kept = []
        for c in configs:
            m, n, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
            resident, streamed = _SHARED_ROWS[kernel](m, n)
            shared = (resident + s * streamed) * block_d * itemsize + 8 * s * max(m, n)
            if (m, n, w, s) in listed and max(m, n) <= longest and shared <= _SHARED_LIMIT:
                kept.append(c)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]
    return prune


def _even_n(args: dict) -> bool:
    return args["N"] % args["BLOCK_M"] == 0 and args["N"] % args["BLOCK_N"] == 0


def _tuned(kernel: str, fn: triton.JITFunction) -> triton.runtime.Autotuner:
    """``fn`` autotuned per (N, D, PRECISION, dtypes) over its tables, with EVEN_N derived from each config."""
    return triton.autotune(_configs(kernel), key=["N", "HEAD_DIM", "PRECISION"],
                           prune_configs_by={"early_config_prune": _pruner(kernel)})(
        triton.heuristics({"EVEN_N": _even_n})(fn))


_attention_fwd = _tuned("fwd", _attention_fwd_kernel)
_attention_bwd_dkdv = _tuned("dkdv", _attention_bwd_dkdv_kernel)
_attention_bwd_dq = _tuned("dq", _attention_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    """The head dimension padded to the next power of two >= 16 (the smallest tensor-core tile side)."""
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for float32 only when torch's float32 matmul precision allows it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _rows_grid(b: int, h: int, n: int, key: str):
    return lambda meta: (triton.cdiv(n, meta[key]), h, b)


def _unit_last(x: Tensor) -> Tensor:
    """``x`` itself when its D axis has unit stride (the kernels take any B, H, N strides), else a contiguous copy.

    A fused qkv projection's ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` views pass without a copy.
    """
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _empty_layout(x: Tensor) -> Tensor:
    """An empty ``(B, H, N, D)`` tensor like ``x``: token-major (a ``(B, N, H, D)`` buffer seen through
    ``transpose(1, 2)``) when ``x``'s heads are inner to its tokens, as in a fused qkv projection, so that
    ``out.transpose(1, 2).reshape(B, N, H * D)`` is a view; else contiguous. The fakes use the same rule."""
    b, h, n, d = x.shape
    if x.stride(1) < x.stride(2):
        return x.new_empty((b, n, h, d)).transpose(1, 2)
    return x.new_empty((b, h, n, d))


def _bhn_strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _fwd_launch(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Run the forward kernel; returns ``o: (B, H, N, D)`` (q's layout rule) and ``lse: (B, H, N)`` float32, log2."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, n, d = q.shape
    o = _empty_layout(q)
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    _attention_fwd[_rows_grid(b, h, n, "BLOCK_M")](
        q, k, v, o, lse, n, h, *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(o),
        scale * _LOG2E, HEAD_DIM=d, BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype))
    return o, lse


def _bwd_launch(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Run the dQ kernel (which also writes delta) and then the dK/dV kernel; returns ``dq, dk, dv``.

    Two launches, no copies of strided inputs, no separate delta pass. ``dq`` follows q's layout rule,
    ``dk`` and ``dv`` k's.
    """
    do, q, k, v, o = (_unit_last(t) for t in (do, q, k, v, o))
    b, h, n, d = q.shape
    dq, dk, dv = _empty_layout(q), _empty_layout(k), _empty_layout(k)
    if q.numel() == 0:
        return dq, dk, dv
    delta = q.new_empty((b, h, n), dtype=torch.float32)
    qkv_strides = (*_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v))
    common = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype))
    _attention_bwd_dq[_rows_grid(b, h, n, "BLOCK_M")](
        q, k, v, o, do, lse, delta, dq, n, h, *qkv_strides, *_bhn_strides(o), *_bhn_strides(do),
        *_bhn_strides(dq), scale * _LOG2E, scale, **common)
    _attention_bwd_dkdv[_rows_grid(b, h, n, "BLOCK_N")](
        q, k, v, do, lse, delta, dk, dv, n, h, *qkv_strides, *_bhn_strides(do), *_bhn_strides(dk),
        scale * _LOG2E, scale, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd: a registered custom op, so torch.compile keeps the kernels in its graph as one node
# each way, and the same launchers behind a plain autograd.Function for eager calls, where the
# custom op's Python dispatch would cost several times the host time of a launch (attention at
# N = 64 is launch-bound).
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("kdiff::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _fwd_launch(q, k, v, scale)


@_attention_fwd_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _empty_layout(_unit_last(q)), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("kdiff::attention_bwd", mutates_args=())
def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_launch(do, q, k, v, o, lse, scale)


@_attention_bwd_op.register_fake
def _(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k = _unit_last(q), _unit_last(k)
    return _empty_layout(q), _empty_layout(k), _empty_layout(k)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do: Tensor, _dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, None]:
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """Eager autograd for the same launchers (once differentiable: no double backward)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        o, lse = _fwd_launch(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, o, lse = ctx.saved_tensors
        return (*_bwd_launch(do, q, k, v, o, lse, ctx.scale), None)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> float:
    """Validate ``q, k, v`` and ``scale``; return the scale as a float."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q: expected a 4-D tensor (B, H, N, D), got shape {tuple(q.shape)}")
    if q.dtype not in _KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} (the shape of q), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
    n, d = q.shape[-2], q.shape[-1]
    if n < 1:
        raise ValueError(f"q: expected a sequence length N >= 1, got shape {tuple(q.shape)}")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dimension 1 <= D <= {_MAX_HEAD_DIM}, got D={d}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite float > 0, got {scale}")
    return float(scale)


SDPA_BELOW_DEFAULT = 1024  # sequences shorter than this go to SDPA on CUDA (see sdpa_below)


def sdpa_below() -> int:
    """The sequence length below which CUDA calls go to ``F.scaled_dot_product_attention`` under ``auto``.

    ``KDIFF_ATTENTION_SDPA_BELOW`` (an int >= 0; 0 sends every length to the kernel), default 1024. Measured
    on an H100 (bf16, fwd+bwd, torch 2.11, Triton 3.6): the kernel reached 0.43x of cuDNN SDPA at N = 256
    (D 64, B 64, H 8) and 1.00x at N = 1024 (D 64), so short sequences, where launch and host overhead
    dominate, take torch's own fastest backend.
    """
    raw = os.environ.get("KDIFF_ATTENTION_SDPA_BELOW", "").strip()
    if not raw:
        return SDPA_BELOW_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"KDIFF_ATTENTION_SDPA_BELOW: expected an int >= 0, got {raw!r}")
    return value


def _use_triton(q: Tensor) -> bool:
    """The dispatch rule (kernels/_dispatch.py); float64 always takes the torch path; under ``auto``, CUDA
    sequences shorter than :func:`sdpa_below` take SDPA. ``KDIFF_KERNELS=triton`` forces the kernel."""
    if q.dtype not in _KERNEL_DTYPES or backend(q, has_numba=False) != "triton":
        return False
    if not (q.is_cuda or _INTERPRET):
        raise RuntimeError(f"KDIFF_KERNELS=triton: the Triton kernel needs a CUDA tensor or TRITON_INTERPRET=1 "
                           f"set before kdiff.kernels is imported, got a tensor on {q.device}")
    if max(q.shape[0], q.shape[1]) > _MAX_GRID:
        raise ValueError(f"q: expected B <= {_MAX_GRID} and H <= {_MAX_GRID} (grid limits of the Triton kernel), "
                         f"got shape {tuple(q.shape)}")
    forced = os.environ.get("KDIFF_KERNELS", "auto").strip().lower() == "triton"
    return forced or not q.is_cuda or q.shape[-2] >= sdpa_below()


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v``, non-causal, scale ``1/sqrt(D)`` by default; ``q, k, v: (B, H, N, D)``.

    FlashAttention-2 (Dao 2023, Alg. 1-2) in Triton for CUDA tensors (and CPU tensors under
    ``TRITON_INTERPRET=1``) in fp16, bf16 or float32, D <= 128, any N; differentiable in q, k, v
    and deterministic. On CUDA, sequences shorter than :func:`sdpa_below` (default 1024, environment
    ``KDIFF_ATTENTION_SDPA_BELOW``) go to ``F.scaled_dot_product_attention``, whose fastest backend
    (cuDNN on an H100) beat the kernel there; ``KDIFF_KERNELS=triton`` forces the kernel at every N.
    Other tensors (CPU, float64, ``KDIFF_KERNELS=torch``) go to SDPA too. q, k, v may be strided views
    (a fused qkv projection's) as long as D has unit stride; the output of token-major inputs is
    token-major, so ``out.transpose(1, 2).reshape(B, N, H * D)`` is free. Under ``torch.compile`` each
    path is one graph node (the ``kdiff::attention_fwd`` custom op, or SDPA). Returns ``(B, H, N, D)``
    in the inputs' dtype.
    """
    scale = _check_inputs(q, k, v, scale)
    if not _use_triton(q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)  # saved for backward without another copy
    if torch.compiler.is_compiling():
        return _attention_fwd_op(q, k, v, scale)[0]
    return _Attention.apply(q, k, v, scale)
