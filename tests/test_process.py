"""kdiff.process against DDPM's tables (Eq. 6-7), Bayes' rule on the joint Gaussian of (z_s, z_t), and
high-precision (mpmath) evaluations of the textbook formulas."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special
from strategies import floats_for

from kdiff import process as P
from kdiff import schedules as S

DTYPES = [torch.float32, torch.float64]
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TINY = {torch.float32: float(np.finfo(np.float32).smallest_subnormal),
        torch.float64: float(np.finfo(np.float64).smallest_subnormal)}
LOGSNR_BOUND = {torch.float32: 15.0, torch.float64: 30.0}
SHAPES = st.sampled_from([(), (3,), (2, 3), (3, 4, 5)])  # trailing dims after the batch


@st.composite
def batches(draw, dtype: torch.dtype, *, n: int = 2) -> tuple[torch.Tensor, ...]:
    """``n`` standard-normal tensors of one random shape (B, ...) with B in 1..4."""
    shape = (draw(st.integers(1, 4)), *draw(SHAPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(n))


@st.composite
def logsnr_pairs(draw, dtype: torch.dtype, size: int, *, min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsnr_s, logsnr_t)`` of length ``size`` with ``logsnr_s >= logsnr_t + min_gap``."""
    b = LOGSNR_BOUND[dtype]
    ls, lt = [], []
    for _ in range(size):
        lo = draw(floats_for(dtype, -b, b - min_gap))
        ls.append(draw(floats_for(dtype, lo + min_gap, b)))
        lt.append(lo)
    return torch.tensor(ls, dtype=dtype), torch.tensor(lt, dtype=dtype)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def col(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-sample vector right-padded to the data rank."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def assert_lin_close(actual: torch.Tensor, expected: np.ndarray, terms: list[np.ndarray], dtype: torch.dtype,
                     *, k: float = 16.0, scale: np.ndarray | float = 1.0) -> None:
    """|actual - expected| <= k u scale (sum|term| + |expected|): the rounding bound of a sum of ``terms``
    evaluated in working precision ``u``. A coefficient formed as exp(sum of logs of size ~|l|) carries a
    relative error ~u |l|: pass ``scale = 1 + |l_s| + |l_t|`` for those."""
    u = UNIT[dtype]
    bound = k * u * scale * (sum(np.abs(t) for t in terms) + np.abs(expected))
    err = np.abs(np64(actual) - expected)
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"


# ---------------------------------------------------------------------------------------------
# Oracles


def mp_alpha2(l: float) -> mpmath.mpf:
    return 1 / (1 + mpmath.exp(-mpmath.mpf(l)))


def mp_digits(ls: float, lt: float) -> int:
    """Working digits for a literal evaluation: 40 plus the ~log10(1 / gap) that the cancellation eats."""
    return 40 + (max(0, int(-math.log10(ls - lt))) if ls > lt else 0)


def mp_var_ts(ls: float, lt: float) -> float:
    """sigma_t^2 - (alpha_t^2 / alpha_s^2) sigma_s^2 evaluated literally in high precision."""
    with mpmath.workdps(mp_digits(ls, lt)):
        a2s, a2t = mp_alpha2(ls), mp_alpha2(lt)
        return float((1 - a2t) - a2t / a2s * (1 - a2s))


def bayes_coefficients(ls: float, lt: float) -> tuple[float, float, float]:
    """q(z_s | z_t, x) by Bayes' rule on the joint Gaussian of (z_s, z_t) given x, in high precision:
    z_s ~ N(alpha_s x, sigma_s^2) and z_t = (alpha_t / alpha_s) z_s + noise, so C = Cov(z_s, z_t) =
    (alpha_t / alpha_s) sigma_s^2 and V = Var z_t = sigma_t^2; the conditional mean is
    alpha_s x + (C / V)(z_t - alpha_t x) and the variance sigma_s^2 - C^2 / V. At ls = lt, z_s = z_t.
    Returns (coefficient of z_t, coefficient of x, variance)."""
    if ls == lt:
        return 1.0, 0.0, 0.0
    with mpmath.workdps(mp_digits(ls, lt)):
        a2s, a2t = mp_alpha2(ls), mp_alpha2(lt)
        cov = mpmath.sqrt(a2t / a2s) * (1 - a2s)
        gain = cov / (1 - a2t)
        return float(gain), float(mpmath.sqrt(a2s) - gain * mpmath.sqrt(a2t)), float((1 - a2s) - cov**2 / (1 - a2t))


def bayes_conditional(x: np.ndarray, z_t: np.ndarray, ls: np.ndarray, lt: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean and variance of q(z_s | z_t, x) (:func:`bayes_coefficients` per sample), and the mean's two terms."""
    gain, c_x, var = (col(np.array(c), x.ndim) for c in zip(*(bayes_coefficients(a, b) for a, b in zip(ls, lt))))
    term_z, term_x = gain * z_t, c_x * x
    return term_z + term_x, var, term_z, term_x


def ddpm_tables(kind: str, T: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(betas, alphas_bar) in float64 numpy: DDPM's linear betas or iDDPM's clipped cosine."""
    if kind == "linear":
        betas = np.linspace(1e-4, 0.02, T)
    else:
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    return betas, np.cumprod(1.0 - betas)


# ---------------------------------------------------------------------------------------------
# diffuse


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_diffuse_closed_form(dtype, data):
    x, eps = data.draw(batches(dtype))
    b = LOGSNR_BOUND[dtype]
    l = torch.tensor(data.draw(st.lists(floats_for(dtype, -b, b), min_size=x.shape[0], max_size=x.shape[0])),
                     dtype=dtype)
    z = P.diffuse(x, eps, l)
    assert z.dtype == dtype and z.shape == x.shape
    ll = col(np64(l), x.ndim)
    terms = [np.sqrt(special.expit(ll)) * np64(x), np.sqrt(special.expit(-ll)) * np64(eps)]
    assert_lin_close(z, terms[0] + terms[1], terms, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(data=st.data())
def test_diffuse_low_precision_data(dtype, data):
    x, eps = data.draw(batches(dtype))
    l = data.draw(floats_for(torch.float32, -15.0, 15.0))
    z = P.diffuse(x, eps, l)
    assert z.dtype == dtype
    ll = np.float64(np.float32(l))
    expected = np.sqrt(special.expit(ll)) * np64(x) + np.sqrt(special.expit(-ll)) * np64(eps)
    # float32 coefficients and one final rounding to the data dtype: within half an ulp of the
    # float64 value (plus float32-level slack). bf16/fp16 coefficient math would miss by ~1-2 ulp.
    err = np.abs(np64(z) - expected)
    ulp = UNIT[dtype] * 2 * 2.0 ** np.floor(np.log2(np.maximum(np.abs(expected), 2.0**-14)))
    assert (err <= 0.5 * ulp * (1 + 1e-3) + 1e-6 * np.abs(expected) + 1e-7).all()


# ---------------------------------------------------------------------------------------------
# transition


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_transition_closed_form(dtype, data):
    ls, lt = data.draw(logsnr_pairs(dtype, data.draw(st.integers(1, 6))))
    alpha_ts, var_ts = P.transition(ls, lt)
    assert alpha_ts.dtype == dtype and var_ts.dtype == dtype
    s, t = np64(ls), np64(lt)
    np.testing.assert_allclose(np64(alpha_ts), np.sqrt(special.expit(t) / special.expit(s)), rtol=64 * UNIT[dtype])
    expected = np.array([mp_var_ts(a, b) for a, b in zip(s, t)])
    # For gaps near the bottom of the range the result itself is subnormal: one spacing of absolute slack.
    np.testing.assert_allclose(np64(var_ts), expected, rtol=64 * UNIT[dtype], atol=2 * TINY[dtype])
    # The marginal: q(z_t | x) = transition applied to q(z_s | x).
    np.testing.assert_allclose(np64(alpha_ts**2 * torch.sigmoid(-ls) + var_ts), special.expit(-t),
                               rtol=64 * UNIT[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_transition_composes(dtype, data):
    b = LOGSNR_BOUND[dtype]
    triples = data.draw(st.lists(st.lists(floats_for(dtype, -b, b), min_size=3, max_size=3), min_size=1, max_size=6))
    ls, lu, lt = (torch.tensor(v, dtype=dtype) for v in zip(*(sorted(tr, reverse=True) for tr in triples)))
    a_su, v_su = P.transition(ls, lu)
    a_ut, v_ut = P.transition(lu, lt)
    a_st, v_st = P.transition(ls, lt)
    rtol = 64 * UNIT[dtype]
    np.testing.assert_allclose(np64(a_su * a_ut), np64(a_st), rtol=rtol)
    # z_t = a_ut (a_su z_s + n_su) + n_ut: variance a_ut^2 v_su + v_ut (both terms >= 0, no cancellation).
    np.testing.assert_allclose(np64(a_ut**2 * v_su + v_ut), np64(v_st), rtol=rtol, atol=1e-300)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), steps=st.integers(1, 1000))
def test_var_ts_stable_when_logsnrs_meet(dtype, data, steps):
    b = LOGSNR_BOUND[dtype]
    lt_value = data.draw(st.one_of(floats_for(dtype, -b, -0.01), floats_for(dtype, 0.01, b - 1.0)))
    # logsnr_s 1..1000 ulp above logsnr_t: sigma_t^2 - alpha_ts^2 sigma_s^2 cancels to ~steps ulp.
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    lt_np = np_dtype(lt_value)
    ls_np = lt_np + np_dtype(steps) * np.abs(np.spacing(lt_np))
    ls, lt = torch.tensor(ls_np, dtype=dtype), torch.tensor(lt_np, dtype=dtype)
    assert ls.item() > lt.item()
    _, var_ts = P.transition(ls, lt)
    expected = mp_var_ts(ls.item(), lt.item())
    assert var_ts.item() > 0
    assert var_ts.item() == pytest.approx(expected, rel=64 * UNIT[dtype])
    # The posterior variance (s given t) is the same kind of difference: sigma_s^2 (1 - SNR_t / SNR_s).
    with mpmath.workdps(mp_digits(ls.item(), lt.item())):
        a2s = 1 / (1 + mpmath.exp(-mpmath.mpf(ls.item())))
        snr_s, snr_t = mpmath.exp(mpmath.mpf(ls.item())), mpmath.exp(mpmath.mpf(lt.item()))
        post = float((1 - a2s) * (1 - snr_t / snr_s))
    x = torch.zeros(1, dtype=dtype)
    _, var = P.posterior(x, x, ls.reshape(1), lt.reshape(1))
    assert var.item() == pytest.approx(post, rel=64 * UNIT[dtype])
    assert P.posterior_logvar(ls, lt).item() == pytest.approx(math.log(post), rel=64 * UNIT[dtype], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# posterior


@pytest.mark.parametrize("table", ["linear", "cosine"])
@given(data=st.data())
@settings(max_examples=25)
def test_posterior_is_ddpm_mu_tilde_beta_tilde(table, data):
    betas, ab = ddpm_tables(table)
    T = len(betas)
    ab_prev = np.append(1.0, ab[:-1])
    x, eps = data.draw(batches(torch.float64))
    idx = np.array(data.draw(st.lists(st.integers(0, T - 1), min_size=x.shape[0], max_size=x.shape[0])))
    # The library's own tables, on the log-SNR axis; index 0's predecessor alpha_bar_0 = 1 is logsnr +inf.
    ab_lib = S.alphas_bar_from_betas(S.betas_linear(T)) if table == "linear" else S.alphas_bar_cosine(T)
    logsnr = S.logsnr_from_alphas_bar(ab_lib)
    lt = logsnr[idx]
    ls = torch.where(torch.from_numpy(idx) > 0, logsnr[np.maximum(idx - 1, 0)], math.inf)
    z_t = P.diffuse(x, eps, lt)
    mean, var = P.posterior(x, z_t, ls, lt)
    # DDPM Eq. 7: mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    #             beta~ = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
    b, a, a_prev = (col(v[idx], x.ndim) for v in (betas, ab, ab_prev))
    c_x = np.sqrt(a_prev) * b / (1 - a)
    c_z = np.sqrt(1 - b) * (1 - a_prev) / (1 - a)
    z = np64(z_t)
    np.testing.assert_allclose(mean.numpy(), c_x * np64(x) + c_z * z, rtol=1e-9,
                               atol=1e-9 * (np.abs(c_x * np64(x)) + np.abs(c_z * z)).max())
    np.testing.assert_allclose(var.reshape(-1).numpy(), ((1 - a_prev) / (1 - a) * b).reshape(-1), rtol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_posterior_is_bayes_conditional(dtype, data):
    x, z_t = data.draw(batches(dtype))
    ls, lt = data.draw(logsnr_pairs(dtype, x.shape[0]))
    mean, var = P.posterior(x, z_t, ls, lt)
    assert mean.dtype == dtype and var.dtype == dtype and var.shape == (x.shape[0],) + (1,) * (x.ndim - 1)
    m, v, term_z, term_x = bayes_conditional(np64(x), np64(z_t), np64(ls), np64(lt))
    assert_lin_close(mean, m, [term_z, term_x], dtype, scale=col(1 + np.abs(np64(ls)) + np.abs(np64(lt)), x.ndim))
    np.testing.assert_allclose(np64(var), v, rtol=64 * UNIT[dtype], atol=2 * TINY[dtype])
    logvar, gap = np64(P.posterior_logvar(ls, lt)), np64(ls) > np64(lt)
    np.testing.assert_allclose(logvar[gap], np.log(v.reshape(-1)[gap]), rtol=64 * UNIT[dtype], atol=64 * UNIT[dtype])
    assert (logvar[~gap] == -np.inf).all()


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_posterior_mean_of_diffused_sample(dtype, data):
    # With z_t = diffuse(x, eps, l_t), averaging the posterior over eps gives back the forward marginal at s:
    # E[mean] = alpha_s x, since E[z_t] = alpha_t x. Checked exactly by linearity: mean(z_t) at eps = 0.
    (x,) = data.draw(batches(dtype, n=1))
    ls, lt = data.draw(logsnr_pairs(dtype, x.shape[0]))
    mean, _ = P.posterior(x, P.diffuse(x, torch.zeros_like(x), lt), ls, lt)
    alpha_s = col(np.sqrt(special.expit(np64(ls))), x.ndim)
    scale = col(1 + np.abs(np64(ls)) + np.abs(np64(lt)), x.ndim)
    assert_lin_close(mean, alpha_s * np64(x), [alpha_s * np64(x)], dtype, scale=scale)


def test_posterior_at_clean_end():
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z_t = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, var = P.posterior(x, z_t, math.inf, torch.tensor([-3.0, 0.0, 9.0], dtype=torch.float64))
    assert torch.equal(mean, x) and (var == 0).all()
    assert P.posterior_logvar(math.inf, 2.0).item() == -math.inf
    alpha_ts, var_ts = P.transition(math.inf, torch.tensor([-2.0, 5.0], dtype=torch.float64))
    np.testing.assert_allclose(alpha_ts.numpy(), np.sqrt(special.expit([-2.0, 5.0])), rtol=1e-15)
    np.testing.assert_allclose(var_ts.numpy(), special.expit([2.0, -5.0]), rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Broadcasting, precision, numerical health, bad input


@given(data=st.data())
def test_scalar_and_batch_logsnr_agree(data):
    x, eps = data.draw(batches(torch.float32))
    B = x.shape[0]
    ls = data.draw(floats_for(torch.float32, -5.0, 15.0))
    lt = data.draw(floats_for(torch.float32, -15.0, ls))
    full_s, full_t = torch.full((B,), ls), torch.full((B,), lt)
    torch.testing.assert_close(P.diffuse(x, eps, lt), P.diffuse(x, eps, full_t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(P.diffuse(x, eps, torch.tensor(lt)), P.diffuse(x, eps, full_t), rtol=1e-6, atol=1e-7)
    m1, v1 = P.posterior(x, eps, ls, lt)
    m2, v2 = P.posterior(x, eps, full_s, full_t)
    torch.testing.assert_close(m1.expand_as(m2), m2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v1.expand_as(v2), v2, rtol=1e-6, atol=1e-12)
    a1, w1 = P.transition(ls, lt)
    a2, w2 = P.transition(full_s, full_t)
    torch.testing.assert_close(a1.expand_as(a2), a2, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(w1.expand_as(w2), w2, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_posterior_low_precision_data(dtype):
    gen = torch.Generator().manual_seed(3)
    x, z_t = torch.randn(4, 8, generator=gen).to(dtype), torch.randn(4, 8, generator=gen).to(dtype)
    ls, lt = torch.tensor([6.0, 2.0, 0.5, -3.0]), torch.tensor([5.9, -1.0, 0.4, -8.0])
    mean, var = P.posterior(x, z_t, ls, lt)
    assert mean.dtype == dtype and var.dtype == torch.float32
    m, v, _, _ = bayes_conditional(np64(x), np64(z_t), np64(ls), np64(lt))
    np.testing.assert_allclose(np64(var), v, rtol=1e-5)
    # One rounding to the data dtype at the end: half an ulp, relative.
    np.testing.assert_allclose(np64(mean), m, rtol=UNIT[dtype] * 1.01, atol=1e-5)


def test_no_nan_or_inf_float32():
    grid = torch.linspace(-30, 30, 121)
    ls, lt = torch.meshgrid(grid, grid, indexing="ij")
    keep = ls >= lt
    ls, lt = ls[keep], lt[keep]
    alpha_ts, var_ts = P.transition(ls, lt)
    x = torch.randn(ls.shape[0], 3, generator=torch.Generator().manual_seed(0))
    mean, var = P.posterior(x, P.diffuse(x, x, lt), ls, lt)
    for out in (alpha_ts, var_ts, mean, var, P.diffuse(x, x, ls)):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (var_ts >= 0).all() and (var >= 0).all()
    logvar = P.posterior_logvar(ls, lt)
    assert torch.isfinite(logvar[ls > lt]).all()


def test_bad_input_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^eps: expected shape \(2, 3\) \(the shape of x\), got \(2, 4\)"):
        P.diffuse(x, torch.zeros(2, 4), 0.0)
    with pytest.raises(ValueError, match=r"^logsnr: expected length B=2 \(the batch of the data\), got 3"):
        P.diffuse(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"^logsnr: expected a scalar or a 1-D tensor.*got shape \(2, 1\)"):
        P.diffuse(x, x, torch.zeros(2, 1))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor, got dtype torch.int64"):
        P.diffuse(torch.zeros(2, 3, dtype=torch.int64), x, 0.0)
    with pytest.raises(TypeError, match=r"^logsnr: expected a floating-point tensor.*got dtype torch.int64"):
        P.diffuse(x, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"^z_t: expected shape \(2, 3\) \(the shape of x\), got \(3, 3\)"):
        P.posterior(x, torch.zeros(3, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"^logsnr_s: expected length B=2 \(the batch of the data\), got 5"):
        P.posterior(x, x, torch.ones(5), 0.0)
    with pytest.raises(ValueError, match=r"^logsnr_s: expected logsnr_s >= logsnr_t .*= -1"):
        P.posterior(x, x, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^logsnr_s: expected logsnr_s >= logsnr_t"):
        P.transition(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]))
    with pytest.raises(TypeError, match=r"^logsnr_t: expected a float or a floating-point tensor, got str"):
        P.transition(1.0, "0.5")


# ----------------------------------------------------------------------------------------------
# Step variance, learned range, and the limits at infinite log-SNR


@pytest.mark.parametrize("l_s, l_t", [(3.0, -2.0), (12.0, 11.5), (-4.0, -9.0), (0.1, 0.0999), (math.inf, 1.5)])
def test_transition_logvar_is_log_one_minus_alpha_ratio(l_s, l_t):
    """log beta = log(1 - alpha_t^2 / alpha_s^2), evaluated with mpmath at 50 digits."""
    mpmath.mp.dps = 50
    sig = lambda l: 1 / (1 + mpmath.exp(-mpmath.mpf(l))) if math.isfinite(l) else mpmath.mpf(1)
    expected = float(mpmath.log(1 - sig(l_t) / sig(l_s)))
    got = P.transition_logvar(torch.tensor(l_s, dtype=torch.float64), torch.tensor(l_t, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    _, var = P.transition(torch.tensor(l_s, dtype=torch.float64), torch.tensor(l_t, dtype=torch.float64))
    assert math.log(var.item()) == pytest.approx(expected, rel=1e-12)


def test_learned_range_logvar_interpolates():
    lb, lbt = torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.tensor([-2.0, -5.0], dtype=torch.float64)
    for f in (0.0, 0.25, 1.0):
        frac = torch.full((2,), f, dtype=torch.float64)
        torch.testing.assert_close(P.learned_range_logvar(frac, lb, lbt), f * lb + (1 - f) * lbt)


def test_posterior_at_pure_noise_and_equal_infinite_levels():
    """At logsnr_t = -inf, z_t carries no information: q(z_s | z_t, x) = q(z_s | x) = N(alpha_s x, sigma_s^2)."""
    x, z = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    l_s = torch.tensor([2.0, -1.0, math.inf], dtype=torch.float64)
    mean, var = P.posterior(x, z, l_s, -math.inf)
    a2 = torch.sigmoid(l_s)[:, None]
    torch.testing.assert_close(mean, a2.sqrt() * x)
    torch.testing.assert_close(var, 1 - a2)
    mean, var = P.posterior(x, x, math.inf, math.inf)  # a step of length zero on clean data
    torch.testing.assert_close(mean, x)
    assert var.item() == 0.0
    alpha_ts, var_ts = P.transition(math.inf, math.inf)
    assert alpha_ts.item() == 1.0 and var_ts.item() == 0.0
    alpha_ts, var_ts = P.transition(1.0, -math.inf)
    assert alpha_ts.item() == 0.0 and var_ts.item() == 1.0
