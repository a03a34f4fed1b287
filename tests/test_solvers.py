"""Solver steps and the sample loop, against exact answers.

Oracles: the Gaussian-mixture test bed (closed-form denoiser and class posterior, checked here
against scipy and autograd), a scipy ``solve_ivp`` solution of the same probability-flow ODE, and
the papers' VP-space formulas written directly on a DDPM ``alphas_bar`` table in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gaussian_mixture import single_gaussian, two_d_mixture
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import solve_ivp
from scipy.stats import multivariate_normal

from kdiff.schedules import alphas_bar_cosine, alphas_bar_from_betas, betas_linear, respace, sigmas_karras
from kdiff.solvers import (
    churn,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_step,
    heun_step,
    sample,
    sigmas_from_alphas_bar,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")

GM = two_d_mixture()
ALPHAS_BAR = alphas_bar_from_betas(betas_linear(1000))  # DDPM's table, float64


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def vp(index: int) -> tuple[float, float]:
    """``(alpha_bar, sigma_ve)`` of the DDPM table at ``index``; index -1 is the clean end (alpha_bar = 1)."""
    if index < 0:
        return 1.0, 0.0
    ab = ALPHAS_BAR[index].item()
    return ab, math.sqrt((1.0 - ab) / ab)


# ----------------------------------------------------------------------------------------------
# The test bed itself


def test_mixture_log_prob_matches_scipy_and_denoiser_matches_tweedie():
    x = randn(6, 2, seed=1) * 2
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.0, 5.0, 20.0], dtype=F64)
    ref = [np.log(sum(GM.weights[k].item() * multivariate_normal(
        GM.means[k].numpy(), GM.covs[k].numpy() + sigma[b].item() ** 2 * np.eye(2)).pdf(x[b].numpy())
        for k in range(3))) for b in range(6)]
    np.testing.assert_allclose(GM.log_prob(x, sigma).numpy(), ref, rtol=1e-10)
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(GM.log_prob(xg, sigma).sum(), xg)
    torch.testing.assert_close(GM.denoise(x, sigma), x + sigma[:, None] ** 2 * score, rtol=1e-10, atol=1e-10)
    assert torch.allclose(GM.class_log_posterior(x, sigma).exp().sum(-1), torch.ones(6, dtype=F64))


# ----------------------------------------------------------------------------------------------
# Convergence order against a tight scipy solution of the same ODE

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
STEPS = (24, 32, 48, 64, 96, 128)
ORDER_TOL = 0.3  # measured on this bed: Euler 1.03, Heun 2.15, DPM-Solver++(2M) 2.21 (asymptote from above)


@pytest.fixture(scope="module")
def ode_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_start, D(x(sigma_min), sigma_min))``: the PF-ODE ``dx/dlog(sigma) = x - D(x, sigma)`` solved
    from 80 to 0.002 by DOP853 at rtol = atol = 1e-12, followed by the exact last map onto ``D``
    (every solver's step into sigma = 0)."""
    x0 = randn(32, 2, seed=2) * SIGMA_MAX

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y.reshape(32, 2))
        return (x - GM.denoise(x, math.exp(u))).numpy().ravel()

    sol = solve_ivp(rhs, (math.log(SIGMA_MAX), math.log(SIGMA_MIN)), x0.numpy().ravel(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    assert sol.success
    x_min = torch.from_numpy(sol.y[:, -1].reshape(32, 2))
    return x0, GM.denoise(x_min, SIGMA_MIN)


@pytest.mark.parametrize("solver, order", [("euler", 1.0), ("heun", 2.0), ("dpmpp_2m", 2.0)])
def test_global_convergence_order(ode_reference, solver, order):
    """Slope of log(error) against log(steps), the error being the median over 32 trajectories (a
    trajectory that starts near the boundary between two modes converges only at fine grids)."""
    x0, ref = ode_reference
    errors = []
    for n in STEPS:
        out = sample(GM.denoise, x0, sigmas_karras(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX), solver=solver)
        errors.append((out - ref).norm(dim=1).median().item())
    slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    assert abs(slope - order) < ORDER_TOL, f"{solver}: measured order {slope:.3f}, errors {errors}"


# ----------------------------------------------------------------------------------------------
# Distributions with the exact denoiser


def assert_matches_mixture(y: torch.Tensor, n_se: float = 4.0) -> None:
    """Mean, covariance and mixture weights of ``y`` within ``n_se`` standard errors of the truth."""
    n = y.shape[0]
    centred = y - y.mean(0)
    se_mean = centred.std(0) / math.sqrt(n)
    assert ((y.mean(0) - GM.mean()).abs() < n_se * se_mean).all(), (y.mean(0), GM.mean())
    prod = (centred[:, :, None] * centred[:, None, :]).reshape(n, -1)
    se_cov = prod.std(0) / math.sqrt(n)
    cov_err = (torch.cov(y.T) - GM.cov()).reshape(-1)
    assert (cov_err.abs() < n_se * se_cov).all(), (cov_err, se_cov)
    resp = GM.class_log_posterior(y).exp()  # E[p(k | y)] = pi_k under the true distribution
    se_w = resp.std(0) / math.sqrt(n)
    assert ((resp.mean(0) - GM.weights).abs() < n_se * se_w).all(), (resp.mean(0), GM.weights)


def test_heun_35_evaluations_matches_mixture():
    """18 Heun steps (35 evaluations) on a Karras grid with sigma_max = 10 and rho = 3, started from an
    exact draw of p_sigma_max = data + N(0, 10^2), so that only the solver's error is measured."""
    calls = []

    def denoise(x, sigma):
        calls.append(float(sigma))
        return GM.denoise(x, sigma)

    gen = torch.Generator().manual_seed(3)
    y0, _ = GM.sample(4000, gen)
    x = y0 + 10.0 * torch.randn(4000, 2, generator=gen, dtype=F64)
    y = sample(denoise, x, sigmas_karras(18, sigma_max=10.0, rho=3.0), solver="heun")
    assert len(calls) == 35
    assert_matches_mixture(y)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_ancestral_matches_mixture(variance):
    """DDPM Alg. 2 on the linear table, respaced to 100 steps, from the VP prior z_T ~ N(0, I)."""
    sigmas = sigmas_from_alphas_bar(ALPHAS_BAR, respace(1000, 100))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4000, 2, generator=gen, dtype=F64) * (1 + sigmas[0] ** 2).sqrt()
    y = sample(GM.denoise, x, sigmas, solver="ddpm", variance=variance, generator=gen)
    assert_matches_mixture(y)


# ----------------------------------------------------------------------------------------------
# Steps against the papers' VP formulas

# (s, t) table indices with s < t; s = -1 is the clean end, the last step of a chain
pairs_to_clean = st.integers(-1, 998).flatmap(lambda s: st.tuples(st.just(s), st.integers(s + 1, 999)))
pairs = st.integers(0, 998).flatmap(lambda s: st.tuples(st.just(s), st.integers(s + 1, 999)))


@given(pairs_to_clean, st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_ddim_step_equals_ddim_eq12(pair, eta, seed):
    s, t = pair
    ab_s, sig_s = vp(s)
    ab_t, sig_t = vp(t)
    z_t, x0, noise = randn(3, 5, seed=seed).unbind(0)
    eps_hat = (z_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    sigma_eta = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)  # DDIM Eq. 16
    z_s = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - sigma_eta**2) * eps_hat + sigma_eta * noise  # Eq. 12
    out = ddim_step(z_t[None] / math.sqrt(ab_t), x0[None], sig_t, sig_s, eta=eta, noise=noise[None])
    torch.testing.assert_close(math.sqrt(ab_s) * out[0], z_s, rtol=1e-9, atol=1e-9)


@given(pairs_to_clean, st.sampled_from(["small", "large", "learned"]), st.integers(0, 10_000))
def test_ddpm_step_equals_ddpm_eq7(pair, variance, seed):
    s, t = pair
    ab_s, sig_s = vp(s)
    ab_t, sig_t = vp(t)
    z_t, x0, noise, v_raw = randn(4, 5, seed=seed).unbind(0)
    beta = 1 - ab_t / ab_s  # the respaced chain's beta_t
    beta_tilde = (1 - ab_s) / (1 - ab_t) * beta  # DDPM Eq. 7
    mu = math.sqrt(ab_s) * beta / (1 - ab_t) * x0 + math.sqrt(ab_t / ab_s) * (1 - ab_s) / (1 - ab_t) * z_t
    v = torch.sigmoid(v_raw)
    if s < 0:
        var = torch.zeros(5, dtype=F64)  # the last step adds no noise (DDPM Alg. 2, z = 0 at t = 1)
    elif variance == "learned":
        var = torch.exp(v * math.log(beta) + (1 - v) * math.log(beta_tilde))  # iDDPM Eq. 15
    else:
        var = torch.full((5,), beta_tilde if variance == "small" else beta, dtype=F64)
    z_s = mu + var.sqrt() * noise
    out = ddpm_step(z_t[None] / math.sqrt(ab_t), x0[None], sig_t, sig_s, noise=noise[None],
                    variance=v[None] if variance == "learned" else variance)
    torch.testing.assert_close(math.sqrt(ab_s) * out[0], z_s, rtol=1e-9, atol=1e-9)


@given(st.integers(0, 997).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, 998)))
       .flatmap(lambda p: st.tuples(st.just(p[0]), st.just(p[1]), st.integers(p[1] + 1, 999))),
       st.integers(0, 10_000))
def test_dpmpp_2m_step_equals_dpm_solver_pp_alg2(triple, seed):
    """Alg. 2 of DPM-Solver++ in VP form, lambda = log(alpha / sigma), on three table points."""
    nxt, cur, prev = triple
    (ab_n, sig_n), (ab_c, sig_c), (ab_p, sig_p) = vp(nxt), vp(cur), vp(prev)
    lam = [0.5 * math.log(ab / (1 - ab)) for ab in (ab_n, ab_c, ab_p)]
    h, h_prev = lam[0] - lam[1], lam[1] - lam[2]
    r = h_prev / h
    z_c, x0_c, x0_p = randn(3, 5, seed=seed).unbind(0)
    d = (1 + 1 / (2 * r)) * x0_c - 1 / (2 * r) * x0_p
    z_n = math.sqrt((1 - ab_n) / (1 - ab_c)) * z_c - math.sqrt(ab_n) * math.expm1(-h) * d
    out = dpmpp_2m_step(z_c[None] / math.sqrt(ab_c), x0_c[None], sig_c, sig_n, denoised_prev=x0_p[None],
                        sigma_prev=sig_p)
    torch.testing.assert_close(math.sqrt(ab_n) * out[0], z_n, rtol=1e-8, atol=1e-8)


sigma_pairs = st.tuples(st.floats(1e-3, 100.0), st.floats(0.0, 1.0)).map(lambda p: (p[0], p[0] * p[1]))


@given(sigma_pairs, st.integers(0, 10_000))
def test_ddim_eta0_is_euler_and_eta1_is_ddpm(sig, seed):
    sigma, sigma_next = sig
    x, d, noise = randn(3, 4, 3, seed=seed).unbind(0)
    torch.testing.assert_close(ddim_step(x, d, sigma, sigma_next, eta=0.0), euler_step(x, d, sigma, sigma_next),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ddim_step(x, d, sigma, sigma_next, eta=1.0, noise=noise),
                               ddpm_step(x, d, sigma, sigma_next, noise=noise, variance="small"),
                               rtol=1e-9, atol=1e-9)


@given(pairs, st.integers(0, 10_000))
def test_ddim_eta1_variance_is_ddpm_posterior_variance(pair, seed):
    s, t = pair
    ab_s, sig_s = vp(s)
    ab_t, sig_t = vp(t)
    x, d, noise = randn(3, 6, seed=seed).unbind(0)
    mean = ddim_step(x, d, sig_t, sig_s, eta=1.0, noise=torch.zeros_like(x))
    std = (ddim_step(x, d, sig_t, sig_s, eta=1.0, noise=noise) - mean) / noise  # the step is affine in the noise
    beta_tilde = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    torch.testing.assert_close(ab_s * std**2, torch.full_like(std, beta_tilde), rtol=1e-7, atol=1e-12)


@given(sigma_pairs, st.sampled_from(["euler", "heun", "dpmpp_2m"]), st.integers(0, 10_000))
def test_ode_steps_exact_for_a_constant_denoiser(sig, solver, seed):
    """With ``D`` constant the ODE ``dx/dsigma = (x - D)/sigma`` has ``x(sigma) = D + (sigma/sigma_0)(x_0 - D)``."""
    sigma, sigma_next = sig
    x, d = randn(2, 3, 2, seed=seed).unbind(0)
    exact = d + (sigma_next / sigma) * (x - d)
    if solver == "euler":
        out = euler_step(x, d, sigma, sigma_next)
    elif solver == "heun":
        out = heun_step(x, d, sigma, sigma_next, denoise=lambda x_, s_: d)
    else:
        out = dpmpp_2m_step(x, d, sigma, sigma_next, denoised_prev=d, sigma_prev=2 * sigma)
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)


@given(st.lists(sigma_pairs, min_size=3, max_size=3), st.integers(0, 10_000))
def test_scalar_and_batched_sigma_agree(sigs, seed):
    """A batch with per-sample sigmas equals each sample stepped alone with a float sigma."""
    sigma = torch.tensor([s for s, _ in sigs], dtype=F64)
    sigma_next = torch.tensor([s for _, s in sigs], dtype=F64)
    x, d, d_prev, noise = randn(4, 3, 2, 2, seed=seed).unbind(0)
    steps = {
        "euler": lambda i, s, sn: euler_step(x[i], d[i], s, sn),
        "ddim": lambda i, s, sn: ddim_step(x[i], d[i], s, sn, eta=0.7, noise=noise[i]),
        "ddpm": lambda i, s, sn: ddpm_step(x[i], d[i], s, sn, noise=noise[i], variance="large"),
        "2m": lambda i, s, sn: dpmpp_2m_step(x[i], d[i], s, sn, denoised_prev=d_prev[i], sigma_prev=s * 1.5 + 0.1),
    }
    for name, step in steps.items():
        batched = step(slice(None), sigma, sigma_next)
        alone = torch.cat([step(slice(b, b + 1), sigs[b][0], sigs[b][1]) for b in range(3)])
        torch.testing.assert_close(batched, alone, rtol=1e-12, atol=1e-12, msg=name)


def test_heun_step_second_evaluation_and_last_step():
    g = single_gaussian()
    x = randn(5, 3, seed=5)
    calls = []

    def denoise(x_, s_):
        calls.append(s_)
        return g.denoise(x_, s_)

    # the last step into 0 is Euler: it lands on denoised without a second evaluation
    d = g.denoise(x, 0.3)
    torch.testing.assert_close(heun_step(x, d, 0.3, 0.0, denoise=denoise), d)
    assert calls == []
    # the trapezoid uses the slope at the Euler point, evaluated at sigma_next
    out = heun_step(x, d, 0.3, 0.2, denoise=denoise)
    assert calls == [0.2]
    x_e = x + (0.2 - 0.3) * (x - d) / 0.3
    slope_next = (x_e - g.denoise(x_e, 0.2)) / 0.2
    torch.testing.assert_close(out, x + (0.2 - 0.3) * 0.5 * ((x - d) / 0.3 + slope_next))
    with pytest.raises(ValueError, match="sigma_next"):
        heun_step(x, d, torch.full((5,), 0.3, dtype=F64), torch.tensor([0.1, 0, 0.1, 0.1, 0.1], dtype=F64),
                  denoise=denoise)


def test_dpmpp_2m_first_and_last_steps_are_first_order():
    x, d, d_prev = randn(3, 4, 2, seed=6).unbind(0)
    torch.testing.assert_close(dpmpp_2m_step(x, d, 2.0, 1.0), euler_step(x, d, 2.0, 1.0))
    torch.testing.assert_close(dpmpp_2m_step(x, d, 2.0, 0.0, denoised_prev=d_prev, sigma_prev=3.0), d)


def test_low_precision_data_is_computed_in_float32():
    """bf16 data: the step is computed in float32 and rounded once, so it is within one bf16 ulp of the
    float64 answer on the same (rounded) inputs; bf16 arithmetic would round after every operation."""
    bf16 = torch.bfloat16
    x, d, d_prev, noise = (randn(4, 512, seed=14) * torch.tensor([[3.0], [2.9], [2.8], [1.0]], dtype=F64)).unbind(0)
    steps = {
        "euler": lambda x_, d_, p_, n_: euler_step(x_, d_, 3.0, 2.5),
        "ddim": lambda x_, d_, p_, n_: ddim_step(x_, d_, 3.0, 2.5, eta=0.5, noise=n_),
        "ddpm": lambda x_, d_, p_, n_: ddpm_step(x_, d_, 3.0, 2.5, noise=n_),
        "2m": lambda x_, d_, p_, n_: dpmpp_2m_step(x_, d_, 3.0, 2.5, denoised_prev=p_, sigma_prev=4.0),
        "heun": lambda x_, d_, p_, n_: heun_step(x_, d_, 3.0, 2.5, denoise=lambda a, s: (0.9 * a).to(a.dtype)),
    }
    low = [t.to(bf16) for t in (x, d, d_prev, noise)]
    for name, step in steps.items():
        out = step(*low)
        assert out.dtype == bf16, name
        exact = step(*[t.double() for t in low])
        ulp = torch.finfo(bf16).eps * exact.abs().clamp_min(1e-3)
        assert ((out.double() - exact).abs() <= ulp).all(), name


# ----------------------------------------------------------------------------------------------
# Churn (EDM Algorithm 2)


def test_churn_gamma_cap_range_and_variance():
    sigma, n = 2.0, 20_000
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(n, 1, generator=gen, dtype=F64)  # data N(0, 1)
    x = y + sigma * torch.randn(n, 1, generator=gen, dtype=F64)
    noise = torch.randn(n, 1, generator=gen, dtype=F64)
    # s_churn / N above sqrt(2) - 1: capped, so the variance at most doubles
    _, s_hat = churn(x, sigma, noise, s_churn=100.0, n_steps=10)
    assert s_hat.item() == pytest.approx(math.sqrt(2.0) * sigma, rel=1e-12)
    # gamma = 0.2: x_hat is distributed as data + N(0, sigma_hat^2)
    x_hat, s_hat = churn(x, sigma, noise, s_churn=4.0, n_steps=20)
    assert s_hat.item() == pytest.approx(2.4, rel=1e-12)
    se = math.sqrt(2.0 / n) * (1 + 2.4**2)
    assert abs(x_hat.var().item() - (1 + 2.4**2)) < 4 * se
    # outside [s_tmin, s_tmax] nothing changes, per sample
    sig = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    x3 = randn(3, 2, seed=8)
    x_hat, s_hat = churn(x3, sig, randn(3, 2, seed=9), s_churn=4.0, n_steps=20, s_tmin=1.0, s_tmax=4.0)
    torch.testing.assert_close(s_hat, torch.tensor([0.5, 2.4, 8.0], dtype=F64))
    torch.testing.assert_close(x_hat[[0, 2]], x3[[0, 2]])
    assert not torch.equal(x_hat[1], x3[1])


def test_churn_in_sample_is_seeded_and_matches_mixture():
    gen = torch.Generator().manual_seed(10)
    y0, _ = GM.sample(4000, gen)
    x = y0 + 10.0 * torch.randn(4000, 2, generator=gen, dtype=F64)
    kw = dict(solver="heun", s_churn=10.0, s_tmin=0.05, s_tmax=5.0)
    a = sample(GM.denoise, x, sigmas_karras(32, sigma_max=10.0, rho=3.0), generator=torch.Generator().manual_seed(1),
               **kw)
    b = sample(GM.denoise, x, sigmas_karras(32, sigma_max=10.0, rho=3.0), generator=torch.Generator().manual_seed(1),
               **kw)
    assert torch.equal(a, b)
    assert_matches_mixture(a)


# ----------------------------------------------------------------------------------------------
# The loop


@pytest.mark.parametrize("solver, kw", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler", {"s_churn": 5.0})])
def test_same_seed_same_samples(solver, kw):
    sigmas = sigmas_karras(10, sigma_max=10.0)
    x = randn(16, 2, seed=11) * 10
    runs = [sample(GM.denoise, x, sigmas, solver=solver, generator=torch.Generator().manual_seed(seed), **kw)
            for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("table", ["linear", "cosine"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "ddim", "ddpm"])
def test_respace_then_sample_is_finite(table, solver):
    """From sigma_max (157 for the linear table, 2e4 for the capped cosine one) to exactly 0, with
    several step counts and spacings: finite and never evaluated at sigma = 0. Except for Heun the
    samples land near the data; Heun's correction grows with sigma / sigma_next, which reaches 1270
    on the cosine table respaced to 25 steps (see heun_step), so it is only required to stay finite."""
    ab = ALPHAS_BAR if table == "linear" else alphas_bar_cosine(1000)
    seen = []

    def denoise(x, sigma):
        seen.append(float(sigma))
        return GM.denoise(x, sigma)

    for n, spacing in [(1, "trailing"), (7, "leading"), (25, "trailing"), (50, "linspace")]:
        sigmas = sigmas_from_alphas_bar(ab, respace(1000, n, spacing=spacing))
        x = randn(64, 2, seed=n).to(torch.float32) * float((1 + sigmas[0] ** 2).sqrt())
        eta = 1.0 if solver == "ddim" else 0.0  # eta applies to DDIM only; elsewhere it is an error
        y = sample(denoise, x, sigmas, solver=solver, eta=eta, generator=torch.Generator().manual_seed(0))
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        if solver != "heun":
            assert GM.log_prob(y.double()).min() > -30.0
    assert min(seen) > 0


def test_sigmas_from_alphas_bar():
    ts = respace(1000, 10)
    sig = sigmas_from_alphas_bar(ALPHAS_BAR, ts)
    ab = ALPHAS_BAR.numpy()[ts.numpy()][::-1]
    np.testing.assert_allclose(sig[:-1].numpy(), np.sqrt((1 - ab) / ab), rtol=1e-12)
    assert sig[-1] == 0 and sig.dtype == F64 and len(sig) == 11
    assert len(sigmas_from_alphas_bar(ALPHAS_BAR)) == 1001
    with pytest.raises(ValueError, match="timesteps"):
        sigmas_from_alphas_bar(ALPHAS_BAR, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="timesteps"):
        sigmas_from_alphas_bar(ALPHAS_BAR, torch.tensor([0, 1000]))
    with pytest.raises(TypeError, match="timesteps"):
        sigmas_from_alphas_bar(ALPHAS_BAR, torch.tensor([0.0, 1.0]))


def test_callback_progress_and_dtypes():
    steps = []
    x = randn(8, 2, seed=12).to(torch.float32) * 10
    sigmas = sigmas_karras(6, sigma_max=10.0)
    dtypes = []

    def denoise(x_, s_):
        dtypes.append(x_.dtype)
        return GM.denoise(x_, s_).to(x_.dtype)

    y = sample(denoise, x, sigmas, solver="dpmpp_2m", callback=steps.append, progress=True)
    assert y.dtype == torch.float32 and set(dtypes) == {torch.float32}
    assert [s.i for s in steps] == list(range(6))
    assert [s.sigma.item() for s in steps] == sigmas[:-1].tolist()
    assert all(s.x.dtype == F64 and s.denoised.shape == x.shape for s in steps)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    x = randn(4, 2, seed=13)
    good = sigmas_karras(5)
    with pytest.raises(ValueError, match="sigmas: expected a strictly decreasing"):
        sample(GM.denoise, x, torch.tensor([1.0, 2.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="sigmas: expected the last value to be 0"):
        sample(GM.denoise, x, good[:-1])
    with pytest.raises(ValueError, match="sigmas: expected a 1-D"):
        sample(GM.denoise, x, good[None])
    with pytest.raises(ValueError, match="sigmas: expected finite"):
        sample(GM.denoise, x, torch.tensor([math.nan, 1.0, 0.0]))
    with pytest.raises(TypeError, match="sigmas"):
        sample(GM.denoise, x, torch.tensor([2, 1, 0]))
    with pytest.raises(ValueError, match=r"denoise: expected an output of shape \(4, 2\).*got \(4, 1\)"):
        sample(lambda x_, s_: x_[:, :1], x, good)
    with pytest.raises(ValueError, match="eta: expected a finite float >= 0, got -0.5"):
        sample(GM.denoise, x, good, solver="ddim", eta=-0.5)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(x, x, 1.0, 0.5, eta=-1.0, noise=x)
    with pytest.raises(ValueError, match="solver: expected one of euler, heun, dpmpp_2m, ddim, ddpm, got 'dpm'"):
        sample(GM.denoise, x, good, solver="dpm")
    with pytest.raises(ValueError, match="s_churn"):
        sample(GM.denoise, x, good, solver="ddim", s_churn=1.0)
    with pytest.raises(ValueError, match="noise"):
        ddpm_step(x, x, 1.0, 0.5)
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(x, x, 1.0, 0.5, noise=x, variance="fixed")
    with pytest.raises(ValueError, match="sigma: expected values > 0"):
        euler_step(x, x, 0.0, 0.0)
    with pytest.raises(ValueError, match="denoised: expected shape"):
        euler_step(x, x[:, :1], 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma: expected length B=4"):
        euler_step(x, x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="eta=2.0"):
        ddim_step(x, x, 1.0, 0.5, eta=2.0, noise=x)
    with pytest.raises(ValueError, match="denoised_prev, sigma_prev"):
        dpmpp_2m_step(x, x, 1.0, 0.5, denoised_prev=x)
    with pytest.raises(ValueError, match="n_steps"):
        churn(x, 1.0, x, s_churn=1.0, n_steps=0)
