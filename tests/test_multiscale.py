"""kdiff.kernels.multiscale: the reference against numpy float64 oracles, every backend against the reference.

Oracles: block means by numpy reshape (not torch pooling), the closed-form gradient
``2 / (H W) sum_l w_l P_l[y // 2^l, x // 2^l]``, exact cases (constant and cell-wise zero-mean
differences), and ``torch.autograd.gradcheck``. Kernels: ``err(kernel, ref64) <= 2 err(ref_dtype, ref64) + atol``
for the loss and both gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kdiff.kernels import multiscale as ms
from kdiff.kernels import multiscale_mse, multiscale_mse_ref

CUDA = torch.cuda.is_available()
DEVICE = {"triton": "cuda" if CUDA else "cpu", "numba": "cpu", "torch": "cpu"}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["triton", "numba", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("KDIFF_KERNELS", request.param)
    return request.param


def _use(monkeypatch, name: str) -> str:
    monkeypatch.setenv("KDIFF_KERNELS", name)
    return DEVICE[name]


# ---------------------------------------------------------------- numpy float64 oracles

def _block_means(x: np.ndarray, k: int) -> np.ndarray:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // k, k, w // k, k).mean(axis=(3, 5))


def _oracle_loss(diff: np.ndarray, weights: list[float]) -> np.ndarray:
    total = np.zeros(diff.shape[0])
    for l, w in enumerate(weights):
        pooled = _block_means(diff, 2**l)
        total += w * (pooled**2).sum(axis=(1, 2, 3)) / (pooled.shape[2] * pooled.shape[3])
    return total


def _oracle_grad(diff: np.ndarray, weights: list[float]) -> np.ndarray:
    h, w_ = diff.shape[2:]
    grad = np.zeros_like(diff)
    for l, w in enumerate(weights):
        k = 2**l
        grad += 2 * w / (h * w_) * np.repeat(np.repeat(_block_means(diff, k), k, axis=2), k, axis=3)
    return grad


def _default_weights(h: int, w: int, base: int) -> list[float]:
    """1/s for every s = min(H, W) / k with k = 2^j dividing H and W and s >= base (k = 1 always)."""
    ks = [1] + [2**j for j in range(1, 12) if h % 2**j == 0 and w % 2**j == 0 and min(h, w) // 2**j >= base]
    return [k / min(h, w) for k in ks]


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def _assert_rule(out, ref_dtype, ref64, *, atol: float, what: str) -> None:
    err, err_ref = _err(out, ref64), _err(ref_dtype, ref64)
    assert err <= 2 * err_ref + atol, f"{what}: err {err:.3e} > 2 * {err_ref:.3e} + {atol:.1e}"


# ---------------------------------------------------------------- levels and the reference

@pytest.mark.parametrize("h, w, base, sizes", [
    (256, 256, 32, [256, 128, 64, 32]),
    (96, 96, 32, [96, 48]),            # not a power-of-two multiple of base: the levels that exist
    (48, 48, 32, [48]),
    (32, 32, 32, [32]),
    (16, 16, 32, [16]),                # d < base: the full-resolution term only
    (64, 128, 32, [64, 32]),           # H != W: s = the shorter side
    (64, 96, 16, [64, 32, 16]),
    (40, 64, 4, [40, 20, 10, 5]),      # stops once H no longer divides
])
def test_levels_and_default_weights(h, w, base, sizes):
    assert ms.multiscale_weights(h, w, base=base) == [1.0 / s for s in sizes]


@given(b=st.integers(1, 2), c=st.integers(1, 3), h_odd=st.sampled_from([1, 3, 5]), w_odd=st.sampled_from([1, 3]),
       h_pow=st.integers(0, 4), w_pow=st.integers(0, 4), base=st.sampled_from([1, 2, 4, 8, 32]),
       custom=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_matches_numpy_oracle(b, c, h_odd, w_odd, h_pow, w_pow, base, custom, seed):
    h, w = h_odd * 2**h_pow, w_odd * 2**w_pow
    rng = np.random.default_rng(seed)
    weights = list(rng.uniform(0.1, 2.0, size=1 + min(h_pow, w_pow))) if custom else None
    pred, target = rng.standard_normal((2, b, c, h, w))
    loss = multiscale_mse_ref(torch.from_numpy(pred), torch.from_numpy(target), base=base, weights=weights)
    expected = _oracle_loss(pred - target, weights if custom else _default_weights(h, w, base))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=0)


def test_reference_exact_cases():
    # constant difference v: every pooled level equals v, so L = C v^2 sum_l w_l
    pred = torch.full((2, 3, 64, 64), 0.75, dtype=torch.float64)
    target = torch.full_like(pred, -0.5)
    np.testing.assert_allclose(multiscale_mse_ref(pred, target, base=16).numpy(),
                               3 * 1.25**2 * (1 / 64 + 1 / 32 + 1 / 16), rtol=1e-14)
    # every 2x2 cell sums to zero: only the full-resolution term survives, L = w_0 C mean(diff^2)
    cell = torch.tensor([[1.0, -2.0], [3.0, -2.0]], dtype=torch.float64)
    diff = cell.repeat(1, 3, 16, 8) * torch.arange(1, 17, dtype=torch.float64).repeat_interleave(2)[:, None]
    expected = (1 / 16) * 3 * diff.pow(2).mean().item()  # w_0 = 1 / min(32, 16)
    np.testing.assert_allclose(multiscale_mse_ref(diff, torch.zeros_like(diff), base=4).item(), expected, rtol=1e-14)


def test_reference_gradient_closed_form_and_gradcheck():
    rng = np.random.default_rng(0)
    pred_np, target_np = rng.standard_normal((2, 2, 3, 12, 8))
    pred = torch.from_numpy(pred_np).requires_grad_()
    (grad,) = torch.autograd.grad(multiscale_mse_ref(pred, torch.from_numpy(target_np), base=2).sum(), pred)
    np.testing.assert_allclose(grad.numpy(), _oracle_grad(pred_np - target_np, _default_weights(12, 8, 2)),
                               rtol=1e-12, atol=1e-15)
    pred = torch.randn(2, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: multiscale_mse_ref(p, t, base=1, weights=[0.3, 1.1, 2.0]),
                                    (pred, target))


# ---------------------------------------------------------------- kernels against the reference

def _check_backend(pred: torch.Tensor, target: torch.Tensor, *, base: int, weights: list[float] | None = None,
                   interp_bf16: bool = False) -> None:
    """Loss, d/dpred and d/dtarget of multiscale_mse against the float64 and same-dtype reference."""
    def run(fn, p, t):
        p, t = p.detach().requires_grad_(), t.detach().requires_grad_()
        loss = fn(p, t, base=base, weights=weights)
        loss.sum().backward()
        return loss, p.grad, t.grad

    ref64 = run(multiscale_mse_ref, pred.double(), target.double())
    ref = run(multiscale_mse_ref, pred, target)
    out = run(multiscale_mse, pred, target)
    assert out[0].dtype == (torch.float64 if pred.dtype == torch.float64 else torch.float32)
    assert out[1].dtype == pred.dtype and out[2].dtype == pred.dtype
    # fp32 accumulation in another order: a few float32 ulps of the largest value
    rel = 1e-13 if pred.dtype == torch.float64 else 4e-7
    for name, o, r, r64 in zip(("loss", "grad pred", "grad target"), out, ref, ref64):
        atol = rel * r64.abs().max().item()
        if interp_bf16 and name != "loss":
            # the Triton interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest even): one ulp
            atol += 2.0**-7 * r64.abs().max().item()
        _assert_rule(o, r, r64, atol=atol, what=f"{name} {pred.dtype} {tuple(pred.shape)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, base", [
    ((1, 1, 32, 32), 32), ((2, 3, 48, 48), 32), ((1, 3, 64, 64), 32), ((1, 1, 96, 96), 32),
    ((1, 3, 256, 256), 32), ((3, 1, 64, 128), 32), ((2, 3, 24, 40), 4),
])
def test_numba_matches_reference(monkeypatch, dtype, shape, base):
    _use(monkeypatch, "numba")
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn((2, *shape), generator=gen).to(dtype)
    _check_backend(pred, target, base=base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, base", [((1, 1, 8, 8), 2), ((2, 3, 12, 24), 2), ((1, 3, 32, 32), 32),
                                         ((1, 1, 64, 64), 32),
                                         ((2, 1, 8, 320), 2),    # several column chunks, the last one ragged
                                         ((1, 2, 64, 64), 1)])   # 64 x 64 coarsest cells: rows spread over warps
def test_triton_matches_reference(monkeypatch, dtype, shape, base):
    device = _use(monkeypatch, "triton")
    gen = torch.Generator().manual_seed(2)
    pred, target = torch.randn((2, *shape), generator=gen).to(dtype).to(device)
    _check_backend(pred, target, base=base, interp_bf16=dtype == torch.bfloat16 and not CUDA)


@settings(max_examples=25)
@given(b=st.integers(1, 3), c=st.integers(1, 3), h_odd=st.sampled_from([1, 3]), w_odd=st.sampled_from([1, 5]),
       h_pow=st.integers(0, 3), w_pow=st.integers(0, 3), base=st.sampled_from([1, 2, 4, 32]),
       custom=st.booleans(), name=st.sampled_from(["triton", "numba", "torch"]), seed=st.integers(0, 2**16))
def test_backends_match_numpy_oracle(b, c, h_odd, w_odd, h_pow, w_pow, base, custom, name, seed):
    h, w = h_odd * 2**h_pow, w_odd * 2**w_pow
    rng = np.random.default_rng(seed)
    weights = list(rng.uniform(0.1, 2.0, size=1 + min(h_pow, w_pow))) if custom else None
    pred_np, target_np = rng.standard_normal((2, b, c, h, w))
    with pytest.MonkeyPatch.context() as mp:
        device = _use(mp, name)
        pred = torch.from_numpy(pred_np).to(device).requires_grad_()
        loss = multiscale_mse(pred, torch.from_numpy(target_np).to(device), base=base, weights=weights)
        loss.sum().backward()
    weights = weights if custom else _default_weights(h, w, base)
    np.testing.assert_allclose(loss.detach().cpu().numpy(), _oracle_loss(pred_np - target_np, weights), rtol=1e-12)
    np.testing.assert_allclose(pred.grad.cpu().numpy(), _oracle_grad(pred_np - target_np, weights),
                               rtol=1e-10, atol=1e-17)


def test_gradcheck_custom_op(backend):
    device = DEVICE[backend]
    pred = torch.randn(2, 2, 8, 4, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.randn(2, 2, 8, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: multiscale_mse(p, t, base=2), (pred, target), fast_mode=True)
    assert torch.autograd.gradcheck(lambda p, t: multiscale_mse(p, t, weights=[0.5, 2.0, -1.0]), (pred, target),
                                    fast_mode=True)


def _layouts(device: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    base_t = torch.randn(2, 3, 16, 16, generator=gen)
    out = [
        ("stride-0 batch", torch.randn(1, 3, 16, 16, generator=gen).expand(2, 3, 16, 16), base_t),
        ("stride-0 everywhere", torch.randn(1, 1, 1, 1, generator=gen).expand(2, 3, 16, 16), base_t),
        ("channels_last", base_t.contiguous(memory_format=torch.channels_last),
         torch.randn(2, 3, 16, 16, generator=gen)),
        ("transposed", torch.randn(2, 3, 16, 16, generator=gen).transpose(-1, -2), base_t.transpose(-1, -2)),
        ("strided slice", torch.randn(2, 6, 16, 32, generator=gen)[:, ::2, :, ::2], base_t),
    ]
    return [(name, p.to(device), t.to(device)) for name, p, t in out]


def test_strided_inputs_and_upstream_gradients(backend):
    device = DEVICE[backend]
    for name, pred, target in _layouts(device):
        pred = pred.detach().requires_grad_()
        (grad,) = torch.autograd.grad(multiscale_mse(pred, target, base=4).sum(), pred)  # stride-0 ones upstream
        pc = pred.detach().contiguous().requires_grad_()
        loss = multiscale_mse(pc, target.contiguous(), base=4)
        torch.testing.assert_close(multiscale_mse(pred.detach(), target, base=4), loss.detach(), rtol=1e-6, atol=0,
                                   msg=name)
        (grad_c,) = torch.autograd.grad(loss.sum(), pc)
        torch.testing.assert_close(grad, grad_c, rtol=1e-6, atol=1e-12, msg=name)
        # mean(): an upstream gradient of 1/B, stride 0; it must scale the stored gradient
        (grad_mean,) = torch.autograd.grad(multiscale_mse(pc, target, base=4).mean(), pc)
        torch.testing.assert_close(grad_mean, grad_c / 2, rtol=1e-6, atol=0, msg=name)
        p64 = pred.detach().double().cpu().numpy()
        expected = _oracle_grad(p64 - target.double().cpu().numpy(), _default_weights(16, 16, 4))
        np.testing.assert_allclose(grad.double().cpu().numpy(), expected, rtol=1e-5, atol=1e-9)


def _opcheck_layouts(device: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """pred/target pairs in every layout the op must handle (float64: opcheck compares values)."""
    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    out = [
        ("contiguous", rand(2, 3, 8, 8), rand(2, 3, 8, 8)),
        ("channels_last", rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last),
         rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)),
        ("channels_last pred, contiguous target", rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last),
         rand(2, 3, 8, 8)),
        ("transposed", rand(2, 3, 8, 8).transpose(-1, -2), rand(2, 3, 8, 8)),
        ("strided slice", rand(2, 6, 8, 16)[:, ::2, :, ::2], rand(2, 3, 16, 8)[:, :, ::2]),
        ("stride-0 batch", rand(1, 3, 8, 8).expand(2, 3, 8, 8), rand(2, 3, 8, 8)),
    ]
    return [(name, p.to(device), t.to(device)) for name, p, t in out]


@pytest.mark.parametrize("layout", range(6))
def test_opcheck_every_layout(backend, layout):
    """torch.library.opcheck: schema, autograd registration, fake tensor (strides included), aot_dispatch_dynamic."""
    name, pred, target = _opcheck_layouts(DEVICE[backend])[layout]
    gammas = ms.level_gammas(8, 8, ms.multiscale_weights(8, 8, base=2))
    for write_grad in (True, False):
        p = pred.detach().requires_grad_(write_grad)
        result = torch.library.opcheck(torch.ops.kdiff.multiscale_mse.default, (p, target, gammas, write_grad))
        assert all(v == "SUCCESS" for v in result.values()), (name, write_grad, result)


def test_gradient_layout_matches_fake(backend):
    """The real gradient has exactly the strides the registered fake promises (torch.empty_like(pred))."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gammas = ms.level_gammas(8, 8, ms.multiscale_weights(8, 8, base=2))
    for name, pred, target in _opcheck_layouts(DEVICE[backend]):
        _, grad = torch.ops.kdiff.multiscale_mse(pred, target, gammas, True)
        with FakeTensorMode() as mode:
            fake_pred, fake_target = mode.from_tensor(pred), mode.from_tensor(target)
            _, fake_grad = torch.ops.kdiff.multiscale_mse(fake_pred, fake_target, gammas, True)
        assert grad.stride() == fake_grad.stride() == torch.empty_like(pred).stride(), name
        p = pred.detach().requires_grad_()
        (grad_p,) = torch.autograd.grad(multiscale_mse(p, target, base=2).sum(), p)
        assert grad_p.stride() == torch.empty_like(pred).stride(), name


def test_target_gradient_only_when_needed(backend):
    device = DEVICE[backend]
    pred, target = torch.randn(2, 2, 2, 8, 8, device=device, dtype=torch.float64)
    weights = _default_weights(8, 8, 2)
    expected = _oracle_grad((pred - target).cpu().numpy(), weights)
    t = target.clone().requires_grad_()
    multiscale_mse(pred, t, base=2).sum().backward()
    np.testing.assert_allclose(t.grad.cpu().numpy(), -expected, rtol=1e-12, atol=1e-17)
    p = pred.clone().requires_grad_()
    multiscale_mse(p, target, base=2).sum().backward()
    np.testing.assert_allclose(p.grad.cpu().numpy(), expected, rtol=1e-12, atol=1e-17)
    gammas = ms.level_gammas(8, 8, weights)
    assert torch.ops.kdiff.multiscale_mse(pred, target, gammas, False)[1].numel() == 0  # no gradient written


def test_float16_gradient_survives_loss_scaling(backend):
    """2 gamma_l ~ 1e-7 at 256^2: a gradient stored in float16 before the upstream scale would be zeros."""
    device = DEVICE[backend]
    gen = torch.Generator().manual_seed(4)
    pred, target = (torch.randn((2, 1, 1, 256, 256), generator=gen) * 0.1).half().to(device)
    if backend == "triton" and not CUDA:
        pred, target = pred[..., :64, :64].contiguous(), target[..., :64, :64].contiguous()
    pred.requires_grad_()
    (multiscale_mse(pred, target, base=32) * 2.0**16).sum().backward()
    h, w = pred.shape[-2:]
    diff = pred.detach().double().cpu().numpy() - target.double().cpu().numpy()
    expected = 2.0**16 * _oracle_grad(diff, _default_weights(h, w, 32))
    assert np.median(np.abs(expected)) / 2.0**16 < 6.1e-5  # unscaled, it lies below float16's smallest normal
    np.testing.assert_allclose(pred.grad.double().cpu().numpy(), expected, rtol=1e-3, atol=1e-7)


def test_bfloat16_scaled_upstream_rounds_at_most_twice(backend):
    """The stored bf16 gradient (one rounding) times a non-1 upstream gradient (a second), each <= 2^-8 relative."""
    device = DEVICE[backend]
    pred, target = torch.randn(2, 3, 2, 32, 32, device=device).bfloat16()
    pred.requires_grad_()
    upstream = torch.tensor([0.3, 1.7, 0.9], device=device)
    multiscale_mse(pred, target, base=8).backward(upstream)
    p64 = pred.detach().double().requires_grad_()
    multiscale_mse_ref(p64, target.double(), base=8).backward(upstream.double())
    first = 2.0**-7 if backend == "triton" and not CUDA else 2.0**-8  # the interpreter truncates
    err = (pred.grad.double().cpu() - p64.grad.cpu()).abs()
    g64 = p64.grad.abs().cpu()
    bound = (first + 2.0**-8) * g64 + 1e-6 * g64.max()  # + float32 accumulation before the first rounding
    assert (err <= bound).all(), (err - bound).max()


def test_deterministic_and_thread_count_independent(monkeypatch, backend):
    device = DEVICE[backend]
    pred, target = torch.randn(2, 4, 3, 32, 32, device=device)
    first = multiscale_mse(pred, target, base=8)
    assert torch.equal(first, multiscale_mse(pred, target, base=8))
    if backend == "numba":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, multiscale_mse(pred, target, base=8))
        finally:
            torch.set_num_threads(threads)


def test_torch_compile_train_step_has_no_graph_break():
    import torch._dynamo

    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    device = DEVICE["triton"]
    net = net.to(device)
    x, eps = torch.randn(2, 2, 3, 16, 16, device=device)

    def loss_fn(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return multiscale_mse(net(x), eps, base=4).mean()

    explained = torch._dynamo.explain(loss_fn)(x, eps)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    loss = loss_fn(x, eps)
    loss.backward()
    grad = net.weight.grad.clone()
    net.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x, eps)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(net.weight.grad, grad)


@pytest.mark.parametrize("name", ["torch", "numba", "triton"])
def test_inductor_channels_last_gradient(monkeypatch, name):
    """Under inductor, a channels_last pred must not trip the stride assert on the op's gradient output,
    and the compiled loss and gradient equal eager ones."""
    import torch._dynamo

    device = _use(monkeypatch, name)
    gen = torch.Generator().manual_seed(6)
    pred = torch.randn(2, 3, 16, 16, generator=gen).to(device)
    pred = pred.contiguous(memory_format=torch.channels_last).requires_grad_()
    target = torch.randn(2, 3, 16, 16, generator=gen).to(device)
    upstream = torch.tensor([0.5, 2.0], device=device)

    def step(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (multiscale_mse(p * 2.0, t, base=4) * upstream).sum()

    (expected,) = torch.autograd.grad(step(pred, target), pred)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    loss = compiled(pred, target)
    (grad,) = torch.autograd.grad(loss, pred)
    torch._dynamo.reset()
    torch.testing.assert_close(loss, step(pred, target).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("fn", [multiscale_mse, multiscale_mse_ref])
@pytest.mark.parametrize("pred, target, kwargs, error, match", [
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 4), {}, ValueError, r"target: expected shape \(2, 3, 8, 8\)"),
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.float64), {}, TypeError,
     "target: expected dtype torch.float32"),
    (torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), {}, ValueError, r"pred: expected a 4-D tensor .* got shape \(3, 8"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), torch.zeros(2, 3, 8, 8, dtype=torch.int64), {}, TypeError,
     "pred: expected a floating-point tensor, got dtype torch.int64"),
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), {"base": 24}, ValueError,
     "base: expected a power of two, got 24"),
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), {"base": 0}, ValueError, "base: expected an int >= 1, got 0"),
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), {"base": 4.0}, TypeError, "base: expected an int, got float"),
    (torch.zeros(2, 3, 12, 20), torch.zeros(2, 3, 12, 20), {"weights": [1.0, 1.0, 1.0, 1.0]}, ValueError,
     r"weights: 4 levels need H and W divisible by 8, got spatial size \(12, 20\), which does not divide"),
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), {"weights": []}, ValueError, "weights: expected at least one"),
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), {"weights": [1.0, float("nan")]}, ValueError,
     "weights: expected finite floats, got nan"),
    (torch.zeros(0, 3, 8, 8), torch.zeros(0, 3, 8, 8), {}, ValueError, r"pred: expected every dimension >= 1"),
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), {"weights": [1.0, "2"]}, TypeError,
     "weights: expected real numbers, got str"),
])
def test_bad_input(fn, pred, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(pred, target, **kwargs)


def test_bad_backend_choice(monkeypatch):
    monkeypatch.setenv("KDIFF_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="KDIFF_KERNELS: expected one of auto, triton, numba, torch"):
        multiscale_mse(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 3, 64, 64), (32, 3, 256, 256), (8, 3, 512, 512), (3, 1, 96, 160)])
def test_triton_cuda_benchmark_shapes(monkeypatch, dtype, shape):
    _use(monkeypatch, "triton")
    pred, target = torch.randn((2, *shape), device="cuda").to(dtype)
    _check_backend(pred, target, base=32)


@pytest.mark.gpu
def test_triton_cuda_compiled_with_inductor(monkeypatch):
    _use(monkeypatch, "triton")
    pred, target = torch.randn(2, 8, 3, 64, 64, device="cuda")
    pred.requires_grad_()
    compiled = torch.compile(lambda p, t: multiscale_mse(p, t).mean(), fullgraph=True)
    loss = compiled(pred, target)
    loss.backward()
    p64 = pred.detach().double().requires_grad_()
    ref = multiscale_mse_ref(p64, target.double()).mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=1e-4, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduce", ["sum", "weighted"])
def test_triton_backward_in_cuda_graph(monkeypatch, dtype, reduce):
    """Forward and backward captured in one CUDA graph (no host sync may happen inside), replayed on new data."""
    _use(monkeypatch, "triton")
    shape = (4, 3, 64, 64)
    pred = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    target = torch.randn(shape, device="cuda").to(dtype)
    upstream = torch.rand(shape[0], device="cuda")

    def step() -> torch.Tensor:
        loss = multiscale_mse(pred, target, base=16)
        (loss.sum() if reduce == "sum" else (loss * upstream).sum()).backward()  # sum: a stride-0 upstream
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and the per-level factors' device copy happen here
        for _ in range(3):
            pred.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    pred.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            pred.copy_(torch.randn(shape, device="cuda", generator=gen).to(dtype))
            target.copy_(torch.randn(shape, device="cuda", generator=gen).to(dtype))
            upstream.copy_(torch.rand(shape[0], device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        p64 = pred.detach().double().requires_grad_()
        ref = multiscale_mse_ref(p64, target.double(), base=16)
        (ref.sum() if reduce == "sum" else (ref * upstream.double()).sum()).backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
        tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=tol, atol=tol * p64.grad.abs().max().item())
