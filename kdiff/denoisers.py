"""Wrappers that turn a network into the sampler contract ``denoise(x, sigma) -> denoised``.

EDM space: ``x = y + sigma n``. A VP network sees the latent ``z = alpha x`` with
``alpha = sqrt(sigmoid(logsnr))``, ``logsnr = -2 log sigma`` (so ``alpha = 1 / sqrt(1 + sigma^2)``),
and its prediction (eps, v or x) is turned into ``denoised`` with :mod:`kdiff.param`. The clean
estimate is the same in both spaces.

References:
    [EDM] Karras et al. 2022, Eq. 7 and Table 1.
    [PD] Salimans, Ho 2022, "Progressive Distillation", Sec. 4 (v-prediction).
    [iDDPM] Nichol, Dhariwal 2021, Sec. 3.1 and Eq. 15 (learned variance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._util import Scalar, check_callable, check_float, check_number, check_range, coef_dtype, per_sample
from .param import edm_precond, split_net_output, x_from_eps, x_from_v
from .schedules import alpha_sigma, logsnr_from_sigma, timestep_from_sigma

__all__ = ["Denoise", "edm_denoiser", "vp_denoiser", "timestep_from_sigma", "clip_denoised"]

Denoise = Callable[[Tensor, Scalar], Tensor]
PARAMS = ("eps", "v", "x")


def _batch(c: Tensor, x: Tensor) -> Tensor:
    """A padded per-sample coefficient (``[]`` or ``[B, 1, ...]``) as a ``[B]`` vector."""
    return c.reshape(-1).expand(x.shape[0])


def _net_input(c: Tensor, x: Tensor) -> Tensor:
    """A ``[B]`` conditioning value as the network sees it: float32, or float64 for float64 data."""
    return _batch(c, x).to(coef_dtype(x)) if c.is_floating_point() else _batch(c, x)


def _check_output(out: object, shape: torch.Size) -> Tensor:
    """The network's output, a tensor shaped like ``x``, or an error naming ``net``."""
    if not isinstance(out, Tensor):
        raise TypeError(f"net: expected the network to return a tensor of shape {tuple(shape)}, "
                        f"got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"net: expected an output of shape {tuple(shape)}, got {tuple(out.shape)}")
    return out


def edm_denoiser(net: Callable[..., Tensor], *, sigma_data: float = 0.5) -> Denoise:
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` [EDM Eq. 7, Table 1].

    ``net(x_in, c_noise, *cond, **cond_kw)`` takes ``x_in: (B, ...)`` in ``x``'s dtype and
    ``c_noise = ln(sigma) / 4`` of shape ``[B]`` (float32, or float64 for float64 ``x``), and returns ``F``
    shaped like ``x``. The returned ``denoise(x, sigma, *cond, **cond_kw)`` accepts ``sigma > 0`` (finite) as a
    float, ``[]`` or ``[B]``, and passes any further arguments (class labels, other conditioning) to ``net``
    unchanged: ``edm_denoiser(unet)(x, sigma, labels)`` calls ``unet(c_in x, c_noise, labels)``. The sampler
    contract is two-argument; bind conditioning with a closure or ``functools.partial`` for sampling.
    """
    check_callable(net, "net")
    sigma_data = check_number(sigma_data, "sigma_data", low=0.0, low_open=True)

    def denoise(x: Tensor, sigma: Scalar, *cond: object, **cond_kw: object) -> Tensor:
        check_float(x, "x")
        s = per_sample(sigma, "sigma", x)
        c_skip, c_out, c_in, c_noise = edm_precond(s, sigma_data=sigma_data)
        out = _check_output(net((c_in * x).to(x.dtype), _net_input(c_noise, x), *cond, **cond_kw), x.shape)
        return (c_skip * x.to(s.dtype) + c_out * out.to(s.dtype)).to(x.dtype)

    return denoise


def vp_denoiser(net: Callable[[Tensor, Tensor], Tensor], *, param: str = "eps", alphas_bar: Tensor | None = None,
                nearest: bool = False, learned_variance: bool = False) -> Denoise:
    """``denoised = x_from_{param}(z, net(z, c), logsnr)`` with ``z = alpha x``, ``logsnr = -2 log sigma``.

    The network is called as ``net(z, logsnr)`` with ``logsnr: [B]``, or, given a discrete
    ``alphas_bar`` table, as ``net(z, t)`` with ``t: [B]`` the 0-based table index (index ``i`` is the
    paper's timestep ``i + 1``) from
    :func:`kdiff.schedules.timestep_from_sigma` (float, or int64 with ``nearest=True``). Float conditioning is
    float32, or float64 for float64 ``x``. ``z`` is always built from
    the exact ``sigma``, so a rounded ``t`` only changes what the network is told. As with
    :func:`edm_denoiser`, ``denoise(x, sigma, *cond, **cond_kw)`` passes further arguments to ``net``.

    Args:
        param: what the network predicts: ``"eps"``, ``"v"`` (``alpha eps - sigma x`` [PD]) or ``"x"``.
        learned_variance: the network returns twice the channels (dim 1), the prediction and
            iDDPM's variance output ``v_raw`` in [-1, 1]; ``denoise`` then returns
            ``(denoised, frac)`` with ``frac = (v_raw + 1) / 2`` for ``solvers.ddpm_step(variance=frac)``
            [iDDPM Eq. 15]. The weight, not a log-variance, is returned: ``log beta`` and
            ``log beta_tilde`` depend on the step's ``sigma_next``, which a denoiser does not see.
    """
    check_callable(net, "net")
    if not isinstance(param, str) or param not in PARAMS:
        raise ValueError(f"param: expected one of {', '.join(PARAMS)}, got {param!r}")
    if alphas_bar is not None:
        check_float(alphas_bar, "alphas_bar")

    def denoise(x: Tensor, sigma: Scalar, *cond: object, **cond_kw: object) -> Tensor | tuple[Tensor, Tensor]:
        check_float(x, "x")
        s = per_sample(sigma, "sigma", x)
        check_range(s, "sigma", low=0.0, low_open=True)
        logsnr = _batch(logsnr_from_sigma(s), x)
        alpha = per_sample(alpha_sigma(logsnr)[0], "alpha", x)
        z = (alpha * x.to(alpha.dtype)).to(x.dtype)
        level = logsnr if alphas_bar is None else timestep_from_sigma(_batch(s, x), alphas_bar, nearest=nearest)
        out, v_raw = split_net_output(net(z, _net_input(level, x), *cond, **cond_kw), x, learned=learned_variance,
                                      setting="learned_variance=True")
        if param == "eps":
            denoised = x_from_eps(z, out.to(z.dtype), logsnr)
        elif param == "v":
            denoised = x_from_v(z, out.to(z.dtype), logsnr)
        else:
            denoised = out.to(x.dtype)
        return (denoised, (v_raw + 1.0) / 2.0) if learned_variance else denoised

    return denoise


def clip_denoised(denoise: Callable, *, low: float = -1.0, high: float = 1.0) -> Callable:
    """``denoise'(x, sigma) = clamp(denoise(x, sigma), low, high)``: DDPM's and ADM's clip of the predicted x0.

    DDPM (Alg. 2 as released) and iDDPM/ADM clip the predicted clean image to the data range [-1, 1] before it
    enters the posterior mean (ancestral steps) or the DDIM update, where the implied noise ``(x - denoised) /
    sigma`` then comes from the clipped value, as in ADM's DDIM. A learned-variance denoiser's pair
    ``(denoised, frac)`` keeps its ``frac``. Off unless wrapped: clipping changes the model.
    """
    if not low < high:
        raise ValueError(f"low, high: expected low < high, got {low}, {high}")

    def clipped(x: Tensor, sigma: Scalar) -> Tensor | tuple[Tensor, Tensor]:
        out = denoise(x, sigma)
        if isinstance(out, tuple):
            return out[0].clamp(low, high), out[1]
        return out.clamp(low, high)

    return clipped
