"""kdiff.losses against numpy float64 closed forms, and the eps/x/v loss identities measured on actual
predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import special
from strategies import cases, floats_for

from kdiff import losses as L
from kdiff import param
from kdiff import process as P

DTYPES = [torch.float32, torch.float64]
TARGETS = ["eps", "x", "v"]
LOGSNR_BOUND = {torch.float32: 15.0, torch.float64: 30.0}


def logsnrs(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    b = LOGSNR_BOUND[dtype]
    return st.lists(floats_for(dtype, -b, b), min_size=1, max_size=8).map(lambda v: torch.tensor(v, dtype=dtype))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def col(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def per_sample_mean(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).mean(axis=1)


RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


# ---------------------------------------------------------------------------------------------
# mse


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_mse_matches_numpy(dtype, data):
    pred, target, _ = data.draw(cases(dtype))
    loss = L.mse(pred, target)
    assert loss.shape == (pred.shape[0],) and loss.dtype == dtype
    np.testing.assert_allclose(np64(loss), per_sample_mean((np64(pred) - np64(target)) ** 2), rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mse_low_precision_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(3, 4, 16, 16, generator=gen).to(dtype) for _ in range(2))
    loss = L.mse(pred, target)
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.numpy(), per_sample_mean((np64(pred) - np64(target)) ** 2), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# One prediction, three losses: L_eps = SNR L_x, L_v = (1 + SNR) L_x = L_eps / alpha^2


def three_losses(x, eps, r, l):
    """(L_eps, L_x, L_v) of the prediction ``eps_hat = eps + r + 0.5 sign(r)`` of z = diffuse(x, eps, l), in
    float64. Every residual is >= 0.5 in size, far above the rounding of z (a tiny residual computed through z
    would carry a relative error ~ eps_machine |z| / |residual|, which these identities do not model)."""
    eps_hat = eps + r + 0.5 * torch.sign(r)
    z = P.diffuse(x, eps, l)
    x_hat = param.x_from_eps(z, eps_hat, l)
    v, v_hat = param.v_from_x_eps(x, eps, l), param.v_from_eps(z, eps_hat, l)
    return {"eps": L.mse(eps_hat, eps), "x": L.mse(x_hat, x), "v": L.mse(v_hat, v)}


@given(data=st.data())
def test_loss_conversion_identities(data):
    x, eps, r, l = data.draw(cases(torch.float64, n=3, bound=10.0))
    losses = {k: np64(v) for k, v in three_losses(x, eps, r, l).items()}
    ll = np64(l)
    alpha2, sigma2 = special.expit(ll), special.expit(-ll)
    np.testing.assert_allclose(losses["x"], sigma2 / alpha2 * losses["eps"], rtol=1e-9)
    np.testing.assert_allclose(losses["x"], sigma2 * losses["v"], rtol=1e-9)
    np.testing.assert_allclose(losses["v"], (1 + alpha2 / sigma2) * losses["x"], rtol=1e-9)
    np.testing.assert_allclose(losses["v"], losses["eps"] / alpha2, rtol=1e-9)
    for a in TARGETS:
        for b in TARGETS:
            w = L.mse_conversion(l, from_target=a, to_target=b)
            np.testing.assert_allclose(np64(w) * losses[a], losses[b], rtol=1e-9, err_msg=f"{a} -> {b}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_mse_conversion_closed_form(dtype, data):
    l = data.draw(logsnrs(dtype))
    snr = np.exp(np64(l))
    c = {"x": np.ones_like(snr), "eps": snr, "v": 1 + snr}
    for a in TARGETS:
        for b in TARGETS:
            w = L.mse_conversion(l, from_target=a, to_target=b)
            assert w.dtype == dtype and w.shape == l.shape
            np.testing.assert_allclose(np64(w), c[b] / c[a], rtol=RTOL[dtype] * (1 + np.abs(np64(l)).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_eps_mse_from_v(dtype, data):
    x, eps, v_pred, l = data.draw(cases(dtype, n=3))
    z = P.diffuse(x, eps, l)
    loss = L.eps_mse_from_v(v_pred, z, eps, l)
    assert loss.shape == (x.shape[0],) and loss.dtype == dtype
    alpha, sigma = (np.sqrt(special.expit(s * col(np64(l), x.ndim))) for s in (1.0, -1.0))
    eps_hat = sigma * np64(z) + alpha * np64(v_pred)  # eps = sigma z + alpha v
    d = eps_hat - np64(eps)
    # Rounding bound: each residual d carries an absolute error delta ~ u (|sigma z| + |alpha v| + |eps|),
    # so mean(d^2) is off by at most mean(2 |d| delta + delta^2).
    delta = 16 * UNIT[dtype] * (np.abs(sigma * np64(z)) + np.abs(alpha * np64(v_pred)) + np.abs(np64(eps)))
    tol = per_sample_mean(2 * np.abs(d) * delta + delta**2)
    assert (np.abs(np64(loss) - per_sample_mean(d**2)) <= tol).all()
    if dtype == torch.float64:
        # ... which is alpha^2 times the v-loss against the true v = alpha eps - sigma x (up to z's rounding).
        v_true = alpha * np64(eps) - sigma * np64(x)
        v_loss = per_sample_mean((np64(v_pred) - v_true) ** 2)
        assert (np.abs(np64(loss) - alpha.reshape(-1) ** 2 * v_loss) <= tol).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eps_mse_from_v_low_precision(dtype):
    gen = torch.Generator().manual_seed(1)
    v_pred, z, eps = (torch.randn(4, 3, 8, 8, generator=gen).to(dtype) for _ in range(3))
    l = torch.tensor([-4.0, 0.0, 2.5, 9.0])
    loss = L.eps_mse_from_v(v_pred, z, eps, l)
    assert loss.dtype == torch.float32
    alpha, sigma = (np.sqrt(special.expit(s * col(np64(l), 4))) for s in (1.0, -1.0))
    expected = per_sample_mean((sigma * np64(z) + alpha * np64(v_pred) - np64(eps)) ** 2)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Weightings


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), gamma=st.floats(0.1, 20.0))
def test_weight_min_snr_closed_form(target, dtype, data, gamma):
    l = data.draw(logsnrs(dtype))
    w = L.weight_min_snr(l, gamma=gamma, target=target)
    assert w.dtype == dtype and w.shape == l.shape
    snr = np.exp(np64(l))
    clipped = np.minimum(snr, gamma)
    expected = {"eps": clipped / snr, "x": clipped, "v": clipped / (snr + 1)}[target]
    np.testing.assert_allclose(np64(w), expected, rtol=RTOL[dtype] * (1 + np.abs(np64(l)).max()))


def test_weight_min_snr_default_gamma():
    l = torch.tensor([np.log(5.0) - 1, np.log(5.0) + 1], dtype=torch.float64)
    snr = np.exp(l.numpy())
    np.testing.assert_allclose(L.weight_min_snr(l).numpy(), [1.0, 5.0 / snr[1]], rtol=1e-13)
    np.testing.assert_allclose(L.weight_min_snr(l, target="v").numpy(), [snr[0] / (snr[0] + 1), 5.0 / (snr[1] + 1)],
                               rtol=1e-13)


@given(data=st.data(), gamma=st.floats(0.1, 20.0))
def test_min_snr_targets_weight_the_same_objective(data, gamma):
    x, eps, r, l = data.draw(cases(torch.float64, n=3, bound=10.0))
    losses = three_losses(x, eps, r, l)
    weighted = {k: L.weight_min_snr(l, gamma=gamma, target=k) * v for k, v in losses.items()}
    # The x-weight min(SNR, gamma) moved to each target weights one and the same objective ...
    np.testing.assert_allclose(np64(weighted["eps"]), np64(weighted["x"]), rtol=1e-9)
    np.testing.assert_allclose(np64(weighted["v"]), np64(weighted["x"]), rtol=1e-9)
    # ... and, converted to a weight on the eps-loss, all three are min(SNR, gamma) / SNR.
    w_eps = np.minimum(np.exp(np64(l)), gamma) / np.exp(np64(l))
    for k in TARGETS:
        as_eps = L.weight_min_snr(l, gamma=gamma, target=k) * L.mse_conversion(l, from_target="eps", to_target=k)
        np.testing.assert_allclose(np64(as_eps), w_eps, rtol=1e-12, err_msg=k)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), sd=st.floats(0.05, 5.0))
def test_weight_edm(dtype, data, sd):
    sigma = data.draw(st.lists(floats_for(dtype, 1e-3, 1e3), min_size=1, max_size=8))
    s = torch.tensor(sigma, dtype=dtype)
    w = L.weight_edm(s, sigma_data=sd)
    assert w.dtype == dtype and w.shape == s.shape
    ss = np64(s)
    np.testing.assert_allclose(np64(w), (ss**2 + sd**2) / (ss * sd) ** 2, rtol=RTOL[dtype])
    # lambda(sigma) = 1 / c_out^2: the weighted loss on D is the unit-weight loss on F's target.
    _, c_out, _, _ = param.edm_precond(s, sigma_data=sd)
    np.testing.assert_allclose(np64(w * c_out**2), 1.0, rtol=4 * RTOL[dtype])


# ---------------------------------------------------------------------------------------------
# multiscale


def multiscale_oracle(pred: np.ndarray, target: np.ndarray, base: int) -> np.ndarray:
    """simple diffusion Sec. 3.3: sum over s = d, d/2, ..., >= base of (1/s) (1/s^2) ||avgpool_s(diff)||^2."""
    diff = pred - target
    B, C, d, _ = diff.shape
    total, s = np.zeros(B), d
    while True:
        k = d // s
        pooled = diff.reshape(B, C, s, k, s, k).mean(axis=(3, 5))
        total += (pooled**2).sum(axis=(1, 2, 3)) / s**3
        if s % 2 or s // 2 < base:
            return total
        s //= 2


@pytest.mark.parametrize("shape,base", [((2, 1, 8, 8), 2), ((3, 3, 16, 16), 4), ((1, 2, 4, 4), 1), ((2, 3, 8, 8), 8)])
def test_multiscale_mse_matches_oracle(shape, base):
    gen = torch.Generator().manual_seed(sum(shape))
    pred, target = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    loss = L.multiscale_mse(pred, target, base=base)
    assert loss.shape == (shape[0],)
    np.testing.assert_allclose(np64(loss), multiscale_oracle(np64(pred), np64(target), base), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Broadcasting, numerical health, bad input


@given(data=st.data())
def test_scalar_and_batch_logsnr_agree(data):
    x, eps, v_pred, l = data.draw(cases(torch.float32, n=3))
    value = l[0].item()
    full = torch.full((x.shape[0],), value)
    torch.testing.assert_close(L.eps_mse_from_v(v_pred, x, eps, value), L.eps_mse_from_v(v_pred, x, eps, full),
                               rtol=1e-6, atol=1e-7)
    for k in TARGETS:
        assert L.weight_min_snr(value, target=k).item() == pytest.approx(L.weight_min_snr(full, target=k)[0].item(),
                                                                          rel=1e-6)
        assert L.mse_conversion(value, to_target=k).item() == pytest.approx(
            L.mse_conversion(full, to_target=k)[0].item(), rel=1e-6)
    assert L.weight_edm(abs(value) + 0.1).item() == pytest.approx(L.weight_edm(full.abs() + 0.1)[0].item(), rel=1e-6)


def test_no_nan_or_inf_float32():
    l = torch.linspace(-30, 30, 241)
    for k in TARGETS:
        assert torch.isfinite(L.weight_min_snr(l, target=k)).all()
        for j in TARGETS:
            assert torch.isfinite(L.mse_conversion(l, from_target=k, to_target=j)).all()
    assert torch.isfinite(L.weight_edm(torch.exp(-0.5 * l))).all()
    gen = torch.Generator().manual_seed(0)
    v_pred, z, eps = (torch.randn(241, 5, generator=gen) for _ in range(3))
    assert torch.isfinite(L.eps_mse_from_v(v_pred, z, eps, l)).all()


def test_bad_input_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^target: expected shape \(2, 3\) \(the shape of pred\), got \(2, 4\)"):
        L.mse(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"^pred: expected a floating-point tensor, got dtype torch.int64"):
        L.mse(torch.zeros(2, 3, dtype=torch.int64), x)
    with pytest.raises(ValueError, match=r"^pred: expected a batch of shape \(B, ...\), got a 0-d tensor"):
        L.mse(torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"^logsnr: expected length B=2 \(the batch of the data\), got 3"):
        L.eps_mse_from_v(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"^eps: expected shape \(2, 3\) \(the shape of z\), got \(3, 3\)"):
        L.eps_mse_from_v(x, x, torch.zeros(3, 3), 0.0)
    with pytest.raises(TypeError, match=r"^v_pred: expected a floating-point tensor"):
        L.eps_mse_from_v(torch.zeros(2, 3, dtype=torch.int32), x, x, 0.0)
    with pytest.raises(ValueError, match=r"^gamma: expected a number > 0, got 0.0"):
        L.weight_min_snr(0.0, gamma=0.0)
    with pytest.raises(ValueError, match=r"^target: expected one of 'eps', 'x', 'v', got 'score'"):
        L.weight_min_snr(0.0, target="score")
    with pytest.raises(ValueError, match=r"^from_target: expected one of 'eps', 'x', 'v', got 'X'"):
        L.mse_conversion(0.0, from_target="X")
    with pytest.raises(TypeError, match=r"^logsnr: expected a floating-point tensor.*got dtype torch.int64"):
        L.weight_min_snr(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"^sigma: expected values > 0.0, got min -1"):
        L.weight_edm(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"^sigma_data: expected > 0, got 0"):
        L.weight_edm(1.0, sigma_data=0.0)
    with pytest.raises(ValueError, match=r"^target: expected shape \(2, 1, 4, 4\) \(the shape of pred\), got"):
        L.multiscale_mse(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 2))


def test_import_kdiff_loads_neither_numba_nor_triton():
    """``import kdiff`` stays light: the kernels (numba, Triton) load on the first multiscale_mse call."""
    import os
    import subprocess
    import sys

    code = ("import sys, kdiff, kdiff.losses, kdiff.solvers, kdiff.elbo; "
            "print(sorted(m for m in ('numba', 'triton', 'kdiff.kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.stdout.strip() == "[]"
