"""Denoiser wrappers against exact Gaussian answers.

Oracle: for data ``N(mu, S)`` the VP network's ideal outputs are closed forms in ``z``
(``E[eps | z] = sigma M^-1 (z - alpha mu)``, ``M = alpha^2 S + sigma^2 I``), written here from
``alpha^2 = 1 / (1 + e^-logsnr)`` in float64; the EDM-space denoiser comes from the test bed.
"""

from __future__ import annotations

import math

import pytest
import torch
from gaussian_mixture import GaussianMixture, single_gaussian
from hypothesis import given
from hypothesis import strategies as st

from kdiff.denoisers import edm_denoiser, timestep_from_sigma, vp_denoiser
from kdiff.schedules import alphas_bar_from_betas, betas_linear, respace
from kdiff.solvers import sample, sigmas_from_alphas_bar

F64 = torch.float64
GAUSS = single_gaussian()  # N(mu, S) in 3-D
ALPHAS_BAR = alphas_bar_from_betas(betas_linear(1000))


pytestmark = pytest.mark.usefixtures("single_thread")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ideal_vp_outputs(z: torch.Tensor, logsnr: torch.Tensor) -> dict[str, torch.Tensor]:
    """``E[eps | z]``, ``E[x | z]`` and ``E[v | z] = alpha E[eps | z] - sigma E[x | z]`` for ``x ~ N(mu, S)``."""
    l = logsnr.to(F64).reshape(-1, 1, 1)
    alpha2 = 1.0 / (1.0 + torch.exp(-l))
    sigma2 = 1.0 / (1.0 + torch.exp(l))
    mu, cov = GAUSS.means[0], GAUSS.covs[0]
    m = alpha2 * cov + sigma2 * torch.eye(3, dtype=F64)
    w = torch.linalg.solve(m, (z.to(F64) - alpha2[:, :, 0].sqrt() * mu)[..., None])[..., 0]
    eps = sigma2[:, :, 0].sqrt() * w
    x = mu + alpha2[:, :, 0].sqrt() * (cov @ w[..., None])[..., 0]
    return {"eps": eps, "x": x, "v": alpha2[:, :, 0].sqrt() * eps - sigma2[:, :, 0].sqrt() * x}


@given(st.lists(st.floats(-12.0, 12.0), min_size=4, max_size=4), st.sampled_from(["eps", "v", "x"]),
       st.booleans(), st.integers(0, 10_000))
def test_vp_denoiser_with_ideal_network_is_exact_edm_denoiser(logsnrs, param, scalar, seed):
    logsnr = torch.tensor(logsnrs[:1] * 4 if scalar else logsnrs, dtype=F64)
    sigma = torch.exp(-0.5 * logsnr)
    x = randn(4, 3, seed=seed) * (1 + sigma[:, None])
    seen = []

    def net(z, logsnr_in):
        seen.append(logsnr_in)
        return ideal_vp_outputs(z, logsnr_in)[param]

    denoise = vp_denoiser(net, param=param)
    out = denoise(x, float(sigma[0]) if scalar else sigma)
    torch.testing.assert_close(out, GAUSS.denoise(x, sigma), rtol=1e-8, atol=1e-8)
    assert seen[0].shape == (4,)
    torch.testing.assert_close(seen[0], logsnr, rtol=1e-12, atol=1e-12)


def test_vp_denoiser_float32():
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    x = (randn(4, 3, seed=1) * (1 + sigma[:, None].double())).float()
    seen = []

    def net(z, logsnr):
        seen.append(logsnr.dtype)
        return ideal_vp_outputs(z, logsnr)["eps"].float()

    out = vp_denoiser(net, param="eps")(x, sigma.double())  # as sample() passes it: float64 sigma
    assert out.dtype == torch.float32 and seen == [torch.float32]
    torch.testing.assert_close(out.double(), GAUSS.denoise(x.double(), sigma.double()), rtol=1e-4, atol=1e-4)


def test_timestep_from_sigma_on_and_between_table_points():
    sigmas = sigmas_from_alphas_bar(ALPHAS_BAR)[:-1].flip(0)  # index order 0..999
    t = timestep_from_sigma(sigmas, ALPHAS_BAR)
    torch.testing.assert_close(t, torch.arange(1000, dtype=F64), rtol=0, atol=1e-9)
    assert torch.equal(timestep_from_sigma(sigmas, ALPHAS_BAR, nearest=True), torch.arange(1000))
    logsnr = torch.log(ALPHAS_BAR) - torch.log1p(-ALPHAS_BAR)
    mid = torch.exp(-0.25 * (logsnr[:-1] + logsnr[1:]))  # halfway in logsnr
    torch.testing.assert_close(timestep_from_sigma(mid, ALPHAS_BAR), torch.arange(999, dtype=F64) + 0.5)
    with pytest.raises(ValueError, match="sigma, as 2 log"):
        timestep_from_sigma(2 * sigmas[-1], ALPHAS_BAR)
    with pytest.raises(ValueError, match="sigma, as 2 log"):
        timestep_from_sigma(0.5 * sigmas[0], ALPHAS_BAR)


@pytest.mark.parametrize("nearest", [False, True])
def test_discrete_vp_denoiser_on_its_own_grid(nearest):
    """A network trained on integer t, given the exact eps of the Gaussian at table index t,
    reproduces the exact denoiser along a respaced grid of the same table, and DDIM with it equals
    DDIM with the exact denoiser."""
    logsnr_table = torch.log(ALPHAS_BAR) - torch.log1p(-ALPHAS_BAR)
    seen = []

    def net(z, t):
        seen.append(t)
        return ideal_vp_outputs(z, logsnr_table[t.round().long()])["eps"]

    denoise = vp_denoiser(net, param="eps", alphas_bar=ALPHAS_BAR, nearest=nearest)
    sigmas = sigmas_from_alphas_bar(ALPHAS_BAR, respace(1000, 20))
    x = randn(16, 3, seed=2) * (1 + sigmas[0] ** 2).sqrt()
    a = sample(denoise, x, sigmas, solver="ddim")
    b = sample(GAUSS.denoise, x, sigmas, solver="ddim")
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    expected = respace(1000, 20).flip(0)
    got = torch.stack([t[0] for t in seen])
    assert got.dtype == (torch.int64 if nearest else F64)
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=1e-9)


def test_learned_variance_denoiser_and_ddpm():
    v_raw = {"small": -1.0, "large": 1.0}

    def make(kind):
        def net(z, logsnr):
            eps = ideal_vp_outputs(z, logsnr)["eps"]
            return torch.cat([eps, torch.full_like(eps, v_raw[kind])], dim=1)
        return vp_denoiser(net, param="eps", learned_variance=True)

    x = randn(8, 3, seed=3)
    denoised, v = make("large")(x, 0.7)
    torch.testing.assert_close(denoised, GAUSS.denoise(x, 0.7), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(v, torch.ones_like(x))
    sigmas = sigmas_from_alphas_bar(ALPHAS_BAR, respace(1000, 10))
    x = randn(8, 3, seed=4) * (1 + sigmas[0] ** 2).sqrt()
    for kind in ("small", "large"):
        learned = sample(make(kind), x, sigmas, solver="ddpm", generator=torch.Generator().manual_seed(0))
        fixed = sample(GAUSS.denoise, x, sigmas, solver="ddpm", variance=kind,
                       generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(learned, fixed, rtol=1e-7, atol=1e-7)
    with pytest.raises(ValueError, match="net: expected 6 channels"):
        vp_denoiser(lambda z, l: z, learned_variance=True)(x, 1.0)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_denoiser_zero_network_is_exact_for_matching_gaussian(sigma_data):
    """For data ``N(0, sigma_data^2 I)`` the exact denoiser is ``c_skip x``, so F = 0 is ideal."""
    data = GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, 3, dtype=F64),
                           sigma_data**2 * torch.eye(3, dtype=F64)[None])
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=F64)
    x = randn(5, 3, seed=5) * 3
    denoise = edm_denoiser(lambda x_in, c_noise: torch.zeros_like(x_in), sigma_data=sigma_data)
    torch.testing.assert_close(denoise(x, sigma), data.denoise(x, sigma), rtol=1e-12, atol=1e-12)


def test_edm_denoiser_network_inputs_and_scalar_sigma():
    seen = {}

    def net(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return x_in**2

    denoise = edm_denoiser(net, sigma_data=0.5)
    x = randn(4, 2, 3, seed=6)
    out = denoise(x, 2.0)
    torch.testing.assert_close(seen["x_in"], x / math.sqrt(4.25))  # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
    torch.testing.assert_close(seen["c_noise"], torch.full((4,), math.log(2.0) / 4, dtype=F64))
    c_skip, c_out = 0.25 / 4.25, 2.0 * 0.5 / math.sqrt(4.25)  # EDM Table 1
    torch.testing.assert_close(out, c_skip * x + c_out * (x / math.sqrt(4.25)) ** 2)
    torch.testing.assert_close(denoise(x, torch.full((4,), 2.0, dtype=F64)), out, rtol=1e-14, atol=1e-14)


def test_denoiser_bad_input():
    x = randn(2, 3)
    with pytest.raises(ValueError, match="param: expected one of eps, v, x, got 'score'"):
        vp_denoiser(lambda z, l: z, param="score")
    with pytest.raises(ValueError, match="sigma: expected values > 0"):
        vp_denoiser(lambda z, l: z)(x, 0.0)
    with pytest.raises(ValueError, match=r"net: expected an output of shape \(2, 3\)"):
        vp_denoiser(lambda z, l: z[:, :2])(x, 1.0)
    with pytest.raises(ValueError, match=r"net: expected an output of shape \(2, 3\)"):
        edm_denoiser(lambda z, c: z[:1])(x, 1.0)
    with pytest.raises(ValueError, match="sigma_data"):
        edm_denoiser(lambda z, c: z, sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma: expected length B=2"):
        edm_denoiser(lambda z, c: z)(x, torch.ones(3))
    with pytest.raises(TypeError, match="alphas_bar"):
        vp_denoiser(lambda z, l: z, alphas_bar=torch.arange(10))


def test_edm_denoiser_passes_conditioning_through():
    seen = {}

    def net(x_in, c_noise, labels, *, scale=1.0):
        seen["labels"], seen["scale"] = labels, scale
        return scale * x_in

    x = torch.randn(2, 3)
    labels = torch.tensor([4, 7])
    out = edm_denoiser(net)(x, 1.0, labels, scale=2.0)
    assert seen["labels"] is labels and seen["scale"] == 2.0
    c_skip, c_out, c_in = 0.25 / 1.25, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)
    torch.testing.assert_close(out, c_skip * x + c_out * 2.0 * c_in * x)
    vp = vp_denoiser(lambda z, logsnr, labels: torch.zeros_like(z) + labels[:, None].float(), param="x")
    torch.testing.assert_close(vp(x, 1.0, labels), labels[:, None].float().expand(2, 3))
