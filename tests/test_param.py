"""kdiff.param against the textbook division forms in float64 numpy, autograd on the Gaussian log-density,
and the Gaussian-data derivation of EDM's preconditioning (EDM App. B.6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import special
from strategies import cases, floats_for

from kdiff import param
from kdiff import process as P

DTYPES = [torch.float32, torch.float64]
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def col(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def alpha_sigma64(l: torch.Tensor, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    ll = col(np64(l), ndim)
    return np.sqrt(special.expit(ll)), np.sqrt(special.expit(-ll))


def assert_lin_close(actual: torch.Tensor, terms: list[np.ndarray], l: torch.Tensor, dtype: torch.dtype,
                     *, k: float = 16.0) -> None:
    """``actual`` equals ``sum(terms)`` up to the rounding bound of that sum in precision ``u``, each
    coefficient (an exp of a softplus of l) carrying ~u (1 + |l|) relative error."""
    expected = sum(terms)
    scale = col(1.0 + np.abs(np64(l)), expected.ndim)
    bound = k * UNIT[dtype] * scale * (sum(np.abs(t) for t in terms) + np.abs(expected))
    err = np.abs(np64(actual) - expected)
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"


# ---------------------------------------------------------------------------------------------
# Each conversion against its division form, for independent random inputs (the maps are linear)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_conversions_closed_form(dtype, data):
    a, b, l = data.draw(cases(dtype, n=2))
    alpha, sigma = alpha_sigma64(l, a.ndim)
    p, q = np64(a), np64(b)
    assert_lin_close(param.x_from_eps(a, b, l), [p / alpha, -sigma * q / alpha], l, dtype)  # (z - sigma eps) / alpha
    assert_lin_close(param.eps_from_x(a, b, l), [p / sigma, -alpha * q / sigma], l, dtype)  # (z - alpha x) / sigma
    assert_lin_close(param.v_from_x_eps(a, b, l), [alpha * q, -sigma * p], l, dtype)  # alpha eps - sigma x
    assert_lin_close(param.x_from_v(a, b, l), [alpha * p, -sigma * q], l, dtype)  # alpha z - sigma v
    assert_lin_close(param.eps_from_v(a, b, l), [sigma * p, alpha * q], l, dtype)  # sigma z + alpha v
    assert_lin_close(param.v_from_x(a, b, l), [alpha * p / sigma, -q / sigma], l, dtype)  # (alpha z - x) / sigma
    assert_lin_close(param.v_from_eps(a, b, l), [q / alpha, -sigma * p / alpha], l, dtype)  # (eps - sigma z) / alpha
    assert_lin_close(param.score_from_eps(a, l), [-p / sigma], l, dtype)
    assert_lin_close(param.eps_from_score(a, l), [-sigma * p], l, dtype)


# ---------------------------------------------------------------------------------------------
# Round trips on a consistent triple z = alpha x + sigma eps, v = alpha eps - sigma x


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_round_trips(dtype, data):
    x, eps, l = data.draw(cases(dtype, n=2))
    z = P.diffuse(x, eps, l)
    alpha, sigma = alpha_sigma64(l, x.ndim)
    # Errors of z (and of each step) are amplified by up to 1/alpha or 1/sigma: the bound scales with them.
    cond = col(1.0 + np.abs(np64(l)), x.ndim) / np.minimum(alpha, sigma)
    size = np.abs(np64(x)) + np.abs(np64(eps))
    tol = 16 * UNIT[dtype] * cond * size

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        assert actual.dtype == dtype
        err = np.abs(np64(actual) - np64(expected))
        assert (err <= tol).all(), f"max err {err.max():.3g}, tol there {tol.flat[err.argmax()]:.3g}"

    close(param.x_from_eps(z, eps, l), x)
    close(param.eps_from_x(z, x, l), eps)
    close(param.x_from_eps(z, param.eps_from_x(z, x, l), l), x)
    close(param.eps_from_x(z, param.x_from_eps(z, eps, l), l), eps)
    v = param.v_from_x_eps(x, eps, l)
    close(param.x_from_v(z, v, l), x)
    close(param.eps_from_v(z, v, l), eps)
    close(param.v_from_x(z, x, l), v)
    close(param.v_from_eps(z, eps, l), v)
    close(param.eps_from_score(param.score_from_eps(eps, l), l), eps)


# ---------------------------------------------------------------------------------------------
# Score: the gradient of the Gaussian log-density


@given(data=st.data())
def test_score_from_eps_is_grad_log_density(data):
    x, eps, l = data.draw(cases(torch.float64, n=2, bound=20.0))
    alpha, sigma = (torch.from_numpy(c) for c in alpha_sigma64(l, x.ndim))
    z = (alpha * x + sigma * eps).requires_grad_(True)
    log_q = torch.distributions.Normal(alpha * x, sigma).log_prob(z).sum()
    (grad,) = torch.autograd.grad(log_q, z)
    # eps as the data-consistent (z - alpha x) / sigma, so both sides see one z.
    eps_z = (z.detach() - alpha * x) / sigma
    torch.testing.assert_close(param.score_from_eps(eps_z, l), grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param.eps_from_score(grad, l), eps_z, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# EDM preconditioning


SIGMAS = st.floats(1e-3, 1e3)
SIGMA_DATA = st.floats(0.05, 5.0)


@given(sigma=st.lists(SIGMAS, min_size=1, max_size=8), sd=SIGMA_DATA)
def test_edm_precond_closed_forms(sigma, sd):
    s = np.array(sigma)
    c_skip, c_out, c_in, c_noise = param.edm_precond(torch.tensor(sigma, dtype=torch.float64), sigma_data=sd)
    # EDM Table 1.
    np.testing.assert_allclose(c_skip.numpy(), sd**2 / (s**2 + sd**2), rtol=1e-13)
    np.testing.assert_allclose(c_out.numpy(), s * sd / np.sqrt(s**2 + sd**2), rtol=1e-13)
    np.testing.assert_allclose(c_in.numpy(), 1 / np.sqrt(s**2 + sd**2), rtol=1e-13)
    np.testing.assert_allclose(c_noise.numpy(), np.log(s) / 4, rtol=1e-13, atol=1e-15)


@given(sigma=st.lists(SIGMAS, min_size=1, max_size=8), sd=SIGMA_DATA)
def test_edm_precond_gaussian_derivation(sigma, sd):
    """EDM App. B.6 for data y ~ N(0, sd^2), x = y + n, n ~ N(0, sigma^2):
    - c_in makes the network input unit-variance: c_in^2 Var(x) = 1;
    - c_skip x is E[y | x] (regression of y on x: Cov(y, x) / Var(x) = sd^2 / (sd^2 + sigma^2));
    - the training target (y - c_skip x) / c_out has unit variance, so c_out^2 = Var(y - c_skip x)
      = (1 - c_skip)^2 sd^2 + c_skip^2 sigma^2, which is Var(y | x) = sd^2 sigma^2 / (sd^2 + sigma^2);
    - the law of total variance, Var(y) = Var(E[y|x]) + E[Var(y|x)]: c_skip^2 (sd^2 + sigma^2) + c_out^2 = sd^2."""
    s = np.array(sigma)
    c_skip, c_out, c_in, _ = (c.numpy() for c in param.edm_precond(torch.tensor(sigma, dtype=torch.float64),
                                                                 sigma_data=sd))
    var_x, cov_yx = sd**2 + s**2, sd**2
    np.testing.assert_allclose(c_in**2 * var_x, 1.0, rtol=1e-13)
    np.testing.assert_allclose(c_skip, cov_yx / var_x, rtol=1e-13)
    # 1 - c_skip ~ sigma^2 / sd^2 for small sigma: the test's own subtraction costs ~eps sd^2 / sigma^2.
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-13 * (1 + sd**2 / s**2).max())
    np.testing.assert_allclose(c_out**2, 1 / (1 / sd**2 + 1 / s**2), rtol=1e-13)  # Gaussian posterior variance
    np.testing.assert_allclose(c_skip**2 * var_x + c_out**2, sd**2, rtol=1e-13)


@given(sigma=st.lists(floats_for(torch.float32, 2e-3, 80.0), min_size=1, max_size=8))
def test_edm_precond_float32(sigma):
    c = param.edm_precond(torch.tensor(sigma))
    c64 = param.edm_precond(torch.tensor(sigma, dtype=torch.float64))
    for a, b in zip(c, c64):
        assert a.dtype == torch.float32
        np.testing.assert_allclose(np64(a), b.numpy(), rtol=1e-6, atol=1e-7)


def test_edm_precond_scalar_and_batch():
    sig = [0.002, 0.5, 1.0, 80.0]
    batch = param.edm_precond(torch.tensor(sig, dtype=torch.float64))
    for i, s in enumerate(sig):
        for a, b in zip(param.edm_precond(s), batch):
            assert a.ndim == 0 and a.item() == pytest.approx(b[i].item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Broadcasting, precision, numerical health, bad input


CONVERSIONS = [param.x_from_eps, param.eps_from_x, param.v_from_x_eps, param.x_from_v, param.eps_from_v,
               param.v_from_x, param.v_from_eps]
UNARY = [param.score_from_eps, param.eps_from_score]


@given(data=st.data())
def test_scalar_and_batch_logsnr_agree(data):
    a, b, l = data.draw(cases(torch.float32, n=2))
    value = l[0].item()
    full = torch.full((a.shape[0],), value)
    for fn in CONVERSIONS:
        torch.testing.assert_close(fn(a, b, value), fn(a, b, full), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fn(a, b, torch.tensor(value)), fn(a, b, full), rtol=1e-6, atol=1e-6)
    for fn in UNARY:
        torch.testing.assert_close(fn(a, value), fn(a, full), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scalar", [False, True])
@given(data=st.data())
def test_low_precision_data_get_float32_coefficients(dtype, scalar, data):
    a, b, l = data.draw(cases(torch.float32, n=2, bound=8.0))
    a, b = a.to(dtype), b.to(dtype)
    arg = l[0].item() if scalar else l
    l_b = torch.full_like(l, l[0].item()) if scalar else l
    alpha, sigma = alpha_sigma64(l_b, a.ndim)
    p, q = np64(a), np64(b)
    checks = [(param.x_from_eps(a, b, arg), [p / alpha, -sigma * q / alpha]),
              (param.eps_from_x(a, b, arg), [p / sigma, -alpha * q / sigma]),
              (param.v_from_x_eps(a, b, arg), [alpha * q, -sigma * p]),
              (param.x_from_v(a, b, arg), [alpha * p, -sigma * q]),
              (param.eps_from_v(a, b, arg), [sigma * p, alpha * q]),
              (param.v_from_x(a, b, arg), [alpha * p / sigma, -q / sigma]),
              (param.v_from_eps(a, b, arg), [q / alpha, -sigma * p / alpha]),
              (param.score_from_eps(a, arg), [-p / sigma])]
    for out, terms in checks:
        assert out.dtype == dtype
        expected = sum(terms)
        # float32 math, then one rounding to the data dtype: half an ulp of the result, plus the float32
        # rounding of the terms. Coefficients rounded to bf16/fp16 would miss by whole ulps.
        half_ulp = UNIT[dtype] * 2.0 ** np.floor(np.log2(np.maximum(np.abs(expected), 2.0**-14)))
        slack = 16 * UNIT[torch.float32] * col(1 + np.abs(np64(l_b)), a.ndim) * sum(np.abs(t) for t in terms)
        bound = 1.001 * half_ulp + slack
        err = np.abs(np64(out) - expected)
        assert (err <= bound).all(), f"{err.max():.3g} > {bound.flat[err.argmax()]:.3g}"


def test_no_nan_or_inf_float32():
    l = torch.linspace(-30, 30, 241)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(241, 3, generator=gen), torch.randn(241, 3, generator=gen)
    for fn in CONVERSIONS:
        out = fn(a, b, l)
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), fn.__name__
    for fn in UNARY:
        assert torch.isfinite(fn(a, l)).all()
    for c in param.edm_precond(param.edm_precond(torch.exp(-0.5 * l))[2]):
        assert torch.isfinite(c).all()


@pytest.mark.parametrize("fn", CONVERSIONS, ids=lambda f: f.__name__)
def test_conversion_bad_input(fn):
    first, second = fn.__code__.co_varnames[:2]
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=rf"^{second}: expected shape \(2, 3\) \(the shape of {first}\), got \(2, 1\)"):
        fn(x, torch.zeros(2, 1), 0.0)
    with pytest.raises(ValueError, match=r"^logsnr: expected length B=2 \(the batch of the data\), got 4"):
        fn(x, x, torch.zeros(4))
    with pytest.raises(TypeError, match=rf"^{first}: expected a floating-point tensor, got dtype torch.int64"):
        fn(torch.zeros(2, 3, dtype=torch.int64), x, 0.0)
    with pytest.raises(TypeError, match=rf"^{second}: expected a floating-point tensor, got dtype torch.int32"):
        fn(x, torch.zeros(2, 3, dtype=torch.int32), 0.0)
    with pytest.raises(TypeError, match=r"^logsnr: expected a floating-point tensor.*got dtype torch.int64"):
        fn(x, x, torch.zeros(2, dtype=torch.int64))


def test_bad_input_errors():
    with pytest.raises(TypeError, match=r"^eps: expected a floating-point tensor"):
        param.score_from_eps(torch.zeros(2, dtype=torch.int64), 0.0)
    with pytest.raises(ValueError, match=r"^logsnr: expected length B=3"):
        param.eps_from_score(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"^sigma: expected values > 0.0, got min -0.5"):
        param.edm_precond(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"^sigma: expected values > 0.0, got min 0"):
        param.edm_precond(0.0)
    with pytest.raises(ValueError, match=r"^sigma_data: expected > 0, got -1"):
        param.edm_precond(1.0, sigma_data=-1.0)
    with pytest.raises(TypeError, match=r"^sigma: expected a floating-point tensor.*got dtype torch.int64"):
        param.edm_precond(torch.tensor([1, 2]))
    assert math.isfinite(param.edm_precond(1e-30)[3].item())
