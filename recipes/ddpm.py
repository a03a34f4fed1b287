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

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from kdiff import elbo, losses, schedules, solvers
from kdiff.denoisers import Denoise, clip_denoised, vp_denoiser
from kdiff.param import x_from_eps
from kdiff.process import diffuse, posterior, posterior_logvar  # noqa: F401 (diffuse re-exported for tests)

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
    ``state_dict`` round-trips bitwise, so a resumed run draws the same steps as an uninterrupted one.
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
                          seed: int = 0) -> tuple[float, float]:
    """``(bits/dim, standard error)`` by :func:`kdiff.elbo.vlb_estimate`: ``k`` random steps per image."""
    C = x.shape[1]
    base = (lambda z, c: net(z, c)[:, :C]) if learn_variance and variance != "learned" else net
    model_fn = elbo.vlb_model(base, logsnrs, variance=variance, clip_denoised=clip_denoised)
    est = elbo.vlb_estimate(model_fn, x, logsnrs, k=k, generator=torch.Generator(x.device).manual_seed(seed))
    return est.summary()
