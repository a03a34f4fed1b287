"""The variational bound of a Gaussian diffusion: KLs, decoders, prior, VLB terms, bits/dim, t importance.

Notation as in :mod:`kdiff.process`: ``q(z_t | x) = N(alpha_t x, sigma_t^2 I)``, ``alpha_t^2 = sigmoid(logsnr_t)``,
``s`` earlier (less noisy) than ``t``. A discrete chain is a table ``logsnrs`` of ``T`` strictly decreasing
values: ``logsnrs[i]`` is the level of ``z_{i+1}`` (the paper's ``t = i + 1``, as in the schedules' tables) and
``z_0 = x`` (``logsnr = +inf``). The bound [DDPM Eq. 5; iDDPM Eq. 4-6]:

    -log p(x) <= L_T + sum_{t=2..T} L_{t-1} + L_0,      L_T = KL(q(z_T|x) || p(z_T)),
    L_{t-1} = E_q KL(q(z_{t-1}|z_t, x) || p(z_{t-1}|z_t)),   L_0 = -E_q log p(x | z_1).

Units: nats per sample, summed over every non-batch dimension, unless a name says bits; :func:`bits_per_dim`
converts. KLs and log-densities come back in float32, or float64 when an input is float64, never in bf16/fp16:
they are summed into losses and bounds.

References:
    [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", Eq. 5-7 and Sec. 3.3.
    [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", Sec. 3.1-3.3.
    [VDM] Kingma, Salimans, Poole, Ho 2021, "Variational Diffusion Models", Sec. 3-4, Eq. 13-17.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ._util import (
    Scalar,
    _checking,
    as_coef,
    check_callable,
    check_float,
    check_generator,
    check_int,
    check_number,
    check_range,
    check_same_device,
    check_same_shape,
    coef_dtype,
    per_sample,
    per_sample_flat,
)
from .param import split_net_output, x_from_eps, x_from_v
from .process import diffuse, learned_range_logvar, posterior, posterior_logvar, transition_logvar

__all__ = [
    "normal_kl", "discretized_gaussian_loglik", "gaussian_nll", "decoder_nll", "prior_kl", "learned_logvar",
    "vlb_term", "hybrid_loss", "bits_per_dim", "VLB", "vlb", "importance_probs", "importance_weights",
    "push_loss_history", "continuous_diffusion_loss", "normal_cdf_tanh", "vlb_model", "VLBEstimate", "vlb_estimate",
]

_HALF_BIN = 1.0 / 255.0  # half the width 2/255 of one of the 256 bins on [-1, 1]
_LOG_2PI = math.log(2.0 * math.pi)

ModelFn = Callable[[Tensor, int], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------------
# Shapes


def _broadcast(*named: tuple[str, Tensor]) -> tuple[Tensor, ...]:
    """Broadcast tensors against each other; ValueError naming first the one that does not fit the others."""
    shape = torch.Size()
    for i, (name, t) in enumerate(named):
        try:
            shape = torch.broadcast_shapes(shape, t.shape)
        except RuntimeError:
            got = ", ".join(f"{n} {tuple(u.shape)}" for n, u in named[:i + 1])
            raise ValueError(f"{name}: expected broadcastable shapes, got {got}") from None
    return tuple(t.expand(shape) for _, t in named)


def _like_x(t: Tensor, name: str, x: Tensor) -> Tensor:
    """``t`` broadcast to ``x``'s shape, or a ValueError naming ``name``."""
    try:
        return t.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"{name}: expected a shape that broadcasts to {tuple(x.shape)} (the shape of x), "
                         f"got {tuple(t.shape)}") from None


def _batched(x: Tensor, name: str = "x") -> Tensor:
    check_float(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name}: expected a batch (B, ...), got a 0-d tensor")
    return x


def _sum_per_sample(t: Tensor) -> Tensor:
    """``(B, ...) -> [B]``: sum over every non-batch dimension (``B = 0`` gives an empty ``[0]``)."""
    return per_sample_flat(t).sum(dim=1)


def _dims(x: Tensor) -> int:
    """Dimensions per sample (also for an empty batch)."""
    return math.prod(x.shape[1:])


# ----------------------------------------------------------------------------------------------
# Gaussian KL and log-densities


def normal_kl(mean1: Scalar, logvar1: Scalar, mean2: Scalar, logvar2: Scalar) -> Tensor:
    """``KL(N(m1, e^lv1) || N(m2, e^lv2)) = (expm1(d) - d + (m1 - m2)^2 e^-lv2) / 2`` with ``d = lv1 - lv2``.

    Elementwise; the four arguments broadcast (floats allowed, at least one tensor, all tensors on one device).
    ``expm1(d) - d`` keeps the variance part accurate when the two variances are close. Returns float32 or float64.

    A log-variance of ``-inf`` is a point mass, and the limits are returned: ``KL(point || N) = +inf``,
    ``KL(N || point) = +inf``, ``KL(point m1 || point m2) = 0`` if ``m1 = m2`` else ``+inf``; ``logvar1 = +inf``
    against a finite ``logvar2`` is ``+inf``. Tensor values are not checked (NaN propagates); a Python float
    argument must not be NaN.
    """
    named = {"mean1": mean1, "logvar1": logvar1, "mean2": mean2, "logvar2": logvar2}
    tensors = [(n, v) for n, v in named.items() if isinstance(v, Tensor)]
    if not tensors:
        raise TypeError("mean1, logvar1, mean2, logvar2: expected at least one torch.Tensor, got only Python numbers")
    for n, v in tensors:
        check_float(v, n)
        check_same_device(tensors[0][1], v, tensors[0][0], n)
    dtype, device = coef_dtype(*(v for _, v in tensors)), tensors[0][1].device
    m1, lv1, m2, lv2 = _broadcast(*((n, v.to(dtype) if isinstance(v, Tensor) else
                                     as_coef(v, n, dtype=dtype, device=device, posinf=True, neginf=True))
                                    for n, v in named.items()))
    d = lv1 - lv2
    kl = 0.5 * (torch.expm1(d) - d + (m1 - m2).square() * torch.exp(-lv2))
    inf = torch.full_like(kl, math.inf)
    point2 = lv2 == -math.inf
    kl = torch.where(point2, torch.where((lv1 == -math.inf) & (m1 == m2), torch.zeros_like(kl), inf), kl)
    return torch.where((lv1 == math.inf) & torch.isfinite(lv2), inf, kl)


def _log1mexp(d: Tensor) -> Tensor:
    """``log(1 - e^d)`` for ``d < 0``, by the branch that is accurate on each side of ``-log 2``."""
    near = d > -math.log(2.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, d, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, d))))


def _log_interval_prob(c: Tensor, h: Tensor, lower_open: Tensor, upper_open: Tensor) -> Tensor:
    """``log(Phi(c + h) - Phi(c - h))`` for a standard normal, an end replaced by -inf / +inf where open.

    Narrow bins (``h (1 + |c|) <= 0.05``) use the series ``2h phi(c) (1 + h^2 He2/6 + h^4 He4/120 + h^6 He6/5040)``
    (He = Hermite polynomials; truncation ~1e-16). Others use ``log Phi(hi) + log(1 - Phi(lo)/Phi(hi))`` after
    reflecting the bin into the lower half-line, where ``log_ndtr`` is accurate. Every branch is evaluated on
    safe values only, so gradients stay finite.
    """
    open_ = lower_open | upper_open
    narrow = ~open_ & (h * (1.0 + c.abs()) <= 0.05)
    cs, g = torch.where(narrow, c, 0.0), torch.where(narrow, h, 0.01).square()
    c2 = cs.square()
    he2, he4, he6 = c2 - 1.0, (c2 - 6.0) * c2 + 3.0, ((c2 - 15.0) * c2 + 45.0) * c2 - 15.0
    series = g * (he2 / 6.0 + g * (he4 / 120.0 + g * he6 / 5040.0))
    log_narrow = torch.log(2.0 * torch.where(narrow, h, 0.01)) - 0.5 * (c2 + _LOG_2PI) + torch.log1p(series)

    flip = upper_open | (~lower_open & (c > 0))  # reflect x -> -x so that the bin lies mostly below 0
    cw = torch.where(narrow, -1.0, torch.where(flip, -c, c))
    hw = torch.where(narrow, 0.5, h)
    lo = torch.where(lower_open | upper_open, -math.inf, cw - hw)
    hi = cw + hw
    log_hi = torch.special.log_ndtr(hi)
    log_wide = log_hi + _log1mexp(torch.special.log_ndtr(lo) - log_hi)
    return torch.where(narrow, log_narrow, log_wide)


CDFS = ("exact", "tanh")


def normal_cdf_tanh(u: Tensor) -> Tensor:
    """``Phi(u) ~ (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) / 2``: the standard normal CDF as DDPM's and iDDPM's
    released code approximate it (the GELU approximation); absolute error below ~2e-4. Elementwise."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u.pow(3))))


def _log_interval_prob_tanh(x: Tensor, mean: Tensor, inv_scale: Tensor, min_prob: float) -> Tensor:
    """``log P(bin)`` with :func:`normal_cdf_tanh` and plain CDF differences, each probability floored at
    ``min_prob`` before the log (as the released code does with 1e-12); the edge bins open to -inf / +inf."""
    centered = x - mean
    cdf_plus = normal_cdf_tanh((centered + _HALF_BIN) * inv_scale)
    cdf_minus = normal_cdf_tanh((centered - _HALF_BIN) * inv_scale)
    prob = torch.where(x < -1.0 + _HALF_BIN, cdf_plus,
                       torch.where(x > 1.0 - _HALF_BIN, 1.0 - cdf_minus, cdf_plus - cdf_minus))
    return torch.log(prob.clamp(min=min_prob)) if min_prob > 0 else torch.log(prob.clamp(min=0.0))


def discretized_gaussian_loglik(x: Tensor, mean: Tensor, log_scale: Tensor, *, min_prob: float = 1e-12,
                                cdf: str = "exact") -> Tensor:
    """``log P(x) = log(Phi((x + 1/255 - mean)/scale) - Phi((x - 1/255 - mean)/scale))`` [DDPM Sec. 3.3, Eq. 13].

    The decoder of 8-bit data scaled to [-1, 1]: 256 bins of width 2/255, the first open to -inf and the last
    to +inf (``x < -1 + 1/255`` resp. ``x > 1 - 1/255``), so the 256 probabilities sum to 1. ``x`` should lie on
    the grid ``k 2/255 - 1``. The log of the CDF difference is computed stably, with no cancellation: a Hermite
    series for narrow bins, else differences of ``log_ndtr`` with the bin reflected into the lower tail.
    ``log P`` is floored at ``log(min_prob)``: DDPM's and iDDPM's reference evaluation floor the bin
    probability at 1e-12, the default here; ``min_prob=0`` gives the exact value. ``log_scale = -inf`` (a
    zero-width decoder, e.g. the posterior variance onto clean data) is the limit: ``P = 1`` when ``mean`` lies
    in ``x``'s bin ``[x - 1/255, x + 1/255)``, else 0.

    ``cdf="tanh"`` replaces ``Phi`` by the approximation of DDPM's and iDDPM's released code,
    ``Phi(u) ~ (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) / 2`` (:func:`normal_cdf_tanh`, max error ~2e-4), with
    the plain CDF differences that code takes, so published bits/dim can be compared digit for digit. Over a
    whole chain it moves the bound by ~1e-3 to 5e-3 bits/dim (only ``L_0`` changes; measured on the digits:
    +0.0041 and +0.0026 with fixed variances, +0.0001 with learned ones; RESULTS.md).

    Shapes: ``x (B, ...)`` in [-1, 1]; ``mean``, ``log_scale`` broadcast to it. Returns ``x``'s shape, float32/64.
    """
    check_float(x, "x")
    check_float(mean, "mean")
    check_float(log_scale, "log_scale")
    check_same_device(x, mean, "x", "mean")
    check_same_device(x, log_scale, "x", "log_scale")
    check_range(x, "x", low=-1.0, high=1.0)
    check_number(min_prob, "min_prob", low=0.0, high=1.0, high_open=True)
    if cdf not in CDFS:
        raise ValueError(f"cdf: expected one of {', '.join(map(repr, CDFS))}, got {cdf!r}")
    dtype = coef_dtype(x, mean, log_scale)
    xx = x.to(dtype)
    m, ls = _like_x(mean.to(dtype), "mean", xx), _like_x(log_scale.to(dtype), "log_scale", xx)
    lower_open, upper_open = xx < -1.0 + _HALF_BIN, xx > 1.0 - _HALF_BIN
    point = ls == -math.inf  # a zero-width decoder: P = 1 if the mean falls in x's bin, else 0
    inv_scale = torch.exp(-torch.where(point, 0.0, ls))
    if cdf == "tanh":
        logp = _log_interval_prob_tanh(xx, m, inv_scale, min_prob)
    else:
        logp = _log_interval_prob((xx - m) * inv_scale, _HALF_BIN * inv_scale, lower_open, upper_open)
    in_bin = (lower_open | (m >= xx - _HALF_BIN)) & (upper_open | (m < xx + _HALF_BIN))
    logp = torch.where(point, torch.where(in_bin, 0.0, -math.inf), logp)
    return logp.clamp(min=math.log(min_prob)) if min_prob > 0 else logp


def decoder_nll(x: Tensor, mean: Tensor, logvar: Tensor, *, min_prob: float = 1e-12, cdf: str = "exact") -> Tensor:
    """``L_0 = -sum log P(x | mean, e^logvar)`` under the discretized decoder [DDPM Eq. 13]; ``[B]`` nats.

    ``x (B, ...)`` on the 256-level grid in [-1, 1]; ``mean``, ``logvar`` broadcast to it. ``cdf``: ``"exact"``
    or ``"tanh"`` (the released DDPM/iDDPM code), see :func:`discretized_gaussian_loglik`.
    """
    check_float(logvar, "logvar")
    _batched(x)
    check_same_device(x, logvar, "x", "logvar")
    _like_x(logvar, "logvar", x)
    return -_sum_per_sample(discretized_gaussian_loglik(_batched(x), mean, 0.5 * logvar, min_prob=min_prob,
                                                       cdf=cdf))


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """``-sum log N(x; mean, e^logvar) = sum (log 2 pi + logvar + (x - mean)^2 e^-logvar) / 2``; ``[B]`` nats.

    The continuous decoder (a density, for real-valued data). ``x (B, ...)``; ``mean``, ``logvar`` broadcast.
    """
    _batched(x)
    check_float(mean, "mean")
    check_float(logvar, "logvar")
    check_same_device(x, mean, "x", "mean")
    check_same_device(x, logvar, "x", "logvar")
    dtype = coef_dtype(x, mean, logvar)
    xx = x.to(dtype)
    m, lv = _like_x(mean.to(dtype), "mean", xx), _like_x(logvar.to(dtype), "logvar", xx)
    return _sum_per_sample(0.5 * (_LOG_2PI + lv + (xx - m).square() * torch.exp(-lv)))


def prior_kl(x: Tensor, logsnr_T: Scalar) -> Tensor:
    """``L_T = KL(q(z_T | x) || N(0, I)) = sum (alpha_T^2 (x^2 - 1) - log sigma_T^2) / 2`` [DDPM Eq. 5]; ``[B]`` nats.

    Uses ``sigma^2 - 1 = -alpha^2`` and ``log sigma^2 = logsigmoid(-logsnr)``. ``x (B, ...)``; ``logsnr_T`` ``[]``
    or ``[B]``: ``-inf`` (pure noise) gives 0, ``+inf`` gives ``+inf``; NaN raises.
    """
    _batched(x)
    l = per_sample(logsnr_T, "logsnr_T", x, posinf=True, neginf=True)
    xx = x.to(l.dtype)
    return _sum_per_sample(_like_x(0.5 * (torch.sigmoid(l) * (xx.square() - 1.0) - F.logsigmoid(-l)), "x", xx))


# ----------------------------------------------------------------------------------------------
# Reverse-process variance and the VLB terms


def learned_logvar(v_raw: Tensor, logsnr_s: Scalar, logsnr_t: Scalar, *,
                   first_logvar: Scalar | None = None) -> Tensor:
    """``log Sigma = f log beta_t + (1 - f) log beta~_t`` with ``f = (v_raw + 1) / 2`` [iDDPM Eq. 15].

    ``v_raw`` is the network's raw variance output (the paper's v, not a velocity); the paper writes the
    interpolation weight in [0, 1], and its released code maps an output in [-1, 1] to it by ``(v_raw + 1) / 2``
    without clamping: we do the same (``v_raw = 1`` gives ``beta_t``, ``-1`` gives ``beta~_t``; values outside
    extrapolate). From the log-SNRs, ``beta_t = 1 - alpha_t^2 / alpha_s^2``
    (:func:`kdiff.process.transition_logvar`) and ``beta~_t = sigma_s^2 (1 - SNR_t / SNR_s)``, the posterior
    variance (:func:`kdiff.process.posterior_logvar`); the interpolation is
    :func:`kdiff.process.learned_range_logvar`.

    At the first step (``logsnr_s = +inf``, onto clean data) ``beta~_1 = 0``. iDDPM's code replaces it by the
    second step's ``beta~_2``; pass that value as ``first_logvar`` (e.g.
    ``posterior_logvar(logsnrs[0], logsnrs[1])`` for a table ``logsnrs``). Without it a first step raises.

    Shapes: ``v_raw (B, ...)``; ``logsnr_s``, ``logsnr_t`` ``[]`` or ``[B]``; ``first_logvar`` a scalar or
    broadcast to ``v_raw``. Returns ``v_raw``'s shape, float32/64.
    """
    v = _batched(v_raw, "v_raw")
    dtype = coef_dtype(logsnr_s, logsnr_t, v)
    ls = per_sample(logsnr_s, "logsnr_s", v, dtype=dtype, posinf=True)
    lt = per_sample(logsnr_t, "logsnr_t", v, dtype=dtype)
    _check_step(ls, lt)
    log_beta = transition_logvar(ls, lt)
    first = torch.isinf(ls)
    log_beta_tilde = posterior_logvar(torch.where(first, lt + 1.0, ls), lt)
    if first_logvar is not None:
        fl = _like_x(as_coef(first_logvar, "first_logvar", dtype=dtype, device=v.device, neginf=True),
                     "first_logvar", v)
        log_beta_tilde = torch.where(first, fl, log_beta_tilde)
    elif first.any():
        raise ValueError("logsnr_s: +inf (the first step, where beta~ = 0) needs first_logvar; iDDPM uses the "
                         "second step's posterior log-variance, posterior_logvar(logsnrs[0], logsnrs[1])")
    return learned_range_logvar(0.5 * (v.to(dtype) + 1.0), log_beta, log_beta_tilde)


def _check_step(ls: Tensor, lt: Tensor) -> None:
    """ValueError unless ``logsnr_t`` is finite and ``logsnr_s > logsnr_t`` (``+inf`` allowed for ``logsnr_s``)."""
    if not _checking(lt):
        return
    check_range(ls, "logsnr_s")
    if not torch.isfinite(lt).all():
        raise ValueError(f"logsnr_t: expected finite values, got {lt.flatten().tolist()[:8]}")
    if (ls <= lt).any():
        raise ValueError(f"logsnr_s: expected logsnr_s > logsnr_t (s is the less noisy level), got "
                         f"logsnr_s {ls.flatten().tolist()[:8]} and logsnr_t {lt.flatten().tolist()[:8]}")


def _flat(l: Tensor) -> Tensor:
    """A per-sample coefficient padded by ``per_sample`` back to ``[]`` or ``[B]``."""
    return l.reshape(l.shape[:1]) if l.ndim else l


def vlb_term(x: Tensor, z_t: Tensor, mean: Tensor, logvar: Tensor, logsnr_s: Scalar, logsnr_t: Scalar) -> Tensor:
    """``L_{t-1} = KL(q(z_s | z_t, x) || N(mean, e^logvar))`` summed per sample [DDPM Eq. 5; iDDPM Eq. 6]; ``[B]`` nats.

    ``q(z_s | z_t, x)`` is :func:`kdiff.process.posterior`. Where ``logsnr_s = +inf`` (the first step, whose
    posterior is a point mass at ``x``) the term is the decoder's ``L_0 = decoder_nll(x, mean, logvar)``
    instead, as in iDDPM, so a batch may mix the first step with the others.

    Shapes: ``x, z_t, mean (B, ...)``; ``logvar`` broadcast to them; ``logsnr_s > logsnr_t``, ``[]`` or ``[B]``.
    """
    _batched(x)
    check_float(z_t, "z_t")
    check_float(mean, "mean")
    check_float(logvar, "logvar")
    check_same_shape(x, z_t, "x", "z_t")
    check_same_shape(x, mean, "x", "mean")
    check_same_device(x, logvar, "x", "logvar")
    _like_x(logvar, "logvar", x)
    dtype = coef_dtype(logsnr_s, logsnr_t, x, mean, logvar)
    ls = per_sample(logsnr_s, "logsnr_s", x, dtype=dtype, posinf=True)
    lt = per_sample(logsnr_t, "logsnr_t", x, dtype=dtype)
    _check_step(ls, lt)
    first = torch.isinf(ls)
    ls_safe = torch.where(first, lt + 1.0, ls)  # any finite level above lt; those samples take L_0 below
    q_mean, _ = posterior(x.to(dtype), z_t.to(dtype), _flat(ls_safe), _flat(lt))
    kl = _sum_per_sample(_like_x(normal_kl(q_mean, posterior_logvar(ls_safe, lt), mean, logvar), "logvar", x))
    if not first.any():
        return kl
    return torch.where(_flat(first).expand(kl.shape), decoder_nll(x, mean, logvar), kl)


def hybrid_loss(x: Tensor, z_t: Tensor, eps: Tensor, eps_hat: Tensor, logvar: Tensor, logsnr_s: Scalar,
                logsnr_t: Scalar, *, num_steps: int, lam: float = 0.001) -> Tensor:
    """``L_hybrid = L_simple + lam L_vlb`` [iDDPM Sec. 3.1, Eq. 16]; ``[B]``.

    ``L_simple = mean_d (eps - eps_hat)^2`` [DDPM Eq. 14]. ``L_vlb`` is estimated from the sampled step as
    ``num_steps * L_{t-1}`` in bits per dimension (:func:`vlb_term`, the decoder term at the first step), with
    the model mean built from ``stopgrad(eps_hat)`` (``x_hat = x_from_eps``, mean = posterior mean at
    ``x_hat``), so the VLB part trains only ``logvar`` (e.g. from :func:`learned_logvar`). This is iDDPM's
    weighting: ``lam num_steps = num_steps / 1000`` for the default ``lam``.

    Shapes: ``x, z_t, eps, eps_hat (B, ...)``; ``logvar`` broadcast to them; ``logsnr_s``, ``logsnr_t`` ``[]``
    or ``[B]``.
    """
    _batched(x)
    check_float(eps, "eps")
    check_float(eps_hat, "eps_hat")
    check_same_shape(x, eps, "x", "eps")
    check_same_shape(x, eps_hat, "x", "eps_hat")
    check_int(num_steps, "num_steps", low=1)
    check_number(lam, "lam", low=0.0)
    z = z_t.to(coef_dtype(z_t, x))  # bf16/fp16 latents: build the mean in float32
    x_hat = x_from_eps(z, eps_hat.detach().to(z.dtype), logsnr_t)
    mean, _ = posterior(x_hat, z, logsnr_s, logsnr_t)  # at logsnr_s = +inf this is x_hat itself
    vb_bits = bits_per_dim(vlb_term(x, z_t, mean, logvar, logsnr_s, logsnr_t), _dims(x))
    dtype = vb_bits.dtype
    simple = (eps.to(dtype) - eps_hat.to(dtype)).square().reshape(x.shape[0], -1).mean(dim=1)
    return simple + (lam * num_steps) * vb_bits


def bits_per_dim(nats: Tensor, dims: int) -> Tensor:
    """``bits/dim = nats / (dims ln 2)``: a per-sample bound in nats over ``dims`` data dimensions."""
    check_float(nats, "nats")
    check_int(dims, "dims", low=1)
    return nats / (dims * math.log(2.0))


# ----------------------------------------------------------------------------------------------
# The whole chain


class VLB(NamedTuple):
    """The terms of the bound for a batch ``x (B, ...)`` and a table of ``T`` levels."""

    bpd: Tensor  # [B] total, bits per dimension
    nats: Tensor  # [B] total, nats: prior + terms.sum(1)
    prior: Tensor  # [B] L_T, nats
    terms: Tensor  # [B, T] nats: column 0 is L_0 (the decoder), column i >= 1 is L_i = KL at z_{i+1} -> z_i


def _check_table(logsnrs: Tensor) -> Tensor:
    check_float(logsnrs, "logsnrs")
    if logsnrs.ndim != 1 or logsnrs.numel() < 1:
        raise ValueError(f"logsnrs: expected a 1-D table (T,) with T >= 1, got shape {tuple(logsnrs.shape)}")
    if not torch.isfinite(logsnrs).all():
        raise ValueError("logsnrs: expected finite values (z_0 = x is implicit, at +inf)")
    if logsnrs.numel() > 1 and not (logsnrs[1:] < logsnrs[:-1]).all():
        raise ValueError(f"logsnrs: expected strictly decreasing values (index i is the level of z_(i+1), "
                         f"noisier with i), got {logsnrs.tolist()[:8]}...")
    return logsnrs


def vlb(model_fn: ModelFn, x: Tensor, logsnrs: Tensor, *, generator: torch.Generator | None = None,
        noise: Tensor | None = None, decoder: str = "discretized",
        prior: tuple[Tensor, Tensor] | None = None, cdf: str = "exact", progress: bool = False) -> VLB:
    """``-log p(x) <= L_T + sum_{i=1}^{T-1} L_i + L_0`` for every sample, term by term [DDPM Eq. 5; iDDPM Sec. 3].

    Each term is estimated at its own ``z_{i+1} = diffuse(x, noise[i], logsnrs[i])``, independently drawn
    (unbiased, since the bound is a sum of expectations). ``model_fn(z, i)`` returns ``(mean, logvar)`` of
    ``p(z_i | z_{i+1})`` for ``z = z_{i+1}`` at level ``logsnrs[i]``; for ``i = 0`` that is the decoder
    ``p(x | z_1)``. ``logvar`` broadcasts to ``x``.

    Args:
        x: data ``(B, ...)``; on the 256-level grid in [-1, 1] for the discretized decoder.
        logsnrs: ``(T,)`` strictly decreasing, finite (``logsnrs[i]`` is the level of ``z_{i+1}``).
        generator, noise: the forward noise: ``noise`` of shape ``(T, *x.shape)``, or drawn from ``generator``
            (torch's global generator when both are None).
        decoder: ``"discretized"`` (:func:`decoder_nll`, 8-bit data) or ``"gaussian"`` (:func:`gaussian_nll`,
            a density for continuous data).
        prior: ``(mean, logvar)`` of ``p(z_T)``, broadcast to ``x``; default ``N(0, I)`` (:func:`prior_kl`).
        cdf: the discretized decoder's normal CDF, ``"exact"`` or ``"tanh"`` (:func:`discretized_gaussian_loglik`).
        progress: show a tqdm bar over the ``T`` model evaluations.
    Returns:
        :class:`VLB` with ``bpd``, ``nats``, ``prior`` ``[B]`` and ``terms`` ``[B, T]``, in nats except ``bpd``.
    """
    check_callable(model_fn, "model_fn")
    _batched(x)
    _check_table(logsnrs)
    check_generator(generator)
    T = logsnrs.numel()
    if decoder not in ("discretized", "gaussian"):
        raise ValueError(f"decoder: expected 'discretized' or 'gaussian', got {decoder!r}")
    if noise is not None:
        check_float(noise, "noise")
        if noise.shape != (T, *x.shape):
            raise ValueError(f"noise: expected shape {(T, *x.shape)} (T, *x.shape), got {tuple(noise.shape)}")
        check_same_device(x, noise, "x", "noise")
    dec = functools.partial(decoder_nll, cdf=cdf) if decoder == "discretized" else gaussian_nll
    levels = logsnrs.to(x.device)
    terms = []
    for i in tqdm(range(T), disable=not progress, desc="vlb"):
        eps = noise[i] if noise is not None else torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                            device=x.device)
        z = diffuse(x, eps, levels[i])
        out = model_fn(z, i)
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, Tensor) for o in out)):
            raise TypeError(f"model_fn: expected a (mean, logvar) pair of tensors, got {type(out).__name__}")
        mean, logvar = out
        terms.append(dec(x, mean, logvar) if i == 0 else vlb_term(x, z, mean, logvar, levels[i - 1], levels[i]))
    if prior is None:
        l_T = prior_kl(x, levels[-1])
    else:
        l = levels[-1].to(coef_dtype(levels, x))
        q_mean = torch.sigmoid(l).sqrt() * x.to(l.dtype)
        l_T = _sum_per_sample(_like_x(normal_kl(q_mean, F.logsigmoid(-l), prior[0], prior[1]), "prior", x))
    stacked = torch.stack(terms, dim=1)
    nats = l_T + stacked.sum(dim=1)
    return VLB(bpd=bits_per_dim(nats, _dims(x)), nats=nats, prior=l_T, terms=stacked)


# ----------------------------------------------------------------------------------------------
# From a network to the bound: the reverse process of a discrete chain, and a stochastic estimate


VARIANCES = ("small", "large", "learned")
_PARAMS = ("eps", "v", "x")


def _step_index(i: int | Tensor, T: int, z: Tensor) -> Tensor:
    """The step index ``i`` (int or ``[B]`` integer tensor) as an int64 ``[B]`` tensor on ``z``'s device."""
    if isinstance(i, bool) or not isinstance(i, (int, Tensor)) or (isinstance(i, Tensor) and (
            i.is_floating_point() or i.dtype == torch.bool)):
        raise TypeError(f"i: expected an int or an integer tensor of step indices, got "
                        f"{i.dtype if isinstance(i, Tensor) else type(i).__name__}")
    idx = torch.as_tensor(i, dtype=torch.int64, device=z.device)
    if idx.ndim == 0:
        idx = idx.expand(z.shape[0])
    if idx.shape != z.shape[:1]:
        raise ValueError(f"i: expected an int or shape ({z.shape[0]},) (the batch of z), got {tuple(idx.shape)}")
    if _checking() and bool(((idx < 0) | (idx >= T)).any()):
        raise ValueError(f"i: expected step indices in [0, {T - 1}], got {idx.min().item()}..{idx.max().item()}")
    return idx


def vlb_model(net: Callable[[Tensor, Tensor], Tensor], logsnrs: Tensor, *, param: str = "eps",
              variance: str = "small", cond: str = "index", clip_denoised: bool = False) -> ModelFn:
    """``model_fn(z_t, i) -> (mean, logvar)`` of ``p(z_s | z_t)`` for :func:`vlb` and :func:`vlb_estimate`.

    ``mean = mu~(x_hat, z_t)``, the posterior mean of ``q(z_s | z_t, x = x_hat)`` [DDPM Eq. 7, 11], with
    ``x_hat = x_from_{param}(z_t, net(z_t, c), logsnr_t)``; at the first step (``i = 0``, the decoder
    ``p(x | z_1)``) ``mean = x_hat``. ``logvar`` [DDPM Sec. 3.2; iDDPM Eq. 15]:

    - ``"small"``: ``log beta~_t`` (the posterior variance); ``"large"``: ``log beta_t``;
    - ``"learned"``: the network returns ``2C`` channels, the prediction then ``v`` with
      ``log Sigma = (v+1)/2 log beta_t + (1-(v+1)/2) log beta~_t`` (:func:`learned_logvar`).

    The first step: ``beta~_1 = 0`` makes the obvious ``"small"`` decoder a point mass (``logvar = -inf``, a NaN
    ``L_0``). DDPM's released code (``diffusion_utils_2.py``) and iDDPM's (``gaussian_diffusion.py``,
    ``posterior_log_variance_clipped``) use ``log beta~_2`` there for both fixed variances, "to get a better
    decoder log likelihood"; so do we, ``posterior_logvar(logsnrs[0], logsnrs[1])``, and ``"learned"`` interpolates
    between ``log beta_1`` and that value, as iDDPM does. A table of one level (``T = 1``) has no second step
    and raises.

    Args:
        net: ``net(z, c)`` with ``z (B, C, ...)`` and ``c [B]``: the step index ``i`` as a float (``cond="index"``,
            float32, or float64 for float64 ``z``; the paper's ``t = i + 1``) or ``logsnrs[i]``
            (``cond="logsnr"``). Returns ``(B, C, ...)``, or ``(B, 2C, ...)`` for ``variance="learned"``.
        logsnrs: ``(T,)`` strictly decreasing, ``logsnrs[i]`` the level of ``z_{i+1}`` (the table :func:`vlb` takes).
        param: what the network predicts, ``"eps"``, ``"v"`` or ``"x"``.
        clip_denoised: clamp ``x_hat`` to [-1, 1] (DDPM/iDDPM evaluate bits/dim with it on); off by default.
    Returns:
        ``model_fn(z, i)``: ``i`` an int (as :func:`vlb` calls it) or a ``[B]`` integer tensor (one step per
        sample); ``mean`` in ``z``'s dtype, ``logvar`` float32/64 of shape ``[]`` or ``[B, 1, ...]`` (broadcast).
    """
    _check_table(logsnrs)
    if param not in _PARAMS:
        raise ValueError(f"param: expected one of {', '.join(map(repr, _PARAMS))}, got {param!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {', '.join(map(repr, VARIANCES))}, got {variance!r}")
    if cond not in ("index", "logsnr"):
        raise ValueError(f"cond: expected 'index' or 'logsnr', got {cond!r}")
    T = logsnrs.numel()
    if T < 2:
        raise ValueError(f"logsnrs: expected T >= 2 levels (the first step's variance is the second step's "
                         f"posterior variance), got T={T}")
    table = logsnrs.to(coef_dtype(logsnrs))
    first_logvar = posterior_logvar(table[0], table[1])

    def model_fn(z: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor]:
        check_float(z, "z")
        _batched(z, "z")
        idx = _step_index(i, T, z)
        levels = table.to(z.device)
        lt = levels[idx]
        ls = torch.where(idx > 0, levels[(idx - 1).clamp(min=0)], math.inf)
        c = idx.to(coef_dtype(z)) if cond == "index" else lt
        out, v_raw = split_net_output(net(z, c), z, learned=variance == "learned", setting="variance='learned'")
        zc = z.to(coef_dtype(z))
        x_hat = (x_from_eps(zc, out.to(zc.dtype), lt) if param == "eps" else
                 x_from_v(zc, out.to(zc.dtype), lt) if param == "v" else out.to(zc.dtype))
        if clip_denoised:
            x_hat = x_hat.clamp(-1.0, 1.0)
        mean, _ = posterior(x_hat, zc, ls, lt)
        if variance == "learned":
            logvar = learned_logvar(v_raw, ls, lt, first_logvar=first_logvar.to(z.device))
        else:
            ls_p, lt_p = per_sample(ls, "logsnr_s", z, posinf=True), per_sample(lt, "logsnr_t", z)
            first = torch.isinf(ls_p)
            ls_safe = torch.where(first, lt_p + 1.0, ls_p)
            fixed = posterior_logvar(ls_safe, lt_p) if variance == "small" else transition_logvar(ls_safe, lt_p)
            logvar = torch.where(first, first_logvar.to(z.device), fixed)
        return mean.to(z.dtype), logvar

    return model_fn


class VLBEstimate(NamedTuple):
    """An unbiased stochastic estimate of the bound for a batch ``x (B, ...)`` (:func:`vlb_estimate`)."""

    bpd: Tensor  # [B] estimate of the whole-chain bound, bits per dimension
    nats: Tensor  # [B] the same in nats
    stderr: Tensor  # [B] Monte-Carlo standard error of bpd over the draws of t and the forward noise

    def summary(self) -> tuple[float, float]:
        """``(mean bpd over the batch, its standard error sqrt(sum_b stderr_b^2) / B)``, given these images."""
        return self.bpd.mean().item(), (self.stderr.square().sum().sqrt() / self.bpd.numel()).item()


ESTIMATORS = ("uniform", "stratified")


def vlb_estimate(model_fn: ModelFn, x: Tensor, logsnrs: Tensor, *, k: int, generator: torch.Generator | None = None,
                 cdf: str = "exact", method: str = "uniform", progress: bool = False) -> VLBEstimate:
    """An unbiased estimate of the bound :func:`vlb` computes exactly, from ``K`` random steps per sample.

    ``method="uniform"``: ``L_T + (T/K) sum_k L_{t_k}`` with ``t_k ~ U{0..T-1}`` i.i.d. [iDDPM Eq. 4-6, 14 with
    ``p_t = 1/T``]; ``E_t[T L_t] = sum_t L_t``; ``stderr = std_k(T L_{t_k}) / sqrt(K)`` (sample std).

    ``method="stratified"``: the steps are split into ``S = K / 2`` strata, the first being the decoder step
    ``{0}`` alone and the others ``S - 1`` contiguous runs of ``1..T-1`` of near-equal size ``n_j``; two draws
    per stratum (``t`` uniform in it, fresh noise): ``L_T + sum_j n_j (L_a + L_b) / 2`` with the unbiased
    variance ``sum_j n_j^2 (L_a - L_b)^2 / 4`` [Cochran, *Sampling Techniques*, 3rd ed., Sec. 5.3 and 5A.12].
    A bound whose terms differ by orders of magnitude along ``t`` (the decoder term is often hundreds of times
    a middle step's) is then sampled where it lives: every estimate sees the decoder term twice, where
    uniform draws hit it with probability ``K/T`` and are right-skewed at small ``K``. Needs an even
    ``K <= 2 T``; ``K = 2`` is one stratum of all steps.

    Each draw gives every sample its own step ``t`` and forward noise, so one ``model_fn(z, t)`` call with
    ``t [B]`` serves the batch (e.g. :func:`vlb_model`). The standard error is the spread over ``t`` and the
    noise for the given images, which is what separates the estimate from the exact bound of the same images.
    Costs ``K`` evaluations per sample instead of ``T``.

    Args:
        model_fn: ``model_fn(z, t) -> (mean, logvar)`` accepting a ``[B]`` integer tensor ``t``.
        x: ``(B, ...)`` on the 256-level grid in [-1, 1]; logsnrs: ``(T,)`` as for :func:`vlb`.
        k: draws per sample, ``>= 2``. generator: every draw (torch's global generator when None).
        cdf: the decoder's normal CDF, ``"exact"`` or ``"tanh"``. method: ``"uniform"`` or ``"stratified"``.
    Returns:
        :class:`VLBEstimate` with ``bpd``, ``nats``, ``stderr`` (of bpd), each ``[B]``.
    """
    _batched(x)
    _check_table(logsnrs)
    check_int(k, "k", low=2)
    if cdf not in CDFS:
        raise ValueError(f"cdf: expected one of {', '.join(map(repr, CDFS))}, got {cdf!r}")
    if method not in ESTIMATORS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, ESTIMATORS))}, got {method!r}")
    T, B = logsnrs.numel(), x.shape[0]
    if method == "stratified" and (k % 2 or k > 2 * T):
        raise ValueError(f"k: expected an even int in [2, {2 * T}] (two draws per stratum, at most T strata) with "
                         f"method='stratified', got {k}")
    # stratified: stratum j = steps [bounds[j], bounds[j + 1]): {0}, then 1..T-1 in S - 1 near-equal runs
    # (K = 2: one stratum of all steps)
    strata = k // 2
    if method == "stratified":
        bounds = [0] + [1 + (j * (T - 1)) // (strata - 1) for j in range(strata)] if strata > 1 else [0, T]
    levels = logsnrs.to(device=x.device, dtype=coef_dtype(logsnrs))
    gen_device = generator.device if generator is not None else x.device
    draws, weights = [], []
    for i in tqdm(range(k), disable=not progress, desc="vlb estimate"):
        if method == "uniform":
            lo, hi = 0, T
        else:
            lo, hi = bounds[i // 2], bounds[i // 2 + 1]
        weights.append(hi - lo)
        t = torch.randint(lo, hi, (B,), generator=generator, device=gen_device).to(x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=gen_device).to(x.device)
        lt = levels[t]
        z = diffuse(x, eps, lt)
        mean, logvar = model_fn(z, t)
        first = t == 0
        ls = torch.where(first, math.inf, levels[(t - 1).clamp(min=0)])
        term = vlb_term(x, z, mean, logvar, ls, lt)
        if cdf != "exact" and bool(first.any()):
            term = torch.where(first, decoder_nll(x, mean, logvar, cdf=cdf).to(term.dtype), term)
        draws.append(weights[-1] * term)
    draws_t = torch.stack(draws, dim=1)  # [B, K]: n L_t, n the size of the stratum (T for uniform draws)
    prior = prior_kl(x, levels[-1]).to(draws_t.dtype)
    if method == "uniform":
        nats = prior + draws_t.mean(dim=1)
        stderr = draws_t.std(dim=1) / math.sqrt(k)
    else:
        pairs = draws_t.view(B, strata, 2)
        nats = prior + pairs.mean(dim=2).sum(dim=1)
        stderr = ((pairs[..., 0] - pairs[..., 1]).square().sum(dim=1) / 4).sqrt()
    dims = _dims(x)
    return VLBEstimate(bpd=bits_per_dim(nats, dims), nats=nats, stderr=bits_per_dim(stderr, dims))


# ----------------------------------------------------------------------------------------------
# Importance sampling of t (iDDPM Sec. 3.3)


def _check_history(loss_history: Tensor, counts: Tensor | None) -> None:
    check_float(loss_history, "loss_history")
    if loss_history.ndim != 2 or loss_history.shape[1] < 1:
        raise ValueError(f"loss_history: expected shape (T, K) with K >= 1, got {tuple(loss_history.shape)}")
    if counts is not None:
        if not isinstance(counts, Tensor) or counts.is_floating_point() or counts.dtype == torch.bool:
            raise TypeError(f"counts: expected an integer tensor, got "
                            f"{counts.dtype if isinstance(counts, Tensor) else type(counts).__name__}")
        if counts.shape != loss_history.shape[:1]:
            raise ValueError(f"counts: expected shape {tuple(loss_history.shape[:1])} (T,), got {tuple(counts.shape)}")
        check_same_device(loss_history, counts, "loss_history", "counts")


def _check_indices(t: Tensor, T: int) -> None:
    """TypeError unless ``t`` is an integer tensor; ValueError unless every index is in ``[0, T)`` (a negative
    index would silently pick a row from the end)."""
    if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t: expected an integer tensor of indices, got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if _checking(t) and t.numel() and bool(((t < 0) | (t >= T)).any()):
        raise ValueError(f"t: expected indices in [0, {T - 1}], got min {int(t.min())}, max {int(t.max())}")


def importance_probs(loss_history: Tensor, counts: Tensor | None = None, *, uniform_prob: float = 0.001) -> Tensor:
    """``p_t = (1 - u) sqrt(E[L_t^2]) / sum_t' sqrt(E[L_t'^2]) + u / T`` [iDDPM Sec. 3.3, Eq. 18].

    ``loss_history (T, K)``: the last ``K`` values of each loss term ``L_t`` (iDDPM keeps K = 10);
    ``counts (T,)`` integer, how many of each row are filled (None: all). Until every row is full the
    sampler is uniform, as in iDDPM. ``u = uniform_prob`` mixes in the uniform distribution. Returns ``(T,)``
    float32/64 summing to 1.
    """
    _check_history(loss_history, counts)
    check_number(uniform_prob, "uniform_prob", low=0.0, high=1.0)
    T, K = loss_history.shape
    h = loss_history.to(coef_dtype(loss_history))
    uniform = torch.full((T,), 1.0 / T, dtype=h.dtype, device=h.device)
    if counts is not None and bool((counts < K).any()):
        return uniform
    w = h.square().mean(dim=1).sqrt()
    total = w.sum()
    p = torch.where(total > 0, w / torch.where(total > 0, total, 1.0), uniform)
    return (1.0 - uniform_prob) * p + uniform_prob / T


def importance_weights(probs: Tensor, t: Tensor) -> Tensor:
    """``w = 1 / (T p_t)`` for sampled indices ``t [B]``, so ``E_{t~p}[w_t L_t] = mean_t L_t``; ``[B]``."""
    check_float(probs, "probs")
    if probs.ndim != 1:
        raise ValueError(f"probs: expected shape (T,), got {tuple(probs.shape)}")
    _check_indices(t, probs.numel())
    check_same_device(probs, t, "probs", "t")
    return 1.0 / (probs.numel() * probs[t])


def push_loss_history(loss_history: Tensor, counts: Tensor, t: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """Append ``losses[b]`` to row ``t[b]`` of the history, oldest value dropped from a full row (iDDPM Sec. 3.3).

    Pure: returns new ``(loss_history (T, K), counts (T,))``. Samples are taken in batch order, one at a time
    (keep the history on the CPU). ``t [B]`` integer, ``losses [B]``.
    """
    _check_history(loss_history, counts)
    check_float(losses, "losses")
    _check_indices(t, loss_history.shape[0])
    if t.ndim != 1 or losses.shape != t.shape:
        raise ValueError(f"losses: expected shape {tuple(t.shape)} (the shape of t, 1-D), got {tuple(losses.shape)}")
    hist, cnt = loss_history.clone(), counts.clone()
    K = hist.shape[1]
    for ti, li in zip(t.tolist(), losses.detach().to(hist.dtype).unbind(0)):
        n = int(cnt[ti])
        if n >= K:
            hist[ti] = torch.cat([hist[ti, 1:], li.reshape(1)])
        else:
            hist[ti, n] = li
            cnt[ti] = n + 1
    return hist, cnt


# ----------------------------------------------------------------------------------------------
# Continuous time (VDM)


def continuous_diffusion_loss(eps: Tensor, eps_hat: Tensor, dlogsnr_dt: Scalar) -> Tensor:
    """``L_inf = -(1/2) dlogsnr/dt ||eps - eps_hat||^2`` [VDM Eq. 17, with gamma = -logsnr]; ``[B]`` nats.

    The ``T -> inf`` limit of the diffusion terms of the bound, one Monte-Carlo sample of ``t``: equal to
    ``-(1/2) dSNR/dt ||x - x_hat||^2`` [VDM Eq. 15] for ``x_hat = x_from_eps(z_t, eps_hat, logsnr_t)``.
    ``eps, eps_hat (B, ...)``; ``dlogsnr_dt`` ``[]`` or ``[B]`` (negative for a schedule that adds noise with t).
    """
    _batched(eps, "eps")
    check_float(eps_hat, "eps_hat")
    check_same_shape(eps, eps_hat, "eps", "eps_hat")
    d = per_sample(dlogsnr_dt, "dlogsnr_dt", eps)
    return _sum_per_sample(_like_x(-0.5 * d * (eps.to(d.dtype) - eps_hat.to(d.dtype)).square(), "eps", eps))
