"""DDPM (Ho et al. 2020) and Improved DDPM (Nichol & Dhariwal 2021), end to end.

Training: a discrete VP chain of ``T`` steps, linear betas [DDPM Sec. 4] or the capped cosine table [iDDPM Eq. 17],
``z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``; an eps-predicting network ``net(z_t, t)`` (``t`` the table index
as a float). Objectives [DDPM Eq. 14; iDDPM Sec. 3.1-3.3]:

- ``simple``: ``L_simple = ||eps - eps_hat||^2`` (mean over dimensions), fixed variances at sampling;
- ``hybrid``: the network also outputs ``v`` (2C channels), ``Sigma = exp((v+1)/2 log beta + (1-(v+1)/2) log beta~)``,
  ``L_hybrid = L_simple + 0.001 L_vlb`` with the mean stop-gradded inside ``L_vlb`` (:func:`kdiff.elbo.hybrid_loss`);
- ``vlb``: pure ``L_vlb = T L_t`` (bits/dim) with iDDPM's loss-aware importance sampling of ``t``
  (``p_t ~ sqrt(E[L_t^2])`` over the last 10 values of every term, uniform until all are filled).

Sampling: ancestral DDPM steps on the full chain or a respaced one (``steps < T``, trailing spacing), with the
variance fixed-small (``beta~``), fixed-large (``beta``) or learned, each recomputed for the respaced chain
[iDDPM Sec. 4]; DDIM(eta) on respaced chains; optional clip of the predicted x0 to [-1, 1] (off by default).
Evaluation: test negative log-likelihood in bits/dim, the exact whole-chain bound (``T`` evaluations per image)
with the exact normal CDF and the released code's tanh approximation, and the digits Frechet distance.

The functions above the ``Recipe`` line are plain and importable: :func:`chain_tables`,
:func:`timesteps_from_uniform`, :func:`ddpm_loss`, :func:`ddpm_denoiser`, :func:`sampling_sigmas`,
:func:`sample_chain`, :func:`chain_bits_per_dim`, :func:`estimate_bits_per_dim`.

References:
    [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", Eq. 5-14, Alg. 1-2, App. B.
    [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", Sec. 3-4, Eq. 15-18.
    [DDIM] Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from kdiff import data, elbo, losses, metrics, nets, schedules, solvers
from kdiff.denoisers import Denoise, clip_denoised, vp_denoiser
from kdiff.param import x_from_eps
from kdiff.process import diffuse, posterior, posterior_logvar  # noqa: F401 (diffuse re-exported for tests)

from .distributed import Dist, Rand
from .image import DataInfo, ImageConfig, ImageRecipe, dataset_for, load_for_sampling, run
from .loop import LossFn

TimeNet = Callable[[Tensor, Tensor], Tensor]  # net(z, t): t the float table index [B]
SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("simple", "hybrid", "vlb")
SAMPLERS = ("ancestral", "ddim")


# ----------------------------------------------------------------------------------------------
# The chain


def chain_tables(schedule: str, T: int) -> tuple[Tensor, Tensor]:
    """``(alphas_bar, logsnrs)``, both ``(T,)`` float64: DDPM's linear betas 1e-4..0.02 [DDPM Sec. 4] or iDDPM's
    cosine table capped at beta 0.999 [iDDPM Eq. 17]; ``logsnrs = log(abar / (1 - abar))``."""
    if schedule == "linear":
        abar = schedules.alphas_bar_from_betas(schedules.betas_linear(T))
    elif schedule == "cosine":
        abar = schedules.alphas_bar_cosine(T)
    else:
        raise ValueError(f"schedule: expected one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    abar = abar.to(torch.float64)
    return abar, schedules.logsnr_from_alphas_bar(abar)


def timesteps_from_uniform(u: Tensor, T: int, probs: Tensor | None = None) -> Tensor:
    """Table indices ``t [B]`` int64 from uniforms ``u [B]`` in [0, 1): ``floor(u T)``, or the inverse CDF of
    ``probs (T,)`` (iDDPM's importance sampler, :func:`kdiff.elbo.importance_probs`)."""
    if probs is None:
        return (u.to(torch.float64) * T).floor().to(torch.int64).clamp(0, T - 1)
    if probs.shape != (T,):
        raise ValueError(f"probs: expected shape ({T},), got {tuple(probs.shape)}")
    cdf = probs.to(torch.float64).cumsum(0)
    return torch.searchsorted(cdf / cdf[-1], u.to(torch.float64).to(cdf.device), right=True).clamp(0, T - 1)


class LossHistory:
    """iDDPM's loss-aware timestep sampler state [iDDPM Sec. 3.3]: the last ``K`` values of every term ``L_t``.

    ``probs()`` is :func:`kdiff.elbo.importance_probs` (uniform until every row holds ``K`` values), ``push``
    appends a batch's detached terms (:func:`kdiff.elbo.push_loss_history`). Kept on the CPU in float64; its
    ``state_dict`` round-trips bitwise, so a resumed run draws the same steps as an uninterrupted one. Under
    DDP each process records its own share of the batch (iDDPM all-gathers the losses first; not done here), so
    the draws depend on the number of processes.
    """

    def __init__(self, T: int, k: int = 10, *, uniform_prob: float = 0.001):
        self.values = torch.zeros(T, k, dtype=torch.float64)
        self.counts = torch.zeros(T, dtype=torch.int64)
        self.uniform_prob = uniform_prob

    def probs(self) -> Tensor:
        return elbo.importance_probs(self.values, self.counts, uniform_prob=self.uniform_prob)

    def push(self, t: Tensor, terms: Tensor) -> None:
        self.values, self.counts = elbo.push_loss_history(self.values, self.counts, t.cpu(),
                                                          terms.detach().to(torch.float64).cpu())

    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        values, counts = state["values"], state["counts"]
        if values.shape != self.values.shape or counts.shape != self.counts.shape:
            raise ValueError(f"loss history: expected shapes {tuple(self.values.shape)} and {tuple(self.counts.shape)} "
                             f"(T, K), got {tuple(values.shape)} and {tuple(counts.shape)}")
        self.values = values.to(torch.float64).clone()
        self.counts = counts.to(torch.int64).clone()


# ----------------------------------------------------------------------------------------------
# Losses


class DDPMLoss(NamedTuple):
    """Per-sample training loss and the value iDDPM's loss history records for the step."""

    loss: Tensor  # [B] the objective for each sample (not yet importance-weighted)
    term: Tensor  # [B] detached: L_simple, L_hybrid or T L_t in bits/dim, what the importance sampler tracks


def ddpm_loss(net: TimeNet, x: Tensor, t: Tensor, eps: Tensor, logsnrs: Tensor, *, objective: str = "simple",
              learn_variance: bool = False) -> DDPMLoss:
    """The per-sample DDPM / iDDPM objective at table indices ``t [B]`` with forward noise ``eps`` [DDPM Alg. 1].

    ``z = diffuse(x, eps, logsnrs[t])``, ``net(z, t)`` returns ``eps_hat`` (and ``v`` with ``learn_variance``):
    ``simple``: ``mean_d (eps - eps_hat)^2`` [DDPM Eq. 14]; ``hybrid``: :func:`kdiff.elbo.hybrid_loss` (iDDPM
    Eq. 16, ``lam = 0.001``, ``L_vlb = T L_t`` with the mean stop-gradded); ``vlb``: ``T L_t`` in bits/dim with
    gradients through mean and variance (the first step's term is the discretized decoder ``L_0``).
    Shapes: ``x, eps (B, C, H, W)`` on the 256-level grid in [-1, 1]; ``t [B]`` int64; ``logsnrs (T,)``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
    if objective != "simple" and not learn_variance:
        raise ValueError(f"objective: {objective!r} trains the learned variance; it needs learn_variance=True")
    T = logsnrs.numel()
    table = logsnrs.to(device=x.device, dtype=torch.float64)
    lt = table[t]
    z = diffuse(x, eps, lt)
    out = net(z, t.to(torch.float32))
    if learn_variance:
        if out.shape[1] != 2 * x.shape[1]:
            raise ValueError(f"net: expected {2 * x.shape[1]} output channels (learn_variance), got {out.shape[1]}")
        eps_hat, v = out.chunk(2, dim=1)
    else:
        eps_hat = out
    if objective == "simple":
        value = losses.mse(eps_hat, eps)
        return DDPMLoss(value, value.detach())
    ls = torch.where(t > 0, table[(t - 1).clamp(min=0)], math.inf)
    logvar = elbo.learned_logvar(v, ls, lt, first_logvar=posterior_logvar(table[0], table[1]))
    if objective == "hybrid":
        value = elbo.hybrid_loss(x, z, eps, eps_hat, logvar, ls, lt, num_steps=T)
    else:
        zc = z.to(torch.promote_types(z.dtype, torch.float32))
        mean, _ = posterior(x_from_eps(zc, eps_hat.to(zc.dtype), lt), zc, ls, lt)
        value = T * elbo.bits_per_dim(elbo.vlb_term(x, z, mean, logvar, ls, lt), x[0].numel())
    return DDPMLoss(value, value.detach())


# ----------------------------------------------------------------------------------------------
# Sampling


def ddpm_denoiser(net: TimeNet, alphas_bar: Tensor, *, learn_variance: bool = False, variance: str = "small",
                  clip: bool = False) -> Denoise:
    """``denoise(x, sigma)`` for :func:`kdiff.solvers.sample`: the eps network on the discrete table.

    ``variance="learned"`` needs ``learn_variance`` and returns ``(denoised, frac)`` (the ancestral step then uses
    iDDPM's interpolation on the step it takes); ``"small"``/``"large"`` drop a learned output. ``clip``: clamp
    the predicted x0 to [-1, 1] (:func:`kdiff.denoisers.clip_denoised`).
    """
    if variance not in elbo.VARIANCES:
        raise ValueError(f"variance: expected one of {', '.join(map(repr, elbo.VARIANCES))}, got {variance!r}")
    if variance == "learned" and not learn_variance:
        raise ValueError("variance: 'learned' needs a network with learn_variance=True")
    inner = vp_denoiser(net, param="eps", alphas_bar=alphas_bar, learned_variance=learn_variance)
    denoise = inner
    if learn_variance and variance != "learned":
        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            return inner(x, sigma)[0]
    return clip_denoised(denoise) if clip else denoise


def sampling_sigmas(alphas_bar: Tensor, steps: int, *, spacing: str = "trailing") -> Tensor:
    """The EDM-space grid of a chain respaced to ``steps`` of the ``T`` table steps [iDDPM Sec. 4], then 0."""
    return solvers.sigmas_from_alphas_bar(alphas_bar, schedules.respace(alphas_bar.numel(), steps, spacing=spacing))


def sample_chain(denoise: Denoise, noise: Tensor, alphas_bar: Tensor, steps: int, *, sampler: str = "ancestral",
                 variance: str = "small", eta: float = 0.0, generator: torch.Generator | None = None,
                 spacing: str = "trailing") -> Tensor:
    """Images from standard normal ``noise (B, C, H, W)`` (that is ``z_T``): ancestral DDPM steps [DDPM Alg. 2]
    or DDIM(eta) [DDIM Eq. 12] over ``steps`` respaced table steps; ``variance`` for fixed-variance ancestral
    steps (``"small"``: beta~, ``"large"``: beta; a learned denoiser's own variance wins). Returns ``x_0``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
    sigmas = sampling_sigmas(alphas_bar, steps, spacing=spacing)
    x = noise.to(torch.float64) * math.sqrt(1.0 + sigmas[0].item() ** 2)  # z_T / alpha_T
    return solvers.sample(denoise, x.to(noise.dtype), sigmas, solver="ddpm" if sampler == "ancestral" else "ddim",
                          eta=eta, variance="small" if variance == "learned" else variance, generator=generator)


# ----------------------------------------------------------------------------------------------
# Bits per dimension


class ChainBits(NamedTuple):
    """The exact whole-chain bound over a data set, bits/dim averaged over images."""

    bpd: float  # exact normal CDF in the decoder
    bpd_tanh: float  # the released code's tanh CDF in the decoder
    prior: float  # L_T part
    decoder: float  # L_0 part (exact CDF)
    kl: float  # sum of L_1..L_{T-1}
    images: int


@torch.no_grad()
def chain_bits_per_dim(net: TimeNet, x: Tensor, logsnrs: Tensor, *, variance: str = "small",
                       learn_variance: bool = False, clip_denoised: bool = True, batch_size: int = 4096,
                       seed: int = 0, progress: bool = False) -> ChainBits:
    """Test bits/dim by the exact whole-chain bound (:func:`kdiff.elbo.vlb` over all ``T`` steps, every image of a
    batch evaluated together at each step), with both decoder CDFs from one pass: the tanh ``L_0`` is recomputed
    at the same ``z_1``. ``x (N, C, H, W)`` on the 256-level grid; ``variance`` as in :func:`kdiff.elbo.vlb_model`;
    a learned network evaluated with a fixed variance drops its variance channels. ``clip_denoised`` clamps the
    predicted x0 to [-1, 1] inside the model mean, as DDPM's and iDDPM's bits/dim evaluations do (their
    ``calc_bpd_loop(clip_denoised=True)``): without it the last steps of a chain whose ``alpha_T`` is tiny (the
    capped cosine table: ``alpha_T ~ 5e-5``) amplify any eps error into a huge x0 error and dominate the bound."""
    C = x.shape[1]
    if learn_variance and variance != "learned":
        def base(z: Tensor, c: Tensor) -> Tensor:
            return net(z, c)[:, :C]
    else:
        base = net
    model_fn = elbo.vlb_model(base, logsnrs, variance=variance, clip_denoised=clip_denoised)
    gen = torch.Generator(x.device).manual_seed(seed)
    sums = torch.zeros(5, dtype=torch.float64)
    first: dict[str, tuple[Tensor, Tensor]] = {}

    def recording(z: Tensor, i: int) -> tuple[Tensor, Tensor]:
        mean, logvar = model_fn(z, i)
        if i == 0:
            first["decoder"] = (mean, logvar)
        return mean, logvar

    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        out = elbo.vlb(recording, xb, logsnrs, generator=gen, progress=progress)
        tanh_l0 = elbo.decoder_nll(xb, *first["decoder"], cdf="tanh")
        dims = xb[0].numel()
        tanh_nats = out.nats - out.terms[:, 0] + tanh_l0.to(out.nats.dtype)
        parts = (out.nats, tanh_nats, out.prior, out.terms[:, 0], out.terms[:, 1:].sum(1))
        sums += torch.stack([elbo.bits_per_dim(p.to(torch.float64), dims).sum() for p in parts]).cpu()
    n = x.shape[0]
    bpd, bpd_tanh, prior, decoder, kl = (s / n for s in sums.tolist())
    return ChainBits(bpd, bpd_tanh, prior, decoder, kl, n)


@torch.no_grad()
def estimate_bits_per_dim(net: TimeNet, x: Tensor, logsnrs: Tensor, *, k: int, variance: str = "small",
                          learn_variance: bool = False, clip_denoised: bool = True,
                          seed: int = 0, method: str = "uniform") -> tuple[float, float]:
    """``(bits/dim, standard error)`` by :func:`kdiff.elbo.vlb_estimate`: ``k`` random steps per image, drawn
    uniformly or stratified (``method``)."""
    C = x.shape[1]
    base = (lambda z, c: net(z, c)[:, :C]) if learn_variance and variance != "learned" else net
    model_fn = elbo.vlb_model(base, logsnrs, variance=variance, clip_denoised=clip_denoised)
    est = elbo.vlb_estimate(model_fn, x, logsnrs, k=k, method=method,
                            generator=torch.Generator(x.device).manual_seed(seed))
    return est.summary()


# ==============================================================================================
# Recipe: config, presets, model, loss, sampling grid, evaluation (on recipes.image)
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class DDPMConfig(ImageConfig):
    """The DDPM / iDDPM recipe: the chain, the objective and the ancestral/DDIM sampler on top of the image's."""

    net: str = "mlp_digits"  # a name in kdiff.nets.CONFIGS
    conditional: bool = False  # DDPM and iDDPM models here are unconditional
    label_dropout: float = 0.0  # unused (unconditional)
    solver: Literal["heun", "euler", "dpmpp_2m", "ddim", "ddpm"] = "ddpm"  # 'ddpm' (ancestral) or 'ddim'
    sample_steps: int = 100  # respaced steps (trailing spacing [iDDPM Sec. 4]); T = the full chain
    T: int = 1000  # diffusion steps of the discrete chain
    schedule: Literal["linear", "cosine"] = "cosine"  # linear betas 1e-4..0.02 [DDPM] or capped cosine [iDDPM]
    objective: Literal["simple", "hybrid", "vlb"] = "hybrid"  # L_simple, L_simple + 0.001 L_vlb, or L_vlb
    learn_variance: bool = True  # the network also outputs iDDPM's variance interpolation v (2C channels)
    timestep_sampler: Literal["uniform", "importance"] = "uniform"  # importance: iDDPM's loss-aware sampler
    variance: Literal["small", "large", "learned"] = "learned"  # ancestral variance: beta~, beta, or learned
    eta: float = 0.0  # DDIM's eta (0: deterministic)
    clip_denoised: bool = False  # clamp the predicted x0 to [-1, 1] while sampling, as DDPM's and iDDPM's code do
    eval_bits: bool = True  # exact whole-chain test bits/dim after training (T evaluations per test image)
    eval_images: int = 0  # test images for bits/dim (0: all of eval_data)
    eval_batch_size: int = 1000  # test images evaluated together at each step of the chain

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conditional:
            raise ValueError("conditional: expected False (the DDPM recipe trains unconditional models), got True")
        if self.solver not in ("ddpm", "ddim"):
            raise ValueError(f"solver: expected 'ddpm' (ancestral) or 'ddim' (the discrete chain), got {self.solver!r}")
        if self.guidance != 1.0:
            raise ValueError(f"guidance: expected 1 (unconditional models), got {self.guidance}")
        if self.T < 2:
            raise ValueError(f"T: expected an int >= 2, got {self.T}")
        if self.sample_steps > self.T:
            raise ValueError(f"sample_steps: expected an int in [1, T={self.T}], got {self.sample_steps}")
        if self.objective != "simple" and not self.learn_variance:
            raise ValueError(f"objective: {self.objective!r} trains the learned variance; add --learn-variance")
        if self.variance == "learned" and not self.learn_variance:
            raise ValueError("variance: 'learned' needs --learn-variance (or choose 'small' or 'large')")
        if self.timestep_sampler == "importance" and self.objective != "vlb":
            raise ValueError(f"timestep_sampler: 'importance' reweights L_vlb [iDDPM Sec. 3.3]; needs --objective vlb, "
                             f"got {self.objective!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta: expected a float >= 0, got {self.eta}")
        for name, low in (("eval_images", 0), ("eval_batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {getattr(self, name)}")


_PAPER = dict(conditional=False, label_dropout=0.0, optimizer="adam", ema_rate=0.9999, ema_rampup_ratio=None,
              batch_size=128, log_every=500, sample_every=20000, checkpoint_every=20000, num_workers=8,
              eval_samples=50000, clip_denoised=True)

PRESETS: dict[str, DDPMConfig] = {
    # CPU, a few minutes: iDDPM's recipe (cosine, L_hybrid, learned variances) on the 1,437 8x8 training digits
    # with the residual MLP; test bits/dim over the whole 1000-step chain on all 360 test digits, and the digits
    # Frechet distance of 1000 samples from 100 respaced ancestral steps. The x0 clip is on: without it the
    # first steps of the capped cosine chain (alpha_T ~ 5e-5) blow any eps error up (RESULTS.md).
    "digits": DDPMConfig(out_dir="runs/ddpm-digits", steps=3000, batch_size=128, optimizer="adam", lr=1e-3,
                         warmup_steps=100, ema_rate=0.999, ema_rampup_ratio=None, log_every=100,
                         checkpoint_every=1000, clip_denoised=True),
    # Fashion-MNIST padded to 32x32, unconditional, one GPU (not yet timed on one). Pack the data first:
    #   python -m kdiff.data pack /usr/share/datasets/fashion-mnist --out data/fashion-train.h5
    #   python -m kdiff.data pack /usr/share/datasets/fashion-mnist --out data/fashion-test.h5 --split test
    "fashion": DDPMConfig(out_dir="runs/ddpm-fashion", data="data/fashion-train.h5", eval_data="data/fashion-test.h5",
                          image_size=32, net="unet_fashion", steps=30000, batch_size=128, optimizer="adam", lr=2e-4,
                          warmup_steps=1000, ema_rate=0.9999, ema_rampup_ratio=None, log_every=200,
                          sample_every=5000, checkpoint_every=5000, num_workers=4, eval_samples=10000,
                          eval_images=1000, clip_denoised=True),
    # DDPM's CIFAR-10 run [DDPM Sec. 4, App. B]: the 35.7M U-Net, linear betas, T = 1000, L_simple, Adam 2e-4 with
    # 5000 warm-up steps, batch 128, EMA 0.9999, dropout 0.1, random flips, gradient clip 1, 800k steps; sampled
    # over the full chain with beta (fixed-large, its CIFAR-10 choice), x0 clipped. Published: FID 3.17, IS 9.46,
    # NLL <= 3.75 bits/dim [DDPM Table 1-2]. Pack (CIFAR-10 python batches):
    #   python -m kdiff.data pack cifar-10-python.tar.gz --out data/cifar10-train.h5
    #   python -m kdiff.data pack cifar-10-python.tar.gz --out data/cifar10-test.h5 --split test
    "cifar10-ddpm": DDPMConfig(**_PAPER, out_dir="runs/ddpm-cifar10", data="data/cifar10-train.h5",
                               eval_data="data/cifar10-test.h5", image_size=32, flip=True, net="ddpm_cifar10",
                               dropout=0.1, schedule="linear", objective="simple", learn_variance=False,
                               variance="large", sample_steps=1000, steps=800_000, lr=2e-4, warmup_steps=5000,
                               grad_clip=1.0),
    # iDDPM's CIFAR-10 setting [iDDPM Sec. 3, its released flags]: the iddpm_cifar10 U-Net (learned variance,
    # dropout 0.3), cosine, T = 4000, L_hybrid, Adam 1e-4, batch 128, EMA 0.9999, flips, 500k steps; sampled with
    # the learned variances over 100 respaced steps (iDDPM Sec. 4: 50-100 steps keep most of the quality).
    # Published: 2.94 bits/dim is iDDPM's best CIFAR-10 NLL (its L_vlb model); L_hybrid trades a little NLL for
    # better FID [iDDPM Sec. 3]. Pack as for cifar10-ddpm.
    "cifar10-iddpm": DDPMConfig(**_PAPER, out_dir="runs/iddpm-cifar10", data="data/cifar10-train.h5",
                                eval_data="data/cifar10-test.h5", image_size=32, flip=True, net="iddpm_cifar10",
                                T=4000, schedule="cosine", objective="hybrid", sample_steps=100, steps=500_000,
                                lr=1e-4),
    # iDDPM's ImageNet 64x64 likelihood model [iDDPM Sec. 3.3]: the iddpm_imagenet64 U-Net, cosine, T = 4000, pure
    # L_vlb with the loss-aware importance sampler, Adam 1e-4, batch 128, EMA 0.9999; 250 respaced steps for
    # samples. Published: 3.53 bits/dim, iDDPM's best ImageNet 64x64 NLL. Pack 64x64 images (folder or .npz):
    #   python -m kdiff.data pack imagenet64/train --out data/imagenet64-train.h5
    #   python -m kdiff.data pack imagenet64/val --out data/imagenet64-val.h5 --split test
    "imagenet64-iddpm": DDPMConfig(**_PAPER, out_dir="runs/iddpm-imagenet64", data="data/imagenet64-train.h5",
                                   eval_data="data/imagenet64-val.h5", image_size=64, net="iddpm_imagenet64",
                                   T=4000, schedule="cosine", objective="vlb", timestep_sampler="importance",
                                   sample_steps=250, steps=1_500_000, lr=1e-4, eval_images=10000),
}


def time_net(model: nn.Module) -> TimeNet:
    """``net(z, t)`` from a kdiff network ``(x, noise_cond, labels)``: the table index is the noise conditioning."""
    return lambda z, t: model(z, t, None)


def build_model(config: DDPMConfig, info: DataInfo) -> nn.Module:
    """``config.net`` sized to the data, unconditional, with 2C outputs when the variance is learned."""
    overrides: dict[str, object] = {"image_size": info.shape[1], "in_channels": info.shape[0], "num_classes": None,
                                    "learn_variance": config.learn_variance}
    if config.net_channels is not None:
        mlp = isinstance(nets.CONFIGS[config.net], nets.MLPConfig)
        overrides["width" if mlp else "channels"] = config.net_channels
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    return nets.build(config.net, **overrides)


def new_state(config: DDPMConfig, info: DataInfo) -> dict[str, Any]:
    """The loss history of iDDPM's importance sampler, saved in every checkpoint (none for uniform t)."""
    return {"loss_history": LossHistory(config.T)} if config.timestep_sampler == "importance" else {}


def loss(config: DDPMConfig, info: DataInfo, state: dict[str, Any]) -> LossFn:
    """``loss_fn(net, batch, rand) -> (loss [b], position [b])``: :func:`ddpm_loss` at ``t`` drawn uniformly, or
    from the loss history (then weighted by ``1 / (T p_t)`` and pushed into it [iDDPM Sec. 3.3])."""
    T = config.T
    _, logsnrs = chain_tables(config.schedule, T)
    history: LossHistory | None = state.get("loss_history")

    def loss_fn(net: nn.Module, batch: Sequence[Tensor], rand: Rand) -> tuple[Tensor, Tensor]:
        x = batch[0]
        u = rand.rand(x.shape[0]).to(x.device)
        probs = history.probs() if history is not None else None
        t = timesteps_from_uniform(u, T, probs).to(x.device)
        out = ddpm_loss(time_net(net), x, t, rand.randn_like(x), logsnrs, objective=config.objective,
                        learn_variance=config.learn_variance)
        value = out.loss
        if history is not None:
            value = value * elbo.importance_weights(probs, t.cpu()).to(device=x.device, dtype=value.dtype)
            history.push(t, out.term)
        return value, (t.to(torch.float32) + 0.5) / T

    return loss_fn


def denoiser(model: nn.Module, config: DDPMConfig, labels: Tensor | None, extras: Mapping[str, nn.Module]) -> Denoise:
    alphas_bar, _ = chain_tables(config.schedule, config.T)
    return ddpm_denoiser(time_net(model), alphas_bar, learn_variance=config.learn_variance, variance=config.variance,
                         clip=config.clip_denoised)


def sigmas(config: DDPMConfig) -> Tensor:
    return sampling_sigmas(chain_tables(config.schedule, config.T)[0], config.sample_steps)


def start_scale(config: DDPMConfig, grid: Tensor) -> float:
    """``z_T / alpha_T`` for ``z_T ~ N(0, I)``: the EDM-space start of a VP chain."""
    return math.sqrt(1.0 + float(grid[0]) ** 2)


def solver_options(config: DDPMConfig) -> dict[str, Any]:
    if config.solver == "ddim":
        return {"eta": config.eta}
    return {"variance": "small" if config.variance == "learned" else config.variance}


def held_out_images(config: DDPMConfig) -> Tensor:
    """The first ``eval_images`` (0: all) images of ``eval_data``, ``(N, C, S, S)`` on the 256-level grid."""
    ds = dataset_for(dataclasses.replace(config, data=config.eval_data, flip=False))
    n = len(ds) if config.eval_images == 0 else min(config.eval_images, len(ds))
    return torch.stack([ds[i][0] for i in range(n)])


def held_out_bits(model: nn.Module, config: DDPMConfig, *, progress: bool = False) -> ChainBits:
    """Test bits/dim of ``model`` by the exact whole chain, x0 clipped as DDPM's and iDDPM's evaluations do."""
    device = next(model.parameters()).device
    x = held_out_images(config).to(device)
    variance = config.variance if config.learn_variance or config.variance != "learned" else "small"
    return chain_bits_per_dim(time_net(model), x, chain_tables(config.schedule, config.T)[1], variance=variance,
                              learn_variance=config.learn_variance, clip_denoised=True,
                              batch_size=config.eval_batch_size, progress=progress)


def digits_fd(images: Tensor) -> float:
    """The digits Frechet distance (:func:`kdiff.metrics.digits_frechet_distance`) of images in [-1, 1]."""
    return metrics.digits_frechet_distance(data.uint8_from_x(images).permute(0, 2, 3, 1).numpy())


@dataclasses.dataclass(frozen=True)
class DDPMRecipe(ImageRecipe):
    """The image recipe plus the exact test bits/dim after training (printed and returned with the scores)."""

    def run(self, config: Any, *, resume: Path | None = None, dist: Dist | None = None) -> dict[str, float]:
        scores = run(self, config, resume=resume, dist=dist)
        if config.eval_bits and (dist is None or dist.rank == 0):
            loaded = load_for_sampling(config.out_dir, device=dist.device if dist is not None else "cpu")
            t0 = time.perf_counter()
            bits = held_out_bits(loaded.model, config, progress=config.progress)
            scores.update({"test_bits_per_dim": bits.bpd, "test_bits_per_dim_tanh_cdf": bits.bpd_tanh,
                           "bits_seconds": time.perf_counter() - t0})
            print(f"test_bits_per_dim: {bits.bpd:.4f} (tanh CDF: {bits.bpd_tanh:.4f}; {bits.images} images, exact "
                  f"{config.T}-step chain, x0 clipped)")
        return scores


RECIPE = DDPMRecipe(
    name="ddpm", config=DDPMConfig, presets=PRESETS, default_preset="digits", loss=loss, denoiser=denoiser,
    sigmas=sigmas, start_scale=start_scale, solver_options=solver_options, build_model=build_model,
    new_state=new_state, sampling_fields=("solver", "sample_steps", "variance", "eta", "clip_denoised"))
main = RECIPE.main

if __name__ == "__main__":
    raise SystemExit(RECIPE.main())
