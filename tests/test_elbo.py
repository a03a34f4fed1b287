"""Tests of kdiff.elbo against independent oracles: torch.distributions and scipy in float64, mpmath at 60
digits, DDPM's discrete-table formulas, and exact Gaussian diffusions, whose reverse conditionals are known in
closed form, so the whole-chain bound must equal the exact negative log-likelihood."""

import collections
import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

from kdiff import elbo
from kdiff.process import posterior_logvar
from kdiff.schedules import alphas_bar_cosine, logsnr_cosine

F64 = torch.float64
DTYPES = st.sampled_from([torch.float32, torch.float64])
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _kl_oracle(m1, lv1, m2, lv2):
    """KL of two normals by torch.distributions in float64."""
    d = torch.distributions
    p = d.Normal(torch.as_tensor(m1, dtype=F64), torch.as_tensor(lv1, dtype=F64).mul(0.5).exp())
    q = d.Normal(torch.as_tensor(m2, dtype=F64), torch.as_tensor(lv2, dtype=F64).mul(0.5).exp())
    return d.kl_divergence(p, q)


def _grid(k):
    """The 256-level grid on [-1, 1]: k in 0..255 -> k 2/255 - 1."""
    return np.asarray(k, dtype=np.float64) * 2.0 / 255.0 - 1.0


def _bin_logprob_scipy(x, mean, log_scale):
    """log(Phi(b) - Phi(a)) in float64 by scipy, the upper half reflected (Phi(b) - Phi(a) = sf(a) - sf(b))."""
    x, mean, scale = (np.asarray(v, dtype=np.float64) for v in (x, mean, np.exp(log_scale)))
    a = np.where(x < -1 + 1 / 255, -np.inf, (x - 1 / 255 - mean) / scale)
    b = np.where(x > 1 - 1 / 255, np.inf, (x + 1 / 255 - mean) / scale)
    lower = stats.norm.cdf(b) - stats.norm.cdf(a)
    upper = stats.norm.sf(a) - stats.norm.sf(b)
    with np.errstate(divide="ignore"):  # an underflowed difference gives -inf; callers mask it out
        return np.log(np.where(a + b > 0, upper, lower))


def _bin_logprob_mpmath(x, mean, log_scale):
    """The same at 60 significant digits, for tails and very narrow bins."""
    with mpmath.workdps(60):
        s = mpmath.exp(mpmath.mpf(log_scale))
        a = -mpmath.inf if x < -1 + 1 / 255 else (mpmath.mpf(x) - mpmath.mpf(mean) - mpmath.mpf(1) / 255) / s
        b = mpmath.inf if x > 1 - 1 / 255 else (mpmath.mpf(x) - mpmath.mpf(mean) + mpmath.mpf(1) / 255) / s
        if a + b > 0:
            a, b = -b, -a
        return float(mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a)))


# ----------------------------------------------------------------------------------------------
# normal_kl


@given(dtype=DTYPES, b=st.integers(1, 4), c=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_normal_kl_matches_torch_distributions_with_broadcasting(dtype, b, c, seed):
    g = torch.Generator().manual_seed(seed)
    m1, lv1 = 3 * torch.randn(b, 1, generator=g), 4 * torch.randn(b, c, generator=g)
    m2, lv2 = 3 * torch.randn(1, c, generator=g), 4 * torch.randn(1, 1, generator=g)
    got = elbo.normal_kl(*(t.to(dtype) for t in (m1, lv1, m2, lv2)))
    assert got.shape == (b, c) and got.dtype == dtype
    want = _kl_oracle(m1, lv1, m2, lv2)
    torch.testing.assert_close(got.to(F64), want, rtol=RTOL[dtype] * 10, atol=RTOL[dtype])


@given(m1=st.floats(-3, 3), lv1=st.floats(-2, 2), m2=st.floats(-3, 3), lv2=st.floats(-2, 2))
def test_normal_kl_matches_numerical_integration(m1, lv1, m2, lv2):
    p, q = stats.norm(m1, math.exp(lv1 / 2)), stats.norm(m2, math.exp(lv2 / 2))
    lo, hi = m1 - 12 * math.exp(lv1 / 2), m1 + 12 * math.exp(lv1 / 2)
    want, _ = integrate.quad(lambda u: p.pdf(u) * (p.logpdf(u) - q.logpdf(u)), lo, hi, epsabs=1e-12, limit=200)
    got = elbo.normal_kl(torch.tensor(m1, dtype=F64), lv1, m2, lv2)
    assert got.item() == pytest.approx(want, rel=1e-7, abs=1e-10)


@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
def test_normal_kl_nonnegative_and_zero_at_equality(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    m, lv, m2, lv2 = ((5 * torch.randn(2, 7, generator=g)).to(dtype) for _ in range(4))
    assert (elbo.normal_kl(m, lv, m2, lv2) >= 0).all()
    assert (elbo.normal_kl(m, lv, m, lv) == 0).all()


@given(d=st.floats(1e-3, 1e-1), sign=st.sampled_from([-1.0, 1.0]))
def test_normal_kl_is_accurate_in_float32_for_close_variances(d, sign):
    # KL(N(0, e^d) || N(0, 1)) = (e^d - 1 - d) / 2 ~ d^2 / 4: the naive form loses all digits in float32.
    want = 0.5 * (math.expm1(sign * d) - sign * d)
    got = elbo.normal_kl(torch.zeros(()), torch.tensor(sign * d), 0.0, 0.0)
    assert got.item() == pytest.approx(want, rel=1e-3)


def test_normal_kl_bad_input():
    with pytest.raises(TypeError, match="mean1"):
        elbo.normal_kl(torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="at least one torch.Tensor"):
        elbo.normal_kl(0.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"broadcastable.*logvar2 \(4,\)"):
        elbo.normal_kl(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(4))


# ----------------------------------------------------------------------------------------------
# The discretized decoder


@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
def test_discretized_loglik_matches_scipy_cdf_differences(dtype, seed):
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 256, size=(3, 17))
    k[0, :2] = (0, 255)  # both open edge bins in every example
    mean = rng.uniform(-1.2, 1.2, size=(3, 17))
    log_scale = rng.uniform(-4.0, 1.0, size=(3, 1))
    x, m, ls = (torch.tensor(v, dtype=dtype) for v in (_grid(k), mean, log_scale))
    got = elbo.discretized_gaussian_loglik(x, m, ls, min_prob=0.0)
    assert got.shape == x.shape and got.dtype == dtype
    want = _bin_logprob_scipy(x.double().numpy(), m.double().numpy(), ls.double().numpy())
    ok = want > -300  # scipy's CDF differences are meaningful only away from underflow
    np.testing.assert_allclose(got.double().numpy()[ok], want[ok], rtol=RTOL[dtype] * 10, atol=RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretized_loglik_is_stable_in_tails_and_narrow_bins(dtype):
    # Far tails (log P down to ~ -1e5) and scales up to e^9 (bins of width ~1e-6 sigma), against 60 digits.
    rng = np.random.default_rng(0)
    k = rng.integers(0, 256, size=400)
    mean = rng.uniform(-3.0, 3.0, size=400)
    log_scale = rng.uniform(-9.0, 9.0, size=400)
    x, m, ls = (torch.tensor(v, dtype=dtype) for v in (_grid(k), mean, log_scale))
    got = elbo.discretized_gaussian_loglik(x, m, ls, min_prob=0.0).double().numpy()
    want = np.array([_bin_logprob_mpmath(a, b, c) for a, b, c in zip(*(t.double().tolist() for t in (x, m, ls)))])
    rel = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    assert rel.max() < {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]


@given(dtype=DTYPES, mean=st.floats(-1.5, 1.5), log_scale=st.floats(-8.0, 6.0))
def test_discretized_probabilities_sum_to_one_over_256_bins(dtype, mean, log_scale):
    x = torch.tensor(_grid(np.arange(256)), dtype=dtype)
    logp = elbo.discretized_gaussian_loglik(x, torch.full_like(x, mean), torch.full_like(x, log_scale), min_prob=0.0)
    assert logp.double().exp().sum().item() == pytest.approx(1.0, abs=RTOL[dtype] * 10)


def test_discretized_loglik_floor_is_documented_min_prob():
    x = torch.tensor(_grid([0, 128, 255]))
    mean, log_scale = torch.full_like(x, 0.5), torch.full_like(x, -2.0)
    exact = elbo.discretized_gaussian_loglik(x, mean, log_scale, min_prob=0.0)
    floored = elbo.discretized_gaussian_loglik(x, mean, log_scale)
    assert exact[0] < math.log(1e-12) < exact[1:].min()  # x = -1 is 11 sigma from the mean, the others < 4
    assert floored[0].item() == pytest.approx(math.log(1e-12))
    torch.testing.assert_close(floored[1:], exact[1:])


def test_discretized_loglik_gradients_finite_everywhere():
    x = torch.tensor(_grid([0, 0, 255, 255, 3, 128, 200, 128]), dtype=torch.float32)
    mean = torch.tensor([-1.0, 0.9, 1.0, -0.8, 0.0, 0.0, -0.99, 0.5], requires_grad=True)
    log_scale = torch.tensor([-9.0, -5.0, 3.0, -5.0, 8.0, -9.0, -1.0, 0.0], requires_grad=True)
    elbo.discretized_gaussian_loglik(x, mean, log_scale, min_prob=0.0).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


def test_discretized_loglik_low_precision_inputs_get_float32_math():
    x = torch.tensor(_grid([0, 17, 255]), dtype=torch.bfloat16)
    got = elbo.discretized_gaussian_loglik(x, torch.zeros_like(x), torch.full_like(x, -1.0), min_prob=0.0)
    assert got.dtype == torch.float32
    want = _bin_logprob_scipy(x.double().numpy(), 0.0, -1.0)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5)


def test_discretized_loglik_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"x: expected values <= 1"):
        elbo.discretized_gaussian_loglik(x + 1.5, x, x)
    with pytest.raises(ValueError, match=r"mean: expected a shape that broadcasts to \(2, 3\)"):
        elbo.discretized_gaussian_loglik(x, torch.zeros(2, 4), x)
    with pytest.raises(TypeError, match="log_scale"):
        elbo.discretized_gaussian_loglik(x, x, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="min_prob"):
        elbo.discretized_gaussian_loglik(x, x, x, min_prob=-1.0)


@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
def test_decoder_and_gaussian_nll_match_scipy(dtype, seed):
    rng = np.random.default_rng(seed)
    x = _grid(rng.integers(0, 256, size=(2, 3, 4)))
    mean, logvar = rng.uniform(-1, 1, size=x.shape), rng.uniform(-6, 0, size=(2, 1, 1))
    args = [torch.tensor(v, dtype=dtype) for v in (x, mean, logvar)]
    want_dec = -_bin_logprob_scipy(x, mean, logvar / 2).reshape(2, -1).sum(1)
    want_gauss = -stats.norm.logpdf(x, mean, np.exp(logvar / 2)).reshape(2, -1).sum(1)
    dec = elbo.decoder_nll(*args, min_prob=0.0)
    gauss = elbo.gaussian_nll(*args)
    assert dec.shape == gauss.shape == (2,)
    np.testing.assert_allclose(dec.double().numpy(), want_dec, rtol=RTOL[dtype] * 10)
    np.testing.assert_allclose(gauss.double().numpy(), want_gauss, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)


# ----------------------------------------------------------------------------------------------
# Prior term and bits/dim


@given(dtype=DTYPES, logsnr=st.lists(st.floats(-30, 30), min_size=3, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_prior_kl_matches_closed_form_and_scalar_time_agrees(dtype, logsnr, seed):
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(seed)).to(dtype)
    l = torch.tensor(logsnr, dtype=dtype)
    got = elbo.prior_kl(x, l)
    assert got.shape == (3,) and torch.isfinite(got).all()
    l64 = torch.tensor(logsnr, dtype=F64)[:, None, None]
    alpha, sigma = torch.sqrt(1 / (1 + torch.exp(-l64))), torch.sqrt(1 / (1 + torch.exp(l64)))
    want = _kl_oracle(alpha * x.double(), 2 * torch.log(sigma), 0.0, 0.0).sum((1, 2))
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype] * 10, atol=1e-12 if dtype == F64 else 1e-6)
    per_sample = elbo.prior_kl(x, torch.full((3,), logsnr[0], dtype=dtype))
    torch.testing.assert_close(per_sample, elbo.prior_kl(x, logsnr[0]).to(per_sample.dtype))


def test_prior_kl_bad_input():
    with pytest.raises(ValueError, match="logsnr_T: expected length B=3"):
        elbo.prior_kl(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(TypeError, match="x"):
        elbo.prior_kl(torch.zeros(3, 2, dtype=torch.int64), 0.0)


@given(nats=st.floats(0, 1e5), dims=st.integers(1, 10_000))
def test_bits_per_dim_is_nats_over_dims_ln2(nats, dims):
    got = elbo.bits_per_dim(torch.tensor([nats], dtype=F64), dims)
    assert got.item() == pytest.approx(nats * math.log2(math.e) / dims, rel=1e-14, abs=1e-300)


def test_bits_per_dim_bad_input():
    with pytest.raises(ValueError, match="dims: expected an int >= 1"):
        elbo.bits_per_dim(torch.ones(2), 0)
    with pytest.raises(TypeError, match="nats"):
        elbo.bits_per_dim(torch.ones(2, dtype=torch.int64), 3)


# ----------------------------------------------------------------------------------------------
# DDPM tables: the oracle for learned_logvar, vlb_term and the hybrid loss


def _ddpm_table(kind, T):
    """alpha_bar, beta and beta~ from DDPM's own recursions (Eq. 4, 7) in numpy float64, and the log-SNR table."""
    if kind == "linear":
        betas = np.linspace(1e-4, 0.02, T)
        ab = np.cumprod(1 - betas)
    else:
        ab = alphas_bar_cosine(T).numpy()
        betas = 1 - ab / np.concatenate([[1.0], ab[:-1]])
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    beta_tilde = betas * (1 - ab_prev) / (1 - ab)
    return ab, ab_prev, betas, beta_tilde, torch.tensor(np.log(ab) - np.log1p(-ab))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_learned_logvar_endpoints_and_first_step_on_ddpm_tables(kind):
    T = 1000
    _, _, betas, beta_tilde, logsnrs = _ddpm_table(kind, T)
    i = torch.arange(T)
    ls = torch.cat([torch.tensor([math.inf], dtype=F64), logsnrs[:-1]])
    first = posterior_logvar(logsnrs[0], logsnrs[1])
    ones = torch.ones(T, 1, dtype=F64)
    hi = elbo.learned_logvar(ones, ls, logsnrs, first_logvar=first)[:, 0]
    lo = elbo.learned_logvar(-ones, ls, logsnrs, first_logvar=first)[:, 0]
    mid = elbo.learned_logvar(0 * ones, ls, logsnrs, first_logvar=first)[:, 0]
    clipped = np.log(np.concatenate([beta_tilde[1:2], beta_tilde[1:]]))  # iDDPM: beta~_1 := beta~_2
    np.testing.assert_allclose(hi.numpy(), np.log(betas), rtol=1e-9)
    np.testing.assert_allclose(lo.numpy(), clipped, rtol=1e-9)
    np.testing.assert_allclose(mid.numpy(), 0.5 * (np.log(betas) + clipped), rtol=1e-9)
    assert i.numel() == T


@given(v=st.floats(-1.5, 1.5), l_s=st.floats(-10, 10), gap=st.floats(0.01, 5.0))
def test_learned_logvar_is_affine_in_v_between_log_beta_and_log_beta_tilde(v, l_s, gap):
    l_t = l_s - gap
    a2 = lambda l: 1 / (1 + math.exp(-l))
    log_beta = math.log(1 - a2(l_t) / a2(l_s))
    log_beta_tilde = math.log((1 - a2(l_s)) * (1 - math.exp(l_t - l_s)))
    f = (v + 1) / 2
    got = elbo.learned_logvar(torch.full((1, 2), v, dtype=F64), l_s, l_t)
    assert got.dtype == F64
    np.testing.assert_allclose(got.numpy(), f * log_beta + (1 - f) * log_beta_tilde, rtol=1e-9, atol=1e-12)


def test_learned_logvar_bad_input_and_low_precision():
    v = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert elbo.learned_logvar(v, 2.0, 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="needs first_logvar"):
        elbo.learned_logvar(v, math.inf, 1.0)
    with pytest.raises(ValueError, match="logsnr_s: expected logsnr_s > logsnr_t"):
        elbo.learned_logvar(v, 1.0, 2.0)
    with pytest.raises(ValueError, match="logsnr_t: expected length B=2"):
        elbo.learned_logvar(v, 3.0, torch.zeros(3))


@given(kind=st.sampled_from(["linear", "cosine"]), t=st.integers(2, 1000), dtype=DTYPES,
       seed=st.integers(0, 2**31 - 1))
def test_vlb_term_matches_ddpm_posterior_kl(kind, t, dtype, seed):
    ab, ab_prev, betas, beta_tilde, logsnrs = _ddpm_table(kind, 1000)
    i = t - 1
    g = torch.Generator().manual_seed(seed)
    x, z = torch.rand(2, 3, 4, generator=g, dtype=F64) * 2 - 1, torch.randn(2, 3, 4, generator=g, dtype=F64)
    mean, logvar = torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(2, 3, 1, generator=g, dtype=F64) - 3
    mu_tilde = (math.sqrt(ab_prev[i]) * betas[i] * x + math.sqrt(1 - betas[i]) * (1 - ab_prev[i]) * z) / (1 - ab[i])
    want = _kl_oracle(mu_tilde, math.log(beta_tilde[i]), mean, logvar).sum((1, 2))
    got = elbo.vlb_term(*(a.to(dtype) for a in (x, z, mean, logvar)), logsnrs[i - 1].item(), logsnrs[i].to(dtype))
    assert got.shape == (2,)
    rtol = {torch.float32: 2e-4, torch.float64: 1e-8}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol)
    per_sample = elbo.vlb_term(*(a.to(dtype) for a in (x, z, mean, logvar)), logsnrs[i - 1].expand(2).to(dtype),
                               logsnrs[i].expand(2).to(dtype))
    torch.testing.assert_close(per_sample, got)


@given(l_s=st.floats(-30, 30), gap=st.floats(1e-3, 60), v=st.floats(-1, 1))
def test_learned_logvar_and_vlb_term_finite_in_float32_for_logsnr_in_30(l_s, gap, v):
    l_t = max(l_s - gap, -30.0)
    if l_t >= l_s:
        return
    x = torch.linspace(-1, 1, 6).reshape(2, 3)
    z = x.flip(1)
    logvar = elbo.learned_logvar(torch.full_like(x, v), l_s, l_t)
    assert logvar.dtype == torch.float32 and torch.isfinite(logvar).all()
    assert torch.isfinite(elbo.vlb_term(x, z, 0.5 * z, logvar, l_s, l_t)).all()


@given(l_s=st.floats(-8, 8), gap=st.floats(1e-3, 6), seed=st.integers(0, 2**31 - 1))
def test_vlb_term_with_x_prediction_is_half_snr_gap_times_squared_error(l_s, gap, seed):
    # VDM Eq. 13: p(z_s|z_t) = q(z_s|z_t, x_hat) gives L = (SNR_s - SNR_t) ||x - x_hat||^2 / 2.
    from kdiff.process import posterior

    l_s, l_t = torch.tensor(l_s, dtype=F64), torch.tensor(l_s - gap, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x, x_hat, z = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3))
    mean, _ = posterior(x_hat, z, l_s, l_t)
    got = elbo.vlb_term(x, z, mean, posterior_logvar(l_s, l_t), l_s, l_t)
    want = 0.5 * (math.exp(l_s) - math.exp(l_s - gap)) * ((x - x_hat) ** 2).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_vlb_term_first_step_is_the_decoder_term():
    x = torch.tensor(_grid([[0, 50, 255], [10, 128, 254]]))
    z, mean = torch.randn(2, 3, dtype=F64), torch.tensor([[-0.9, -0.5, 0.9], [0.0, 0.1, 0.8]], dtype=F64)
    logvar = torch.full((2, 1), -5.0, dtype=F64, requires_grad=True)
    mean.requires_grad_(True)
    got = elbo.vlb_term(x, z, mean, logvar, torch.tensor([math.inf, 3.0], dtype=F64), torch.tensor([2.0, 2.0]))
    want0 = -_bin_logprob_scipy(x[0].numpy(), mean[0].detach().numpy(), -2.5).sum()
    assert got[0].item() == pytest.approx(want0, rel=1e-9)
    assert got[1].item() == pytest.approx(elbo.vlb_term(x[1:], z[1:], mean[1:], logvar[1:], 3.0, 2.0).item())
    got.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(logvar.grad).all()


def test_vlb_term_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logsnr_s: expected logsnr_s > logsnr_t"):
        elbo.vlb_term(x, x, x, x, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"mean: expected shape \(2, 3\)"):
        elbo.vlb_term(x, x, torch.zeros(2, 4), x, 2.0, 1.0)
    with pytest.raises(ValueError, match="logsnr_t: expected finite"):
        elbo.vlb_term(x, x, x, x, 2.0, -math.inf)
    with pytest.raises(ValueError, match="logvar: expected a shape that broadcasts"):
        elbo.vlb_term(x, x, x, torch.zeros(5), 2.0, 1.0)


def _mu_tilde(x, z, table, i):
    """DDPM Eq. 7: mu~_t(z_t, x) on the table, index i = t - 1."""
    ab, ab_prev, betas = table[:3]
    return (math.sqrt(ab_prev[i]) * betas[i] * x + math.sqrt(1 - betas[i]) * (1 - ab_prev[i]) * z) / (1 - ab[i])


@given(t=st.integers(1, 1000), seed=st.integers(0, 2**31 - 1))
def test_hybrid_loss_value_and_stopped_mean_gradient(t, seed):
    T, D, i = 1000, 6, t - 1
    table = _ddpm_table("linear", T)
    ab, _, betas, beta_tilde, logsnrs = table
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(_grid(torch.randint(0, 256, (2, D), generator=g).numpy()))
    eps, eps_hat = torch.randn(2, D, generator=g, dtype=F64), torch.randn(2, D, generator=g, dtype=F64)
    z = math.sqrt(ab[i]) * x + math.sqrt(1 - ab[i]) * eps
    logvar = torch.randn(2, 1, generator=g, dtype=F64) + math.log(betas[i])
    eps_hat.requires_grad_(True)
    logvar.requires_grad_(True)
    l_s = math.inf if i == 0 else logsnrs[i - 1].item()
    loss = elbo.hybrid_loss(x, z, eps, eps_hat, logvar, l_s, logsnrs[i], num_steps=T)
    # Oracle: x0 from eps (DDPM Eq. 4 inverted), mu~ (Eq. 7), KL by torch.distributions or the decoder by scipy.
    x_hat = (z - math.sqrt(1 - ab[i]) * eps_hat.detach()) / math.sqrt(ab[i])
    mu = _mu_tilde(x_hat, z, table, i)
    lv = logvar.detach()
    if i == 0:
        logp = np.maximum(_bin_logprob_scipy(x.numpy(), mu.numpy(), lv.numpy() / 2), math.log(1e-12))
        vb = torch.tensor(-logp.sum(1))
    else:
        vb = _kl_oracle(_mu_tilde(x, z, table, i), math.log(beta_tilde[i]), mu, lv).sum(1)
    want = ((eps - eps_hat.detach()) ** 2).mean(1) + T / 1000 * vb / (D * math.log(2))
    torch.testing.assert_close(loss.detach(), want, rtol=1e-7, atol=1e-9)
    loss.sum().backward()
    torch.testing.assert_close(eps_hat.grad, 2 * (eps_hat.detach() - eps) / D)  # the VLB part adds nothing
    assert torch.isfinite(logvar.grad).all()
    if i > 0:  # d KL / d logvar = (1 - e^(lq - lv) - (mq - m)^2 e^-lv) / 2, summed over dims
        sq = (_mu_tilde(x, z, table, i) - mu) ** 2
        dkl = 0.5 * (1 - beta_tilde[i] * torch.exp(-lv) - sq * torch.exp(-lv)).sum(1, keepdim=True)
        torch.testing.assert_close(logvar.grad, T / 1000 * dkl / (D * math.log(2)), rtol=1e-7, atol=1e-10)


def test_hybrid_loss_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_steps: expected an int >= 1"):
        elbo.hybrid_loss(x, x, x, x, x, 2.0, 1.0, num_steps=0)
    with pytest.raises(ValueError, match=r"eps_hat: expected shape \(2, 3\)"):
        elbo.hybrid_loss(x, x, x, torch.zeros(3, 2), x, 2.0, 1.0, num_steps=10)


# ----------------------------------------------------------------------------------------------
# Importance sampling of t


@given(T=st.integers(1, 30), K=st.integers(1, 10), u=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_importance_probs_sum_to_one_and_follow_root_mean_square(T, K, u, seed):
    rng = np.random.default_rng(seed)
    hist = rng.exponential(size=(T, K)) * rng.uniform(0.1, 10, size=(T, 1))
    p = elbo.importance_probs(torch.tensor(hist), torch.full((T,), K), uniform_prob=u).numpy()
    rms = np.sqrt((hist**2).mean(1))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p, (1 - u) * rms / rms.sum() + u / T, rtol=1e-12)


def test_importance_probs_uniform_until_every_row_is_full():
    hist = torch.arange(12.0).reshape(4, 3)
    counts = torch.tensor([3, 3, 2, 3])
    np.testing.assert_allclose(elbo.importance_probs(hist, counts).numpy(), np.full(4, 0.25))
    np.testing.assert_allclose(elbo.importance_probs(torch.zeros(4, 3)).numpy(), np.full(4, 0.25))
    assert not np.allclose(elbo.importance_probs(hist, torch.full((4,), 3)).numpy(), 0.25)


@given(T=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_importance_weights_make_the_estimate_unbiased(T, seed):
    # sum_t p_t w_t L_t = mean_t L_t exactly, for any p > 0.
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(T)) + 1e-6
    p /= p.sum()
    L = rng.normal(size=T)
    w = elbo.importance_weights(torch.tensor(p), torch.arange(T)).numpy()
    assert (p * w * L).sum() == pytest.approx(L.mean(), rel=1e-9, abs=1e-12)


@given(T=st.integers(1, 5), K=st.integers(1, 4),
       pushes=st.lists(st.tuples(st.integers(0, 4), st.floats(0, 100)), min_size=1, max_size=30))
def test_push_loss_history_keeps_the_last_k_values(T, K, pushes):
    pushes = [(t % T, loss) for t, loss in pushes]
    rows = [collections.deque(maxlen=K) for _ in range(T)]
    for t, loss in pushes:
        rows[t].append(loss)
    hist, counts = torch.zeros(T, K, dtype=F64), torch.zeros(T, dtype=torch.int64)
    for start in range(0, len(pushes), 7):  # in batches of up to 7
        chunk = pushes[start:start + 7]
        hist, counts = elbo.push_loss_history(hist, counts, torch.tensor([c[0] for c in chunk]),
                                              torch.tensor([c[1] for c in chunk], dtype=F64))
    for t in range(T):
        assert counts[t].item() == len(rows[t])
        assert hist[t, :len(rows[t])].tolist() == list(rows[t])


def test_importance_bad_input():
    with pytest.raises(ValueError, match=r"loss_history: expected shape \(T, K\)"):
        elbo.importance_probs(torch.zeros(5))
    with pytest.raises(TypeError, match="counts: expected an integer tensor"):
        elbo.importance_probs(torch.zeros(5, 2), torch.zeros(5))
    with pytest.raises(ValueError, match=r"counts: expected shape \(5,\)"):
        elbo.importance_probs(torch.zeros(5, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="uniform_prob"):
        elbo.importance_probs(torch.zeros(5, 2), uniform_prob=1.5)
    with pytest.raises(TypeError, match="t: expected an integer tensor"):
        elbo.importance_weights(torch.full((3,), 1 / 3), torch.zeros(2))


# ----------------------------------------------------------------------------------------------
# The whole chain on Gaussian data: the bound is tight with the exact reverse conditionals


def _alpha2(l):
    return 1.0 / (1.0 + torch.exp(-l))


def _gaussian_model(m, s, logsnrs, *, var_scale=1.0):
    """Exact reverse conditionals of the diffusion of x ~ N(m, s^2) (per dim), by Gaussian conditioning.

    z_i at level logsnrs[i-1] (x itself for i = 0) and z_{i+1} = a z_i + noise are jointly Gaussian with
    Var z = alpha^2 s^2 + sigma^2 and Cov(z_i, z_{i+1}) = a Var z_i, a = alpha_{i+1} / alpha_i. ``var_scale``
    mis-scales every reverse variance.
    """
    a2 = _alpha2(logsnrs)[:, None]
    mean = torch.sqrt(a2) * m
    var = a2 * s**2 + (1 - a2)

    def model_fn(z, i):
        mu_s, var_s, a = (m, s**2, torch.sqrt(a2[i])) if i == 0 else (mean[i - 1], var[i - 1],
                                                                       torch.sqrt(a2[i] / a2[i - 1]))
        cov = a * var_s
        k = cov / var[i]
        return mu_s + k * (z - mean[i]), torch.log(var_s - k * cov) + math.log(var_scale)

    return model_fn, (mean[-1], torch.log(var[-1]))


def _tables(draw_levels, T):
    levels = sorted(set(round(v, 3) for v in draw_levels), reverse=True)[:T]
    return torch.tensor(levels, dtype=F64)


LEVELS = st.lists(st.floats(-9, 9), min_size=1, max_size=12, unique=True)


def _expected_vlb(model_fn, x, logsnrs, prior):
    """E over the forward noise, exactly: every term is a quadratic in its own standard-normal noise, so the
    two-point Gauss-Hermite rule eps = +-1 integrates it without error."""
    T = logsnrs.numel()
    runs = [elbo.vlb(model_fn, x, logsnrs, noise=sign * torch.ones(T, *x.shape, dtype=F64), decoder="gaussian",
                     prior=prior) for sign in (1.0, -1.0)]
    return runs[0].nats.add(runs[1].nats).div(2), runs


@given(levels=LEVELS, D=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_vlb_with_exact_reverse_conditionals_equals_exact_nll(levels, D, seed):
    logsnrs = _tables(levels, 12)
    rng = np.random.default_rng(seed)
    m, s = rng.uniform(-2, 2, size=D), rng.uniform(0.2, 3, size=D)
    x = rng.normal(m, s, size=(3, D)) * rng.uniform(0.2, 2.5, size=(3, 1))  # typical and atypical points
    model_fn, prior = _gaussian_model(torch.tensor(m), torch.tensor(s), logsnrs)
    got, runs = _expected_vlb(model_fn, torch.tensor(x), logsnrs, prior)
    want = -stats.norm.logpdf(x, m, s).sum(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    assert runs[0].terms.shape == (3, logsnrs.numel())
    torch.testing.assert_close(runs[0].bpd, runs[0].nats / (D * math.log(2)))


@given(levels=LEVELS, seed=st.integers(0, 2**31 - 1))
def test_vlb_default_standard_normal_prior_is_exact_for_standard_normal_data(levels, seed):
    # For x ~ N(0, 1) every marginal is N(0, 1), so prior_kl's N(0, I) is the true marginal of z_T.
    logsnrs = _tables(levels, 12)
    x = torch.tensor(np.random.default_rng(seed).normal(size=(2, 3)) * 1.5)
    model_fn, _ = _gaussian_model(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), logsnrs)
    got, _ = _expected_vlb(model_fn, x, logsnrs, None)
    np.testing.assert_allclose(got.numpy(), -stats.norm.logpdf(x.numpy()).sum(1), rtol=1e-9, atol=1e-9)


def test_vlb_monte_carlo_with_generator_within_five_standard_errors():
    logsnrs = torch.linspace(6, -6, 10, dtype=F64)
    m, s = torch.tensor([0.5, -1.0, 0.0], dtype=F64), torch.tensor([0.3, 2.0, 1.0], dtype=F64)
    x = torch.tensor([[0.9, 1.5, -0.4]], dtype=F64).expand(4096, 3)
    model_fn, prior = _gaussian_model(m, s, logsnrs)
    out = elbo.vlb(model_fn, x, logsnrs, generator=torch.Generator().manual_seed(0), decoder="gaussian",
                   prior=prior)
    want = -stats.norm.logpdf(x[0].numpy(), m.numpy(), s.numpy()).sum()
    se = out.nats.std().item() / math.sqrt(x.shape[0])
    assert se > 0 and abs(out.nats.mean().item() - want) < 5 * se
    again = elbo.vlb(model_fn, x, logsnrs, generator=torch.Generator().manual_seed(0), decoder="gaussian",
                     prior=prior)
    assert torch.equal(out.nats, again.nats)


@given(levels=LEVELS, c=st.sampled_from([0.25, 0.5, 0.9, 1.1, 2.0, 4.0]), seed=st.integers(0, 2**31 - 1))
def test_vlb_with_misscaled_reverse_variance_is_larger_by_the_exact_gap(levels, c, seed):
    # E_x VLB_c = H(q(x)) + KL(q(x, z) || p_c(x, z)) = H + T D (1/c - 1 + log c) / 2: each of the T reverse
    # conditionals has the right mean and c times the variance, and the prior is exact (chain rule of KL).
    logsnrs = _tables(levels, 12)
    T, D = logsnrs.numel(), 2
    rng = np.random.default_rng(seed)
    m, s = rng.uniform(-1, 1, size=D), rng.uniform(0.3, 2, size=D)
    x = torch.tensor(np.stack([m - s, m + s]))  # the two-point rule over x ~ N(m, s^2) as well
    entropy = (0.5 * np.log(2 * np.pi * np.e * s**2)).sum()
    model_fn, prior = _gaussian_model(torch.tensor(m), torch.tensor(s), logsnrs, var_scale=c)
    got = _expected_vlb(model_fn, x, logsnrs, prior)[0].mean().item()
    gap = T * D * 0.5 * (1 / c - 1 + math.log(c))
    assert gap > 0 and got > entropy
    assert got == pytest.approx(entropy + gap, rel=1e-9, abs=1e-9)


def test_vlb_discretized_decoder_with_a_model_that_knows_x():
    # p(z_i | z_{i+1}) = q(z_i | z_{i+1}, x): every KL term is 0, so the bound is L_T + L_0 with a narrow decoder.
    from kdiff.process import posterior

    logsnrs = torch.linspace(5, -5, 6, dtype=F64)
    x = torch.tensor(_grid([[0, 100, 255, 30], [128, 129, 7, 250]]))

    def model_fn(z, i):
        if i == 0:
            return x, torch.full((1, 1), 2 * math.log(0.004), dtype=F64)
        return posterior(x, z, logsnrs[i - 1], logsnrs[i])[0], posterior_logvar(logsnrs[i - 1], logsnrs[i])

    out = elbo.vlb(model_fn, x, logsnrs, generator=torch.Generator().manual_seed(1))
    assert out.terms[:, 1:].abs().max() < 1e-10
    l_T = logsnrs[-1]
    a2 = _alpha2(l_T)
    prior = _kl_oracle(torch.sqrt(a2) * x, torch.log(1 - a2), 0.0, 0.0).sum(1)
    dec = -_bin_logprob_scipy(x.numpy(), x.numpy(), math.log(0.004)).sum(1)
    torch.testing.assert_close(out.prior, prior, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.terms[:, 0].numpy(), dec, rtol=1e-9)
    torch.testing.assert_close(out.nats, prior + torch.tensor(dec), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.bpd, out.nats / (4 * math.log(2)))


def test_vlb_bad_input():
    x = torch.zeros(2, 3, dtype=F64)
    fn = lambda z, i: (z, torch.zeros(()))
    with pytest.raises(ValueError, match="logsnrs: expected strictly decreasing"):
        elbo.vlb(fn, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="logsnrs: expected finite"):
        elbo.vlb(fn, x, torch.tensor([math.inf, 2.0]))
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 2, 3\)"):
        elbo.vlb(fn, x, torch.tensor([1.0, -1.0]), noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="decoder: expected 'discretized' or 'gaussian'"):
        elbo.vlb(fn, x, torch.tensor([1.0]), decoder="logistic")


# ----------------------------------------------------------------------------------------------
# Continuous time


@given(t=st.floats(0.01, 0.99), dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
def test_continuous_diffusion_loss_equals_vdm_x_space_form(t, dtype, seed):
    # VDM Eq. 15: -(1/2) SNR'(t) ||x - x_hat||^2, with SNR'(t) by autograd through the schedule.
    tt = torch.tensor(t, dtype=F64, requires_grad=True)
    logsnr = logsnr_cosine(tt)
    (dsnr,) = torch.autograd.grad(torch.exp(logsnr), tt)
    (dlogsnr,) = torch.autograd.grad(logsnr_cosine(tt), tt)
    g = torch.Generator().manual_seed(seed)
    x, eps, eps_hat = (torch.randn(3, 4, generator=g, dtype=F64) for _ in range(3))
    a2 = _alpha2(logsnr.detach())
    z = torch.sqrt(a2) * x + torch.sqrt(1 - a2) * eps
    x_hat = (z - torch.sqrt(1 - a2) * eps_hat) / torch.sqrt(a2)
    want = -0.5 * dsnr * ((x - x_hat) ** 2).sum(1)
    got = elbo.continuous_diffusion_loss(eps.to(dtype), eps_hat.to(dtype), dlogsnr.to(dtype))
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype] * 10, atol=RTOL[dtype])


def test_continuous_diffusion_loss_is_the_limit_of_t_vlb_terms():
    # VDM Eq. 14 -> 17: T L_{t-1} with s = t - 1/T tends to the continuous loss, with error O(1/T).
    from kdiff.process import posterior

    g = torch.Generator().manual_seed(0)
    x, eps, eps_hat = (torch.randn(2, 5, generator=g, dtype=F64) for _ in range(3))
    t = torch.tensor(0.4, dtype=F64, requires_grad=True)
    (dlogsnr,) = torch.autograd.grad(logsnr_cosine(t), t)
    l_t = logsnr_cosine(t.detach())
    a2 = _alpha2(l_t)
    z = torch.sqrt(a2) * x + torch.sqrt(1 - a2) * eps
    x_hat = (z - torch.sqrt(1 - a2) * eps_hat) / torch.sqrt(a2)
    want = elbo.continuous_diffusion_loss(eps, eps_hat, dlogsnr)
    errs = []
    for T in (100, 1000, 10000):
        l_s = logsnr_cosine(t.detach() - 1 / T)
        mean, _ = posterior(x_hat, z, l_s, l_t)
        discrete = T * elbo.vlb_term(x, z, mean, posterior_logvar(l_s, l_t), l_s, l_t)
        errs.append(((discrete - want).abs() / want).max().item())
    assert errs[-1] < 1e-3 and errs[0] / errs[-1] > 50


def test_continuous_diffusion_loss_bad_input():
    e = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dlogsnr_dt: expected length B=2"):
        elbo.continuous_diffusion_loss(e, e, torch.zeros(3))
    with pytest.raises(ValueError, match=r"eps_hat: expected shape \(2, 3\)"):
        elbo.continuous_diffusion_loss(e, torch.zeros(3, 2), -1.0)
