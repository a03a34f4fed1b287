"""Noise schedules, all expressed in one coordinate: the log signal-to-noise ratio.

Variance-preserving (VP) convention: ``alpha^2 = sigmoid(logsnr)``, ``sigma^2 = sigmoid(-logsnr)``,
``z = alpha x + sigma eps``. The EDM (variance-exploding) noise level is
``sigma_ve = exp(-logsnr / 2)`` with ``x_ve = z / alpha``. Continuous time ``t`` runs from 0
(clean, high logsnr) to 1 (noise, low logsnr). Discrete DDPM tables (``betas``, ``alphas_bar``)
are indexed 0..T-1 for the paper's timesteps 1..T.

References:
    [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models".
    [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
    [EDM] Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
        Generative Models".
    [SD] Hoogeboom, Heek, Salimans 2023, "simple diffusion: End-to-end diffusion for high
        resolution images".
    [Lin] Lin, Liu, Li, Yang 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._util import Scalar, as_coef, check_choice, check_float, check_int, check_number, check_range, check_values

__all__ = [
    "alpha_sigma", "sigma_from_logsnr", "logsnr_from_sigma", "logsnr_from_alpha_sigma",
    "betas_linear", "alphas_bar_cosine", "alphas_bar_from_betas", "betas_from_alphas_bar",
    "logsnr_from_alphas_bar", "alphas_bar_from_logsnr",
    "logsnr_cosine", "t_from_logsnr_cosine", "logsnr_cosine_shifted", "t_from_logsnr_cosine_shifted",
    "logsnr_cosine_interpolated", "t_from_logsnr_cosine_interpolated",
    "sigmas_karras", "sigma_lognormal", "respace", "sigmas_from_alphas_bar", "timestep_from_sigma",
    "sigmas_from_schedule",
]


# ----------------------------------------------------------------------------------------------
# VP log-SNR algebra


def alpha_sigma(logsnr: Scalar) -> tuple[Tensor, Tensor]:
    """``(alpha, sigma) = (sqrt(sigmoid(logsnr)), sqrt(sigmoid(-logsnr)))``; shapes as ``logsnr``.

    ``logsnr = +inf`` (clean data) gives ``(1, 0)``, ``-inf`` (pure noise) ``(0, 1)``; NaN is a ValueError."""
    l = as_coef(logsnr, "logsnr", posinf=True, neginf=True)
    return torch.sigmoid(l).sqrt(), torch.sigmoid(-l).sqrt()


def sigma_from_logsnr(logsnr: Scalar) -> Tensor:
    """EDM noise level ``sigma_ve = sigma / alpha = exp(-logsnr / 2)`` (``+inf`` gives 0, ``-inf`` gives inf)."""
    return torch.exp(-0.5 * as_coef(logsnr, "logsnr", posinf=True, neginf=True))


def logsnr_from_sigma(sigma: Scalar) -> Tensor:
    """``logsnr = -2 log(sigma_ve)``; ``sigma >= 0`` (``sigma = 0`` gives ``+inf``, ``sigma = inf`` gives ``-inf``)."""
    s = as_coef(sigma, "sigma", posinf=True)
    check_range(s, "sigma", low=0.0)
    return -2.0 * torch.log(s)


def logsnr_from_alpha_sigma(alpha: Scalar, sigma: Scalar) -> Tensor:
    """``logsnr = 2 (log alpha - log sigma)``; ``alpha, sigma >= 0``, finite, not both 0 (``alpha = 0`` gives
    ``-inf``, ``sigma = 0`` gives ``+inf``)."""
    a, s = as_coef(alpha, "alpha"), as_coef(sigma, "sigma")
    check_range(a, "alpha", low=0.0)
    check_range(s, "sigma", low=0.0)
    check_range(torch.maximum(a, s.to(a.device)), "alpha, sigma (the larger of the two)", low=0.0, low_open=True)
    return 2.0 * (torch.log(a) - torch.log(s))


# ----------------------------------------------------------------------------------------------
# Discrete tables (DDPM, Improved DDPM). Tables are float64, index i is the paper's t = i + 1.


def betas_linear(T: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule, ``beta_t = linspace(beta_start, beta_end, T)`` [DDPM Sec. 4]; ``(T,)`` float64."""
    check_int(T, "T", low=1)
    check_number(beta_start, "beta_start", low=0.0, low_open=True, high=1.0, high_open=True)
    check_number(beta_end, "beta_end", low=0.0, low_open=True, high=1.0, high_open=True)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, "
                         f"got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def alphas_bar_cosine(T: int, *, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """iDDPM cosine schedule [iDDPM Eq. 17]: ``alpha_bar(t) = f(t)/f(0)``, ``f(t) = cos((t/T + s)/(1 + s) pi/2)^2``.

    Betas ``1 - alpha_bar(t)/alpha_bar(t-1)`` are capped at ``max_beta`` (the paper uses 0.999 to
    avoid the singularity at t = T) and the table is rebuilt from the capped betas, as the paper's
    code does. Returns ``(T,)`` float64 for t = 1..T.
    """
    check_int(T, "T", low=1)
    check_number(s, "s", low=0.0)
    check_number(max_beta, "max_beta", low=0.0, low_open=True, high=1.0)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    betas = (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    return alphas_bar_from_betas(betas)


def alphas_bar_from_betas(betas: Tensor) -> Tensor:
    """``alpha_bar_t = prod_{i<=t} (1 - beta_i)``, computed as ``exp(cumsum(log1p(-beta)))``."""
    check_float(betas, "betas")
    check_range(betas, "betas", low=0.0, high=1.0)
    b = betas.to(torch.float64)
    return torch.exp(torch.cumsum(torch.log1p(-b), dim=-1))


def betas_from_alphas_bar(alphas_bar: Tensor) -> Tensor:
    """``beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}`` with ``alpha_bar_0 = 1``."""
    check_float(alphas_bar, "alphas_bar")
    check_range(alphas_bar, "alphas_bar", low=0.0, high=1.0)
    ab = alphas_bar.to(torch.float64)
    prev = torch.cat([ab.new_ones(ab.shape[:-1] + (1,)), ab[..., :-1]], dim=-1)
    return 1.0 - ab / prev


def logsnr_from_alphas_bar(alphas_bar: Tensor) -> Tensor:
    """``logsnr = log(alpha_bar) - log(1 - alpha_bar)``: the DDPM table on the log-SNR axis."""
    check_float(alphas_bar, "alphas_bar")
    check_range(alphas_bar, "alphas_bar", low=0.0, high=1.0)
    ab = alphas_bar.to(torch.float64) if alphas_bar.dtype == torch.float64 else alphas_bar.float()
    return torch.log(ab) - torch.log1p(-ab)


def alphas_bar_from_logsnr(logsnr: Scalar) -> Tensor:
    """``alpha_bar = alpha^2 = sigmoid(logsnr)`` (``+inf`` gives 1, ``-inf`` gives 0)."""
    return torch.sigmoid(as_coef(logsnr, "logsnr", posinf=True, neginf=True))


# ----------------------------------------------------------------------------------------------
# Continuous schedules (simple diffusion)


def _time(t: Scalar) -> Tensor:
    tt = as_coef(t, "t")
    check_range(tt, "t", low=0.0, high=1.0)
    return tt


def _cosine_bounds(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    check_number(logsnr_min, "logsnr_min")
    check_number(logsnr_max, "logsnr_max")
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min, logsnr_max: expected logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
    return math.atan(math.exp(-0.5 * logsnr_max)), math.atan(math.exp(-0.5 * logsnr_min))


def logsnr_cosine(t: Scalar, *, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """Cosine schedule in log-SNR [SD Sec. 2]: ``-2 log tan(t_min + t (t_max - t_min))``.

    ``t_min = atan(exp(-logsnr_max / 2))``, ``t_max = atan(exp(-logsnr_min / 2))``, so that
    ``logsnr(0) = logsnr_max`` and ``logsnr(1) = logsnr_min``. ``t`` in [0, 1].
    """
    return _cosine(_time(t), *_cosine_bounds(logsnr_min, logsnr_max))


def _cosine(tt: Tensor, t_min: float, t_max: float) -> Tensor:
    """:func:`logsnr_cosine` on a checked ``t``. Past pi/4 it uses ``tan(u) = 1 / tan(pi/2 - u)`` with
    ``pi/2 - u`` formed from ``1 - t``: near ``u = pi/2`` the difference would otherwise lose most of its
    float32 digits (a logsnr error ~2e-4 at -15)."""
    u = t_min + tt * (t_max - t_min)
    u_rev = (0.5 * math.pi - t_max) + (1.0 - tt) * (t_max - t_min)
    return torch.where(u <= 0.25 * math.pi, -2.0 * torch.log(torch.tan(u)), 2.0 * torch.log(torch.tan(u_rev)))


def t_from_logsnr_cosine(logsnr: Scalar, *, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """Inverse of :func:`logsnr_cosine`: ``t = (atan(exp(-logsnr/2)) - t_min) / (t_max - t_min)``.

    ``logsnr`` outside ``[logsnr_min, logsnr_max]`` gives ``t`` outside [0, 1] (``+/-inf`` allowed); NaN raises."""
    l = as_coef(logsnr, "logsnr", posinf=True, neginf=True)
    t_min, t_max = _cosine_bounds(logsnr_min, logsnr_max)
    return (torch.atan(torch.exp(-0.5 * l)) - t_min) / (t_max - t_min)


def _shift(image_size: int, noise_size: int, name: str = "noise_size") -> float:
    check_int(image_size, "image_size", low=1)
    check_int(noise_size, name, low=1)
    return 2.0 * math.log(noise_size / image_size)


def logsnr_cosine_shifted(t: Scalar, *, image_size: int, noise_size: int = 64,
                          logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """Resolution-shifted cosine schedule [SD Sec. 3.1]: ``logsnr_cosine(t) + 2 log(noise_size / image_size)``.

    A model at ``image_size`` then sees the same signal at the scale of ``noise_size`` as a model
    trained at ``noise_size`` with the plain cosine schedule. The endpoints shift with it.
    """
    return logsnr_cosine(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max) + _shift(image_size, noise_size)


def t_from_logsnr_cosine_shifted(logsnr: Scalar, *, image_size: int, noise_size: int = 64,
                                 logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """Inverse of :func:`logsnr_cosine_shifted` (``+/-inf`` allowed, see :func:`t_from_logsnr_cosine`)."""
    l = as_coef(logsnr, "logsnr", posinf=True, neginf=True) - _shift(image_size, noise_size)
    return t_from_logsnr_cosine(l, logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def logsnr_cosine_interpolated(t: Scalar, *, image_size: int, noise_size_low: int = 32,
                               noise_size_high: int | None = None, logsnr_min: float = -15.0,
                               logsnr_max: float = 15.0) -> Tensor:
    """Interpolated cosine schedule [SD Sec. 3.1, pseudocode]:
    ``t * shifted(t; noise_size_low) + (1 - t) * shifted(t; noise_size_high)``.

    At high noise (t -> 1) the schedule follows the strongly shifted ``noise_size_low`` version,
    at low noise (t -> 0) the ``noise_size_high`` one (default: ``image_size``, i.e. unshifted).
    The shift ``2 log(noise_size / image_size)`` is negative (more noise) for ``noise_size < image_size``;
    with ``image_size < noise_size_low`` it is positive, so the schedule moves toward *less* noise.
    """
    high, high_name = (image_size, "image_size") if noise_size_high is None else (noise_size_high, "noise_size_high")
    return _interpolated(_time(t), _cosine_bounds(logsnr_min, logsnr_max),
                         _shift(image_size, noise_size_low, "noise_size_low"), _shift(image_size, high, high_name))


def _interpolated(tt: Tensor, bounds: tuple[float, float], shift_low: float, shift_high: float) -> Tensor:
    """:func:`logsnr_cosine_interpolated` on a checked ``t``: ``cosine(t) + t shift_low + (1 - t) shift_high``."""
    return _cosine(tt, *bounds) + tt * shift_low + (1.0 - tt) * shift_high


def t_from_logsnr_cosine_interpolated(logsnr: Scalar, *, image_size: int, noise_size_low: int = 32,
                                      noise_size_high: int | None = None, logsnr_min: float = -15.0,
                                      logsnr_max: float = 15.0, iters: int = 80) -> Tensor:
    """Inverse of :func:`logsnr_cosine_interpolated` by bisection in float64 (the schedule is
    strictly decreasing in t when ``noise_size_low <= noise_size_high``). Values outside the
    schedule's range (``+/-inf`` included) map to the nearest end, 0 or 1; NaN raises."""
    l = as_coef(logsnr, "logsnr", posinf=True, neginf=True)
    check_int(iters, "iters", low=1)
    high, high_name = (image_size, "image_size") if noise_size_high is None else (noise_size_high, "noise_size_high")
    shift_low, shift_high = _shift(image_size, noise_size_low, "noise_size_low"), _shift(image_size, high, high_name)
    if noise_size_low > high:
        raise ValueError(f"noise_size_low: expected <= noise_size_high ({high}) for an invertible schedule, "
                         f"got {noise_size_low}")
    target = l.to(torch.float64)
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    bounds = _cosine_bounds(logsnr_min, logsnr_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = _interpolated(mid, bounds, shift_low, shift_high) > target  # still too clean: move right
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    t = 0.5 * (lo + hi)
    start, end = (_interpolated(target.new_tensor(v), bounds, shift_low, shift_high) for v in (0.0, 1.0))
    t = torch.where(target >= start, 0.0, torch.where(target <= end, 1.0, t))  # outside the range: the nearest end
    return t.to(l.dtype)


# ----------------------------------------------------------------------------------------------
# EDM


def sigmas_karras(n: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM time steps [EDM Eq. 5]: ``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for i = 0..n-1, then a trailing 0. Returns ``(n + 1,)`` float64, decreasing."""
    check_int(n, "n", low=1)
    check_number(sigma_min, "sigma_min", low=0.0, low_open=True)
    check_number(sigma_max, "sigma_max", low=0.0, low_open=True)
    check_number(rho, "rho", low=0.0, low_open=True)
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def sigma_lognormal(u: Tensor, *, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """EDM training noise levels [EDM Table 1]: ``ln sigma ~ N(P_mean, P_std^2)``, i.e.
    ``sigma = exp(p_mean + p_std u)`` for a given standard normal ``u``."""
    check_float(u, "u")
    check_values(u, "u")
    check_number(p_mean, "p_mean")
    check_number(p_std, "p_std", low=0.0, low_open=True)
    uu = u.to(torch.float64) if u.dtype == torch.float64 else u.float()
    return torch.exp(p_mean + p_std * uu)


# ----------------------------------------------------------------------------------------------
# Timestep respacing


def _round_div(q: Tensor, d: int) -> Tensor:
    """``round(q / d)`` for integers ``q >= 0``, ``d >= 1``, ties to even (as ``numpy.round``), in exact
    integer arithmetic: float ``T - k T/n`` lands on either side of a tie (e.g. T=27, n=26)."""
    floor, rem = q // d, q % d
    up = (2 * rem > d) | ((2 * rem == d) & (floor % 2 == 1))
    return floor + up.to(torch.int64)


def respace(T: int, n: int, *, spacing: str = "trailing") -> Tensor:
    """Choose ``n`` of the ``T`` discrete timesteps (indices 0..T-1) for sampling; increasing int64.

    - ``"trailing"`` (default) [Lin Table 2]: ``round(T - k T/n) - 1`` for k = 0..n-1, so the last
      index ``T - 1`` (pure noise) is always included. Rounding is exact, ties to even.
    - ``"leading"``: ``k * (T // n)`` — the convention of several libraries, which reaches ``T - 1``
      only when ``n = T`` (T = 1000, n = 50 ends at 980) and so starts sampling from a partly clean
      level.
    - ``"linspace"``: ``round(linspace(0, T - 1, n))``, both ends included.
    """
    check_int(T, "T", low=1)
    check_int(n, "n", low=1)
    if n > T:
        raise ValueError(f"n: expected 1 <= n <= T={T}, got {n}")
    k = torch.arange(n, dtype=torch.int64)
    check_choice(spacing, "spacing", ("trailing", "leading", "linspace"))
    if spacing == "trailing":
        return (_round_div(T * (n - k), n) - 1).flip(0)
    if spacing == "leading":
        return k * (T // n)
    if spacing == "linspace":
        return _round_div(k * (T - 1), max(n - 1, 1))
    raise ValueError(f"spacing: expected one of 'trailing', 'leading', 'linspace', got {spacing!r}")


# ----------------------------------------------------------------------------------------------
# Discrete tables on the EDM axis


def sigmas_from_alphas_bar(alphas_bar: Tensor, timesteps: Tensor | None = None) -> Tensor:
    """``sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i)`` at ``timesteps``, noisiest first, then 0.

    The grid on which a DDPM/DDIM chain over a discrete table runs in EDM space. ``timesteps`` are
    increasing table indices (:func:`respace`; default all ``T``); the trailing 0 is
    ``alpha_bar = 1``, so the last step lands on the denoiser output. Returns ``(n + 1,)`` float64.
    """
    check_float(alphas_bar, "alphas_bar")
    logsnr = logsnr_from_alphas_bar(alphas_bar.to(torch.float64))
    if logsnr.ndim != 1:
        raise ValueError(f"alphas_bar: expected a 1-D table, got shape {tuple(logsnr.shape)}")
    if timesteps is None:
        timesteps = torch.arange(logsnr.shape[0])
    if not isinstance(timesteps, Tensor) or timesteps.dtype not in (torch.int32, torch.int64) or timesteps.ndim != 1:
        raise TypeError(f"timesteps: expected a 1-D int64 tensor of table indices, got {timesteps!r}")
    T = logsnr.shape[0]
    if len(timesteps) == 0 or timesteps.min() < 0 or timesteps.max() >= T or (timesteps.diff() <= 0).any():
        raise ValueError(f"timesteps: expected strictly increasing indices in [0, {T - 1}], got {timesteps.tolist()}")
    sig = sigma_from_logsnr(logsnr[timesteps.to(logsnr.device)]).flip(0)
    if (sig.diff() >= 0).any():
        raise ValueError("alphas_bar: expected a strictly decreasing table at the chosen timesteps")
    return torch.cat([sig, sig.new_zeros(1)])


def timestep_from_sigma(sigma: Scalar, alphas_bar: Tensor, *, nearest: bool = False) -> Tensor:
    """The table index ``t`` with ``logsnr(alpha_bar_t) = -2 log sigma``, linear in logsnr between indices.

    ``alphas_bar``: ``(T,)`` decreasing, index ``i`` is the paper's timestep ``i + 1``. The index is
    a float (``nearest=False``, for networks that embed a continuous timestep) or the nearest int64
    (for networks with a lookup table). Both are exact integers on a grid from
    :func:`sigmas_from_alphas_bar` of the same table. A ``sigma`` within 1e-4 in logsnr outside
    the table's range is rounding and maps to the end; further out is a ValueError (a network
    trained on integer t never saw it).
    """
    check_float(alphas_bar, "alphas_bar")
    if alphas_bar.ndim != 1:
        raise ValueError(f"alphas_bar: expected a 1-D table, got shape {tuple(alphas_bar.shape)}")
    s = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma.to(torch.float64)
    table = -logsnr_from_alphas_bar(alphas_bar.to(device=s.device, dtype=torch.float64))  # increasing in t
    if bool((table.diff() <= 0).any()):
        raise ValueError("alphas_bar: expected a strictly decreasing table")
    query = -logsnr_from_sigma(s)
    lo_end, hi_end = table[0].item(), table[-1].item()
    check_range(query, f"sigma, as 2 log(sigma) (the table covers [{lo_end:.6g}, {hi_end:.6g}])",
                low=lo_end - 1e-4, high=hi_end + 1e-4)
    query = query.clamp(lo_end, hi_end)
    T = table.shape[0]
    if T == 1:
        t = torch.zeros_like(query)
    else:
        upper = torch.searchsorted(table, query.contiguous()).clamp(1, T - 1)
        lower = upper - 1
        t = lower + (query - table[lower]) / (table[upper] - table[lower])
    return torch.round(t).to(torch.int64) if nearest else t

# ----------------------------------------------------------------------------------------------
# Sampling grids from a continuous schedule


def sigmas_from_schedule(schedule: Callable[[Tensor], Tensor], n: int, *, t_start: float = 1.0) -> Tensor:
    """The EDM grid of a continuous VP schedule: ``sigma_i = exp(-logsnr(t_i) / 2)``, ``t_i = t_start (1 - i/n)``
    for i = 0..n-1, then a trailing 0. Returns ``(n + 1,)`` float64, strictly decreasing.

    ``schedule`` maps a float64 ``t`` tensor in [0, 1] to the log-SNR, decreasing in ``t`` (bind the
    keywords first: ``partial(logsnr_cosine_shifted, image_size=32, noise_size=8)``). The steps are
    uniform in ``t``, as in the ancestral sampler of [SD Sec. 2]; the last one goes from ``t = t_start/n``
    straight into the data (``sigma = 0``), where every solver of :mod:`kdiff.solvers` lands on the
    denoiser's output. The grid serves DDPM-ancestral, DDIM and DPM-Solver++(2M) sampling of a
    continuous-time VP model through ``kdiff.denoisers.vp_denoiser``.

    Starting noise. The samplers run on ``x = z / alpha``, so the start is ``x_T = z_T / alpha_T``
    with ``sigmas[0] = sigma_T / alpha_T``. The VP prior ``z_T ~ N(0, I)`` gives
    ``x_T = n sqrt(1 + sigmas[0]^2) = n / alpha_T`` (``n`` standard normal); the EDM convention
    ``x_T = sigmas[0] n`` is ``z_T = sigma_T n``, smaller by the factor ``sigma_T``, which differs
    from 1 by about ``exp(logsnr_min) / 2`` (1.5e-7 at logsnr_min = -15): either is fine when
    ``logsnr(t_start)`` is that low, and only ``n / alpha_T`` is the prior when it is not.
    """
    if not callable(schedule):
        raise TypeError(f"schedule: expected a callable t -> logsnr, got {type(schedule).__name__}")
    check_int(n, "n", low=1)
    if isinstance(t_start, bool) or not isinstance(t_start, (int, float)) or not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start: expected a float in (0, 1], got {t_start!r}")
    t = t_start * (1.0 - torch.arange(n, dtype=torch.float64) / n)
    logsnr = schedule(t)
    if not isinstance(logsnr, Tensor) or logsnr.shape != t.shape:
        got = tuple(logsnr.shape) if isinstance(logsnr, Tensor) else type(logsnr).__name__
        raise ValueError(f"schedule: expected a tensor of shape ({n},) for t of shape ({n},), got {got}")
    if not bool(torch.isfinite(logsnr).all()):
        raise ValueError(f"schedule: expected finite log-SNR values, got {logsnr.tolist()}")
    sig = sigma_from_logsnr(logsnr.to(torch.float64))
    if not bool(torch.isfinite(sig).all()) or bool((sig <= 0).any()):
        raise ValueError(f"schedule: expected finite log-SNR values, got sigmas {sig.tolist()}")
    if bool((sig.diff() >= 0).any()):
        raise ValueError("schedule: expected a log-SNR strictly decreasing in t (sigma increasing), got "
                         f"logsnr(t)={logsnr.tolist()} at t={t.tolist()}")
    return torch.cat([sig, sig.new_zeros(1)])

