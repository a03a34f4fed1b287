"""ADM with classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis").

Two networks on one discrete VP chain (``T`` steps, ``z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``):

- the diffusion model: ADM's U-Net (AdaGN, BigGAN resampling, learned variance), class-conditional or not,
  trained as iDDPM does, ``L_hybrid = L_simple + 0.001 L_vlb`` [iDDPM Sec. 3.1] (the DDPM recipe's functions);
- the noisy classifier ``p(y | z_t, t)``: the U-Net's downsampling trunk with attention pooling [ADM Sec. 4.1,
  App. C], trained beside it on the same batches by cross-entropy on ``z_t`` at ``t ~ U{0..T-1}``, with the same
  forward process and the same noise conditioning (the table index ``t``).

Guided sampling toward a class ``y`` with scale ``s``, ``g = grad_z log p(y | z_t)`` [ADM Sec. 4]:
Algorithm 1 (``--sampler ancestral``): ``z_{t-1} ~ N(mu + s Sigma g, Sigma)``; Algorithm 2 (``--sampler ddim``):
``eps' = eps - s sqrt(1 - abar_t) g``, then DDIM. After training, the run prints the held-out classifier
accuracy per noise-level bucket and the trade-off sweep over ``--sweep-scales``: the accuracy of an independent
digit classifier on samples guided toward their class (fidelity) and the digits Frechet distance (quality and
diversity); for other data, FID.

    python -m recipes.adm                           # digits, CPU, a few minutes: classifier + conditional model
    python -m recipes.adm --preset digits-uncond    # the unconditional model (guided by its classifier)
    python -m recipes.adm sweep runs/adm-digits-uncond --classifier runs/adm-digits --sweep-scales 0,1,4
    python -m recipes.adm --preset fashion          # Fashion-MNIST 32x32, one GPU
    python -m recipes.adm --preset imagenet128      # the paper's setting (data packed by the user)

References:
    [ADM] Dhariwal, Nichol 2021, Sec. 4 (Algorithms 1 and 2), App. C (the classifier).
    [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", Sec. 3-4.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiff import data, elbo, metrics, nets, process
from kdiff.denoisers import timestep_from_sigma
from kdiff.guidance import classifier_guidance, grad_log_prob, guided_eps, guided_mean, noisy_classifier_log_prob
from kdiff.param import eps_from_x, x_from_eps
from kdiff.schedules import alpha_sigma, logsnr_from_sigma
from kdiff.solvers import ddim_step

from . import ddpm
from .distributed import Rand
from .grids import write_grid
from .image import DataInfo, Denoise, ImageConfig, ImageRecipe, initial_noise, load_for_sampling, resolve_data
from .image import main as image_main
from .loop import LossFn, Trainable
from .optim import adamw, lr_at
from .plot import line_chart

SAMPLERS = ("ancestral", "ddim")

# ----------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ADMConfig(ImageConfig):
    """ADM: the chain, the noisy classifier and guided sampling on top of the shared image settings."""

    solver: Literal["ddpm", "ddim"] = "ddpm"  # the generic sampling path's step (grids, recipes.sample)
    sample_steps: int = 50  # the chain respaced to this many steps for sampling (trailing spacing)
    label_dropout: float = 0.0  # ADM's models have no "no label" training: classifier guidance needs none
    schedule: Literal["linear", "cosine"] = "cosine"  # the chain's table: DDPM's linear betas or iDDPM's cosine
    timesteps: int = 1000  # T, the chain's length (training and the classifier's noise conditioning)
    clip_denoised: bool = True  # clamp the predicted x0 to [-1, 1] while sampling, as ADM's sampler does
    sampler: Literal["ancestral", "ddim"] = "ancestral"  # guided sampling: Algorithm 1 or Algorithm 2
    classifier_net: str = "classifier_tiny"  # a ClassifierConfig name in kdiff.nets.CONFIGS
    classifier_channels: int | None = None  # override the classifier's base width (none: the named config's)
    classifier_lr: float = 3e-4  # classifier AdamW learning rate, annealed linearly to 0 (ADM's classifier runs)
    classifier_weight_decay: float = 0.05  # classifier AdamW weight decay (ADM's classifier runs)
    classifier_scale: float = 1.0  # guidance scale s for sample grids and recipes.sample
    sweep_scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 10.0)  # scales of the trade-off sweep
    sweep_samples: int = 1000  # samples per scale in the sweep (labels cycle through the classes; 0: no sweep)
    accuracy_buckets: int = 10  # equal ranges of t in which the held-out classifier accuracy is reported

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timesteps < 2:
            raise ValueError(f"timesteps: expected an int >= 2, got {self.timesteps}")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps: expected at most timesteps={self.timesteps}, got {self.sample_steps}")
        if self.guidance != 1.0:
            raise ValueError(f"guidance: classifier-free guidance is not ADM's; use --classifier-scale, "
                             f"got guidance={self.guidance}")
        spec = nets.CONFIGS.get(self.classifier_net)
        if not isinstance(spec, nets.ClassifierConfig):
            names = [k for k, v in nets.CONFIGS.items() if isinstance(v, nets.ClassifierConfig)]
            raise ValueError(f"classifier_net: expected one of {', '.join(names)}, got {self.classifier_net!r}")
        if self.classifier_channels is not None and self.classifier_channels < 1:
            raise ValueError(f"classifier_channels: expected an int >= 1 or none, got {self.classifier_channels}")
        if not self.classifier_lr > 0 or not self.classifier_weight_decay >= 0:
            raise ValueError(f"classifier_lr, classifier_weight_decay: expected > 0 and >= 0, got "
                             f"{self.classifier_lr}, {self.classifier_weight_decay}")
        if not self.sweep_scales or any(not math.isfinite(s) or s < 0 for s in self.sweep_scales):
            raise ValueError(f"sweep_scales: expected finite scales >= 0, got {self.sweep_scales}")
        if self.sweep_samples < 0 or self.accuracy_buckets < 1:
            raise ValueError(f"sweep_samples, accuracy_buckets: expected >= 0 and >= 1, got "
                             f"{self.sweep_samples}, {self.accuracy_buckets}")


_DIGITS = dict(steps=1000, batch_size=128, lr=1e-3, warmup_steps=100, ema_halflife_kimg=20.0, log_every=50,
               checkpoint_every=500, net="unet_digits", net_channels=16, dropout=0.0, eval_samples=0,
               classifier_lr=1e-3, sweep_samples=500)
_FASHION = dict(data="data/fashion-train.h5", eval_data="data/fashion-test.h5", image_size=32, net="unet_fashion",
                steps=30000, batch_size=256, lr=3e-4, warmup_steps=1000, ema_halflife_kimg=500.0, log_every=200,
                sample_every=5000, checkpoint_every=5000, num_workers=4, sample_steps=100, eval_samples=0,
                classifier_net="adm_classifier_imagenet64", classifier_channels=64, sweep_samples=10000)
# The paper's ImageNet settings [ADM Sec. 4, App. C and its hyper-parameter tables]: T = 1000, learned variance,
# EMA 0.9999, batch 256 and lr 1e-4 (64x64: batch 2048, lr 3e-4), 250 sampling steps; the classifier with
# AdamW, lr 3e-4, weight decay 0.05. Pack folders of images already resized to the preset's size, one
# subfolder per class (train and the 50,000 validation images):
#   python -m kdiff.data pack IMAGENET64_TRAIN --out data/imagenet64-train.h5
#   python -m kdiff.data pack IMAGENET64_VAL --out data/imagenet64-val.h5 --split test     (128, 256 likewise)
_IMAGENET = dict(conditional=True, flip=True, batch_size=256, lr=1e-4, ema_rate=0.9999, log_every=1000,
                 sample_every=50000, checkpoint_every=10000, num_workers=8, sample_steps=250, eval_samples=0,
                 sweep_samples=50000, sweep_scales=(0.0, 0.5, 1.0, 2.0, 4.0, 10.0))

PRESETS: dict[str, ADMConfig] = {
    # CPU, a few minutes: 8x8 digits, a small class-conditional U-Net with learned variance and classifier_tiny.
    "digits": ADMConfig(out_dir="runs/adm-digits", **_DIGITS),
    "digits-uncond": ADMConfig(out_dir="runs/adm-digits-uncond", conditional=False, **_DIGITS),
    # Fashion-MNIST padded to 32x32, one GPU. Pack the data first (README).
    "fashion": ADMConfig(out_dir="runs/adm-fashion", **_FASHION),
    "fashion-uncond": ADMConfig(out_dir="runs/adm-fashion-uncond", conditional=False, **_FASHION),
    # ImageNet 64: cosine schedule, 64x64 batch and learning rate (no published number is claimed here).
    "imagenet64": ADMConfig(out_dir="runs/adm-imagenet64", data="data/imagenet64-train.h5",
                            eval_data="data/imagenet64-val.h5", image_size=64, net="adm_imagenet64",
                            classifier_net="adm_classifier_imagenet64", schedule="cosine", steps=540000,
                            **{**_IMAGENET, "batch_size": 2048, "lr": 3e-4}),
    # ADM-G ImageNet 128 (published FID 2.97, 250 steps; scale 0.5 in the released sampling flags): linear.
    "imagenet128": ADMConfig(out_dir="runs/adm-imagenet128", data="data/imagenet128-train.h5",
                             eval_data="data/imagenet128-val.h5", image_size=128, net="adm_imagenet128",
                             classifier_net="adm_classifier_imagenet128", schedule="linear", steps=4360000,
                             classifier_scale=0.5, **_IMAGENET),
    # ADM-G ImageNet 256 (published FID 4.59, 250 steps; scale 1.0 in the released sampling flags): linear.
    "imagenet256": ADMConfig(out_dir="runs/adm-imagenet256", data="data/imagenet256-train.h5",
                             eval_data="data/imagenet256-val.h5", image_size=256, net="adm_imagenet256",
                             classifier_net="adm_classifier_imagenet256", schedule="linear", steps=1980000,
                             **_IMAGENET),
}


def tables(config: ADMConfig) -> tuple[Tensor, Tensor]:
    """``(alphas_bar, logsnrs)`` of the chain, ``(T,)`` float64 (the DDPM recipe's tables)."""
    return ddpm.chain_tables(config.schedule, config.timesteps)


# ----------------------------------------------------------------------------------------------
# The diffusion model: ADM's U-Net trained with iDDPM's L_hybrid
# ----------------------------------------------------------------------------------------------


def build_model(config: ADMConfig, info: DataInfo) -> nn.Module:
    """``config.net`` with a learned-variance output (2C channels), sized to the data."""
    overrides: dict[str, object] = {"image_size": info.shape[1], "in_channels": info.shape[0],
                                    "num_classes": info.num_classes, "learn_variance": True}
    if config.net_channels is not None:
        overrides["channels"] = config.net_channels
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    return nets.build(config.net, **overrides)


def make_loss_fn(config: ADMConfig, info: DataInfo, state: dict[str, Any] | None = None) -> LossFn:
    """iDDPM's ``L_hybrid`` per sample at ``t ~ U{0..T-1}`` (``ddpm.ddpm_loss``); noise position ``(t + 1/2) / T``."""
    _, logsnrs = tables(config)
    T = config.timesteps

    def loss_fn(net: nn.Module, batch: Sequence[Tensor], rand: Rand) -> tuple[Tensor, Tensor]:
        x, labels = batch
        t = ddpm.timesteps_from_uniform(rand.rand(x.shape[0]), T).to(x.device)
        eps = rand.randn_like(x)
        y = labels.to(x.device) if info.num_classes is not None else None
        out = ddpm.ddpm_loss(lambda z, c: net(z, c, y), x, t, eps, logsnrs, objective="hybrid", learn_variance=True)
        return out.loss, (t.to(torch.float32) + 0.5) / T

    return loss_fn


def model_denoiser(model: nn.Module, config: ADMConfig, labels: Tensor | None, *, clip: bool = False) -> Denoise:
    """``denoise(x, sigma) -> (denoised, frac)``: the eps network on the table with its learned variance
    (``ddpm.ddpm_denoiser``); an unconditional model ignores ``labels``; ``clip`` clamps x0 to [-1, 1]."""
    alphas_bar, _ = tables(config)
    y = labels if getattr(model.cfg, "num_classes", None) is not None else None
    return ddpm.ddpm_denoiser(lambda z, t: model(z, t, y), alphas_bar, learn_variance=True, variance="learned",
                              clip=clip)


# ----------------------------------------------------------------------------------------------
# The noisy classifier: built, trained beside the model, scored against the noise level
# ----------------------------------------------------------------------------------------------


def classifier_classes(config: ADMConfig, info: DataInfo) -> int:
    """The classifier's number of classes: the model's, or the labelled data's for an unconditional model."""
    if info.num_classes is not None:
        return info.num_classes
    names = data.read_info(resolve_data(config.data)).class_names
    if not names:
        raise ValueError(f"data: classifier guidance needs labelled data, {config.data!r} has no class names")
    return len(names)


def build_classifier(config: ADMConfig, info: DataInfo) -> nn.Module:
    """ADM's noisy classifier ``(z_t, t) -> logits`` of ``config.classifier_net``, sized to the data."""
    overrides: dict[str, object] = {"image_size": info.shape[1], "in_channels": info.shape[0],
                                    "num_classes": classifier_classes(config, info)}
    if config.classifier_channels is not None:
        overrides["channels"] = config.classifier_channels
    return nets.build(config.classifier_net, **overrides)


def classifier_loss_fn(config: ADMConfig) -> LossFn:
    """ADM's classifier objective [ADM Sec. 4.1]: ``CE(classifier(z_t, t), y)`` per sample, ``t ~ U{0..T-1}``.

    The forward process and the noise conditioning (the table index ``t`` as a float) are the diffusion model's.
    Noise position ``(t + 1/2) / T``, so the loop logs the loss per quarter of the chain.
    """
    _, logsnrs = tables(config)
    T = config.timesteps

    def loss_fn(net: nn.Module, batch: Sequence[Tensor], rand: Rand) -> tuple[Tensor, Tensor]:
        x, labels = batch
        t = ddpm.timesteps_from_uniform(rand.rand(x.shape[0]), T).to(x.device)
        z = process.diffuse(x, rand.randn_like(x), logsnrs.to(x.device)[t])
        logits = net(z, t.to(x.dtype))
        return F.cross_entropy(logits.float(), labels.to(x.device).long(), reduction="none"), (t + 0.5) / T

    return loss_fn


def extra_models(config: ADMConfig, info: DataInfo, state: dict[str, Any]) -> dict[str, Trainable]:
    """The classifier, with its own AdamW and ADM's linear learning-rate anneal, no EMA."""
    def optimizer_fn(params):
        return adamw(params, lr=config.classifier_lr, weight_decay=config.classifier_weight_decay)

    def lr_fn(step: int) -> float:
        return lr_at(step, lr=config.classifier_lr, warmup_steps=0, schedule="linear", total_steps=config.steps)

    return {"classifier": Trainable(build_classifier(config, info), classifier_loss_fn(config),
                                    optimizer_fn=optimizer_fn, lr_fn=lr_fn, ema=False)}


@torch.no_grad()
def accuracy_by_noise(classifier: nn.Module, images: Tensor, labels: Tensor, logsnrs: Tensor, *, buckets: int = 10,
                      seed: int = 0, batch_size: int = 500) -> list[tuple[int, int, float]]:
    """Held-out accuracy of ``classifier(z_t, t)`` in ``buckets`` equal ranges of ``t``: ``[(t_first, t_last, acc)]``.

    Each image is noised once per bucket at a ``t`` drawn uniformly inside it (a seeded generator).
    ``images (N, C, H, W)`` in [-1, 1]; ``labels (N,)``; ``logsnrs (T,)`` the chain's table.
    """
    T = logsnrs.shape[0]
    device = next(classifier.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    edges = [round(i * T / buckets) for i in range(buckets + 1)]
    result = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        correct = 0
        for start in range(0, len(images), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            t = torch.randint(lo, hi, (x.shape[0],), generator=gen)
            z = process.diffuse(x, torch.randn(x.shape, generator=gen), logsnrs[t].to(torch.float32))
            correct += int((classifier(z.to(device), t.to(device, torch.float32)).argmax(1).cpu() == y).sum())
        result.append((lo, hi - 1, correct / len(images)))
    return result


# ----------------------------------------------------------------------------------------------
# Guided sampling: ADM's Algorithm 1 (ancestral) and Algorithm 2 (DDIM)
# ----------------------------------------------------------------------------------------------


def classifier_cond(classifier: nn.Module, alphas_bar: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``(z, sigma) -> logits``: the classifier at the table index of EDM's ``sigma`` (``timestep_from_sigma``)."""
    def logits(z: Tensor, sigma: Tensor) -> Tensor:
        t = timestep_from_sigma(sigma, alphas_bar).reshape(-1).expand(z.shape[0])
        return classifier(z, t.to(z.device, z.dtype))

    return logits


@torch.no_grad()
def guided_sample(denoise: Callable, classifier: nn.Module, x: Tensor, sigmas: Tensor, labels: Tensor | None, *,
                  scale: float, sampler: str, alphas_bar: Tensor, clip: bool = False,
                  generator: torch.Generator | None = None) -> Tensor:
    """Sample ``denoise`` guided toward ``labels`` by ``classifier`` over the grid ``sigmas`` (decreasing, ending in 0).

    The state is EDM's ``x = z / alpha`` in float64. At each level the VP latent ``z_t = alpha_t x`` and the
    classifier's table index ``t`` give ``g = grad_z log p(y | z_t)`` (:func:`kdiff.guidance.grad_log_prob`):

    - ``"ancestral"`` [ADM Alg. 1]: ``mu, Sigma`` from ``process.posterior`` at the model's ``x_0`` (``Sigma`` from
      iDDPM's learned interpolation when ``denoise`` returns ``(denoised, frac)``, with the chain's second
      posterior variance at the last step, as iDDPM), then ``z_s = guided_mean(mu, Sigma, g, s) + sqrt(Sigma) n``;
      no noise on the last step.
    - ``"ddim"`` [ADM Alg. 2]: ``eps' = guided_eps(eps, sqrt(1 - abar_t), g, s)``, ``x_0`` from ``eps'``, then the
      deterministic DDIM step (:func:`kdiff.solvers.ddim_step`).

    ``clip`` clamps ``x_0`` to [-1, 1] as ADM's sampler does (in Alg. 2 after the guided ``eps'``). ``labels=None``
    or ``scale=0`` samples without the classifier. Returns the sample at sigma 0 in ``x``'s dtype.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    dtype = x.dtype
    state = x.to(torch.float64)
    grid = sigmas.to(device=x.device, dtype=torch.float64)
    logsnr = torch.cat([logsnr_from_sigma(grid[:-1]), grid.new_full((1,), math.inf)])
    first_logvar = process.posterior_logvar(logsnr[-2], logsnr[-3]) if grid.shape[0] > 2 else None
    cond = classifier_cond(classifier, alphas_bar)
    guided = labels is not None and scale != 0

    for i in range(grid.shape[0] - 1):
        sigma, sigma_next, lt, ls = grid[i], grid[i + 1], logsnr[i], logsnr[i + 1]
        out = denoise(state.to(dtype), sigma)
        denoised, frac = out if isinstance(out, tuple) else (out, None)
        denoised = denoised.to(torch.float64)
        alpha_t, sigma_vp = alpha_sigma(lt)
        z = alpha_t * state
        grad = grad_log_prob(lambda zz, s: cond(zz.to(dtype), s), z, sigma, labels).to(torch.float64) \
            if guided else torch.zeros_like(z)
        if sampler == "ddim":
            if guided:
                denoised = x_from_eps(z, guided_eps(eps_from_x(z, denoised, lt), sigma_vp, grad, scale=scale), lt)
            state = ddim_step(state, denoised.clamp(-1, 1) if clip else denoised, sigma, sigma_next)
            continue
        mean, var = process.posterior(denoised.clamp(-1, 1) if clip else denoised, z, ls, lt)
        if frac is not None:
            var = elbo.learned_logvar(2.0 * frac.to(torch.float64) - 1.0, ls, lt, first_logvar=first_logvar).exp()
        z_next = guided_mean(mean, var, grad, scale=scale)
        if sigma_next > 0:
            noise = torch.randn(state.shape, generator=generator, dtype=torch.float64,
                                device=generator.device if generator is not None else state.device)
            z_next = z_next + var.sqrt() * noise.to(state.device)
        state = z_next / alpha_sigma(ls)[0]
    return state.to(dtype)


def start_scale(config: ADMConfig, sigmas: Tensor) -> float:
    """A VP chain starts at ``z_T = n``, that is ``x = n sqrt(1 + sigma_max^2)`` in EDM space."""
    return math.sqrt(1.0 + float(sigmas[0]) ** 2)


def sigmas_for(config: ADMConfig) -> Tensor:
    """The chain respaced to ``sample_steps`` (trailing spacing) in EDM space, then 0 (``ddpm.sampling_sigmas``)."""
    return ddpm.sampling_sigmas(tables(config)[0], config.sample_steps)


def denoiser(model: nn.Module, config: ADMConfig, labels: Tensor | None,
             extras: Mapping[str, nn.Module] | None = None) -> Denoise:
    """The generic sampling path (training grids, ``recipes.sample``): the model, guided toward ``labels`` by the
    classifier with ``classifier_scale`` in EDM form (:func:`kdiff.guidance.classifier_guidance` through
    :func:`kdiff.guidance.noisy_classifier_log_prob`). With ``--solver ddim`` this is Algorithm 2 exactly; with
    ``ddpm`` the ancestral step's mean moves by the guided ``x_0``, a discretization of Algorithm 1 that
    :func:`guided_sample` implements as published (the sweep uses that)."""
    base = model_denoiser(model, config, labels, clip=config.clip_denoised)
    classifier = (extras or {}).get("classifier")
    if labels is None or classifier is None or config.classifier_scale == 0:
        return base
    log_prob = noisy_classifier_log_prob(classifier, alphas_bar=tables(config)[0])
    return classifier_guidance(base, log_prob, y=labels, scale=config.classifier_scale)


RECIPE = ImageRecipe(
    name="adm", config=ADMConfig, presets=PRESETS, default_preset="digits", loss=make_loss_fn, denoiser=denoiser,
    sigmas=sigmas_for, start_scale=start_scale, build_model=build_model, extra_models=extra_models,
    sampling_fields=("solver", "sample_steps", "classifier_scale", "clip_denoised"),
)


# ----------------------------------------------------------------------------------------------
# Evaluation: classifier accuracy against the noise level, the guidance trade-off sweep
# ----------------------------------------------------------------------------------------------


def heldout(config: ADMConfig) -> tuple[Tensor, Tensor]:
    """The held-out split ``eval_data`` as ``(images (N, C, S, S) in [-1, 1], labels (N,))``, padded like training."""
    u8, labels, _ = data.read_h5(resolve_data(config.eval_data))
    x = data.x_from_uint8(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())
    return data.pad_to(x, config.image_size), torch.from_numpy(labels)


def is_digits(config: ADMConfig, info: DataInfo) -> bool:
    return config.eval_data == "digits-test" and info.shape == (1, 8, 8)


@torch.no_grad()
def sweep(sample_denoiser: Callable[[Tensor | None], Callable], classifier: nn.Module, config: ADMConfig,
          info: DataInfo, *, num_classes: int, out_dir: Path, device: torch.device, batch_size: int = 500,
          progress: bool = False) -> list[dict[str, float]]:
    """Guided samples at each of ``config.sweep_scales`` with ``config.sampler``: one row per scale with the
    independent digit classifier's accuracy on the guided class (``metrics.digits_accuracy``, never the guiding
    classifier) and the digits Frechet distance, or FID for other data; the samples (HDF5, with the labels they
    were guided toward) and a PNG grid per scale.

    ``sample_denoiser(labels) -> denoise``. Sample ``i`` starts from seed ``i`` with label ``i % num_classes`` at
    every scale (common random numbers), and its later noise comes from a generator seeded by its batch.
    """
    alphas_bar, _ = tables(config)
    sigmas = sigmas_for(config)
    n = config.sweep_samples
    labels = torch.arange(n) % num_classes
    svc = metrics.fit_digits_classifier() if is_digits(config, info) else None
    rows = []
    for scale in config.sweep_scales:
        t0 = time.perf_counter()
        chunks = []
        for start in range(0, n, batch_size):
            seeds = list(range(start, min(n, start + batch_size)))
            y = labels[seeds[0]:seeds[-1] + 1].to(device)
            x = initial_noise(seeds, info.shape, device) * start_scale(config, sigmas)
            gen = torch.Generator(device).manual_seed(seeds[0] + 1_000_003)
            out = guided_sample(sample_denoiser(y), classifier, x.float(), sigmas, y, scale=scale,
                                sampler=config.sampler, alphas_bar=alphas_bar, clip=config.clip_denoised,
                                generator=gen)
            chunks.append(out.clamp(-1, 1).float().cpu())
        images = torch.cat(chunks)
        row = {"scale": float(scale), "sample_seconds": time.perf_counter() - t0}
        u8 = data.uint8_from_x(images).permute(0, 2, 3, 1).numpy()
        if svc is not None:
            row["digits_accuracy"] = metrics.digits_accuracy(u8, labels.numpy(), classifier=svc)
            row["digits_fd"] = metrics.digits_frechet_distance(u8)
        else:
            row["fid"] = metrics.fid(u8, resolve_data(config.eval_data), progress=progress)
        name = f"sweep-{config.sampler}-scale{scale:g}"
        data.write_h5(out_dir / f"{name}.h5", u8, labels.numpy(), split="test",
                      source=f"recipes.adm: {config.sampler}, {config.sample_steps} steps, classifier scale {scale:g}")
        write_grid(images[:100], out_dir / f"{name}.png")
        rows.append(row)
        if progress:
            print("  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()), file=sys.stderr)
    return rows


def report(config: ADMConfig, info: DataInfo, accuracy: list[tuple[int, int, float]] | None,
           rows: list[dict[str, float]], *, model: str) -> str:
    """The printed summary: accuracy per noise bucket, then the sweep table."""
    lines = []
    if accuracy is not None:
        lines.append(f"noisy classifier, held-out accuracy by timestep t (0: clean, {config.timesteps - 1}: noise):")
        lines += [f"  t {lo:4d}-{hi:4d}  accuracy {acc:.3f}" for lo, hi, acc in accuracy]
    if rows:
        lines.append(f"classifier guidance ({config.sampler}, {config.sample_steps} steps, {config.sweep_samples} "
                     f"samples per scale), {model} model:")
        keys = [k for k in rows[0] if k not in ("scale", "sample_seconds")]
        lines.append("  scale  " + "  ".join(f"{k:>15s}" for k in keys))
        lines += ["  " + f"{r['scale']:5g}  " + "  ".join(f"{r[k]:15.4f}" for k in keys) for r in rows]
        if is_digits(config, info):
            lines.append(f"  floors: real-test digits_accuracy {real_digits_accuracy():.4f}, real train-vs-test "
                         f"digits_fd {metrics.digits_frechet_floor():.4f}")
    return "\n".join(lines)


def real_digits_accuracy() -> float:
    test_u8, test_labels = data.digits_arrays(split="test")
    return metrics.digits_accuracy(test_u8, test_labels)


def write_tensorboard(out_dir: Path, accuracy: list[tuple[int, int, float]] | None, rows: list[dict[str, float]],
                      sampler: str) -> None:
    """Scalars a chart reads directly: accuracy against the bucket's middle ``t``; sweep metrics against 100 s."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(out_dir / "tb")) as writer:
        for lo, hi, acc in accuracy or []:
            writer.add_scalar("classifier/heldout_accuracy_by_t", acc, (lo + hi) // 2)
        for row in rows:
            for key, value in row.items():
                if key != "scale":
                    writer.add_scalar(f"guidance_{sampler}/{key}_by_100scale", value, round(100 * row["scale"]))


def evaluate_guidance(model: nn.Module, classifier: nn.Module, config: ADMConfig, info: DataInfo, *, out_dir: Path,
                      sample_denoiser: Callable | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Held-out classifier accuracy per noise bucket and the sweep; printed, saved as JSON, logged to TensorBoard."""
    device = next(classifier.parameters()).device
    _, logsnrs = tables(config)
    images, labels = heldout(config)
    accuracy = accuracy_by_noise(classifier, images, labels, logsnrs, buckets=config.accuracy_buckets,
                                 seed=config.seed)
    num_classes = classifier_classes(config, info)
    model_name = model_name or ("conditional" if info.num_classes is not None else "unconditional")
    rows = []
    if config.sweep_samples > 0:
        rows = sweep(sample_denoiser or (lambda y: model_denoiser(model, config, y)), classifier, config, info,
                     num_classes=num_classes, out_dir=out_dir, device=device, progress=config.progress)
    result = {"model": model_name, "sampler": config.sampler, "sample_steps": config.sample_steps,
              "sweep_samples": config.sweep_samples,
              "classifier_accuracy": [{"t_first": lo, "t_last": hi, "accuracy": a} for lo, hi, a in accuracy],
              "sweep": rows}
    (out_dir / f"guidance-{config.sampler}.json").write_text(json.dumps(result, indent=2))
    write_tensorboard(out_dir, accuracy, rows, config.sampler)
    print(report(config, info, accuracy, rows, model=model_name))
    return result


# ----------------------------------------------------------------------------------------------
# Run and main
# ----------------------------------------------------------------------------------------------


def run(config: ADMConfig, *, resume: Path | None = None, dist: Any = None) -> dict[str, Any]:
    """Train the model and the classifier (the shared image machinery), then, on rank 0, the accuracy-by-noise
    table and the guidance sweep from the final checkpoint."""
    scores = RECIPE.run(config, resume=resume, dist=dist)
    if dist is not None and dist.rank != 0:
        return scores
    loaded = load_for_sampling(config.out_dir, device=dist.device if dist is not None else "cpu")
    result = evaluate_guidance(loaded.model, loaded.extras["classifier"], loaded.config, loaded.info,
                               out_dir=Path(config.out_dir))
    return {**scores, "guidance": result}


def sweep_main(argv: Sequence[str]) -> int:
    """``python -m recipes.adm sweep MODEL [--classifier RUN] [...]``: guide any recipe's checkpoint (MODEL) with
    an ADM run's classifier (default: MODEL's own) over a scale sweep."""
    p = argparse.ArgumentParser(prog="python -m recipes.adm sweep", description=sweep_main.__doc__)
    p.add_argument("model", help="a checkpoint or run directory of any recipe")
    p.add_argument("--classifier", default=None, help="an ADM checkpoint or run directory (default: MODEL)")
    p.add_argument("--sweep-scales", default=None, help="comma-separated scales, e.g. 0,0.5,1,2,4,10")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="ancestral (Alg. 1) or ddim (Alg. 2)")
    p.add_argument("--sweep-samples", type=int, default=None, help="samples per scale")
    p.add_argument("--sample-steps", type=int, default=None, help="respaced chain length")
    p.add_argument("--out-dir", default=None, help="where the grids and JSON go (default: MODEL's run directory)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        loaded = load_for_sampling(args.model, device=args.device)
        guide = load_for_sampling(args.classifier or args.model, device=args.device)
        if guide.recipe.name != "adm" or "classifier" not in guide.extras:
            raise ValueError(f"--classifier: expected an ADM run with a classifier, got {guide.path}")
        changes: dict[str, Any] = {"progress": True}
        if args.sweep_scales is not None:
            changes["sweep_scales"] = tuple(float(s) for s in args.sweep_scales.split(","))
        for key in ("sampler", "sweep_samples", "sample_steps"):
            if getattr(args, key) is not None:
                changes[key] = getattr(args, key)
        config = dataclasses.replace(guide.config, **changes)
        if loaded.recipe.name == "adm":  # (not isinstance: under -m this module is __main__, not recipes.adm)
            def sample_denoiser(y):
                return model_denoiser(loaded.model, config, y)
        else:  # any other recipe's denoiser, without its own guidance
            def sample_denoiser(y):
                return loaded.recipe.denoiser(loaded.model, loaded.config, y, loaded.extras)
        out_dir = Path(args.out_dir) if args.out_dir else loaded.path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "conditional" if loaded.info.num_classes is not None else "unconditional"
        evaluate_guidance(loaded.model, guide.extras["classifier"], config, loaded.info, out_dir=out_dir,
                          sample_denoiser=sample_denoiser, model_name=f"{name} ({loaded.recipe.name})")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def plot_guidance(runs: Mapping[str, Mapping[str, Any]], out_prefix: str | Path, *, fidelity: str = "digits_accuracy",
                  quality: str = "digits_fd") -> list[Path]:
    """PNG charts of finished evaluations (``guidance-*.json`` contents by name): the two sides of the trade-off
    against the guidance scale, ``{out_prefix}-fidelity.png`` (``fidelity``) and ``-quality.png`` (``quality``), and
    the noisy classifiers' held-out accuracy against ``t``, ``-classifier.png`` (:func:`recipes.plot.line_chart`)."""
    prefix = str(out_prefix)
    sweeps = {name: r["sweep"] for name, r in runs.items() if r["sweep"]}
    paths = []
    for key, suffix in ((fidelity, "fidelity"), (quality, "quality")):
        if sweeps:
            paths.append(line_chart({n: ([r["scale"] for r in rows], [r[key] for r in rows])
                                     for n, rows in sweeps.items()}, f"{prefix}-{suffix}.png", logx=False,
                                    xlabel="classifier guidance scale s", ylabel=key,
                                    title=f"classifier guidance: {key} against the scale"))
    distinct: dict[str, list[dict[str, float]]] = {}
    for name, r in runs.items():  # the sweeps of one run share its classifier: one line per classifier
        if r["classifier_accuracy"] not in distinct.values():
            distinct[name] = r["classifier_accuracy"]
    paths.append(line_chart({n: ([(a["t_first"] + a["t_last"]) / 2 for a in acc], [a["accuracy"] for a in acc])
                             for n, acc in distinct.items()},
                            f"{prefix}-classifier.png", logx=False, xlabel="timestep t (0 clean, T-1 noise)",
                            ylabel="held-out accuracy", title="noisy classifier: accuracy against the noise level"))
    return paths


def plot_main(argv: Sequence[str]) -> int:
    """``python -m recipes.adm plot NAME=guidance.json ... --out PREFIX``: charts of finished evaluations."""
    p = argparse.ArgumentParser(prog="python -m recipes.adm plot", description=plot_main.__doc__)
    p.add_argument("runs", nargs="+", help="NAME=PATH of a guidance-*.json written by a run or a sweep")
    p.add_argument("--out", required=True, help="path prefix of the PNGs")
    args = p.parse_args(argv)
    runs = {name: json.loads(Path(path).read_text()) for name, _, path in (c.partition("=") for c in args.runs)}
    for path in plot_guidance(runs, args.out):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipes.adm [--preset P] [flags]``; ``... sweep MODEL``; ``... plot NAME=JSON --out PNG``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    return image_main(RECIPE, argv, run_fn=run)


if __name__ == "__main__":
    raise SystemExit(main())
