"""The bound from a network in one line (kdiff.elbo.vlb_model, vlb_estimate, the tanh CDF) and ancestral sampling
on respaced chains, against independent oracles: DDPM's and iDDPM's discrete-table formulas written out in
float64 (betas, alpha-bars, beta-tilde, the clipped posterior log-variance), scipy's normal CDF, and closed-form
bounds of models whose every term is deterministic."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kdiff import elbo
from kdiff.denoisers import vp_denoiser
from kdiff.schedules import alphas_bar_cosine, alphas_bar_from_betas, betas_linear, logsnr_from_alphas_bar, respace
from kdiff.solvers import sample, sigmas_from_alphas_bar

F64 = torch.float64


def _grid(k):
    return np.asarray(k, dtype=np.float64) * 2 / 255 - 1


def _table(kind, T):
    abar = alphas_bar_from_betas(betas_linear(T, beta_start=0.05, beta_end=0.4)) if kind == "linear" \
        else alphas_bar_cosine(T)
    return abar.to(F64)


class _Net(torch.nn.Module):
    """A smooth test network ``net(z, t)`` on (B, C, H, W): a 1x1 conv mixing channels, modulated by t."""

    def __init__(self, C, out_mult=1, T=10, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(C * out_mult, C, generator=g, dtype=F64) * 0.5
        self.b = torch.randn(C * out_mult, generator=g, dtype=F64) * 0.3
        self.T = T

    def forward(self, z, c):
        h = torch.einsum("oc,bchw->bohw", self.w, z) + self.b[None, :, None, None]
        return torch.tanh(h * (1.0 + c.to(z.dtype)[:, None, None, None] / self.T))


def _hand_model(net, abar, *, param, variance):
    """DDPM/iDDPM's model p(x_{t-1} | x_t) from the beta table [DDPM Eq. 7, 11; iDDPM Eq. 15], in numpy-style
    float64 table arithmetic: the twelve lines a user writes without the entry point."""
    T = abar.numel()
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # posterior_log_variance_clipped
    large = torch.log(torch.cat([post_var[1:2], betas[1:]]))  # DDPM's fixedlarge log-variance
    coef_x = betas * abar_prev.sqrt() / (1 - abar)
    coef_z = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    def model_fn(z, i):
        out = net(z, torch.full((z.shape[0],), float(i), dtype=F64))
        if variance == "learned":
            out, v = out.chunk(2, dim=1)
        if param == "eps":
            x_hat = (z - (1 - abar[i]).sqrt() * out) / abar[i].sqrt()
        elif param == "v":
            x_hat = abar[i].sqrt() * z - (1 - abar[i]).sqrt() * out
        else:
            x_hat = out
        mean = coef_x[i] * x_hat + coef_z[i] * z
        if variance == "small":
            logvar = clipped[i].reshape(1, 1, 1, 1)
        elif variance == "large":
            logvar = large[i].reshape(1, 1, 1, 1)
        else:
            frac = (v + 1) / 2
            logvar = frac * torch.log(betas[i]) + (1 - frac) * clipped[i]
        return mean, logvar

    assert T >= 2
    return model_fn


@pytest.mark.parametrize("variance", ["small", "large", "learned"])
@pytest.mark.parametrize("param", ["eps", "v", "x"])
def test_vlb_model_equals_the_whole_chain_vlb_called_by_hand(param, variance):
    T, C = 12, 2
    abar = _table("cosine", T)
    logsnrs = logsnr_from_alphas_bar(abar)
    net = _Net(C, 2 if variance == "learned" else 1, T=T)
    x = torch.tensor(_grid(np.random.default_rng(0).integers(0, 256, size=(5, C, 3, 3))))
    noise = torch.randn(T, *x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = elbo.vlb(elbo.vlb_model(net, logsnrs, param=param, variance=variance), x, logsnrs, noise=noise)
    want = elbo.vlb(_hand_model(net, abar, param=param, variance=variance), x, logsnrs, noise=noise)
    assert torch.isfinite(got.terms).all()
    torch.testing.assert_close(got.terms, want.terms, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.bpd, want.bpd, rtol=1e-10, atol=1e-12)


def test_vlb_model_first_step_uses_the_clipped_posterior_logvar_not_minus_inf():
    # The obvious "small" first-step variance is beta~_1 = 0, log = -inf, and the decoder would return NaN.
    abar = _table("linear", 6)
    logsnrs = logsnr_from_alphas_bar(abar)
    post_var_2 = (1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])  # DDPM Eq. 7 at t = 2
    z = torch.zeros(3, 1, 2, 2, dtype=F64)
    for variance in ("small", "large"):
        _, logvar = elbo.vlb_model(lambda z, c: torch.zeros_like(z), logsnrs, variance=variance)(z, 0)
        torch.testing.assert_close(logvar.reshape(-1), torch.log(post_var_2).expand(3), rtol=1e-12, atol=0)
    # per-sample steps mix the first step with the others; learned with v = 1 is log beta_t, also at t = 1
    net = lambda z, c: torch.cat([torch.zeros_like(z), torch.ones_like(z)], dim=1)  # noqa: E731
    _, logvar = elbo.vlb_model(net, logsnrs, variance="learned")(z, torch.tensor([0, 1, 5]))
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    torch.testing.assert_close(logvar[:, 0, 0, 0], torch.log(betas[[0, 1, 5]]), rtol=1e-12, atol=0)


def test_vlb_model_conditions_on_index_or_logsnr_and_clips():
    logsnrs = logsnr_from_alphas_bar(_table("cosine", 8))
    seen = []
    net = lambda z, c: (seen.append(c), 5 * torch.ones_like(z))[1]  # noqa: E731
    z = torch.zeros(2, 1, 1, 1, dtype=torch.float32)
    mean, _ = elbo.vlb_model(net, logsnrs, param="x", clip_denoised=True)(z, 0)
    assert seen[-1].dtype == torch.float32 and seen[-1].tolist() == [0.0, 0.0]
    torch.testing.assert_close(mean, torch.ones_like(z))  # the first step's mean is x_hat, clipped to 1
    elbo.vlb_model(net, logsnrs, param="x", cond="logsnr")(z, torch.tensor([3, 7]))
    torch.testing.assert_close(seen[-1].to(F64), logsnrs[[3, 7]])


def test_vlb_model_bad_input():
    logsnrs = logsnr_from_alphas_bar(_table("cosine", 4))
    net = lambda z, c: z  # noqa: E731
    with pytest.raises(ValueError, match="variance: expected one of"):
        elbo.vlb_model(net, logsnrs, variance="fixed")
    with pytest.raises(ValueError, match="param: expected one of"):
        elbo.vlb_model(net, logsnrs, param="score")
    with pytest.raises(ValueError, match="cond: expected"):
        elbo.vlb_model(net, logsnrs, cond="t")
    with pytest.raises(ValueError, match="logsnrs: expected T >= 2"):
        elbo.vlb_model(net, logsnrs[:1])
    z = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"i: expected step indices in \[0, 3\]"):
        elbo.vlb_model(net, logsnrs)(z, 4)
    with pytest.raises(TypeError, match="i: expected an int or an integer tensor"):
        elbo.vlb_model(net, logsnrs)(z, 1.0)
    with pytest.raises(ValueError, match="i: expected an int or shape"):
        elbo.vlb_model(net, logsnrs)(z, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="net: expected 2 channels"):
        elbo.vlb_model(net, logsnrs, variance="learned")(z, 1)


# ----------------------------------------------------------------------------------------------
# A model whose every term is deterministic: the bound in closed form, and the stochastic estimate around it


def _fixed_prediction_model(x_hat, v):
    """An x-prediction network that returns a fixed ``x_hat`` (and a fixed variance output ``v``) for each image
    of the batch, whatever z: then the model mean differs from the posterior mean by a constant, so every term
    of the bound is the same for every forward noise."""

    def net(z, c):
        reps = z.shape[0] // x_hat.shape[0]
        return torch.cat([x_hat, v], dim=1).repeat(reps, 1, 1, 1).to(z.dtype)

    return net


def _closed_form_bound(x, x_hat, v, abar):
    """sum_t L_t + L_T in nats per image, by DDPM's table formulas: KL of two Gaussians with equal means but for
    coef_x (x - x_hat), the decoder by scipy's normal CDF, iDDPM's learned variance with the clipped beta~."""
    x, x_hat, v, abar = (np.asarray(a, dtype=np.float64) for a in (x, x_hat, v, abar))
    T = abar.size
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    clipped = np.log(np.append(post_var[1], post_var[1:]))
    frac = (v + 1) / 2
    total = np.zeros(x.shape[0])
    for t in range(T):
        logvar = frac * np.log(betas[t]) + (1 - frac) * clipped[t]
        if t == 0:
            scale = np.exp(0.5 * logvar)
            hi = np.where(x > 1 - 1 / 255, 1.0, stats.norm.cdf((x + 1 / 255 - x_hat) / scale))
            lo = np.where(x < -1 + 1 / 255, 0.0, stats.norm.cdf((x - 1 / 255 - x_hat) / scale))
            total += -np.log(np.maximum(hi - lo, 1e-12)).reshape(x.shape[0], -1).sum(1)
        else:
            coef_x = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
            d = np.log(post_var[t]) - logvar
            kl = 0.5 * (np.expm1(d) - d + (coef_x * (x - x_hat)) ** 2 * np.exp(-logvar))
            total += kl.reshape(x.shape[0], -1).sum(1)
    prior = 0.5 * (abar[-1] * x**2 - abar[-1] - np.log(1 - abar[-1]))
    return total + prior.reshape(x.shape[0], -1).sum(1)


def _deterministic_case(T=40, B=3):
    rng = np.random.default_rng(3)
    x = torch.tensor(_grid(rng.integers(0, 256, size=(B, 1, 2, 2))))
    x_hat = (x + torch.tensor(rng.normal(0, 0.05, size=x.shape))).clamp(-1, 1)
    v = torch.tensor(rng.uniform(-1, 1, size=x.shape))
    abar = _table("cosine", T)
    return x, x_hat, v, abar


def test_exact_bound_of_a_deterministic_model_matches_the_closed_form():
    x, x_hat, v, abar = _deterministic_case()
    logsnrs = logsnr_from_alphas_bar(abar)
    model_fn = elbo.vlb_model(_fixed_prediction_model(x_hat, v), logsnrs, param="x", variance="learned")
    out = elbo.vlb(model_fn, x, logsnrs, generator=torch.Generator().manual_seed(0), progress=False)
    np.testing.assert_allclose(out.nats.numpy(), _closed_form_bound(x, x_hat, v, abar), rtol=1e-9)


@pytest.mark.parametrize("method", elbo.ESTIMATORS)
def test_stochastic_estimate_is_unbiased_and_its_standard_error_is_calibrated(method):
    x, x_hat, v, abar = _deterministic_case()
    logsnrs = logsnr_from_alphas_bar(abar)
    exact = torch.tensor(_closed_form_bound(x, x_hat, v, abar)) / (x[0].numel() * math.log(2))
    R, K = 400, 4  # R independent estimates per image, run as one batch of R copies
    xr = x.repeat(R, 1, 1, 1)
    model_fn = elbo.vlb_model(_fixed_prediction_model(x_hat, v), logsnrs, param="x", variance="learned")
    est = elbo.vlb_estimate(model_fn, xr, logsnrs, k=K, method=method, generator=torch.Generator().manual_seed(0))
    bpd, se = est.bpd.reshape(R, -1), est.stderr.reshape(R, -1)
    # unbiased: the mean of R estimates is within 4 of its standard errors of the exact bound, per image
    assert ((bpd.mean(0) - exact).abs() < 4 * bpd.std(0) / math.sqrt(R)).all()
    # calibrated: the stated standard error matches the spread of independent estimates (within sampling error)
    ratio = se.square().mean(0).sqrt() / bpd.std(0)
    assert ((ratio > 0.75) & (ratio < 1.33)).all(), ratio
    mean, se_mean = elbo.VLBEstimate(est.bpd[:3], est.nats[:3], est.stderr[:3]).summary()
    assert se_mean == pytest.approx(est.stderr[:3].square().sum().sqrt().item() / 3)
    assert mean == pytest.approx(est.bpd[:3].mean().item())
    again = elbo.vlb_estimate(model_fn, xr, logsnrs, k=K, method=method, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.bpd, est.bpd)


def test_stratified_estimate_with_one_stratum_per_step_is_the_exact_bound():
    """K = 2T: every step is its own stratum, drawn twice. This model's terms do not depend on the noise (its
    prediction ignores z), so the estimate is the closed-form bound and both draws of a stratum agree (SE 0)."""
    x, x_hat, v, abar = _deterministic_case(T=12)
    logsnrs = logsnr_from_alphas_bar(abar)
    exact = torch.tensor(_closed_form_bound(x, x_hat, v, abar))
    model_fn = elbo.vlb_model(_fixed_prediction_model(x_hat, v), logsnrs, param="x", variance="learned")
    est = elbo.vlb_estimate(model_fn, x, logsnrs, k=24, method="stratified", generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(est.nats.numpy(), exact.numpy(), rtol=1e-9)
    np.testing.assert_allclose(est.stderr.numpy(), 0.0, atol=1e-9)


def test_stratified_estimate_has_a_smaller_spread_where_the_decoder_term_dominates():
    """The decoder term of this model is most of its bound; uniform draws at K = 8 of T = 40 steps miss it most of
    the time, the stratified estimate sees it in every run (measured over 400 runs: a 7-19x smaller spread)."""
    x, x_hat, v, abar = _deterministic_case()
    logsnrs = logsnr_from_alphas_bar(abar)
    xr = x.repeat(200, 1, 1, 1)
    model_fn = elbo.vlb_model(_fixed_prediction_model(x_hat, v), logsnrs, param="x", variance="learned")
    spread = {m: elbo.vlb_estimate(model_fn, xr, logsnrs, k=8, method=m, generator=torch.Generator().manual_seed(1))
              .bpd.reshape(200, -1).std(0) for m in elbo.ESTIMATORS}
    assert (spread["stratified"] < spread["uniform"] / 3).all(), spread


@pytest.mark.parametrize("method", elbo.ESTIMATORS)
def test_stochastic_estimate_of_a_network_agrees_with_the_exact_bound(method):
    # A z-dependent network: the terms are random in the noise too; the estimate is within 4 standard errors.
    T, C = 16, 1
    abar = _table("linear", T)
    logsnrs = logsnr_from_alphas_bar(abar)
    model_fn = elbo.vlb_model(_Net(C, 2, T=T, seed=4), logsnrs, variance="learned")
    x = torch.tensor(_grid(np.random.default_rng(5).integers(0, 256, size=(64, C, 2, 2))))
    exact = elbo.vlb(model_fn, x, logsnrs, generator=torch.Generator().manual_seed(6)).bpd.mean().item()
    est = elbo.vlb_estimate(model_fn, x, logsnrs, k=32, method=method, generator=torch.Generator().manual_seed(7))
    mean, se = est.summary()
    assert se > 0 and abs(mean - exact) < 4 * se


def test_vlb_estimate_bad_input():
    logsnrs = logsnr_from_alphas_bar(_table("cosine", 4))
    fn = elbo.vlb_model(lambda z, c: z, logsnrs)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="k: expected an int >= 2"):
        elbo.vlb_estimate(fn, x, logsnrs, k=1)
    with pytest.raises(ValueError, match="cdf: expected one of"):
        elbo.vlb_estimate(fn, x, logsnrs, k=2, cdf="erf")
    with pytest.raises(ValueError, match="method: expected one of 'uniform', 'stratified', got 'sobol'"):
        elbo.vlb_estimate(fn, x, logsnrs, k=2, method="sobol")
    for k in (3, 10):  # odd; more than two draws for each of the T = 4 steps
        with pytest.raises(ValueError, match=r"k: expected an even int in \[2, 8\]"):
            elbo.vlb_estimate(fn, x, logsnrs, k=k, method="stratified")


# ----------------------------------------------------------------------------------------------
# The tanh CDF of the released code


def test_tanh_cdf_is_the_published_approximation_and_close_to_the_exact_cdf():
    u = torch.linspace(-8, 8, 2001, dtype=F64)
    want = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u.numpy() + 0.044715 * u.numpy() ** 3)))
    np.testing.assert_allclose(elbo.normal_cdf_tanh(u).numpy(), want, rtol=1e-15, atol=1e-15)
    err = np.abs(want - stats.norm.cdf(u.numpy())).max()
    assert 1e-5 < err < 3e-4


def test_tanh_decoder_is_the_published_formula_with_its_1e12_floor():
    rng = np.random.default_rng(8)
    x = _grid(rng.integers(0, 256, size=(4, 50)))
    x[:, :3] = [-1.0, 1.0, 0.0]
    mean = np.clip(x + rng.normal(0, 0.02, size=x.shape), -1, 1)
    log_scale = rng.uniform(-7, -2, size=x.shape)
    cdf = lambda u: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))  # noqa: E731
    plus, minus = cdf((x - mean + 1 / 255) * np.exp(-log_scale)), cdf((x - mean - 1 / 255) * np.exp(-log_scale))
    want = np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))))
    got = elbo.discretized_gaussian_loglik(torch.tensor(x), torch.tensor(mean), torch.tensor(log_scale), cdf="tanh")
    # probabilities agree to rounding: the difference of two CDFs near 1 cancels, as in the released code
    np.testing.assert_allclose(np.exp(got.numpy()), np.exp(want), rtol=1e-12, atol=1e-15)
    exact = elbo.discretized_gaussian_loglik(torch.tensor(x), torch.tensor(mean), torch.tensor(log_scale))
    assert (got.exp() - exact.exp()).abs().max() < 5e-4  # each CDF off by < 2.5e-4 (relative error large in tails)
    with pytest.raises(ValueError, match="cdf: expected one of"):
        elbo.decoder_nll(torch.tensor(x), torch.tensor(mean), torch.tensor(log_scale), cdf="probit")


# ----------------------------------------------------------------------------------------------
# Ancestral sampling with learned variances on respaced chains (iDDPM Sec. 4)


def _ddpm_loop_by_table(net, abar, timesteps, z_T, noises):
    """iDDPM's respaced ancestral sampler: betas recomputed from the kept alpha-bars, p_mean_variance with the
    learned range between log beta_t and the clipped log beta~_t, no noise at the last step [DDPM Alg. 2]."""
    kept = abar[timesteps]
    abar_prev = torch.cat([torch.ones(1, dtype=F64), kept[:-1]])
    betas = 1 - kept / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - kept)
    clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    z = z_T
    for n, k in enumerate(reversed(range(len(timesteps)))):
        out = net(z, torch.full((z.shape[0],), float(timesteps[k]), dtype=F64))
        eps, v = out.chunk(2, dim=1)
        x_hat = (z - (1 - kept[k]).sqrt() * eps) / kept[k].sqrt()
        mean = (betas[k] * abar_prev[k].sqrt() * x_hat + (1 - abar_prev[k]) * (1 - betas[k]).sqrt() * z) / (1 - kept[k])
        frac = (v + 1) / 2
        logvar = frac * torch.log(betas[k]) + (1 - frac) * clipped[k]
        z = mean + (torch.exp(0.5 * logvar) * noises[n] if k > 0 else 0.0)
    return z


@pytest.mark.parametrize("K", [30, 7, 2])
def test_learned_variance_respaced_sampling_matches_the_table_sampler(K):
    # K = T: the respaced chain is the full chain; K < T: the betas and variances are recomputed for the subset.
    T, C = 30, 2
    abar = _table("cosine", T)
    net = _Net(C, 2, T=T, seed=9)
    timesteps = respace(T, K)
    sigmas = sigmas_from_alphas_bar(abar, timesteps)
    n = torch.randn(3, C, 2, 2, generator=torch.Generator().manual_seed(10), dtype=F64)
    gen = torch.Generator().manual_seed(11)
    got = sample(vp_denoiser(net, alphas_bar=abar, learned_variance=True), n * math.sqrt(1 + sigmas[0] ** 2),
                 sigmas, solver="ddpm", generator=gen)
    gen = torch.Generator().manual_seed(11)
    noises = [torch.randn(n.shape, generator=gen, dtype=F64) for _ in range(K)]
    want = _ddpm_loop_by_table(net, abar, timesteps, n, noises)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    if K == T:
        assert torch.equal(timesteps, torch.arange(T))
