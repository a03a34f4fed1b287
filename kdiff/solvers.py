"""Sampler steps in EDM space, one function per step, and the loop that composes them.

Model contract: ``denoise(x, sigma) -> denoised``, an estimate of ``E[y | x = y + sigma n]``, with
``sigma`` a float, ``[]`` or ``[B]``. The probability-flow ODE in this space is
``dx/dsigma = (x - denoised) / sigma`` [EDM Eq. 3 with sigma(t) = t, s(t) = 1]. A step takes the
state ``x``, the denoiser output at ``x``, ``sigma`` and ``sigma_next`` (and the noise, for the
stochastic steps) and returns the next state. Grids ``sigmas`` decrease and end with 0.

The VP samplers (DDIM, DDPM) are written on ``x = z / alpha`` with ``sigma = exp(-logsnr / 2)``;
their output times ``alpha_next`` is the paper's VP update exactly. On this axis the last step
into ``sigma = 0`` lands on ``denoised`` without any division by zero.

References:
    [EDM] Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
        Generative Models", Algorithms 1 and 2.
    [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", Eq. 6-7, Alg. 2.
    [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", Eq. 15.
    [DDIM] Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12, 13 and 16.
    [DPM++] Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
        Diffusion Probabilistic Models", Algorithm 2 (multistep second order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ._util import (
    Scalar,
    check_callable,
    check_choice,
    check_float,
    check_generator,
    check_int,
    check_number,
    check_range,
    check_same_shape,
    coef_dtype,
    per_sample,
)
from .denoisers import Denoise
from .process import learned_range_logvar, posterior_logvar, transition_logvar
from .schedules import logsnr_from_sigma, sigmas_from_alphas_bar  # the latter re-exported: its old home

__all__ = ["euler_step", "heun_step", "churn", "ddim_step", "ddpm_step", "dpmpp_2m_step",
           "sigmas_from_alphas_bar", "sample", "SampleStep", "SOLVERS"]

SOLVERS = ("euler", "heun", "dpmpp_2m", "ddim", "ddpm")


def _levels(x: Tensor, denoised: Tensor, sigma: Scalar, sigma_next: Scalar) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, denoised, sigma, sigma_next)`` checked, in the coefficient dtype (float32, or float64 if
    any input is float64; never bf16/fp16), the sigmas padded to the rank of ``x``."""
    check_float(x, "x")
    check_float(denoised, "denoised")
    check_same_shape(x, denoised, "x", "denoised")
    dtype = coef_dtype(sigma, sigma_next, x, denoised)
    s = per_sample(sigma, "sigma", x, dtype=dtype)
    s_next = per_sample(sigma_next, "sigma_next", x, dtype=dtype)
    check_range(s, "sigma", low=0.0, low_open=True)
    check_range(s_next, "sigma_next", low=0.0)
    return x.to(dtype), denoised.to(dtype), s, s_next


def _check_eta(eta: float) -> float:
    """DDIM's ``eta``: a finite Python number >= 0."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta: expected a finite float >= 0, got {eta!r}")
    return float(eta)


def _check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    """EDM Algorithm 2's ``S_churn, S_tmin, S_tmax, S_noise``: finite ``s_churn, s_noise >= 0``,
    ``0 <= s_tmin <= s_tmax`` (``s_tmax`` may be inf)."""
    for name, value in (("s_churn", s_churn), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
    check_number(s_tmin, "s_tmin", low=0.0)
    check_number(s_tmax, "s_tmax", low=0.0, finite=False)
    if not s_tmin <= s_tmax:
        raise ValueError(f"s_tmin, s_tmax: expected s_tmin <= s_tmax, got {s_tmin}, {s_tmax}")


_VARIANCES = ("small", "large")


def _check_variance(variance: str | Tensor) -> None:
    if isinstance(variance, Tensor):
        check_float(variance, "variance")
    else:
        check_choice(variance, "variance", _VARIANCES)


def _check_noise(noise: Tensor | None, x: Tensor, dtype: torch.dtype) -> Tensor:
    if noise is None:
        raise ValueError("noise: expected a tensor shaped like x for a stochastic step, got None")
    check_float(noise, "noise")
    check_same_shape(x, noise, "x", "noise")
    return noise.to(dtype)


def euler_step(x: Tensor, denoised: Tensor, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """``x_next = x + (sigma_next - sigma) (x - denoised) / sigma = denoised + (sigma_next / sigma) (x - denoised)``.

    One Euler step of the probability-flow ODE [EDM Alg. 1, first stage]; the same as deterministic
    DDIM [DDIM Eq. 13, eta = 0] on ``x = z / alpha``. ``x, denoised: (B, ...)``; ``sigma > 0`` and
    ``sigma_next >= 0``: floats, ``[]`` or ``[B]``. Returns ``x``'s dtype.
    """
    xc, den, s, s_next = _levels(x, denoised, sigma, sigma_next)
    return (den + (s_next / s) * (xc - den)).to(x.dtype)


def heun_step(x: Tensor, denoised: Tensor, sigma: Scalar, sigma_next: Scalar, *, denoise: Denoise) -> Tensor:
    """``x_next = x + (sigma_next - sigma) (d + d') / 2``, ``d = (x - denoised) / sigma``, ``d'`` at the Euler point.

    EDM Algorithm 1: an Euler step to ``x' = x + (sigma_next - sigma) d``, a second evaluation
    ``D' = denoise(x', sigma_next)`` with slope ``d' = (x' - D') / sigma_next``, and the trapezoidal
    average. The average is evaluated in the algebraically equal form
    ``x_next = x' + (sigma - sigma_next) (D' - denoised) / (2 sigma_next)``, which avoids the
    cancellation in ``x' - D'`` when ``sigma_next << sigma``. It also shows that the correction
    grows with ``sigma / sigma_next``: grids with very large ratios (respaced discrete tables near
    ``sigma_max``) suit :func:`ddim_step` or :func:`dpmpp_2m_step` better. Into ``sigma_next = 0``
    the correction is skipped (the algorithm's ``t_{i+1} != 0`` test) and the step lands on ``denoised``.

    Args:
        x: the state at ``sigma``, ``(B, ...)``; denoised: ``denoise(x, sigma)``, same shape.
        sigma, sigma_next: floats, ``[]`` or ``[B]``; ``sigma_next`` all zero or all positive.
        denoise: the model, called once more at ``(x', sigma_next)`` unless ``sigma_next = 0``.
    """
    xc, den, s, s_next = _levels(x, denoised, sigma, sigma_next)
    x_euler = den + (s_next / s) * (xc - den)
    last = s_next == 0
    if bool(last.all()):
        return x_euler.to(x.dtype)
    if bool(last.any()):
        raise ValueError("sigma_next: expected all zero or all positive within a batch, "
                         f"got {s_next.flatten().tolist()}")
    denoised_next = denoise(x_euler.to(x.dtype), sigma_next)
    if not isinstance(denoised_next, Tensor):
        raise TypeError(f"denoise: expected a tensor shaped like x, got {type(denoised_next).__name__}")
    check_same_shape(x, denoised_next, "x", "denoise(x, sigma_next)")
    return (x_euler + 0.5 * (s - s_next) * ((denoised_next.to(s.dtype) - den) / s_next)).to(x.dtype)


def churn(x: Tensor, sigma: Scalar, noise: Tensor, *, s_churn: float, n_steps: int, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0) -> tuple[Tensor, Tensor]:
    """``sigma_hat = (1 + gamma) sigma``, ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) s_noise noise``.

    EDM Algorithm 2 (the noise increase before each step): ``gamma = min(s_churn / n_steps, sqrt(2) - 1)`` where
    ``s_tmin <= sigma <= s_tmax``, else 0 (the cap at ``sqrt(2) - 1`` is the paper's: it never more
    than doubles the variance). ``n_steps`` is the paper's N, the number of steps of the grid.

    Args:
        x: the state at ``sigma``, ``(B, ...)``; noise: standard normal, same shape.
        sigma: float, ``[]`` or ``[B]``, > 0.
    Returns:
        ``(x_hat, sigma_hat)``: ``x_hat`` in ``x``'s dtype and ``sigma_hat`` shaped like ``sigma``
        (``[]`` for a float), float32 or float64.
    """
    check_float(x, "x")
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    check_int(n_steps, "n_steps", low=1)
    s = per_sample(sigma, "sigma", x)
    check_range(s, "sigma", low=0.0, low_open=True)
    noise = _check_noise(noise, x, s.dtype)
    gamma_max = min(s_churn / n_steps, math.sqrt(2.0) - 1.0)
    gamma = gamma_max * ((s >= s_tmin) & (s <= s_tmax)).to(s.dtype)
    s_hat = s * (1.0 + gamma)
    x_hat = x.to(s.dtype) + torch.sqrt(s_hat**2 - s**2) * s_noise * noise
    return x_hat.to(x.dtype), s_hat.reshape(s_hat.shape[:1] if s_hat.ndim else ())


def ddim_step(x: Tensor, denoised: Tensor, sigma: Scalar, sigma_next: Scalar, *, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """``x_next = denoised + sigma_down (x - denoised) / sigma + sigma_up noise`` [DDIM Eq. 12, 16 over alpha_next].

    ``sigma_up = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2)`` is DDIM's ``sigma_t(eta)`` on the
    EDM axis and ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``. ``eta = 0``: deterministic DDIM,
    equal to :func:`euler_step`; ``eta = 1``: the DDPM posterior variance, equal to
    :func:`ddpm_step` with ``variance="small"``.

    Args:
        x, denoised: ``(B, ...)``; sigma, sigma_next: floats, ``[]`` or ``[B]``, ``sigma_next <= sigma``.
        eta: >= 0; above 1 only while ``sigma_up <= sigma_next``.
        noise: standard normal shaped like ``x``; needed when ``eta > 0``.
    """
    xc, den, s, s_next = _levels(x, denoised, sigma, sigma_next)
    eta = _check_eta(eta)
    if eta == 0:
        return (den + (s_next / s) * (xc - den)).to(x.dtype)
    noise = _check_noise(noise, x, s.dtype)
    check_range(s - s_next, "sigma - sigma_next", low=0.0)
    var_up = eta**2 * s_next**2 * (1.0 - (s_next / s) ** 2)
    check_range(s_next**2 - var_up, f"sigma_next^2 - sigma_up^2 (eta={eta})", low=0.0)
    s_down = torch.sqrt(s_next**2 - var_up)
    return (den + (s_down / s) * (xc - den) + torch.sqrt(var_up) * noise).to(x.dtype)


def ddpm_step(x: Tensor, denoised: Tensor, sigma: Scalar, sigma_next: Scalar, *, noise: Tensor | None = None,
              variance: str | Tensor = "small") -> Tensor:
    """``x_next = denoised + (sigma_next / sigma)^2 (x - denoised) + sqrt(Sigma / alpha_next^2) noise``.

    A draw from ``q(z_s | z_t, x = denoised)`` [DDPM Eq. 6-7, Alg. 2] divided by ``alpha_s``, with
    ``s`` at ``sigma_next`` and ``t`` at ``sigma`` (a respaced grid is a DDPM chain with
    ``beta = 1 - alpha_bar_t / alpha_bar_s`` [iDDPM Sec. 4]). The VP variance ``Sigma`` is
    ``beta_tilde = sigma_s^2 (1 - SNR_t / SNR_s)`` for ``variance="small"``, ``beta`` for
    ``"large"``, or ``exp(frac log beta + (1 - frac) log beta_tilde)`` for a tensor ``frac``
    [iDDPM Eq. 15, their v: a learned-variance network's output mapped to [0, 1], see
    ``denoisers.vp_denoiser``]. Into ``sigma_next = 0`` no noise is added and the step lands on
    ``denoised`` [DDPM Alg. 2: z = 0 at t = 1].

    Args:
        x, denoised: ``(B, ...)``; sigma, sigma_next: floats, ``[]`` or ``[B]``, ``sigma_next <= sigma``.
        noise: standard normal shaped like ``x``; needed unless every ``sigma_next`` is 0.
        variance: ``"small"``, ``"large"`` or ``frac``, a tensor broadcastable to ``x``.
    """
    xc, den, s, s_next = _levels(x, denoised, sigma, sigma_next)
    _check_variance(variance)
    check_range(s - s_next, "sigma - sigma_next", low=0.0)
    mean = den + (s_next / s) ** 2 * (xc - den)
    if bool((s_next == 0).all()):
        return mean.to(x.dtype)
    noise = _check_noise(noise, x, s.dtype)
    logsnr_s, logsnr_t = logsnr_from_sigma(s_next), logsnr_from_sigma(s)
    log_beta_tilde = posterior_logvar(logsnr_s, logsnr_t)
    log_beta = transition_logvar(logsnr_s, logsnr_t)
    if isinstance(variance, Tensor):
        logvar = learned_range_logvar(variance.to(s.dtype), log_beta, log_beta_tilde)
    elif variance == "small":
        logvar = log_beta_tilde
    else:
        logvar = log_beta
    std = torch.exp(0.5 * (logvar - F.logsigmoid(logsnr_s)))  # sqrt(Sigma) / alpha_s
    std = torch.where(s_next > 0, std, torch.zeros_like(std))
    return (mean + std * noise).to(x.dtype)


def dpmpp_2m_step(x: Tensor, denoised: Tensor, sigma: Scalar, sigma_next: Scalar, *,
                  denoised_prev: Tensor | None = None, sigma_prev: Scalar | None = None) -> Tensor:
    """``x_next = D + (sigma_next / sigma) (x - D)``, ``D = denoised + (denoised - denoised_prev) / (2 r)``.

    DPM-Solver++(2M) [DPM++ Alg. 2] on ``x = z / alpha`` with ``lambda = -log sigma``:
    ``h = log(sigma / sigma_next)``, ``r = h_prev / h`` with ``h_prev = log(sigma_prev / sigma)``.
    ``D`` is the linear extrapolation of the denoiser outputs in ``lambda`` to the middle of the step.
    Without a previous output (the first step, as in the algorithm) and into ``sigma_next = 0``
    (where ``h`` is infinite and the extrapolation undefined) it is the first-order step, equal to
    :func:`euler_step`.

    Args:
        x, denoised: ``(B, ...)`` at ``sigma``; sigma, sigma_next: floats, ``[]`` or ``[B]``.
        denoised_prev: the denoiser output of the previous step, at ``sigma_prev > sigma``; both or neither.
    """
    xc, den, s, s_next = _levels(x, denoised, sigma, sigma_next)
    if (denoised_prev is None) != (sigma_prev is None):
        raise ValueError("denoised_prev, sigma_prev: expected both or neither, got "
                         f"{type(denoised_prev).__name__}, {type(sigma_prev).__name__}")
    ratio = s_next / s
    if denoised_prev is None:
        return (den + ratio * (xc - den)).to(x.dtype)
    check_float(denoised_prev, "denoised_prev")
    check_same_shape(x, denoised_prev, "x", "denoised_prev")
    d_prev = denoised_prev.to(s.dtype)
    s_prev = per_sample(sigma_prev, "sigma_prev", x, dtype=s.dtype)
    check_range(s_prev - s, "sigma_prev - sigma", low=0.0, low_open=True)
    last = s_next == 0
    h = torch.log(s / torch.where(last, s, s_next))  # the last step's h is unused
    half_inv_r = 0.5 * h / torch.log(s_prev / s)  # 1 / (2 r)
    extrapolated = den + half_inv_r * (den - d_prev)
    d_mid = torch.where(last, den, extrapolated)
    return (d_mid + ratio * (xc - d_mid)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The sampling loop


class SampleStep(NamedTuple):
    """What :func:`sample` hands its callback at every step (``x`` is the state the step starts from,
    after churn; ``sigma`` its noise level; everything float64)."""

    i: int
    x: Tensor
    denoised: Tensor
    sigma: Tensor
    sigma_next: Tensor


def _check_sigmas(sigmas: Tensor) -> None:
    check_float(sigmas, "sigmas")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas: expected a 1-D grid with at least 2 values, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"sigmas: expected finite values, got {sigmas.tolist()}")
    if sigmas[-1] != 0:
        raise ValueError(f"sigmas: expected the last value to be 0, got {sigmas[-1].item():.6g}")
    if bool((sigmas.diff() >= 0).any()):
        bad = int(torch.nonzero(sigmas.diff() >= 0)[0])
        raise ValueError(f"sigmas: expected a strictly decreasing grid, got sigmas[{bad}]={sigmas[bad].item():.6g} "
                         f"<= sigmas[{bad + 1}]={sigmas[bad + 1].item():.6g}")


def _evaluate(denoise: Callable, x: Tensor, sigma: Scalar, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``denoise`` at the state (cast to the input dtype); ``(denoised, frac)`` with ``frac`` from a
    learned-variance denoiser that returns a pair, else None. Output checked against ``x``'s shape."""
    out = denoise(x.to(dtype), sigma)
    frac = None
    if isinstance(out, tuple):
        out, frac = out
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"denoise: expected an output of shape {tuple(x.shape)} (the shape of x), got {got}")
    return out.to(x.dtype), frac


def sample(denoise: Callable, x: Tensor, sigmas: Tensor, *, solver: str = "heun", eta: float = 0.0,
           variance: str = "small", s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
           s_noise: float = 1.0, generator: torch.Generator | None = None,
           callback: Callable[[SampleStep], None] | None = None, progress: bool = False) -> Tensor:
    """Run ``solver`` over the grid ``sigmas``: ``x_{i+1} = step(x_i, denoise(x_i, sigma_i), sigma_i, sigma_{i+1})``.

    Solvers: ``"euler"`` (:func:`euler_step`), ``"heun"`` (:func:`heun_step`, EDM Alg. 1; with
    ``s_churn > 0`` EDM Alg. 2), ``"dpmpp_2m"`` (:func:`dpmpp_2m_step`), ``"ddim"``
    (:func:`ddim_step` with ``eta``), ``"ddpm"`` (:func:`ddpm_step` with ``variance``; a denoiser
    returning ``(denoised, frac)`` supplies iDDPM's learned variance, and its ``frac`` is ignored
    by the other solvers). Churn (:func:`churn`) applies to ``"euler"`` and ``"heun"`` only.
    An option that does not apply to the chosen solver (``eta != 0`` without ``"ddim"``, ``variance``
    other than ``"small"`` without ``"ddpm"``, ``s_churn != 0`` without ``"euler"``/``"heun"``) is a
    ValueError, as is an invalid value of any option, whether or not it applies.

    The state is kept in float64; ``denoise`` sees it in ``x``'s dtype with ``sigma`` a float64
    ``[]`` tensor. Every random draw uses ``generator`` (torch's global generator when None).

    Args:
        denoise: ``denoise(x, sigma) -> denoised`` (or ``(denoised, frac)``), output shaped like ``x``.
        x: the start, noise at ``sigmas[0]``: ``sigma_max n`` for an EDM model, ``n sqrt(1 + sigma_max^2)``
            (that is ``z_T / alpha_T``) for a VP model. ``(B, ...)``.
        sigmas: ``(n + 1,)``, strictly decreasing, last value 0 (``schedules.sigmas_karras``,
            :func:`kdiff.schedules.sigmas_from_alphas_bar`).
        callback: called with a :class:`SampleStep` after each evaluation of ``denoise(x_i, sigma_i)``.
        progress: show a tqdm bar over the steps.
    Returns:
        The sample at ``sigma = 0``, in ``x``'s dtype.
    """
    check_callable(denoise, "denoise")
    check_float(x, "x")
    _check_sigmas(sigmas)
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    eta = _check_eta(eta)
    _check_variance(variance)
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    check_generator(generator)
    if callback is not None:
        check_callable(callback, "callback")
    if s_churn != 0 and solver not in ("euler", "heun"):
        raise ValueError(f"s_churn: churn applies to solver='euler' or 'heun', got s_churn={s_churn} with {solver!r}")
    if eta != 0 and solver != "ddim":
        raise ValueError(f"eta: applies to solver='ddim' only, got eta={eta} with {solver!r}")
    if not (isinstance(variance, str) and variance == "small") and solver != "ddpm":
        raise ValueError(f"variance: applies to solver='ddpm' only, got variance={variance!r} with {solver!r}")
    dtype = x.dtype
    state = x.to(torch.float64)
    grid = sigmas.to(device=x.device, dtype=torch.float64)
    n = grid.shape[0] - 1

    def randn() -> Tensor:
        gen_device = generator.device if generator is not None else state.device
        return torch.randn(state.shape, generator=generator, dtype=torch.float64, device=gen_device).to(state.device)

    def model(x_: Tensor, sigma_: Scalar) -> Tensor:
        return _evaluate(denoise, x_, sigma_, dtype)[0]

    denoised_prev, sigma_prev = None, None
    for i in tqdm(range(n), disable=not progress, desc=f"sample ({solver})"):
        sigma, sigma_next = grid[i], grid[i + 1]
        if s_churn > 0:
            state, sigma = churn(state, sigma, randn(), s_churn=s_churn, n_steps=n, s_tmin=s_tmin, s_tmax=s_tmax,
                                 s_noise=s_noise)
        denoised, frac = _evaluate(denoise, state, sigma, dtype)
        if callback is not None:
            callback(SampleStep(i, state, denoised, sigma, sigma_next))
        if solver == "euler":
            state = euler_step(state, denoised, sigma, sigma_next)
        elif solver == "heun":
            state = heun_step(state, denoised, sigma, sigma_next, denoise=model)
        elif solver == "dpmpp_2m":
            state = dpmpp_2m_step(state, denoised, sigma, sigma_next, denoised_prev=denoised_prev,
                                  sigma_prev=sigma_prev)
            denoised_prev, sigma_prev = denoised, sigma
        elif solver == "ddim":
            state = ddim_step(state, denoised, sigma, sigma_next, eta=eta, noise=randn() if eta > 0 else None)
        else:
            state = ddpm_step(state, denoised, sigma, sigma_next, noise=randn(),
                              variance=variance if frac is None else frac.to(torch.float64))
    return state.to(dtype)
