"""kdiff.kernels.attention: the Triton flash-attention kernel against a float64 softmax(q k^T) v.

On a machine without a GPU the Triton kernels run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) at tiny float32 shapes; the ``gpu`` grid covers long sequences, D up to 128 and
fp16/bf16/fp32. The accuracy rule for the output and each gradient is
``err(kernel, ref64) <= 2 * err(torch in the same dtype, ref64) + atol`` with ``err`` the max abs error.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kdiff.kernels import attention, attention_ref

attention_module = importlib.import_module("kdiff.kernels.attention")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
triton_on_cpu = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 to run Triton on CPU tensors")
# Absolute slack of the accuracy rule: a few units in the last place at the unit scale of the values.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _qkv_do(shape: tuple[int, int, int, int], *, seed: int, device: str = "cpu",
            gain: float = 1.0) -> tuple[torch.Tensor, ...]:
    """q, k, v and an upstream gradient dO, standard normal in float64 (q, k, v times ``gain``)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    return tuple(t.to(device) for t in (gain * q, gain * k, gain * v, do))


def _forward_backward(fn, q, k, v, do) -> tuple[torch.Tensor, ...]:
    """``(o, dq, dk, dv)`` of ``fn(q, k, v)`` for the upstream gradient ``do``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _assert_accurate(q64, k64, v64, do64, dtype: torch.dtype, *, scale: float | None = None) -> None:
    """The accuracy rule for o, dq, dk, dv of the kernel in ``dtype``."""
    q, k, v, do = (t.to(dtype) for t in (q64, k64, v64, do64))
    kernel = _forward_backward(lambda a, b, c: attention(a, b, c, scale=scale), q, k, v, do)
    torch_same = _forward_backward(lambda a, b, c: attention_ref(a, b, c, scale=scale), q, k, v, do)
    exact = _forward_backward(lambda a, b, c: attention_ref(a, b, c, scale=scale),
                              q.double(), k.double(), v.double(), do.double())
    for name, got, same, ref in zip(("o", "dq", "dk", "dv"), kernel, torch_same, exact):
        assert got.dtype == dtype and got.shape == ref.shape
        err = (got.double() - ref).abs().max().item()
        err_torch = (same.double() - ref).abs().max().item()
        assert err <= 2 * err_torch + ATOL[dtype], f"{name}: kernel error {err:.3g}, torch {dtype} {err_torch:.3g}"


# ----------------------------------------------------------------------------------------------
# The reference itself, against scipy's softmax.
# ----------------------------------------------------------------------------------------------


def test_reference_matches_scipy_softmax():
    q, k, v, _ = _qkv_do((2, 3, 9, 5), seed=0)
    scale = 0.7
    p = scipy.special.softmax(np.einsum("bhnd,bhmd->bhnm", q.numpy(), k.numpy()) * scale, axis=-1)
    expected = np.einsum("bhnm,bhmd->bhnd", p, v.numpy())
    np.testing.assert_allclose(attention_ref(q, k, v, scale=scale).numpy(), expected, rtol=1e-12, atol=1e-12)
    p_default = scipy.special.softmax(np.einsum("bhnd,bhmd->bhnm", q.numpy(), k.numpy()) / math.sqrt(5), axis=-1)
    np.testing.assert_allclose(attention_ref(q, k, v).numpy(), np.einsum("bhnm,bhmd->bhnd", p_default, v.numpy()),
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Triton kernels in the interpreter: accuracy, ragged blocks, padding, strides.
# ----------------------------------------------------------------------------------------------


@triton_on_cpu
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("n", [1, 7, 64, 100])
def test_interpreter_matches_float64(n: int, d: int):
    _assert_accurate(*_qkv_do((2, 2, n, d), seed=n * 1000 + d), torch.float32)


@triton_on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_half_precision(dtype: torch.dtype):
    """Ragged N, D = 40 padded to 64, half-precision storage with float32 accumulation."""
    _assert_accurate(*_qkv_do((1, 2, 100, 40), seed=7), dtype)


@triton_on_cpu
@settings(max_examples=10)
@given(b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 80), d=st.integers(1, 72),
       scale=st.floats(0.05, 2.0), seed=st.integers(0, 2**16))
def test_interpreter_any_shape_and_scale(b: int, h: int, n: int, d: int, scale: float, seed: int):
    _assert_accurate(*_qkv_do((b, h, n, d), seed=seed), torch.float32, scale=scale)


@triton_on_cpu
@settings(max_examples=10)
@given(n=st.integers(2, 70), seed=st.integers(0, 2**16))
def test_softmax_invariances(n: int, seed: int):
    """Keys and values permuted together, or every key shifted by one vector, leave the output unchanged;
    permuting the queries permutes the output rows; values of ones give ones (rows of P sum to 1)."""
    q, k, v, _ = (t.float() for t in _qkv_do((1, 2, n, 16), seed=seed))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    shift = torch.randn(16, generator=gen)
    o = attention(q, k, v)
    torch.testing.assert_close(attention(q, k[:, :, perm], v[:, :, perm]), o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q[:, :, perm], k, v), o[:, :, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k + shift, v), o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attention(q, k, torch.ones_like(v)), torch.ones_like(v), rtol=1e-6, atol=1e-6)


@triton_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_stay_finite(dtype: torch.dtype):
    """Inputs scaled by 100 give logits of order 1e4: no overflow in the online softmax or its backward.

    The output keeps the accuracy rule (with the slack scaled by the values' scale, 100). Gradients are
    only checked to be finite: the backward recomputes logits of size 1e4 whose float32 rounding
    (~1e-2 absolute) differs from the forward's, which moves P by ~1e-3 relative, as in any
    FlashAttention backward.
    """
    q64, k64, v64, do64 = _qkv_do((1, 2, 100, 32), seed=3, gain=100.0)
    q, k, v, do = (t.to(dtype) for t in (q64, k64, v64, do64))
    o, dq, dk, dv = _forward_backward(attention, q, k, v, do)
    for name, t in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN or inf"
    exact = attention_ref(q.double(), k.double(), v.double())
    err = (o.double() - exact).abs().max().item()
    err_torch = (attention_ref(q, k, v).double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 100 * ATOL[dtype], f"o: kernel error {err:.3g}, torch {dtype} {err_torch:.3g}"


@triton_on_cpu
def test_non_contiguous_inputs_and_stride_zero_gradient():
    """q, k, v as views of one (B, N, 3, H, D) projection, and ``o.sum()``'s stride-0 gradient."""
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 37, 3, 2, 24, generator=gen)
    views = tuple(t.permute(0, 2, 1, 3) for t in qkv.unbind(2))  # (B, H, N, D), not contiguous
    assert not views[0].is_contiguous()
    ones = torch.ones(2, 2, 37, 24)
    strided = _forward_backward(attention, *views, ones.expand(2, 2, 37, 24))
    q, k, v = (t.contiguous() for t in views)
    o = attention(*(t.requires_grad_() for t in (q, k, v)))
    o.sum().backward()  # upstream gradient of stride 0
    for got, want in zip(strided, (o.detach(), q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    _assert_accurate(*(t.double() for t in views), ones.double(), torch.float32)


@triton_on_cpu
def test_fused_qkv_views_are_not_copied_and_the_output_is_token_major(monkeypatch: pytest.MonkeyPatch):
    """Views of a (B, N, 3, H, D) projection reach the kernel as they are; the output is a (B, N, H, D)
    buffer seen as (B, H, N, D), so merging the heads back is a view, and the gradients are exact."""
    gen = torch.Generator().manual_seed(12)
    qkv = torch.randn(2, 19, 3, 2, 16, generator=gen, dtype=torch.float64)
    views = [t.float().detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).requires_grad_()
             for t in qkv.permute(2, 0, 3, 1, 4)]
    assert not views[0].is_contiguous() and views[0].stride(-1) == 1
    seen = []
    launch = attention_module._fwd_launch
    monkeypatch.setattr(attention_module, "_fwd_launch", lambda q, *a: seen.append(q.data_ptr()) or launch(q, *a))
    o = attention(*views)
    assert seen == [views[0].data_ptr()]
    assert o.transpose(1, 2).is_contiguous()
    do = torch.randn(o.shape, generator=gen)
    o.backward(do)
    exact = _forward_backward(attention_ref, *(t.detach().double() for t in views), do.double())
    for got, want in zip((o, *(t.grad for t in views)), exact):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-4, atol=1e-5)


@triton_on_cpu
@pytest.mark.parametrize("layout", ["contiguous", "token-major", "stride-0 gradient"])
def test_custom_ops_pass_opcheck(layout: str):
    """torch.library.opcheck (schema, autograd registration, fake tensors with strides, aot_dispatch_dynamic)
    on the forward and backward ops."""
    gen = torch.Generator().manual_seed(13)
    if layout == "token-major":
        q, k, v = torch.randn(2, 9, 3, 2, 16, generator=gen).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = torch.randn(3, 2, 2, 9, 16, generator=gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    result = torch.library.opcheck(torch.ops.kdiff.attention_fwd.default, (q, k, v, 0.25))
    assert all(r == "SUCCESS" for r in result.values()), result
    o, lse = torch.ops.kdiff.attention_fwd(q.detach(), k.detach(), v.detach(), 0.25)
    do = torch.ones(2, 2, 9, 16).expand_as(o) if layout == "stride-0 gradient" else torch.randn(o.shape, generator=gen)
    args = (do, q.detach(), k.detach(), v.detach(), o, lse, 0.25)
    result = torch.library.opcheck(torch.ops.kdiff.attention_bwd.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert all(r == "SUCCESS" for r in result.values()), result


def test_sdpa_threshold_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KDIFF_ATTENTION_SDPA_BELOW", raising=False)
    assert attention_module.sdpa_below() == attention_module.SDPA_BELOW_DEFAULT == 1024
    monkeypatch.setenv("KDIFF_ATTENTION_SDPA_BELOW", "0")
    assert attention_module.sdpa_below() == 0
    for bad in ("-1", "short"):
        monkeypatch.setenv("KDIFF_ATTENTION_SDPA_BELOW", bad)
        with pytest.raises(ValueError, match=f"KDIFF_ATTENTION_SDPA_BELOW: expected an int >= 0, got '{bad}'"):
            attention_module.sdpa_below()


@triton_on_cpu
def test_torch_compile_keeps_the_op_in_one_graph():
    """fullgraph=True fails on a graph break; the forward and backward graphs hold the custom ops."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    targets: list[object] = []

    def record(gm: torch.fx.GraphModule, _inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    class SelfAttention(torch.nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    net, x = SelfAttention(32, 2), torch.randn(2, 20, 32)
    compiled = torch.compile(net, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    y_eager = net(x)
    y_eager.square().sum().backward()
    assert torch.ops.kdiff.attention_fwd.default in targets
    assert torch.ops.kdiff.attention_bwd.default in targets
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def _forbid_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher ran")
    monkeypatch.setattr(attention_module, "_fwd_launch", fail)


@triton_on_cpu
def test_triton_path_runs_the_launcher_under_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    calls = []
    launch = attention_module._fwd_launch
    monkeypatch.setattr(attention_module, "_fwd_launch", lambda *a: calls.append(1) or launch(*a))
    attention(*(t.float() for t in _qkv_do((1, 1, 5, 8), seed=1)[:3]))
    assert calls == [1]


def test_float64_and_kdiff_kernels_torch_take_the_torch_path(monkeypatch: pytest.MonkeyPatch):
    _forbid_triton(monkeypatch)
    q, k, v, do = _qkv_do((2, 2, 13, 8), seed=5)
    for got, want in zip(_forward_backward(attention, q, k, v, do), _forward_backward(attention_ref, q, k, v, do)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("KDIFF_KERNELS", "torch")
    _assert_accurate(q, k, v, do, torch.float32)


def test_kdiff_kernels_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDIFF_KERNELS", "triton")
    monkeypatch.setattr(attention_module, "_INTERPRET", False)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="KDIFF_KERNELS=triton"):
        attention(q, q, q)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

_GOOD = torch.zeros(2, 3, 5, 8)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((_GOOD[0], _GOOD[0], _GOOD[0]), {}, ValueError, r"q: expected a 4-D tensor \(B, H, N, D\), got shape \(3, 5, 8\)"),
    ((_GOOD, _GOOD[:, :, :4], _GOOD), {}, ValueError, r"k: expected shape \(2, 3, 5, 8\) \(the shape of q\), got"),
    ((_GOOD, _GOOD, _GOOD[..., :4]), {}, ValueError, r"v: expected shape \(2, 3, 5, 8\) \(the shape of q\), got"),
    ((_GOOD, _GOOD.half(), _GOOD), {}, TypeError,
     r"k: expected dtype torch.float32 \(the dtype of q\), got torch.float16"),
    ((_GOOD, _GOOD, _GOOD.double()), {}, TypeError, r"v: expected dtype torch.float32 \(the dtype of q\)"),
    ((_GOOD.long(),) * 3, {}, TypeError, r"q: expected dtype float16, bfloat16, float32 or float64, got torch.int64"),
    ((torch.zeros(1, 1, 4, 129),) * 3, {}, ValueError, r"q: expected a head dimension 1 <= D <= 128, got D=129"),
    ((torch.zeros(1, 1, 0, 8),) * 3, {}, ValueError, r"q: expected a sequence length N >= 1"),
    ((_GOOD, _GOOD, _GOOD), {"scale": "0.5"}, TypeError, r"scale: expected a float or None, got str"),
    ((_GOOD, _GOOD, _GOOD), {"scale": torch.tensor(0.5)}, TypeError, r"scale: expected a float or None, got Tensor"),
    ((_GOOD, _GOOD, _GOOD), {"scale": float("nan")}, ValueError, r"scale: expected a finite float > 0, got nan"),
    ((_GOOD, _GOOD, _GOOD), {"scale": -0.5}, ValueError, r"scale: expected a finite float > 0, got -0.5"),
    ((_GOOD.numpy(), _GOOD, _GOOD), {}, TypeError, r"q: expected a torch.Tensor, got ndarray"),
])
def test_bad_input_raises(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*args, **kwargs)


def test_different_devices_raise():
    with pytest.raises(ValueError, match=r"k: expected device cpu \(the device of q\), got meta"):
        attention(_GOOD, _GOOD.to("meta"), _GOOD)


# ----------------------------------------------------------------------------------------------
# GPU grid (skipped without CUDA)
# ----------------------------------------------------------------------------------------------

# N: single token, ragged below one block, U-Net 8x8 / 12x12 / 16x16 / 32x32 / 64x64 token counts.
_GPU_GRID = (
    [(torch.bfloat16, n, d) for n in (1, 7, 64, 100, 144, 256, 1024, 4096) for d in (16, 40, 64, 128)]
    + [(torch.float16, n, d) for n in (7, 144, 1024, 4096) for d in (64, 128)]
    + [(torch.float32, n, d) for n in (7, 144, 1024, 4096) for d in (32, 128)]
)


@pytest.fixture
def kernel_at_every_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernel even below the SDPA threshold (``KDIFF_KERNELS=triton``)."""
    monkeypatch.setenv("KDIFF_KERNELS", "triton")


@pytest.mark.gpu
@pytest.mark.usefixtures("kernel_at_every_n")
@pytest.mark.parametrize("dtype, n, d", _GPU_GRID)
def test_gpu_matches_float64(dtype: torch.dtype, n: int, d: int):
    b, h = (2, 3) if n <= 1024 else (1, 2)
    _assert_accurate(*_qkv_do((b, h, n, d), seed=n + d, device="cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.usefixtures("kernel_at_every_n")
def test_gpu_tf32_when_torch_allows_it():
    """With float32 matmul precision "high" the float32 kernel uses TF32 dots, as torch's matmuls then do."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert attention_module._precision(torch.float32) == "tf32"
        q, k, v, do = _qkv_do((2, 4, 1024, 64), seed=2, device="cuda")
        kernel = _forward_backward(attention, q.float(), k.float(), v.float(), do.float())
        tf32 = _forward_backward(attention_ref, q.float(), k.float(), v.float(), do.float())
        exact = _forward_backward(attention_ref, q, k, v, do)
        for name, got, same, ref in zip(("o", "dq", "dk", "dv"), kernel, tf32, exact):
            err, err_torch = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
            assert err <= 2 * err_torch + 2.0**-10, f"{name}: kernel {err:.3g}, torch tf32 {err_torch:.3g}"
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
@pytest.mark.usefixtures("kernel_at_every_n")
@pytest.mark.parametrize("n", [144, 1024])
def test_gpu_backward_is_deterministic(n: int):
    q, k, v, do = (t.to(torch.bfloat16) for t in _qkv_do((2, 4, n, 64), seed=4, device="cuda"))
    first = _forward_backward(attention, q, k, v, do)
    for _ in range(3):
        for got, want in zip(_forward_backward(attention, q, k, v, do), first):
            assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.usefixtures("kernel_at_every_n")
def test_gpu_torch_compile_inductor_fullgraph():
    q, k, v, do = (t.to(torch.bfloat16) for t in _qkv_do((2, 4, 256, 64), seed=6, device="cuda"))
    compiled = torch.compile(lambda a, b, c: attention(a, b, c) * 2.0, fullgraph=True)
    got = _forward_backward(compiled, q, k, v, do)
    want = _forward_backward(lambda a, b, c: attention(a, b, c) * 2.0, q, k, v, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.usefixtures("kernel_at_every_n")
def test_gpu_matches_sdpa_flash_on_unet_shape():
    """A U-Net 16x16 attention in bf16: the kernel and PyTorch's own attention agree to bf16 rounding."""
    q, k, v, _ = (t.to(torch.bfloat16) for t in _qkv_do((8, 4, 256, 64), seed=9, device="cuda"))
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_short_sequences_go_to_sdpa(monkeypatch: pytest.MonkeyPatch):
    """Under auto, N below the threshold runs SDPA (the launcher never runs); at the threshold, the kernel."""
    monkeypatch.delenv("KDIFF_KERNELS", raising=False)
    monkeypatch.delenv("KDIFF_ATTENTION_SDPA_BELOW", raising=False)
    calls = []
    launch = attention_module._fwd_launch
    monkeypatch.setattr(attention_module, "_fwd_launch", lambda *a: calls.append(a[0].shape[-2]) or launch(*a))
    for n in (256, 1023, 1024):
        q, k, v, _ = (t.to(torch.bfloat16) for t in _qkv_do((1, 2, n, 64), seed=n, device="cuda"))
        torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=2e-2, atol=2e-2)
    assert calls == [1024]
    monkeypatch.setenv("KDIFF_ATTENTION_SDPA_BELOW", "0")
    attention(q[..., :256, :], k[..., :256, :], v[..., :256, :])
    assert calls == [1024, 256]


@pytest.mark.gpu
@pytest.mark.usefixtures("kernel_at_every_n")
def test_gpu_fused_qkv_views_match_contiguous():
    """The strided (token-major) path gives bit-identical results to contiguous copies of the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(14)
    qkv = torch.randn(4, 256, 3, 8, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(4, 8, 256, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    views = [t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4)]
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    strided = _forward_backward(attention, *views, do)
    dense = _forward_backward(attention, *copies, do)
    for got, want in zip(strided, dense):
        assert torch.equal(got, want)
