"""kdiff.schedules against float64 numpy / scipy closed forms written out from the papers."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats
from strategies import floats_for

from kdiff import schedules as S

DTYPES = [torch.float32, torch.float64]
# fp32 math: rtol ~1e-5 (STYLE.md); float64: near machine precision.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
# logsnr ranges: [-15, 15] in float32, wider in float64.
LOGSNR_BOUND = {torch.float32: 15.0, torch.float64: 40.0}
# Differences of logs: absolute error a few ulp of the summands (|log| <= ~20).
LOG_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def vectors(dtype: torch.dtype, lo: float, hi: float, *, max_size: int = 8) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(floats_for(dtype, lo, hi), min_size=1, max_size=max_size).map(
        lambda v: torch.tensor(v, dtype=dtype))


def grid_times(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    """Increasing times on the grid k / 10^6 in [0, 1], at least two."""
    return st.lists(st.integers(0, 10**6), min_size=2, max_size=12, unique=True).map(
        lambda ks: torch.tensor(sorted(ks), dtype=torch.float64).div(10**6).to(dtype))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, **tol: float) -> None:
    np.testing.assert_allclose(np64(actual), expected, **(tol or TOL[dtype]))


# ---------------------------------------------------------------------------------------------
# numpy oracles, written from the papers


def sd_cosine(t: np.ndarray, lmin: float = -15.0, lmax: float = 15.0) -> np.ndarray:
    """simple diffusion, logsnr_schedule_cosine (pseudocode, Sec. 2)."""
    t_min, t_max = np.arctan(np.exp(-0.5 * lmax)), np.arctan(np.exp(-0.5 * lmin))
    return -2.0 * np.log(np.tan(t_min + t * (t_max - t_min)))


def sd_shifted(t: np.ndarray, image_d: int, noise_d: int) -> np.ndarray:
    """simple diffusion, logsnr_schedule_cosine_shifted: + 2 log(noise_d / image_d)."""
    return sd_cosine(t) + 2.0 * np.log(noise_d / image_d)


def sd_interpolated(t: np.ndarray, image_d: int, noise_d_low: int, noise_d_high: int) -> np.ndarray:
    """simple diffusion, logsnr_schedule_cosine_interpolated."""
    low = sd_shifted(t, image_d, noise_d_low)
    high = sd_shifted(t, image_d, noise_d_high)
    return t * low + (1.0 - t) * high


def iddpm_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """iDDPM Eq. 17 with betas 1 - abar(t)/abar(t-1) clipped at max_beta, cumulated back: (alphas_bar, betas)."""
    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = np.array([min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)])
    return np.cumprod(1.0 - betas), betas


def edm_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """EDM Eq. 5, i = 0..n-1, then sigma_N = 0."""
    i = np.arange(n, dtype=np.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return np.append((a + i / (n - 1) * (b - a)) ** rho, 0.0)


# ---------------------------------------------------------------------------------------------
# VP log-SNR algebra


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_alpha_sigma_closed_form_and_unit_variance(dtype, data):
    b = LOGSNR_BOUND[dtype]
    l = data.draw(vectors(dtype, -b, b))
    alpha, sigma = S.alpha_sigma(l)
    assert alpha.dtype == dtype and sigma.dtype == dtype and alpha.shape == l.shape
    ll = np64(l)
    assert_close(alpha, np.sqrt(special.expit(ll)), dtype)
    assert_close(sigma, np.sqrt(special.expit(-ll)), dtype)
    assert_close(alpha.square() + sigma.square(), np.ones_like(ll), dtype)
    # log-SNR back from (alpha, sigma): the identity log(alpha^2 / sigma^2) = logsnr.
    # log alpha - log sigma: absolute error ~ ulp(1) per log in float32.
    assert_close(S.logsnr_from_alpha_sigma(alpha, sigma), ll, dtype, **LOG_TOL[dtype])
    assert_close(S.alphas_bar_from_logsnr(l), special.expit(ll), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_sigma_logsnr_round_trip(dtype, data):
    b = LOGSNR_BOUND[dtype]
    l = data.draw(vectors(dtype, -b, b))
    sigma = S.sigma_from_logsnr(l)
    assert_close(sigma, np.exp(-0.5 * np64(l)), dtype)
    assert_close(S.logsnr_from_sigma(sigma), np64(l), dtype, **LOG_TOL[dtype])
    s = data.draw(vectors(dtype, 1e-3, 1e3))
    assert_close(S.logsnr_from_sigma(s), -2.0 * np.log(np64(s)), dtype)
    assert_close(S.sigma_from_logsnr(S.logsnr_from_sigma(s)), np64(s), dtype)


def test_logsnr_from_sigma_zero_is_clean():
    assert S.logsnr_from_sigma(0.0).item() == math.inf


# ---------------------------------------------------------------------------------------------
# Discrete tables


@given(T=st.integers(1, 2000), start=st.floats(1e-6, 1e-2), width=st.floats(0.0, 0.5))
def test_betas_linear_endpoints(T, start, width):
    end = start + width
    betas = S.betas_linear(T, beta_start=start, beta_end=end)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), np.linspace(start, end, T), rtol=1e-12, atol=1e-15)
    assert betas[0].item() == pytest.approx(start, rel=1e-14)
    if T > 1:
        assert betas[-1].item() == pytest.approx(end, rel=1e-14)


def test_betas_linear_ddpm_defaults():
    betas = S.betas_linear(1000)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-14)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-14)


@given(T=st.integers(1, 2000), s=st.floats(1e-4, 0.05), max_beta=st.sampled_from([0.999, 0.99, 0.5]))
def test_alphas_bar_cosine_matches_iddpm(T, s, max_beta):
    ab = S.alphas_bar_cosine(T, s=s, max_beta=max_beta)
    expected, betas = iddpm_cosine(T, s=s, max_beta=max_beta)
    assert ab.shape == (T,) and ab.dtype == torch.float64
    np.testing.assert_allclose(ab.numpy(), expected, rtol=1e-10, atol=1e-300)
    # The last beta, 1 - f(T)/f(T-1) = 1 - cos(pi/2)^2 / ..., always hits the cap.
    assert betas[-1] == max_beta
    np.testing.assert_allclose(S.betas_from_alphas_bar(ab).numpy(), betas, rtol=1e-9, atol=1e-14)


@given(betas=st.lists(st.floats(1e-6, 0.999), min_size=1, max_size=60))
def test_betas_alphas_bar_round_trip(betas):
    b = torch.tensor(betas, dtype=torch.float64)
    ab = S.alphas_bar_from_betas(b)
    np.testing.assert_allclose(ab.numpy(), np.cumprod(1.0 - np.array(betas)), rtol=1e-11, atol=1e-300)
    # alpha_bar is held as exp(sum log(1 - beta)): each ratio comes back to ~eps |log alpha_bar| absolute.
    atol = 8 * np.finfo(np.float64).eps * np.abs(np.log(ab.numpy())).max()
    np.testing.assert_allclose(S.betas_from_alphas_bar(ab).numpy(), betas, rtol=1e-9, atol=atol)


@given(ab=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=60))
def test_alphas_bar_betas_round_trip(ab):
    a = torch.tensor(sorted(ab, reverse=True), dtype=torch.float64)
    betas = S.betas_from_alphas_bar(a)
    assert (betas >= 0).all() and (betas < 1).all()
    # beta stores 1 - r for the ratio r = abar_t / abar_{t-1} >= 1e-4, so r comes back to ~eps / r relative.
    np.testing.assert_allclose(S.alphas_bar_from_betas(betas).numpy(), a.numpy(), rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_logsnr_from_alphas_bar_is_logit(dtype, data):
    ab = data.draw(vectors(dtype, 1e-5, 1.0 - 1e-4))
    l = S.logsnr_from_alphas_bar(ab)
    assert l.dtype == dtype
    assert_close(l, special.logit(np64(ab)), dtype, **LOG_TOL[dtype])
    assert_close(S.alphas_bar_from_logsnr(l), np64(ab), dtype)


@pytest.mark.parametrize("table", ["linear", "cosine"])
def test_ddpm_tables_on_logsnr_axis_decrease(table):
    ab = S.alphas_bar_from_betas(S.betas_linear(1000)) if table == "linear" else S.alphas_bar_cosine(1000)
    l = S.logsnr_from_alphas_bar(ab)
    assert torch.isfinite(l).all() and (l.diff() < 0).all()
    np.testing.assert_allclose(l.numpy(), special.logit(ab.numpy()), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Continuous schedules (simple diffusion)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_logsnr_cosine_closed_form(dtype, data):
    t = data.draw(vectors(dtype, 0.0, 1.0))
    l = S.logsnr_cosine(t)
    assert l.dtype == dtype
    assert_close(l, sd_cosine(np64(t)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(lmin=st.floats(-20.0, -1.0), lmax=st.floats(1.0, 20.0))
def test_logsnr_cosine_endpoints(dtype, lmin, lmax):
    l = S.logsnr_cosine(torch.tensor([0.0, 1.0], dtype=dtype), logsnr_min=lmin, logsnr_max=lmax)
    assert_close(l, np.array([lmax, lmin]), dtype, rtol=1e-6 if dtype == torch.float32 else 1e-11, atol=0)
    default = S.logsnr_cosine(torch.tensor([0.0, 1.0], dtype=dtype))
    assert_close(default, np.array([15.0, -15.0]), dtype, rtol=1e-6 if dtype == torch.float32 else 1e-11, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_logsnr_cosine_monotone(dtype, data):
    t = data.draw(grid_times(dtype))
    # |dlogsnr/dt| >= 2 pi, so t spaced >= 1e-6 apart give logsnr >= 6e-6 apart: above float32 rounding.
    assert (S.logsnr_cosine(t).diff() < 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_logsnr_cosine_inverse_round_trip(dtype, data):
    t = data.draw(vectors(dtype, 0.0, 1.0))
    assert_close(S.t_from_logsnr_cosine(S.logsnr_cosine(t)), np64(t), dtype, rtol=0,
                 atol=2e-6 if dtype == torch.float32 else 1e-12)
    l = data.draw(vectors(torch.float64, -15.0, 15.0))
    t_l = S.t_from_logsnr_cosine(l)
    assert ((t_l >= -1e-12) & (t_l <= 1 + 1e-12)).all()
    np.testing.assert_allclose(S.logsnr_cosine(t_l.clamp(0, 1)).numpy(), l.numpy(), rtol=0, atol=1e-8)


SIZES = st.sampled_from([8, 16, 32, 64, 128, 256, 512])


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), image_size=SIZES, noise_size=SIZES)
def test_logsnr_cosine_shifted(dtype, data, image_size, noise_size):
    t = data.draw(vectors(dtype, 0.0, 1.0))
    l = S.logsnr_cosine_shifted(t, image_size=image_size, noise_size=noise_size)
    assert_close(l, sd_shifted(np64(t), image_size, noise_size), dtype, **LOG_TOL[dtype])
    shift = 2.0 * math.log(noise_size / image_size)
    ends = S.logsnr_cosine_shifted(torch.tensor([0.0, 1.0], dtype=dtype), image_size=image_size,
                                   noise_size=noise_size)
    assert_close(ends, np.array([15.0 + shift, -15.0 + shift]), dtype, rtol=1e-6, atol=1e-6)
    back = S.t_from_logsnr_cosine_shifted(l, image_size=image_size, noise_size=noise_size)
    assert_close(back, np64(t), dtype, rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), image_size=SIZES, low=SIZES, high=SIZES)
def test_logsnr_cosine_interpolated_matches_pseudocode(dtype, data, image_size, low, high):
    t = data.draw(vectors(dtype, 0.0, 1.0))
    l = S.logsnr_cosine_interpolated(t, image_size=image_size, noise_size_low=low, noise_size_high=high)
    assert l.dtype == dtype
    assert_close(l, sd_interpolated(np64(t), image_size, low, high), dtype, **LOG_TOL[dtype])


@given(image_size=SIZES, low=SIZES)
def test_logsnr_cosine_interpolated_defaults_and_ends(image_size, low):
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    l = S.logsnr_cosine_interpolated(t, image_size=image_size, noise_size_low=low)
    # noise_size_high defaults to image_size: no shift at t = 0, the full low shift at t = 1.
    np.testing.assert_allclose(l.numpy(), sd_interpolated(t.numpy(), image_size, low, image_size), rtol=1e-12)
    assert l[0].item() == pytest.approx(15.0, rel=1e-11)
    assert l[2].item() == pytest.approx(-15.0 + 2 * math.log(low / image_size), rel=1e-11)


@given(data=st.data(), image_size=SIZES, sizes=st.lists(SIZES, min_size=2, max_size=2))
def test_logsnr_cosine_interpolated_monotone_and_inverse(data, image_size, sizes):
    low, high = sorted(sizes)
    kw = dict(image_size=image_size, noise_size_low=low, noise_size_high=high)
    t = data.draw(grid_times(torch.float64))
    l = S.logsnr_cosine_interpolated(t, **kw)
    assert (l.diff() < 0).all()
    np.testing.assert_allclose(S.t_from_logsnr_cosine_interpolated(l, **kw).numpy(), t.numpy(), rtol=0, atol=1e-10)
    # float32 logsnr in, float32 t out; |dt/dlogsnr| < 1/6, so t comes back to about ulp(1).
    t32 = S.t_from_logsnr_cosine_interpolated(l.float(), **kw)
    assert t32.dtype == torch.float32
    np.testing.assert_allclose(np64(t32), t.numpy(), rtol=0, atol=1e-6)


def test_t_from_logsnr_cosine_interpolated_clips_to_ends():
    kw = dict(image_size=128, noise_size_low=32)
    t = S.t_from_logsnr_cosine_interpolated(torch.tensor([100.0, -100.0], dtype=torch.float64), **kw)
    np.testing.assert_allclose(t.numpy(), [0.0, 1.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# EDM


@given(n=st.integers(2, 300), sigma_min=st.floats(1e-4, 1.0), ratio=st.floats(1.5, 1e5), rho=st.floats(1.0, 10.0))
def test_sigmas_karras(n, sigma_min, ratio, rho):
    sigma_max = sigma_min * ratio
    sig = S.sigmas_karras(n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    assert sig.shape == (n + 1,) and sig.dtype == torch.float64
    assert sig[-1].item() == 0.0
    assert sig[0].item() == pytest.approx(sigma_max, rel=1e-12)
    assert sig[-2].item() == pytest.approx(sigma_min, rel=1e-10)
    assert (sig.diff() < 0).all()
    np.testing.assert_allclose(sig.numpy(), edm_sigmas(n, sigma_min, sigma_max, rho), rtol=1e-12)


def test_sigmas_karras_defaults():
    sig = S.sigmas_karras(18)
    np.testing.assert_allclose(sig.numpy(), edm_sigmas(18, 0.002, 80.0, 7.0), rtol=1e-12)
    assert S.sigmas_karras(1).tolist() == [80.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), p_mean=st.floats(-3.0, 3.0), p_std=st.floats(0.1, 3.0))
def test_sigma_lognormal_quantiles(dtype, data, p_mean, p_std):
    u = data.draw(vectors(dtype, -5.0, 5.0))
    sigma = S.sigma_lognormal(u, p_mean=p_mean, p_std=p_std)
    assert sigma.dtype == dtype
    # u is a standard-normal draw: sigma must be the log-normal quantile at Phi(u).
    expected = stats.lognorm(s=p_std, scale=math.exp(p_mean)).ppf(stats.norm.cdf(np64(u)))
    assert_close(sigma, expected, dtype, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=0)


def test_sigma_lognormal_defaults():
    sigma = S.sigma_lognormal(torch.tensor([0.0, 1.0], dtype=torch.float64))
    np.testing.assert_allclose(sigma.numpy(), np.exp([-1.2, 0.0]), rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# Respacing


def exact_round(q: Fraction) -> int:
    """Round half to even on an exact rational (Python's round on Fraction)."""
    return round(q)


TN = st.integers(1, 2000).flatmap(lambda T: st.tuples(st.just(T), st.integers(1, T)))


def check_indices(idx: torch.Tensor, T: int, n: int) -> None:
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert idx.min().item() >= 0 and idx.max().item() <= T - 1
    assert (idx.diff() > 0).all()
    assert len(set(idx.tolist())) == n


@given(Tn=TN)
def test_respace_trailing(Tn):
    T, n = Tn
    idx = S.respace(T, n)
    check_indices(idx, T, n)
    assert idx[-1].item() == T - 1
    # Lin et al. Table 2: round(arange(T, 0, -T/n)) - 1, evaluated exactly.
    assert idx.tolist() == sorted(exact_round(Fraction(T * (n - k), n)) - 1 for k in range(n))


@given(Tn=TN)
def test_respace_leading(Tn):
    T, n = Tn
    idx = S.respace(T, n, spacing="leading")
    check_indices(idx, T, n)
    assert idx.tolist() == list(range(0, n * (T // n), T // n))
    assert idx[0].item() == 0
    if n < T:  # the flaw trailing spacing fixes: the noisiest step is never used
        assert idx[-1].item() < T - 1


@given(Tn=TN)
def test_respace_linspace(Tn):
    T, n = Tn
    idx = S.respace(T, n, spacing="linspace")
    check_indices(idx, T, n)
    assert idx.tolist() == [exact_round(Fraction(k * (T - 1), max(n - 1, 1))) for k in range(n)]
    assert idx[0].item() == 0
    if n > 1:
        assert idx[-1].item() == T - 1


def test_respace_numpy_formula_and_tie():
    # Where no tie occurs, numpy's float formula from Lin et al. Table 2 agrees.
    for T, n in [(1000, 10), (1000, 50), (1000, 999), (4000, 250), (1000, 3)]:
        ref = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[:n] - 1
        assert S.respace(T, n).tolist() == sorted(ref.tolist())
    # T=27, n=26, k=13: 27 - 13 * 27/26 = 13.5 exactly, a tie, to even: 14, index 13. Evaluated in floats,
    # 13 * (27/26) rounds above 13.5, and index 12 came out instead.
    assert S.respace(27, 26).tolist() == [*range(12), *range(13, 27)]


# ---------------------------------------------------------------------------------------------
# Broadcasting, numerical health, bad input


@given(t=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=4))
@settings(max_examples=25)
def test_scalar_and_batch_agree(t):
    batch = torch.tensor(t)
    for fn in (S.logsnr_cosine, lambda u: S.logsnr_cosine_shifted(u, image_size=128),
               lambda u: S.logsnr_cosine_interpolated(u, image_size=128)):
        out = fn(batch)
        # Same math; only vectorised vs scalar transcendental kernels may differ, by an ulp.
        torch.testing.assert_close(torch.stack([fn(ti) for ti in t]), out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.stack([fn(torch.tensor(ti)) for ti in t]), out, rtol=1e-6, atol=1e-6)
    l = S.logsnr_cosine(batch)
    a, s = S.alpha_sigma(l)
    a1, s1 = zip(*(S.alpha_sigma(li) for li in l.tolist()))
    torch.testing.assert_close(torch.stack(a1), a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.stack(s1), s, rtol=1e-6, atol=1e-7)


def test_no_nan_or_inf_float32():
    l = torch.linspace(-30, 30, 1201)
    outs = [*S.alpha_sigma(l), S.sigma_from_logsnr(l), S.alphas_bar_from_logsnr(l), S.t_from_logsnr_cosine(l),
            S.t_from_logsnr_cosine_shifted(l, image_size=256), S.t_from_logsnr_cosine_interpolated(l, image_size=256),
            S.logsnr_from_sigma(S.sigma_from_logsnr(l))]
    for out in outs:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    t = torch.linspace(0, 1, 1001)
    for out in (S.logsnr_cosine(t), S.logsnr_cosine_shifted(t, image_size=512),
                S.logsnr_cosine_interpolated(t, image_size=512)):
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_get_float32_math(dtype):
    l = torch.tensor([-10.0, -1.0, 0.0, 3.0, 10.0], dtype=dtype)
    alpha, sigma = S.alpha_sigma(l)
    assert alpha.dtype == torch.float32
    np.testing.assert_allclose(np64(alpha), np.sqrt(special.expit(np64(l))), rtol=1e-6)
    t = torch.tensor([0.0, 0.25, 0.999], dtype=dtype)
    np.testing.assert_allclose(np64(S.logsnr_cosine(t)), sd_cosine(np64(t)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [S.logsnr_cosine, lambda t: S.logsnr_cosine_shifted(t, image_size=64),
                                lambda t: S.logsnr_cosine_interpolated(t, image_size=64)])
@pytest.mark.parametrize("bad", [1.5, -0.25, torch.tensor([0.5, 1.0001])])
def test_t_outside_unit_interval(fn, bad):
    with pytest.raises(ValueError, match=r"^t: expected values (<=|>=)"):
        fn(bad)


def test_bad_input_errors():
    with pytest.raises(TypeError, match=r"^t: expected a floating-point tensor.*got dtype torch.int64"):
        S.logsnr_cosine(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"^logsnr: .*got dtype torch.int32"):
        S.alpha_sigma(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^sigma: expected values >= 0.0, got min -1"):
        S.logsnr_from_sigma(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"^T: expected an int >= 1, got 0"):
        S.betas_linear(0)
    with pytest.raises(TypeError, match=r"^T: expected an int, got float"):
        S.alphas_bar_cosine(10.0)
    with pytest.raises(ValueError, match=r"beta_start, beta_end: .*got 0.02, 0.0001"):
        S.betas_linear(10, beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match=r"^betas: expected values <= 1.0, got max 1.5"):
        S.alphas_bar_from_betas(torch.tensor([0.1, 1.5], dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^betas: expected a floating-point tensor"):
        S.alphas_bar_from_betas(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^alphas_bar: expected values >= 0.0"):
        S.logsnr_from_alphas_bar(torch.tensor([-0.1]))
    with pytest.raises(ValueError, match=r"^n: expected an int >= 1, got 0"):
        S.sigmas_karras(0)
    with pytest.raises(ValueError, match=r"sigma_min, sigma_max: .*got 80.0, 0.002"):
        S.sigmas_karras(10, sigma_min=80.0, sigma_max=0.002)
    with pytest.raises(ValueError, match=r"^rho: expected > 0, got -1"):
        S.sigmas_karras(10, rho=-1.0)
    with pytest.raises(TypeError, match=r"^u: expected a floating-point tensor"):
        S.sigma_lognormal(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^p_std: expected > 0, got 0"):
        S.sigma_lognormal(torch.zeros(2), p_std=0.0)
    with pytest.raises(ValueError, match=r"^n: expected 1 <= n <= T=10, got 11"):
        S.respace(10, 11)
    with pytest.raises(ValueError, match=r"^spacing: expected one of .*got 'uniform'"):
        S.respace(10, 5, spacing="uniform")
    with pytest.raises(ValueError, match=r"^image_size: expected an int >= 1, got 0"):
        S.logsnr_cosine_shifted(0.5, image_size=0)
    with pytest.raises(ValueError, match=r"^noise_size_low: expected <= noise_size_high \(64\).*got 128"):
        S.t_from_logsnr_cosine_interpolated(0.0, image_size=64, noise_size_low=128)
    with pytest.raises(ValueError, match=r"logsnr_min, logsnr_max: .*got 5.0, -5.0"):
        S.logsnr_cosine(0.5, logsnr_min=5.0, logsnr_max=-5.0)
