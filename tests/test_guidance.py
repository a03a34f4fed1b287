"""Guidance against the Gaussian-mixture test bed, whose class-conditional denoisers and class
posterior are exact, and against Ho & Salimans' eps-space formula and a quadrature of ADM's tilt."""

from __future__ import annotations

import math

import pytest
import torch
from gaussian_mixture import two_d_mixture
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import quad
from scipy.stats import norm

from kdiff.guidance import cfg, cfg_batched, classifier_guidance, grad_log_prob, guided_eps, guided_mean
from kdiff.schedules import sigmas_karras
from kdiff.solvers import sample

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
    with pytest.raises(ValueError, match=r"y: expected an integer tensor of shape \(4,\)"):
        grad_log_prob(GM.class_log_posterior, x, 1.0, torch.zeros(4))
    with pytest.raises(ValueError, match="classifier: expected logits"):
        grad_log_prob(lambda x_, s_: x_[:, 0], x, 1.0, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="grad: expected shape"):
        guided_eps(x, 0.5, x[:, :1], scale=1.0)
    with pytest.raises(ValueError, match="var: expected length B=4"):
        guided_mean(x, torch.ones(3), x, scale=1.0)
