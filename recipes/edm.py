"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), end to end.

Training: preconditioning ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (Table 1, Eq. 7), noise levels
``ln sigma ~ N(P_mean, P_std^2)`` and the weighting ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
(Eq. 8, Table 1), so the loss is ``lambda(sigma) ||D(x + sigma n, sigma) - x||^2`` per sample. Class labels are
dropped to the network's "no label" index with probability ``label_dropout``, which makes the same network
usable unconditionally and with classifier-free guidance.
Sampling: Heun's 2nd-order method on the Karras grid, 18 steps = 35 network evaluations (Algorithm 1); the
stochastic sampler (Algorithm 2) through ``--s-churn``.

    python -m recipes.edm                       # the digits default: CPU, a few minutes
    python -m recipes.edm --preset fashion      # Fashion-MNIST 32x32, class-conditional, one GPU
    python -m recipes.edm --preset fashion-uncond
    python -m recipes.edm --preset cifar10      # the paper's CIFAR-10 setting, for users who have the data

Only EDM's own parts live here (config fields, presets, loss, denoiser, sampling grid); the data, network,
training loop, generation and evaluation are the shared machinery of :mod:`recipes.image`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdiff import losses, schedules
from kdiff.denoisers import edm_denoiser
from kdiff.guidance import cfg_batched

from .distributed import Rand
from .image import DataInfo, Denoise, ImageConfig, ImageRecipe
from .loop import LossFn

# ----------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EDMConfig(ImageConfig):
    """The EDM recipe: noise distribution, preconditioning and sampling grid on top of the shared image settings."""

    sigma_data: float = 0.5  # data standard deviation assumed by the preconditioning
    p_mean: float = -1.2  # mean of ln(sigma) during training
    p_std: float = 1.2  # standard deviation of ln(sigma) during training
    sigma_min: float = 0.002  # smallest nonzero noise level of the sampling grid
    sigma_max: float = 80.0  # largest noise level of the sampling grid
    rho: float = 7.0  # Karras grid exponent
    s_churn: float = 0.0  # stochastic sampler's churn (0: deterministic Algorithm 1; heun and euler only)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sigma_data", "p_std", "sigma_min", "sigma_max", "rho"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a float > 0, got {getattr(self, name)}")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min: expected a float below sigma_max={self.sigma_max}, got {self.sigma_min}")
        if self.s_churn < 0:
            raise ValueError(f"s_churn: expected a float >= 0, got {self.s_churn}")


PRESETS: dict[str, EDMConfig] = {
    # CPU, a few minutes: 1,437 8x8 digits, class-conditional, a 4-level check by a digit classifier.
    "digits": EDMConfig(out_dir="runs/edm-digits", steps=1500, batch_size=128, lr=2e-3, warmup_steps=100,
                        ema_halflife_kimg=20.0, log_every=50, checkpoint_every=500, net="unet_digits",
                        net_channels=32, dropout=0.0, eval_samples=1000),
    # Fashion-MNIST padded to 32x32 for one GPU (meant for ~10 min on an H100; not yet timed on one).
    # Pack the data first (README).
    "fashion": EDMConfig(out_dir="runs/edm-fashion", data="data/fashion-train.h5", eval_data="data/fashion-test.h5",
                         image_size=32, net="unet_fashion", steps=30000, batch_size=256, lr=1e-3, warmup_steps=1000,
                         ema_halflife_kimg=500.0, log_every=200, sample_every=5000, checkpoint_every=5000,
                         num_workers=4, eval_samples=50000),
    "fashion-uncond": EDMConfig(out_dir="runs/edm-fashion-uncond", data="data/fashion-train.h5",
                                eval_data="data/fashion-test.h5", image_size=32, net="unet_fashion",
                                conditional=False, label_dropout=0.0, steps=30000, batch_size=256, lr=1e-3,
                                warmup_steps=1000, ema_halflife_kimg=500.0, log_every=200, sample_every=5000,
                                checkpoint_every=5000, num_workers=4, eval_samples=50000),
    # EDM's CIFAR-10 setting (Table 7): batch 512, lr 1e-3, EMA half-life 500k images, dropout 0.13, flips,
    # 200M images; the ADM-style network from kdiff.nets stands in for the paper's DDPM++.
    "cifar10": EDMConfig(out_dir="runs/edm-cifar10", data="data/cifar10-train.h5", eval_data="data/cifar10-test.h5",
                         image_size=32, flip=True, net="ddpm_cifar10", dropout=0.13, conditional=False,
                         label_dropout=0.0, steps=390625, batch_size=512, lr=1e-3, warmup_steps=19531,
                         ema_halflife_kimg=500.0, log_every=500, sample_every=10000, checkpoint_every=10000,
                         num_workers=8, eval_samples=50000),
}


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def make_loss_fn(config: EDMConfig, info: DataInfo | int | None, state: dict[str, Any] | None = None) -> LossFn:
    """EDM Eq. 8 per sample: ``lambda(sigma) mean((D(x + sigma n, sigma) - x)^2)``; noise position = Phi(u).

    ``info``: the run's :class:`DataInfo` (or just its number of classes); labels are kept with probability
    ``1 - label_dropout`` and otherwise replaced by the "no label" index ``num_classes``.
    """
    num_classes = info.num_classes if isinstance(info, DataInfo) else info

    def loss_fn(net: nn.Module, batch: Sequence[Tensor], rand: Rand) -> tuple[Tensor, Tensor]:
        x, labels = batch
        b = x.shape[0]
        u = rand.randn(b).to(x.device)
        sigma = schedules.sigma_lognormal(u, p_mean=config.p_mean, p_std=config.p_std)
        noise = rand.randn_like(x)
        y = None
        if num_classes is not None:
            keep = rand.rand(b).to(x.device) >= config.label_dropout
            y = torch.where(keep, labels.to(x.device), torch.full_like(labels.to(x.device), num_classes))
        denoise = edm_denoiser(lambda xx, c_noise: net(xx, c_noise, y), sigma_data=config.sigma_data)
        denoised = denoise(x + sigma.view(-1, *[1] * (x.ndim - 1)) * noise, sigma)
        loss = losses.weight_edm(sigma, sigma_data=config.sigma_data) * losses.mse(denoised.float(), x.float())
        position = 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))
        return loss, position

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Sampling: the denoiser and the grid
# ----------------------------------------------------------------------------------------------


def num_classes_of(model: nn.Module) -> int | None:
    return getattr(getattr(model, "cfg", None), "num_classes", None)


def denoiser(model: nn.Module, config: EDMConfig, labels: Tensor | None,
             extras: Mapping[str, nn.Module] | None = None) -> Denoise:
    """``denoise(x, sigma)``: EDM preconditioning around ``model``, with classifier-free guidance when labelled."""
    num_classes = num_classes_of(model)
    if labels is None or num_classes is None:
        return edm_denoiser(lambda x, c_noise: model(x, c_noise, None), sigma_data=config.sigma_data)
    if config.guidance == 1.0:
        return edm_denoiser(lambda x, c_noise: model(x, c_noise, labels), sigma_data=config.sigma_data)

    def labelled(x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        return edm_denoiser(lambda xx, c_noise: model(xx, c_noise, y), sigma_data=config.sigma_data)(x, sigma)

    return cfg_batched(labelled, labels, scale=config.guidance, null_label=num_classes)


def sigmas_for(config: EDMConfig) -> Tensor:
    """The Karras et al. grid (Eq. 5): ``sample_steps + 1`` levels from ``sigma_max`` to ``sigma_min``, then 0."""
    return schedules.sigmas_karras(config.sample_steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                                   rho=config.rho)


def solver_options(config: EDMConfig) -> dict[str, Any]:
    return {"s_churn": config.s_churn}


RECIPE = ImageRecipe(
    name="edm", config=EDMConfig, presets=PRESETS, default_preset="digits", loss=make_loss_fn, denoiser=denoiser,
    sigmas=sigmas_for, solver_options=solver_options,
    sampling_fields=("solver", "sample_steps", "guidance", "sigma_min", "sigma_max", "rho", "s_churn"),
)


def run(config: EDMConfig, **kw: Any) -> dict[str, float]:
    return RECIPE.run(config, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    return RECIPE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
