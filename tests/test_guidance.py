"""Guidance against the Gaussian-mixture test bed, whose class-conditional denoisers and class
posterior are exact, and against Ho & Salimans' eps-space formula and a quadrature of ADM's tilt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gaussian_mixture import two_d_mixture
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import quad
from scipy.special import softmax
from scipy.stats import norm

from kdiff.denoisers import vp_denoiser
from kdiff.guidance import (
    cfg,
    cfg_batched,
    classifier_guidance,
    grad_log_prob,
    guided_eps,
    guided_mean,
    label_log_prob,
    noisy_classifier_log_prob,
)
from kdiff.param import x_from_eps
from kdiff.process import posterior
from kdiff.schedules import alphas_bar_cosine, logsnr_from_alphas_bar, sigmas_karras
from kdiff.solvers import ddim_step, sample, sigmas_from_alphas_bar

F64 = torch.float64
GM = two_d_mixture()
NULL = GM.n_classes  # the reserved "no label" index


pytestmark = pytest.mark.usefixtures("single_thread")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def labelled_denoiser(x: torch.Tensor, sigma, labels: torch.Tensor) -> torch.Tensor:
    """A label-conditioned model: class ``k``'s exact denoiser, the mixture's for the null label."""
    out = GM.denoise(x, sigma)
    for k in range(GM.n_classes):
        rows = labels == k
        if rows.any():
            s = sigma[rows] if isinstance(sigma, torch.Tensor) and sigma.ndim == 1 else sigma
            out[rows] = GM.denoise_class(x[rows], s, k)
    return out


def class_log_prob(k: int):
    return lambda x, sigma: GM.class_log_posterior(x, sigma)[:, k]


sigmas = st.floats(0.01, 50.0)


@given(sigmas, st.integers(0, 2), st.floats(0.0, 10.0), st.integers(0, 10_000))
def test_cfg_endpoints_and_ho_salimans_eps_form(sigma, k, w, seed):
    x = randn(6, 2, seed=seed) * (1 + sigma)
    cond = lambda x_, s_: GM.denoise_class(x_, s_, k)  # noqa: E731
    torch.testing.assert_close(cfg(cond, GM.denoise, scale=1.0)(x, sigma), cond(x, sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cfg(cond, GM.denoise, scale=0.0)(x, sigma), GM.denoise(x, sigma),
                               rtol=1e-12, atol=1e-12)
    eps_c, eps_u = (x - cond(x, sigma)) / sigma, (x - GM.denoise(x, sigma)) / sigma
    eps_guided = (1 + w) * eps_c - w * eps_u  # Ho & Salimans Eq. 6
    torch.testing.assert_close(cfg(cond, GM.denoise, scale=1 + w)(x, sigma), x - sigma * eps_guided,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("batched_sigma", [False, True])
def test_cfg_batched_is_one_pass_of_cfg(batched_sigma):
    labels = torch.tensor([0, 2, 1, 2, 0])
    x = randn(5, 2, seed=1) * 2
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.5, 4.0], dtype=F64) if batched_sigma else 1.5
    calls = []

    def model(x_, s_, y_):
        calls.append((x_.shape[0], y_.tolist()))
        return labelled_denoiser(x_, s_, y_)

    out = cfg_batched(model, labels, scale=3.0, null_label=NULL)(x, sigma)
    assert calls == [(10, labels.tolist() + [NULL] * 5)]
    two_pass = cfg(lambda x_, s_: labelled_denoiser(x_, s_, labels),
                   lambda x_, s_: labelled_denoiser(x_, s_, torch.full_like(labels, NULL)), scale=3.0)
    torch.testing.assert_close(out, two_pass(x, sigma), rtol=1e-12, atol=1e-12)


@given(sigmas, st.integers(0, 2), st.integers(0, 10_000))
def test_classifier_guidance_scale_one_with_exact_posterior_is_conditional_denoiser(sigma, k, seed):
    x = randn(6, 2, seed=seed) * (1 + sigma)
    with torch.no_grad():
        guided = classifier_guidance(GM.denoise, class_log_prob(k), scale=1.0)(x, sigma)
        unguided = classifier_guidance(GM.denoise, class_log_prob(k), scale=0.0)(x, sigma)
    torch.testing.assert_close(guided, GM.denoise_class(x, sigma, k), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(unguided, GM.denoise(x, sigma), rtol=1e-12, atol=1e-12)


def test_classifier_guidance_moves_samples_to_the_class():
    """Sampling the mixture with guidance towards its smallest class (weight 0.2): the fraction of
    samples assigned to that class starts at the weight and rises with the scale."""
    k, n = 2, 1000
    gen = torch.Generator().manual_seed(2)
    y0, _ = GM.sample(n, gen)
    x = y0 + 10.0 * torch.randn(n, 2, generator=gen, dtype=F64)
    grid = sigmas_karras(18, sigma_max=10.0, rho=3.0)
    fractions = []
    for scale in (0.0, 0.5, 1.0, 3.0):
        y = sample(classifier_guidance(GM.denoise, class_log_prob(k), scale=scale), x, grid, solver="heun")
        fractions.append((GM.class_log_posterior(y).argmax(-1) == k).double().mean().item())
    se = math.sqrt(0.2 * 0.8 / n)
    assert abs(fractions[0] - 0.2) < 4 * se, fractions
    assert fractions == sorted(fractions) and fractions[1] > fractions[0] + 4 * se, fractions
    assert fractions[2] > 0.97, fractions


@given(sigmas, st.integers(0, 10_000))
def test_grad_log_prob_matches_closed_form(sigma, seed):
    x = randn(6, 2, seed=seed) * (1 + sigma)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        grad = grad_log_prob(GM.class_log_posterior, x, sigma, y)
    expected = torch.stack([GM.class_log_posterior_grad(x[i:i + 1], sigma, int(y[i]))[0] for i in range(6)])
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


@given(st.floats(-8.0, 8.0), st.integers(0, 2), st.floats(0.0, 5.0), st.integers(0, 10_000))
def test_guided_eps_on_a_vp_model_equals_classifier_guidance(logsnr, k, scale, seed):
    """ADM Alg. 2 on ``z = alpha x`` and the EDM-space wrapper give the same clean estimate."""
    alpha, sigma_vp = math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))
    sigma = sigma_vp / alpha
    x = randn(6, 2, seed=seed) * (1 + sigma)
    z = alpha * x
    eps = (z - alpha * GM.denoise(x, sigma)) / sigma_vp
    grad_z = GM.class_log_posterior_grad(x, sigma, k) / alpha  # log p(k | z) = log p(k | x = z / alpha)
    eps_guided = guided_eps(eps, sigma_vp, grad_z, scale=scale)
    expected = classifier_guidance(GM.denoise, class_log_prob(k), scale=scale)(x, sigma)
    torch.testing.assert_close((z - sigma_vp * eps_guided) / alpha, expected, rtol=1e-8, atol=1e-8)


@given(st.floats(-3.0, 3.0), st.floats(0.05, 4.0), st.floats(-2.0, 2.0), st.floats(0.0, 3.0))
def test_guided_mean_is_the_mean_of_the_tilted_gaussian(mean, var, grad, scale):
    """For a log-likelihood linear in z, ``N(mean, var) p(y | z)^scale`` has mean ``mean + scale var grad``."""
    sd = math.sqrt(var)
    lo, hi = mean - 12 * sd - abs(scale * var * grad), mean + 12 * sd + abs(scale * var * grad)
    weight = lambda z: norm.pdf(z, mean, sd) * math.exp(scale * grad * (z - mean))  # noqa: E731
    tilted = quad(lambda z: z * weight(z), lo, hi, epsabs=1e-12)[0] / quad(weight, lo, hi, epsabs=1e-12)[0]
    out = guided_mean(torch.full((1, 1), mean, dtype=F64), var, torch.full((1, 1), grad, dtype=F64), scale=scale)
    assert out.item() == pytest.approx(tilted, rel=1e-7, abs=1e-7)


def test_guided_mean_per_sample_and_per_element_variance():
    mean, grad = randn(3, 2, 2, seed=3), randn(3, 2, 2, seed=4)
    var = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    per_element = var[:, None, None].expand(3, 2, 2).clone()
    torch.testing.assert_close(guided_mean(mean, var, grad, scale=2.0), guided_mean(mean, per_element, grad, scale=2.0))
    torch.testing.assert_close(guided_mean(mean, 0.2, grad, scale=2.0), mean + 0.4 * grad)


def test_guidance_bad_input():
    x = randn(4, 2)
    with pytest.raises(ValueError, match="scale: expected a finite float, got nan"):
        cfg(GM.denoise, GM.denoise, scale=math.nan)
    with pytest.raises(TypeError, match="labels: expected a 1-D integer tensor"):
        cfg_batched(labelled_denoiser, torch.zeros(4), scale=2.0, null_label=NULL)
    with pytest.raises(ValueError, match="labels: expected length B=4"):
        cfg_batched(labelled_denoiser, torch.zeros(3, dtype=torch.int64), scale=2.0, null_label=NULL)(x, 1.0)
    with pytest.raises(ValueError, match=r"log_prob: expected one value per sample, shape \(4,\)"):
        classifier_guidance(GM.denoise, lambda x_, s_: GM.class_log_posterior(x_, s_), scale=1.0)(x, 1.0)
    with pytest.raises(TypeError, match="y: expected an integer tensor of class indices, got dtype torch.float32"):
        grad_log_prob(GM.class_log_posterior, x, 1.0, torch.zeros(4))
    with pytest.raises(ValueError, match=r"y: expected an integer tensor of shape \(4,\)"):
        grad_log_prob(GM.class_log_posterior, x, 1.0, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="classifier: expected logits"):
        grad_log_prob(lambda x_, s_: x_[:, 0], x, 1.0, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="grad: expected shape"):
        guided_eps(x, 0.5, x[:, :1], scale=1.0)
    with pytest.raises(ValueError, match="var: expected length B=4"):
        guided_mean(x, torch.ones(3), x, scale=1.0)
    with pytest.raises(ValueError, match=r"var: expected a shape broadcastable to \(4, 2\)"):
        guided_mean(x, torch.ones(2, 1, dtype=F64), x, scale=1.0)


# ---------------------------------------------------------------------------------------------------
# A noisy classifier (z, noise_cond) -> logits, through the EDM-space adapter


def vp_posterior_classifier(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """The mixture's exact class posterior as a classifier on VP latents: ``log p(k | z_t)`` with
    ``z_t = alpha y + sigma_vp n``, i.e. ``log p(k | x = z / alpha, sigma_edm = sigma_vp / alpha)``."""
    alpha = torch.sqrt(1 / (1 + torch.exp(-logsnr)))
    return GM.class_log_posterior(z / alpha[:, None], torch.exp(-logsnr / 2))


@given(sigmas, st.integers(0, 10_000))
def test_noisy_classifier_adapter_at_scale_one_gives_the_exact_conditional_denoiser(sigma, seed):
    x = randn(6, 2, seed=seed) * (1 + sigma)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    log_prob = noisy_classifier_log_prob(vp_posterior_classifier)
    with torch.no_grad():
        guided = classifier_guidance(GM.denoise, log_prob, y=y, scale=1.0)(x, sigma)
    expected = torch.stack([GM.denoise_class(x[i:i + 1], sigma, int(y[i]))[0] for i in range(6)])
    torch.testing.assert_close(guided, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_prob(x, sigma, y), GM.class_log_posterior(x, sigma)[torch.arange(6), y],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nearest", [False, True])
def test_noisy_classifier_adapter_on_a_discrete_table(nearest):
    """A classifier trained on table indices ``t`` (looked up in the table inside the network) guides an
    EDM-space denoiser on the table's sigma grid, per-sample sigmas and labels included."""
    alphas_bar = alphas_bar_cosine(40)
    table_logsnr = logsnr_from_alphas_bar(alphas_bar)
    seen = []

    def net(z, t):
        seen.append(t.dtype)
        idx = t.round().long() if t.is_floating_point() else t
        torch.testing.assert_close(t.double(), idx.double(), rtol=0, atol=1e-6)  # on the grid t is an integer
        return vp_posterior_classifier(z, table_logsnr[idx])

    grid = sigmas_from_alphas_bar(alphas_bar)[:-1]
    sigma = grid[torch.tensor([0, 5, 17, 30, 39])]
    x = randn(5, 2, seed=7) * (1 + sigma[:, None])
    y = torch.tensor([2, 0, 1, 2, 1])
    log_prob = noisy_classifier_log_prob(net, alphas_bar=alphas_bar, nearest=nearest)
    guided = classifier_guidance(GM.denoise, log_prob, y=y, scale=1.0)(x, sigma)
    expected = torch.stack([GM.denoise_class(x[i:i + 1], sigma[i:i + 1], int(y[i]))[0] for i in range(5)])
    torch.testing.assert_close(guided, expected, rtol=1e-8, atol=1e-8)
    assert set(seen) == {torch.int64 if nearest else torch.float64}


def test_noisy_classifier_adapter_custom_noise_cond_and_int_label():
    """``noise_cond`` maps logsnr to what the classifier was trained with (here ``t = -logsnr / 30 + 1 / 2``)."""
    def net(z, t):
        return vp_posterior_classifier(z, 30 * (0.5 - t))

    x, sigma = randn(4, 2, seed=8) * 2, torch.tensor([0.2, 1.0, 3.0, 9.0], dtype=F64)
    log_prob = noisy_classifier_log_prob(net, noise_cond=lambda logsnr: 0.5 - logsnr / 30)
    torch.testing.assert_close(log_prob(x, sigma, 1), GM.class_log_posterior(x, sigma)[:, 1], rtol=1e-10, atol=1e-10)


def linear_classifier(weight: torch.Tensor, bias: torch.Tensor):
    """A toy noisy classifier: ``logits = W flatten(z) + t b`` (``W: (K, D)``, ``b: (K,)``)."""
    return lambda z, t: z.flatten(1) @ weight.T + torch.as_tensor(t, dtype=F64).reshape(-1, 1) * bias


def linear_grad(weight: np.ndarray, bias: np.ndarray, z: np.ndarray, t: float, y: np.ndarray) -> np.ndarray:
    """``grad_z log softmax(W z + t b)[y] = W[y] - sum_j p_j W[j]``, in numpy float64."""
    p = softmax(z @ weight.T + t * bias, axis=1)
    return weight[y] - p @ weight


TOY_T = 100
TOY_AB = alphas_bar_cosine(TOY_T)


def toy_eps_model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a noise-prediction network."""
    return torch.tanh(0.7 * z + 0.01 * torch.as_tensor(t, dtype=F64).reshape(-1, 1, 1, 1))


@given(st.integers(1, TOY_T - 1), st.floats(0.0, 10.0), st.integers(0, 10_000))
def test_algorithm_1_from_kdiff_functions_matches_adm(t, scale, seed):
    """ADM Alg. 1: ``z_{t-1} ~ N(mu + s Sigma grad_z log p(y | z_t), Sigma)``, with ``mu, Sigma`` the DDPM
    posterior at the model's x_0 (DDPM Eq. 7, written here from the alpha-bar table in numpy)."""
    gen = np.random.default_rng(seed)
    weight, bias = gen.normal(size=(5, 4)), gen.normal(size=5)
    z_t, x0 = gen.normal(size=(3, 4)), gen.normal(size=(3, 4))
    y = gen.integers(0, 5, size=3)
    ab = TOY_AB.numpy()
    ab_t, ab_s = ab[t], ab[t - 1]
    beta_t = 1 - ab_t / ab_s
    mu = beta_t * np.sqrt(ab_s) / (1 - ab_t) * x0 + (1 - ab_s) * np.sqrt(1 - beta_t) / (1 - ab_t) * z_t
    var = (1 - ab_s) / (1 - ab_t) * beta_t
    expected = mu + scale * var * linear_grad(weight, bias, z_t, t, y)

    shape = (3, 1, 2, 2)
    tz, tx0 = torch.from_numpy(z_t).reshape(shape), torch.from_numpy(x0).reshape(shape)
    logsnr = logsnr_from_alphas_bar(TOY_AB)
    mean, var_k = posterior(tx0, tz, logsnr[t - 1], logsnr[t])
    grad = grad_log_prob(linear_classifier(torch.from_numpy(weight), torch.from_numpy(bias)), tz, float(t),
                         torch.from_numpy(y))
    out = guided_mean(mean, var_k, grad, scale=scale)
    np.testing.assert_allclose(out.reshape(3, 4).numpy(), expected, rtol=1e-9, atol=1e-9)


@given(st.integers(1, TOY_T - 1), st.floats(0.0, 10.0), st.integers(0, 10_000))
def test_algorithm_2_from_kdiff_functions_matches_adm(t, scale, seed):
    """ADM Alg. 2: ``eps' = eps - sqrt(1 - ab_t) s grad``, then the DDIM update
    ``z_{t-1} = sqrt(ab_{t-1}) (z_t - sqrt(1 - ab_t) eps') / sqrt(ab_t) + sqrt(1 - ab_{t-1}) eps'``, built two
    ways: guided_eps in the VP frame, and classifier_guidance through the adapter in EDM space."""
    gen = np.random.default_rng(seed)
    weight, bias = gen.normal(size=(5, 4)), gen.normal(size=5)
    z_t = gen.normal(size=(3, 4))
    y = gen.integers(0, 5, size=3)
    ab = TOY_AB.numpy()
    ab_t, ab_s = ab[t], ab[t - 1]
    shape = (3, 1, 2, 2)
    tz = torch.from_numpy(z_t).reshape(shape)
    eps = toy_eps_model(tz, torch.tensor(float(t))).reshape(3, 4).numpy()
    eps_hat = eps - np.sqrt(1 - ab_t) * scale * linear_grad(weight, bias, z_t, t, y)
    expected = np.sqrt(ab_s) * (z_t - np.sqrt(1 - ab_t) * eps_hat) / np.sqrt(ab_t) + np.sqrt(1 - ab_s) * eps_hat

    clf, labels = linear_classifier(torch.from_numpy(weight), torch.from_numpy(bias)), torch.from_numpy(y)
    logsnr = logsnr_from_alphas_bar(TOY_AB)
    sig = torch.sqrt((1 - TOY_AB) / TOY_AB)
    # VP frame: guided_eps, then the DDIM step (on x = z / alpha, as kdiff's solvers run it)
    eps_g = guided_eps(toy_eps_model(tz, torch.tensor(float(t))), math.sqrt(1 - ab_t),
                       grad_log_prob(clf, tz, float(t), labels), scale=scale)
    x_t = tz * math.sqrt(1 + sig[t].item() ** 2)
    z_next = ddim_step(x_t, x_from_eps(tz, eps_g, logsnr[t]), sig[t], sig[t - 1]) / math.sqrt(1 + sig[t - 1] ** 2)
    np.testing.assert_allclose(z_next.reshape(3, 4).numpy(), expected, rtol=1e-9, atol=1e-9)
    # EDM frame: the adapter and classifier_guidance around vp_denoiser
    denoise = classifier_guidance(vp_denoiser(toy_eps_model, alphas_bar=TOY_AB),
                                  noisy_classifier_log_prob(clf, alphas_bar=TOY_AB), y=labels, scale=scale)
    x_next = ddim_step(x_t, denoise(x_t, sig[t]), sig[t], sig[t - 1])
    np.testing.assert_allclose((x_next / math.sqrt(1 + sig[t - 1] ** 2)).reshape(3, 4).numpy(), expected,
                               rtol=1e-8, atol=1e-8)


def test_guided_mean_takes_the_posterior_variance_shape():
    """``process.posterior`` returns ``var`` as ``(B, 1, 1, 1)``; guided_mean broadcasts it."""
    z_t, x0, grad = randn(3, 2, 2, 2, seed=5), randn(3, 2, 2, 2, seed=6), randn(3, 2, 2, 2, seed=9)
    logsnr_s, logsnr_t = torch.tensor([1.0, 0.0, -2.0], dtype=F64), torch.tensor([0.5, -1.0, -3.0], dtype=F64)
    mean, var = posterior(x0, z_t, logsnr_s, logsnr_t)
    assert var.shape == (3, 1, 1, 1)
    out = guided_mean(mean, var, grad, scale=3.0)
    torch.testing.assert_close(out, guided_mean(mean, var.expand_as(mean).clone(), grad, scale=3.0))
    torch.testing.assert_close(out, guided_mean(mean, var.reshape(3), grad, scale=3.0))


def test_classifier_guidance_passes_a_learned_variance_through():
    frac = torch.full((4, 2), 0.25, dtype=F64)
    x = randn(4, 2, seed=10)
    out = classifier_guidance(lambda x_, s_: (GM.denoise(x_, s_), frac), class_log_prob(1), scale=2.0)(x, 1.5)
    assert isinstance(out, tuple) and out[1] is frac
    torch.testing.assert_close(out[0], classifier_guidance(GM.denoise, class_log_prob(1), scale=2.0)(x, 1.5))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_guidance_function_rejects_a_non_finite_scale(bad):
    x, y = randn(4, 2), torch.zeros(4, dtype=torch.int64)
    calls = [
        lambda: cfg(GM.denoise, GM.denoise, scale=bad),
        lambda: cfg_batched(labelled_denoiser, y, scale=bad, null_label=NULL),
        lambda: classifier_guidance(GM.denoise, class_log_prob(0), scale=bad),
        lambda: guided_mean(x, 0.1, x, scale=bad),
        lambda: guided_eps(x, 0.1, x, scale=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="scale: expected a finite float"):
            call()


def test_label_and_variance_hardening():
    x, logits = randn(4, 2), randn(4, 3)
    clf = lambda z, c: z @ torch.ones(2, 3, dtype=F64)  # noqa: E731
    for y in (torch.tensor([0, 1, 3, 2]), torch.tensor([0, -1, 1, 2]), 3):
        with pytest.raises(ValueError, match=r"y: expected class indices in \[0, 2\] \(the classifier has K=3"):
            grad_log_prob(clf, x, 1.0, y)
    with pytest.raises(TypeError, match="y: expected an integer tensor of class indices, got dtype torch.float64"):
        label_log_prob(logits, torch.zeros(4, dtype=F64))
    with pytest.raises(TypeError, match="y: expected class indices as an int or an integer tensor"):
        label_log_prob(logits, 1.0)
    with pytest.raises(TypeError, match="y: expected class indices as an int or an integer tensor"):
        classifier_guidance(GM.denoise, noisy_classifier_log_prob(clf), y=True, scale=1.0)
    with pytest.raises(ValueError, match="y: expected class indices in"):
        classifier_guidance(GM.denoise, noisy_classifier_log_prob(clf), y=5, scale=1.0)(x, 1.0)
    for var in (-1.0, torch.tensor([0.1, -1.0, 0.2, 0.3]), torch.full((4, 1), -1.0, dtype=F64)):
        with pytest.raises(ValueError, match="var: expected values >= 0.0"):
            guided_mean(x, var, x, scale=1.0)
    with pytest.raises(ValueError, match="^var: expected finite values, got NaN"):
        guided_mean(x, math.nan, x, scale=1.0)
    with pytest.raises(ValueError, match="sigma_vp: expected values <= 1.0"):
        guided_eps(x, 2.0, x, scale=1.0)
    with pytest.raises(ValueError, match="noise_cond: expected either alphas_bar or noise_cond, got both"):
        noisy_classifier_log_prob(clf, alphas_bar=TOY_AB, noise_cond=lambda l: l)
    with pytest.raises(ValueError, match="sigma: expected values > 0.0"):
        noisy_classifier_log_prob(clf)(x, 0.0, 1)
    with pytest.raises(ValueError, match=r"classifier: expected logits of shape \(4, K\)"):
        noisy_classifier_log_prob(lambda z, c: z[:, 0])(x, 1.0, 1)
