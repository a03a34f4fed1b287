"""simple diffusion in the library: the EDM sigma grid of a continuous log-SNR schedule, and the U-Net's
simple-diffusion knobs (blocks per level, dropout only at low resolutions).

Oracles: the cosine schedule's closed form ``sigma_ve(t) = tan(t_min + t (t_max - t_min))`` in float64
(times the shift factors, ``image / noise``), the schedules' own inverses, the exact probability-flow map
of a Gaussian, and forward hooks that record where each residual block and dropout layer actually runs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from kdiff import schedules as S
from kdiff import solvers
from kdiff.nets import CONFIGS, ResBlock, UNet, build, count_params
from kdiff.nets.unet import blocks_per_level, dropout_per_level

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# sigmas_from_schedule


def _tan_sigma(t: np.ndarray, lmin: float = -15.0, lmax: float = 15.0) -> np.ndarray:
    """``exp(-logsnr_cosine(t) / 2)`` written as the tangent it is, float64."""
    t_min, t_max = math.atan(math.exp(-0.5 * lmax)), math.atan(math.exp(-0.5 * lmin))
    return np.tan(t_min + t * (t_max - t_min))


def _times(n: int, t_start: float = 1.0) -> np.ndarray:
    return t_start * (1.0 - np.arange(n) / n)


SCHEDULES = {
    "cosine": (S.logsnr_cosine, lambda t: _tan_sigma(t), S.t_from_logsnr_cosine),
    "shifted": (partial(S.logsnr_cosine_shifted, image_size=32, noise_size=8),
                lambda t: _tan_sigma(t) * 32 / 8,
                partial(S.t_from_logsnr_cosine_shifted, image_size=32, noise_size=8)),
    "shifted_up": (partial(S.logsnr_cosine_shifted, image_size=64, noise_size=256),
                   lambda t: _tan_sigma(t) * 64 / 256,
                   partial(S.t_from_logsnr_cosine_shifted, image_size=64, noise_size=256)),
    "interpolated": (partial(S.logsnr_cosine_interpolated, image_size=512, noise_size_low=32, noise_size_high=256),
                     lambda t: _tan_sigma(t) * (512 / 32) ** t * (512 / 256) ** (1 - t),
                     partial(S.t_from_logsnr_cosine_interpolated, image_size=512, noise_size_low=32,
                             noise_size_high=256)),
}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_grid_is_the_schedules_sigma_at_uniform_times_then_zero(name, n):
    schedule, oracle, _ = SCHEDULES[name]
    sigmas = S.sigmas_from_schedule(schedule, n)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (n + 1,)
    assert sigmas[-1] == 0 and bool((sigmas.diff() < 0).all())
    np.testing.assert_allclose(sigmas[:-1].numpy(), oracle(_times(n)), rtol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_schedules_inverse_recovers_the_uniform_times(name):
    schedule, _, inverse = SCHEDULES[name]
    for n, t_start in [(50, 1.0), (13, 0.9)]:
        sigmas = S.sigmas_from_schedule(schedule, n, t_start=t_start)
        t = inverse(S.logsnr_from_sigma(sigmas[:-1]))
        np.testing.assert_allclose(t.numpy(), _times(n, t_start), rtol=0, atol=1e-9)


def test_the_grid_equals_the_hand_built_one():
    """What users wrote by hand before: ``cat(sigma_from_logsnr(sched(linspace(1, 0, n + 1)[:-1])), 0)``."""
    sched = partial(S.logsnr_cosine_shifted, image_size=128, noise_size=64)
    n = 32
    hand = torch.cat([S.sigma_from_logsnr(sched(torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1])),
                      torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(S.sigmas_from_schedule(sched, n), hand, rtol=1e-14, atol=0)


def test_the_first_sigma_is_sigma_over_alpha_and_the_vp_prior_scale_is_one_over_alpha():
    """``sigmas[0] = sigma_T / alpha_T`` and ``sqrt(1 + sigmas[0]^2) = 1 / alpha_T``; ``sigma_T`` differs from 1
    by ``~exp(logsnr_min) / 2``, which is what separates the two starting-noise conventions."""
    sched = partial(S.logsnr_cosine_shifted, image_size=32, noise_size=8)
    for t_start in (1.0, 0.5):
        sigmas = S.sigmas_from_schedule(sched, 10, t_start=t_start)
        logsnr_T = sched(torch.tensor(t_start, dtype=torch.float64))
        alpha_T, sigma_T = S.alpha_sigma(logsnr_T)
        torch.testing.assert_close(sigmas[0], sigma_T / alpha_T, rtol=1e-13, atol=0)
        torch.testing.assert_close(torch.sqrt(1 + sigmas[0] ** 2), 1 / alpha_T, rtol=1e-13, atol=0)
        if t_start == 1.0:  # logsnr_min = -15 - 2 log 4: the two conventions differ by ~1e-8
            np.testing.assert_allclose(1 - sigma_T.item(), math.exp(logsnr_T.item()) / 2, rtol=1e-3)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_on_the_grid_follow_the_exact_gaussian_flow(solver):
    """Data N(mu, s^2), exact denoiser ``mu + s^2 / (s^2 + sigma^2) (x - mu)``: the probability-flow ODE maps
    ``x_T`` at ``sigma_T`` to ``mu + (x_T - mu) s / sqrt(s^2 + sigma_T^2)``. On the grid DDIM converges to it at
    first order, DPM-Solver++(2M) at second order (measured between 512 and 2048 steps: uniform steps in t
    make the first step span most of log sigma, so fewer steps are not yet in the asymptotic regime)."""
    mu, s = 0.3, 0.5
    sched = partial(S.logsnr_cosine_shifted, image_size=32, noise_size=8)

    def denoise(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    n_T = torch.linspace(-3, 3, 13, dtype=torch.float64)
    errors = []
    for n in (512, 2048):
        sigmas = S.sigmas_from_schedule(sched, n)
        x_T = n_T * sigmas[0]
        x0 = solvers.sample(denoise, x_T, sigmas, solver=solver)
        errors.append((x0 - (mu + (x_T - mu) * s / torch.sqrt(s**2 + sigmas[0] ** 2))).abs().max().item())
    order = math.log(errors[0] / errors[1]) / math.log(4)
    expected, tol = (1, 5e-3) if solver == "ddim" else (2, 2e-4)
    assert expected - 0.25 < order < expected + 0.5, (errors, order)
    assert errors[1] < tol, errors


def test_ancestral_sampling_on_the_grid_from_the_vp_prior_gives_the_data_distribution():
    """DDPM ancestral steps from ``x_T = n / alpha_T`` (the VP prior) on Gaussian data: the sample mean and
    standard deviation match (mu, s) within 5 standard errors."""
    mu, s, N = -0.4, 0.7, 20000
    sched = partial(S.logsnr_cosine_interpolated, image_size=32, noise_size_low=8)
    sigmas = S.sigmas_from_schedule(sched, 200)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, dtype=torch.float64, generator=g) * torch.sqrt(1 + sigmas[0] ** 2)
    x0 = solvers.sample(lambda x, sigma: mu + s**2 / (s**2 + sigma**2) * (x - mu), x_T, sigmas, solver="ddpm",
                        generator=g)
    assert abs(x0.mean().item() - mu) < 5 * s / math.sqrt(N)
    assert abs(x0.std().item() - s) < 5 * s / math.sqrt(2 * N)


def test_sigmas_from_schedule_rejects_bad_input():
    with pytest.raises(TypeError, match="schedule"):
        S.sigmas_from_schedule(0.5, 10)
    with pytest.raises(ValueError, match="n"):
        S.sigmas_from_schedule(S.logsnr_cosine, 0)
    with pytest.raises(ValueError, match="t_start"):
        S.sigmas_from_schedule(S.logsnr_cosine, 10, t_start=0.0)
    with pytest.raises(ValueError, match="t_start"):
        S.sigmas_from_schedule(S.logsnr_cosine, 10, t_start=1.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.sigmas_from_schedule(lambda t: 10.0 * t, 10)  # log-SNR increasing in t
    with pytest.raises(ValueError, match="shape"):
        S.sigmas_from_schedule(lambda t: t.sum(), 10)
    with pytest.raises(ValueError, match="finite"):
        S.sigmas_from_schedule(lambda t: -torch.log(t - 0.5), 10)  # NaN below t = 0.5


# ----------------------------------------------------------------------------------------------
# The U-Net's simple-diffusion knobs


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("KDIFF_KERNELS", "torch")


def _where_blocks_run(net: nn.Module, x: torch.Tensor
                      ) -> tuple[dict[int, int], dict[int, int], list[tuple[float, int]]]:
    """Run ``net`` once and record, by the input feature-map size: how many residual blocks run there, how
    many parameters they hold, and every dropout layer's ``(p, size)``."""
    blocks: dict[int, int] = {}
    params: dict[int, int] = {}
    dropouts: list[tuple[float, int]] = []
    hooks = []
    for m in net.modules():
        if isinstance(m, ResBlock):
            def count(mod, args, m=m):
                size = args[0].shape[-1]
                blocks[size] = blocks.get(size, 0) + 1
                params[size] = params.get(size, 0) + count_params(mod)
            hooks.append(m.register_forward_pre_hook(count))
        elif isinstance(m, nn.Dropout):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: dropouts.append((mod.p, args[0].shape[-1]))))
    with torch.no_grad():
        net(x, torch.zeros(x.shape[0]))
    for h in hooks:
        h.remove()
    return blocks, params, dropouts


def test_level_blocks_put_the_blocks_where_asked():
    """``level_blocks[i]`` blocks at level i going down, one more going up, and the two middle blocks at
    the lowest level (its resolution also counts the down-path block feeding it)."""
    torch.manual_seed(0)
    net = build("unet_tiny", image_size=16, channel_mult=(1, 2, 2), level_blocks=(1, 3, 2), attn_resolutions=(),
                biggan=False)
    blocks, _, _ = _where_blocks_run(net, torch.randn(2, 3, 16, 16))
    assert blocks == {16: 1 + 2, 8: 3 + 4, 4: 2 + 3 + 2}


def test_default_fields_build_the_adm_network_unchanged():
    """``level_blocks=(num_blocks,) * L`` and a ``dropout_max_resolution`` at or above the image size build the
    same modules, parameter shapes and dropout probabilities as the defaults."""
    base = CONFIGS["unet_digits"]
    nets = [UNet(replace(base, level_blocks=None, dropout_max_resolution=None)),
            UNet(replace(base, level_blocks=(base.num_blocks,) * len(base.channel_mult),
                         dropout_max_resolution=base.image_size))]
    shapes = [[(k, tuple(v.shape)) for k, v in n.state_dict().items()] for n in nets]
    drops = [[m.p for m in n.modules() if isinstance(m, nn.Dropout)] for n in nets]
    assert shapes[0] == shapes[1] and drops[0] == drops[1]
    assert set(drops[0]) == {base.dropout}


def test_dropout_runs_only_at_and_below_the_chosen_resolution():
    """Recorded where each dropout layer sees its input; BigGAN resampling blocks (unet_tiny has them) drop
    out on their output, so the one upsampling 8 -> 16 must not drop out."""
    torch.manual_seed(0)
    net = build("unet_tiny", image_size=16, channel_mult=(1, 2, 2), attn_resolutions=(), dropout=0.3,
                dropout_max_resolution=8)
    _, _, dropouts = _where_blocks_run(net, torch.randn(2, 3, 16, 16))
    active = {size for p, size in dropouts if p > 0}
    inactive = {size for p, size in dropouts if p == 0}
    assert active == {8, 4} and inactive == {16}
    assert {p for p, _ in dropouts} == {0.0, 0.3}


def test_dropout_below_every_level_means_a_deterministic_training_forward():
    """Behaviour, not bookkeeping: with ``dropout_max_resolution`` under the lowest level no dropout is active,
    so two training-mode passes agree; with it at the lowest level they differ."""
    x = torch.randn(2, 3, 16, 16)
    outs = {}
    for limit in (2, 4):
        torch.manual_seed(0)
        net = build("unet_tiny", image_size=16, channel_mult=(1, 2, 2), dropout=0.5, dropout_max_resolution=limit)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))  # zero-initialized output layers would hide the dropout
        net.train()
        outs[limit] = [net(x, torch.zeros(2)) for _ in range(2)]
    torch.testing.assert_close(outs[2][0], outs[2][1], rtol=0, atol=0)
    assert (outs[4][0] - outs[4][1]).abs().max() > 1e-3


def test_the_paper_unet_holds_its_depth_at_16x16():
    """sd_unet_imagenet128 at 1/16 of its width (placement does not depend on width): the 16x16 level runs the
    most residual blocks (8 down, 9 up) and holds the most of their parameters; no dropout above 64x64."""
    torch.manual_seed(0)
    net = build("sd_unet_imagenet128", channels=8, head_channels=8, norm_groups=8, num_classes=None)
    blocks, params, dropouts = _where_blocks_run(net, torch.randn(1, 3, 128, 128))
    assert blocks == {128: 2 + 3, 64: 2 + 3, 32: 2 + 3, 16: 8 + 9, 8: 2 + 3 + 2}
    assert max(params, key=params.get) == 16
    assert {size for p, size in dropouts if p > 0} == {64, 32, 16, 8}
    assert {size for p, size in dropouts if p == 0} == {128}


@pytest.mark.parametrize("name,shape", [("unet_digits32", (3, 1, 32, 32)), ("uvit_digits32", (3, 1, 32, 32)),
                                        ("sd_unet_imagenet256", (1, 3, 256, 256)),
                                        ("sd_unet_imagenet512", (1, 3, 512, 512))])
def test_forward_shapes(name, shape):
    torch.manual_seed(0)
    small = dict(channels=8, head_channels=8, norm_groups=8, level_blocks=(1, 1, 1, 2, 1)) if "imagenet" in name else {}
    net = build(name, **small)
    labels = torch.tensor([3]) if "imagenet" in name else None
    with torch.no_grad():
        out = net(torch.randn(shape), torch.full((shape[0],), 0.5), labels)
    assert out.shape == shape and bool(torch.isfinite(out).all())


def test_blocks_and_dropout_per_level_read_the_config():
    cfg = CONFIGS["sd_unet_imagenet256"]
    assert blocks_per_level(cfg) == (2, 2, 2, 8, 2)
    assert dropout_per_level(cfg, input_factor=2) == (0.0, 0.1, 0.1, 0.1, 0.1)  # 128 (after the wavelet), 64, ..., 8
    assert blocks_per_level(CONFIGS["unet_digits"]) == (2, 2)


@pytest.mark.parametrize("overrides,match", [
    (dict(level_blocks=(1,)), "level_blocks"), (dict(level_blocks=(1, 0)), "level_blocks"),
    (dict(level_blocks=(1, True)), "level_blocks"), (dict(level_blocks=[1, 1]), "level_blocks"),
    (dict(dropout_max_resolution=0), "dropout_max_resolution"),
])
def test_bad_unet_fields_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet(replace(CONFIGS["unet_tiny"], **overrides))
