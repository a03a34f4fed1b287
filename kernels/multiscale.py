"""Simple diffusion's multiscale loss, fused: one pass over memory for the loss and its gradient.

Hoogeboom, Heek & Salimans, "simple diffusion" (ICML 2023), section "Multiscale training loss"::

    L_b = sum_l w_l / (h_l w_l) * || D_l[pred_b] - D_l[target_b] ||^2,     w_l = 1 / s_l by default

where ``D_l`` is average pooling by ``k_l = 2^l`` to ``(h_l, w_l) = (H / k_l, W / k_l)``, the norm sums
channels and pooled pixels, and ``s_l = min(h_l, w_l)`` (``= d / k_l`` for square ``d x d`` images, so the
default term is ``(1/s)(1/s^2) ||.||^2``). Levels: ``k = 1, 2, 4, ...`` while both sides divide by ``k``
and ``s_l >= base``, so ``d`` not a power-of-two multiple of ``base`` keeps the levels that exist
(``d = 96, base = 32``: 96 and 48) and ``d < base`` keeps the full-resolution term only. Explicit
``weights`` (finest level first) fix the number of levels to ``len(weights)`` instead (``base`` is then
unused) and require ``H`` and ``W`` to divide by ``2^(len(weights) - 1)``.

With ``S_l`` the ``k_l x k_l`` block *sums* of ``diff = pred - target`` and ``gamma_l = w_l / (H W 4^l)``:
``L_b = sum_l gamma_l ||S_l||^2`` and ``dL_b / dpred = 2 sum_l gamma_l S_l[y // k_l, x // k_l]``.
The kernels compute both in one read of ``pred`` and ``target``; backward scales the stored gradient
by the upstream gradient, always, in one elementwise pass fused with the cast to ``pred``'s dtype (no
host synchronization and no data-dependent branch, so forward and backward can be captured in a CUDA
graph once warmed up).

Loss: ``[B]`` in float32 (float64 for float64 inputs). Stored gradient: the input dtype, except float16,
whose gradient is kept in float32: ``2 gamma_l`` is ~1e-7 at 256^2, below float16's smallest
subnormal, so a loss-scaled backward would otherwise read zeros. The stored gradient, and so the
gradients returned, have ``pred``'s memory layout (``torch.empty_like(pred)``: channels_last stays
channels_last, a non-dense view gives a contiguous gradient) on every backend and in the fake.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import types
from numba.extending import overload
from torch import Tensor
from torch.autograd.function import FunctionCtx

from kdiff._util import check_float, check_int, check_same_shape

from ._dispatch import backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run numba or the reference
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Levels, weights and checks
# --------------------------------------------------------------------------------------------------

def multiscale_levels(height: int, width: int, *, base: int = 32) -> int:
    """Number of levels ``k = 1, 2, 4, ...`` with ``H % k == W % k == 0`` and ``min(H, W) / k >= base`` (>= 1)."""
    levels, k = 1, 2
    while height % k == 0 and width % k == 0 and min(height, width) // k >= base:
        levels, k = levels + 1, 2 * k
    return levels


def multiscale_weights(height: int, width: int, *, base: int = 32,
                       weights: Sequence[float] | None = None) -> list[float]:
    """Per-level weights, finest first: ``w_l = 1 / min(H / 2^l, W / 2^l)`` unless ``weights`` is given."""
    check_int(base, "base", low=1)
    if base & (base - 1):
        raise ValueError(f"base: expected a power of two, got {base}")
    if weights is None:
        return [2.0**l / min(height, width) for l in range(multiscale_levels(height, width, base=base))]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights: expected a sequence of floats or None, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError("weights: expected at least one level weight, got an empty sequence")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights: expected real numbers, got {type(w).__name__}")
        if not math.isfinite(w):
            raise ValueError(f"weights: expected finite floats, got {w!r}")
        out.append(float(w))
    k = 2 ** (len(out) - 1)
    if height % k or width % k:
        raise ValueError(f"weights: {len(out)} levels need H and W divisible by {k}, got spatial size "
                         f"({height}, {width}), which does not divide")
    return out


def level_gammas(height: int, width: int, weights: Sequence[float]) -> list[float]:
    """``gamma_l = w_l / (H W 4^l)``: the factor of ``||S_l||^2`` (block sums ``S_l``) in the loss."""
    return [w / (height * width * 4.0**l) for l, w in enumerate(weights)]


@functools.lru_cache(maxsize=256, typed=True)
def _default_gammas(height: int, width: int, base: int) -> tuple[float, ...]:
    """``level_gammas`` of the default weights, cached: the per-call host work of the common case."""
    return tuple(level_gammas(height, width, multiscale_weights(height, width, base=base)))


def _check_inputs(pred: Tensor, target: Tensor) -> None:
    check_float(pred, "pred")
    check_float(target, "target")
    if pred.dtype not in _DTYPES:
        raise TypeError(f"pred: expected dtype float16, bfloat16, float32 or float64, got {pred.dtype}")
    if pred.ndim != 4:
        raise ValueError(f"pred: expected a 4-D tensor (B, C, H, W), got shape {tuple(pred.shape)}")
    check_same_shape(pred, target, "pred", "target")
    if target.dtype != pred.dtype:
        raise TypeError(f"target: expected dtype {pred.dtype} (the dtype of pred), got {target.dtype}")
    if target.device != pred.device:
        raise ValueError(f"target: expected device {pred.device} (the device of pred), got {target.device}")
    if pred.numel() == 0:
        raise ValueError(f"pred: expected every dimension >= 1, got shape {tuple(pred.shape)}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _empty_grad(pred: Tensor) -> Tensor:
    """The stored gradient's buffer: ``_grad_dtype``, in ``pred``'s memory layout (``torch.empty_like``)."""
    return torch.empty_like(pred, dtype=_grad_dtype(pred.dtype))


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

def multiscale_mse_ref(pred: Tensor, target: Tensor, *, base: int = 32,
                       weights: Sequence[float] | None = None) -> Tensor:
    """``sum_l w_l / (h_l w_l) ||avgpool_{2^l}(pred - target)||^2`` (simple diffusion); ``(B, C, H, W) -> [B]``.

    Plain torch, differentiable, float32 math for float16/bfloat16/float32 inputs and float64 for float64.
    """
    _check_inputs(pred, target)
    height, width = pred.shape[-2:]
    acc = _acc_dtype(pred.dtype)
    diff = pred.to(acc) - target.to(acc)
    total = diff.new_zeros(pred.shape[0])
    for l, w in enumerate(multiscale_weights(height, width, base=base, weights=weights)):
        pooled = F.avg_pool2d(diff, 2**l) if l else diff
        total = total + w / (pooled.shape[-2] * pooled.shape[-1]) * pooled.pow(2).sum(dim=(1, 2, 3))
    return total


def _multiscale_mse_torch(pred: Tensor, target: Tensor, gammas: Sequence[float],
                          write_grad: bool) -> tuple[Tensor, Tensor]:
    """Loss and ``2 sum_l gamma_l S_l[y // 2^l, x // 2^l]`` with torch ops (the fallback backend)."""
    acc = _acc_dtype(pred.dtype)
    diff = pred.to(acc) - target.to(acc)
    loss = diff.new_zeros(pred.shape[0])
    grad = torch.zeros_like(diff) if write_grad else diff.new_empty(0)
    for l, gamma in enumerate(gammas):
        k = 2**l
        sums = F.avg_pool2d(diff, k, divisor_override=1) if l else diff
        loss = loss + gamma * sums.pow(2).sum(dim=(1, 2, 3))
        if write_grad:
            grad = grad + 2 * gamma * sums.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    return loss, (_empty_grad(pred).copy_(grad) if write_grad else grad.to(_grad_dtype(pred.dtype)))


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_REGS_ROWS = 128  # K * (elements per 16-byte vector) above which a unit's K rows are split over warps

# Work decomposition. A *unit* is K rows x V columns of one (b, c) plane, K = 2^(LEVELS - 1) the side of the
# coarsest cell and V a power-of-two multiple of K: every cell of every level lies inside one unit, so a unit
# is computed from its own bytes alone, each read once. Units are numbered plane-major, then stripe of K rows,
# then column chunk, so consecutive units are adjacent in memory and the units of sample b are contiguous
# (their loss partials sum to L_b). A program takes A consecutive units as one (K, A, V) tile. Triton gives
# the 16-byte vector of a load's contiguous axis to one thread, the 32 lanes of a warp to V / vec vectors
# and then to units, and the warps to units, so the K rows of a vector stay in one thread: the vertical
# block sums are register adds and the horizontal ones stay inside a thread or a warp (shuffles), with no
# shared memory and no barrier (checked on sm_90 PTX).

if triton is not None:
    @triton.jit
    def _pool2(s, R: tl.constexpr, A: tl.constexpr, V: tl.constexpr):
        """2 x 2 block sums of each unit: ``(R, A, V) -> (R / 2, A, V / 2)``."""
        return tl.sum(tl.sum(tl.reshape(s, [R // 2, 2, A, V // 2, 2]), axis=4), axis=1)

    @triton.jit
    def _upsample(s, R: tl.constexpr, A: tl.constexpr, V: tl.constexpr, F: tl.constexpr):
        """``out[i, a, j] = s[i // F, a, j // F]``: ``(R / F, A, V / F) -> (R, A, V)``."""
        cells = tl.broadcast_to(tl.reshape(s, [R // F, 1, A, V // F, 1]), [R // F, F, A, V // F, F])
        return tl.reshape(cells, [R, A, V])

    @triton.jit
    def _multiscale_mse_kernel(
        pred_ptr,      # *T  (B, C, H, W) with strides (s_pb, s_pc, s_ph, s_pw); T = fp16 | bf16 | fp32 | fp64
        target_ptr,    # *T  (B, C, H, W) with strides (s_tb, s_tc, s_th, s_tw)
        grad_ptr,      # *G  (B, C, H, W) with strides (s_gb, s_gc, s_gh, s_gw): dL_b / dpred, written iff WRITE_GRAD
        partial_ptr,   # *ACC (n_units,): sum_l gamma_l ||S_l||^2 over one unit
        gamma_ptr,     # *ACC (LEVELS,): gamma_l = w_l / (H W 4^l)
        n_units,       # B * C * (H / K) * n_chunks
        C, H, W,       # channels, height, width
        n_chunks,      # column chunks of V per stripe: cdiv(W, V)
        s_pb, s_pc, s_ph, s_pw,
        s_tb, s_tc, s_th, s_tw,
        s_gb, s_gc, s_gh, s_gw,
        LEVELS: tl.constexpr,      # number of levels
        K: tl.constexpr,           # 2^(LEVELS - 1): rows per unit, side of the coarsest cell
        V: tl.constexpr,           # columns per unit, a power-of-two multiple of K
        A: tl.constexpr,           # units per program
        WRITE_GRAD: tl.constexpr,  # store dL / dpred
        ACC: tl.constexpr,         # tl.float32, or tl.float64 for float64 inputs
    ):
        units = tl.program_id(0) * A + tl.arange(0, A)
        chunk = units % n_chunks
        stripe_plane = units // n_chunks
        n_stripes = H // K
        row0 = ((stripe_plane % n_stripes) * K).to(tl.int64)
        plane = stripe_plane // n_stripes
        b = (plane // C).to(tl.int64)
        c = (plane % C).to(tl.int64)
        rows = tl.arange(0, K)[:, None, None].to(tl.int64)
        cols = chunk[:, None] * V + tl.arange(0, V)[None, :]                     # (A, V)
        # masked lanes (past the last unit, or past W in the last chunk; W divides by K) are whole cells of zeros
        mask = ((units[:, None] < n_units) & (cols < W))[None, :, :]             # (1, A, V)
        p_offs = (b * s_pb + c * s_pc + row0 * s_ph)[None, :, None] + rows * s_ph + cols[None, :, :] * s_pw
        t_offs = (b * s_tb + c * s_tc + row0 * s_th)[None, :, None] + rows * s_th + cols[None, :, :] * s_tw
        diff = (tl.load(pred_ptr + p_offs, mask=mask, other=0.0).to(ACC)
                - tl.load(target_ptr + t_offs, mask=mask, other=0.0).to(ACC))   # (K, A, V)

        gamma = tl.load(gamma_ptr)
        loss = gamma * tl.sum(tl.sum(diff * diff, axis=0), axis=1)               # (A,): rows in-thread first
        grad = (2.0 * gamma) * diff
        sums = diff
        for l in tl.static_range(1, LEVELS):
            sums = _pool2(sums, K >> (l - 1), A, V >> (l - 1))                     # S_l: (K >> l, A, V >> l)
            gamma = tl.load(gamma_ptr + l)
            loss += gamma * tl.sum(tl.sum(sums * sums, axis=0), axis=1)
            if WRITE_GRAD:
                grad += (2.0 * gamma) * _upsample(sums, K, A, V, 1 << l)

        tl.store(partial_ptr + units, loss, mask=units < n_units)
        if WRITE_GRAD:
            g_offs = (b * s_gb + c * s_gc + row0 * s_gh)[None, :, None] + rows * s_gh + cols[None, :, :] * s_gw
            tl.store(grad_ptr + g_offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_shape(width: int, levels: int, itemsize: int, num_warps: int) -> tuple[int, int]:
    """``(V, A)``: columns per unit and units per program for one program of ``num_warps`` warps.

    ``V``: the columns one warp loads in 16-byte vectors (``32 * 16 / itemsize``), cut to the next power of two
    >= W for narrow images, never below K. ``A``: enough units for every lane and warp to hold a vector of its
    own; 1 when K rows of a vector would not fit one thread's registers (then the rows spread over warps).
    """
    k = 2 ** (levels - 1)
    vec = 16 // itemsize
    v = max(k, min(triton.next_power_of_2(width), 32 * vec))
    if k * vec > _MAX_REGS_ROWS:
        return v, 1
    return v, max(1, 32 * vec * num_warps // v)


def _num_warps(levels: int, itemsize: int) -> int:
    """Warps per program: one, unless a unit's K rows of a 16-byte vector overflow a thread's registers (then 4,
    and Triton spreads the rows over the warps).

    One warp because of how Triton picks the layout of the (K, A, V) tile: lanes go to V, then warps to the next
    axis in its order, and the K and A axes tie (neither has unit stride). Triton 3.9 breaks the tie towards A
    (warps own units: vertical sums stay in registers), Triton 3.6 towards K, which splits each vector's rows over
    warps: offline sm_90 compiles of the 4-warp kernel at bf16 (32, 3, 256) gave 13 barriers, 192 shuffles and
    16 KiB of shared memory under Triton 3.6 against 1 barrier and 20 shuffles under 3.9. With one warp there is
    no warp axis to misplace: 0 barriers, no shared memory and the same 20 shuffles under both
    (``python -m benchmarks.compile_sm90 --op multiscale``). One-warp programs are not short of memory
    parallelism: each thread has K 16-byte loads per input in flight.
    """
    k = 2 ** (levels - 1)
    return 4 if k * (16 // itemsize) > _MAX_REGS_ROWS else 1


@functools.lru_cache(maxsize=64)
def _gamma_tensor(gammas: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The per-level factors on ``device``, copied once per configuration (no host sync per call)."""
    return torch.tensor(gammas, dtype=dtype, device=device)


def _multiscale_mse_triton(pred: Tensor, target: Tensor, gammas: Sequence[float],
                           write_grad: bool) -> tuple[Tensor, Tensor]:
    if triton is None:
        raise RuntimeError("multiscale_mse: the triton backend was selected but triton is not installed")
    if not pred.is_cuda and not _INTERPRET:
        raise ValueError(f"pred: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device "
                         f"{pred.device}")
    n_b, n_c, height, width = pred.shape
    levels = len(gammas)
    k = 2 ** (levels - 1)
    if k * 16 // pred.element_size() > 4 * _MAX_REGS_ROWS:  # 16-bit: cells of 128 x 128 and more; too many registers
        return _multiscale_mse_torch(pred, target, gammas, write_grad)
    num_warps = 1 if _INTERPRET else _num_warps(levels, pred.element_size())  # interpreter: one program per unit set
    v, a = _launch_shape(width, levels, pred.element_size(), num_warps)
    n_chunks = triton.cdiv(width, v)
    n_units = n_b * n_c * (height // k) * n_chunks
    acc = _acc_dtype(pred.dtype)
    partial = torch.empty(n_units, dtype=acc, device=pred.device)
    grad = _empty_grad(pred) if write_grad else pred.new_empty(0, dtype=_grad_dtype(pred.dtype))
    _multiscale_mse_kernel[(triton.cdiv(n_units, a),)](
        pred, target, grad, partial, _gamma_tensor(tuple(gammas), acc, pred.device),
        n_units, n_c, height, width, n_chunks, *pred.stride(), *target.stride(),
        *(grad.stride() if write_grad else (0, 0, 0, 0)),
        LEVELS=levels, K=k, V=v, A=a, WRITE_GRAD=write_grad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=num_warps,
    )
    return partial.view(n_b, -1).sum(dim=1), grad


# --------------------------------------------------------------------------------------------------
# numba (CPU)
# --------------------------------------------------------------------------------------------------
# numba has no float16 or bfloat16: bfloat16 arrays arrive as their uint16 bits, float16 as int16 bits.

def _diff_row(p: np.ndarray, t: np.ndarray, src: int, out: np.ndarray, dst: int, n: int,
              scratch: np.ndarray, scratch_bits: np.ndarray) -> None:
    """``out[dst + j] = float(p[src + j]) - float(t[src + j])`` for ``j < n`` (flat arrays).

    ``scratch``: at least ``2 n`` working-dtype elements; ``scratch_bits``: its uint32 view.
    """
    raise NotImplementedError


def _store_row(g: np.ndarray, g_bits: np.ndarray, src: int, out: np.ndarray, dst: int, n: int) -> None:
    """``out[dst + j] = g[src + j]`` rounded to the storage format of ``out`` (``g_bits``: g's uint32 view)."""
    raise NotImplementedError


@numba.njit(cache=True)
def _half_to_float(h: int) -> float:
    u = np.int32(h) & 0xFFFF
    e, m = (u >> 10) & 0x1F, u & 0x3FF
    if e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = math.ldexp(m + (1024 if e else 0), max(e, 1) - 25)
    return -v if u & 0x8000 else v


# numba wants an overload's parameters spelled exactly like its implementations': hence no annotations
# (numba types here; numpy arrays and integers in the implementations). Offsets into flat arrays rather
# than row slices: a slice is a new array whose reference count the loop would update on every row.
@overload(_diff_row, inline="always")
def _diff_row_impl(p, t, src, out, dst, n, scratch, scratch_bits) -> Callable | None:
    if isinstance(p.dtype, types.Float):
        def impl(p, t, src, out, dst, n, scratch, scratch_bits):
            s, d = np.uint64(src), np.uint64(dst)
            for j in range(np.uint64(n)):
                out[d + j] = p[s + j] - t[s + j]
        return impl
    if p.dtype == types.uint16:  # bfloat16: the high half of a float32
        def impl(p, t, src, out, dst, n, scratch, scratch_bits):
            s, d, m = np.uint64(src), np.uint64(dst), np.uint64(n)
            for j in range(m):
                scratch_bits[j] = np.uint32(p[s + j]) << np.uint32(16)
                scratch_bits[m + j] = np.uint32(t[s + j]) << np.uint32(16)
            for j in range(m):
                out[d + j] = scratch[j] - scratch[m + j]
        return impl
    if p.dtype == types.int16:  # float16 bits
        def impl(p, t, src, out, dst, n, scratch, scratch_bits):
            s, d = np.uint64(src), np.uint64(dst)
            for j in range(np.uint64(n)):
                out[d + j] = _half_to_float(p[s + j]) - _half_to_float(t[s + j])
        return impl
    return None


@overload(_store_row, inline="always")
def _store_row_impl(g, g_bits, src, out, dst, n) -> Callable | None:
    if isinstance(out.dtype, types.Float):
        def impl(g, g_bits, src, out, dst, n):
            s, d = np.uint64(src), np.uint64(dst)
            for j in range(np.uint64(n)):
                out[d + j] = g[s + j]
        return impl
    if out.dtype == types.uint16:  # bfloat16, round to nearest even; NaN stays a (quiet) NaN
        def impl(g, g_bits, src, out, dst, n):
            s, d = np.uint64(src), np.uint64(dst)
            for j in range(np.uint64(n)):
                u = g_bits[s + j]
                rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                quiet = (u >> np.uint32(16)) | np.uint32(0x40)
                is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                out[d + j] = np.uint16(quiet if is_nan else rounded)
        return impl
    return None


# The helpers index with unsigned offsets: numba then skips its negative-index wraparound, which would
# otherwise keep the loops from vectorizing.
_FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _sum_squares(x: np.ndarray, lo: int, hi: int) -> float:
    """``sum(x[lo:hi] ** 2)`` accumulated in float64."""
    sq = 0.0
    for q in range(np.uint64(lo), np.uint64(hi)):
        v = np.float64(x[q])
        sq += v * v
    return sq


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _pool_row(x: np.ndarray, src: int, n: int, pair: np.ndarray, dst: int) -> None:
    """``x[dst + j] = sum of the 2 x 2 block at column 2j`` of the rows ``x[src:src + n]``, ``x[src + n:src + 2n]``.

    Rows first (contiguous), then adjacent columns of the pair sums.
    """
    s, d, m, two = np.uint64(src), np.uint64(dst), np.uint64(n), np.uint64(2)
    for j in range(m):
        pair[j] = x[s + j] + x[s + m + j]
    for j in range(m // two):
        x[d + j] = pair[two * j] + pair[two * j + np.uint64(1)]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _add_upsampled(x: np.ndarray, a: float, src: int, n: int, up: np.ndarray, dst: int) -> None:
    """Rows ``x[dst:dst + 2n]`` and ``x[dst + 2n:dst + 4n]`` become ``a x + x[src + j // 2]``."""
    s, d, m, two = np.uint64(src), np.uint64(dst), np.uint64(n), np.uint64(2)
    for j in range(m):
        v = x[s + j]
        up[two * j] = v
        up[two * j + np.uint64(1)] = v
    for j in range(two * m):
        x[d + j] = a * x[d + j] + up[j]
    d += two * m
    for j in range(two * m):
        x[d + j] = a * x[d + j] + up[j]


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _multiscale_mse_numba(pred: np.ndarray, target: np.ndarray, gamma: np.ndarray, grad: np.ndarray,
                          write_grad: bool, partial: np.ndarray, start: int, stop: int) -> None:
    """Stripes ``start..stop`` of K rows (stripe u: plane u // (H / K), rows from K (u % (H / K))) in one pass.

    Per stripe: the block-sum pyramid S_l, ``partial[u] = sum_l gamma_l ||S_l||^2`` (squares summed in
    float64), and, iff ``write_grad``, ``grad = 2 sum_l gamma_l S_l[y // 2^l, x // 2^l]``. pred, target,
    grad: (B, C, H, W) C-contiguous; gamma: (L,) in the working dtype (float32, or float64 for float64
    inputs). Every inner loop runs over contiguous rows, so it vectorizes.
    """
    width = pred.shape[3]
    levels = gamma.shape[0]
    twice = gamma + gamma
    k = 1 << (levels - 1)
    size = 0
    for l in range(levels):
        size += (k >> l) * (width >> l)
    pyramid = np.empty(size, gamma.dtype)  # level l: (k >> l, width >> l) block sums, finest first
    pyramid_bits = pyramid.view(np.uint32)
    block = k * width  # a stripe's elements, contiguous: stripe u starts at u * block
    scratch = np.empty(2 * block, gamma.dtype)
    scratch_bits = scratch.view(np.uint32)
    p_flat, t_flat, g_flat = pred.reshape(-1), target.reshape(-1), grad.reshape(-1)
    for u in range(start, stop):
        base = u * block
        _diff_row(p_flat, t_flat, base, pyramid, 0, block, scratch, scratch_bits)
        total = gamma[0] * _sum_squares(pyramid, 0, block)
        off, rows, cols = 0, k, width
        for l in range(1, levels):
            fine, fine_cols = off, cols
            off, rows, cols = off + rows * cols, rows // 2, cols // 2
            for i in range(rows):
                _pool_row(pyramid, fine + 2 * i * fine_cols, fine_cols, scratch, off + i * cols)
            total += gamma[l] * _sum_squares(pyramid, off, off + rows * cols)
        partial[u] = total
        if not write_grad:
            continue
        # top-down, in place over the pyramid: G_l = 2 gamma_l S_l + G_{l+1}[i // 2, j // 2], each coarse
        # row upsampled once and added to its two fine rows
        for q in range(off, off + rows * cols):
            pyramid[q] *= twice[levels - 1]
        for l in range(levels - 2, -1, -1):
            coarse, coarse_rows, coarse_cols = off, rows, cols
            rows, cols = rows * 2, cols * 2
            off -= rows * cols
            for i in range(coarse_rows):
                _add_upsampled(pyramid, twice[l], coarse + i * coarse_cols, coarse_cols, scratch,
                               off + 2 * i * cols)
        _store_row(pyramid, pyramid_bits, 0, g_flat, base, block)


@functools.lru_cache(maxsize=1)
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdiff-numba")


def _numpy_bits(x: Tensor) -> np.ndarray:
    """A numpy view numba can type: float32/64 as is, bfloat16 as uint16 bits, float16 as int16 bits."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.uint16).numpy()
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy()
    return x.numpy()


def _multiscale_mse_cpu(pred: Tensor, target: Tensor, gammas: Sequence[float],
                        write_grad: bool) -> tuple[Tensor, Tensor]:
    """The numba kernel over ``torch.get_num_threads()`` threads (it releases the GIL); fixed-order sums."""
    if pred.device.type != "cpu":
        raise ValueError(f"pred: the numba backend needs CPU tensors, got device {pred.device}")
    n_b, n_c, height, _ = pred.shape
    acc = _acc_dtype(pred.dtype)
    out = _empty_grad(pred) if write_grad else None
    pred, target = pred.detach().contiguous(), target.detach().contiguous()
    # the kernel writes C-contiguous rows: straight into ``out`` when it is contiguous, else via a copy
    grad = out if out is not None and out.is_contiguous() else torch.empty(
        pred.shape if write_grad else (1, 1, 1, 1), dtype=_grad_dtype(pred.dtype))
    n_stripes = n_b * n_c * (height // 2 ** (len(gammas) - 1))
    partial = torch.empty(n_stripes, dtype=torch.float64)
    gamma = np.asarray(gammas, dtype=np.float64 if acc == torch.float64 else np.float32)
    args = (_numpy_bits(pred), _numpy_bits(target), gamma, _numpy_bits(grad), write_grad, partial.numpy())
    workers = max(1, min(torch.get_num_threads(), n_stripes))
    bounds = [n_stripes * i // workers for i in range(workers + 1)]
    if workers == 1:
        _multiscale_mse_numba(*args, 0, n_stripes)
    else:
        pool = _thread_pool(workers)
        for job in [pool.submit(_multiscale_mse_numba, *args, lo, hi) for lo, hi in zip(bounds, bounds[1:])]:
            job.result()
    if out is None:
        return partial.view(n_b, -1).sum(dim=1).to(acc), grad.new_empty(0)
    return partial.view(n_b, -1).sum(dim=1).to(acc), grad if grad is out else out.copy_(grad)


# --------------------------------------------------------------------------------------------------
# Custom op with autograd
# --------------------------------------------------------------------------------------------------

def _multiscale_mse_impl(pred: Tensor, target: Tensor, gammas: Sequence[float],
                         write_grad: bool) -> tuple[Tensor, Tensor]:
    """``(L [B], dL/dpred (B, C, H, W) in pred's layout, or empty)`` on the backend the dispatch rule picks."""
    choice = backend(pred, has_numba=True)
    if choice == "triton":
        return _multiscale_mse_triton(pred, target, gammas, write_grad)
    if choice == "numba":
        return _multiscale_mse_cpu(pred, target, gammas, write_grad)
    return _multiscale_mse_torch(pred, target, gammas, write_grad)


@torch.library.custom_op("kdiff::multiscale_mse", mutates_args=())
def _multiscale_mse_op(pred: Tensor, target: Tensor, gammas: list[float], write_grad: bool) -> tuple[Tensor, Tensor]:
    """``(L [B], dL/dpred (B, C, H, W) in pred's layout, or empty)`` on the backend the dispatch rule picks."""
    return _multiscale_mse_impl(pred, target, gammas, write_grad)


@_multiscale_mse_op.register_fake
def _(pred: Tensor, target: Tensor, gammas: list[float], write_grad: bool) -> tuple[Tensor, Tensor]:
    loss = pred.new_empty(pred.shape[0], dtype=_acc_dtype(pred.dtype))
    grad = _empty_grad(pred) if write_grad else pred.new_empty(0, dtype=_grad_dtype(pred.dtype))
    return loss, grad


def _scaled(grad: Tensor, grad_loss: Tensor, dtype: torch.dtype, *, negate: bool) -> Tensor:
    """``(+-grad_loss[b]) * grad`` in float32 (float64) cast to ``dtype``, in ``grad``'s layout.

    On CUDA one elementwise kernel (``torch.mul(out=)`` casts inside the kernel). On CPU, where TensorIterator
    would cast through full-size temporaries and a slow mixed-dtype loop, the same math as an explicit upcast,
    in-place multiply and downcast.
    """
    scale = grad_loss.reshape(-1, 1, 1, 1)
    scale = scale.neg() if negate else scale
    if grad.device.type == "cpu" and (grad.dtype != dtype or dtype in (torch.bfloat16, torch.float16)):
        return grad.to(scale.dtype).mul_(scale).to(dtype)
    return torch.mul(grad, scale, out=torch.empty_like(grad, dtype=dtype))


def _input_grads(grad: Tensor, grad_loss: Tensor, dtype: torch.dtype,
                 needs: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """``dL/dpred`` and ``dL/dtarget`` (where needed) from the stored gradient; no host sync, no branch on data."""
    if grad.numel() == 0:
        raise RuntimeError("multiscale_mse: backward through a call made without gradients enabled")
    return (_scaled(grad, grad_loss, dtype, negate=False) if needs[0] else None,
            _scaled(grad, grad_loss, dtype, negate=True) if needs[1] else None)


def _setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    pred = inputs[0]
    ctx.pred_dtype = pred.dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros for the gradient output's (absent) upstream gradient


def _backward(ctx: FunctionCtx, grad_loss: Tensor | None,
              _grad_grad: Tensor | None) -> tuple[Tensor | None, Tensor | None, None, None]:
    if grad_loss is None:
        return None, None, None, None
    (grad,) = ctx.saved_tensors
    return (*_input_grads(grad, grad_loss, ctx.pred_dtype, ctx.needs_input_grad[:2]), None, None)


_multiscale_mse_op.register_autograd(_backward, setup_context=_setup_context)


class _MultiscaleMSE(torch.autograd.Function):
    """Eager autograd over the same launchers: the custom op's Python dispatch costs more host time than
    the kernel takes on a GPU, so eager calls skip it (torch.compile traces the custom op instead)."""

    @staticmethod
    def forward(ctx: FunctionCtx, pred: Tensor, target: Tensor, gammas: Sequence[float], write_grad: bool) -> Tensor:
        loss, grad = _multiscale_mse_impl(pred.detach(), target.detach(), gammas, write_grad)
        ctx.pred_dtype = pred.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        return (*_input_grads(grad, grad_loss, ctx.pred_dtype, ctx.needs_input_grad[:2]), None, None)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------

def multiscale_mse(pred: Tensor, target: Tensor, *, base: int = 32,
                   weights: Sequence[float] | None = None) -> Tensor:
    """``sum_l w_l / (h_l w_l) ||avgpool_{2^l}(pred - target)||^2`` (simple diffusion), fused; ``[B]``.

    Args:
        pred, target: ``(B, C, H, W)``, same dtype (float16, bfloat16, float32, float64), any strides.
        base: the coarsest resolution kept (a power of two); levels are listed in the module docstring.
        weights: optional per-level weights, finest first; replaces ``w_l = 1 / s_l`` and ``base``.

    Returns:
        ``[B]`` float32 (float64 for float64 inputs). Differentiable in ``pred`` and ``target``.

    References:
        Hoogeboom, Heek & Salimans, "simple diffusion: End-to-end diffusion for high resolution
        images", ICML 2023, section "Multiscale training loss".
    """
    _check_inputs(pred, target)
    height, width = pred.shape[-2:]
    if weights is None and not torch.compiler.is_compiling():
        gammas = list(_default_gammas(height, width, base))
    else:
        gammas = level_gammas(height, width, multiscale_weights(height, width, base=base, weights=weights))
    write_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    if torch.compiler.is_compiling():
        return _multiscale_mse_op(pred, target, gammas, write_grad)[0]
    return _MultiscaleMSE.apply(pred, target, gammas, write_grad)
