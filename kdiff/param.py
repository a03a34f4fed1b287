"""Conversions between the network outputs a diffusion model may predict, and EDM preconditioning.

VP latent ``z = alpha x + sigma eps`` with ``alpha^2 = sigmoid(logsnr)``; velocity
``v = alpha eps - sigma x`` [Salimans & Ho 2022, "Progressive Distillation", Sec. 4]. The
divisions by ``alpha`` or ``sigma`` are written with ``softplus`` so no intermediate overflows for
``|logsnr|`` up to ~80 in float32.

Infinite log-SNRs are accepted where the conversion has a limit: ``logsnr = +inf`` is clean data
(``alpha = 1``, ``sigma = 0``), ``-inf`` pure noise (``alpha = 0``, ``sigma = 1``). A conversion that divides
by the vanishing one of the two (``x_from_eps`` at ``-inf``: ``alpha = 0``; ``eps_from_x`` at ``+inf``:
``sigma = 0``) is undefined there and raises a ValueError, as does NaN anywhere.

References:
    [PD] Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models".
    [EDM] Karras et al. 2022, Table 1 and Eq. 7.
    [SDE] Song et al. 2021, "Score-Based Generative Modeling through SDEs".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import Scalar, as_coef, check_float, check_number, check_range, check_same_shape, per_sample

__all__ = ["x_from_eps", "eps_from_x", "v_from_x_eps", "x_from_v", "eps_from_v", "v_from_x",
           "v_from_eps", "score_from_eps", "eps_from_score", "edm_precond"]


def _softplus(l: Tensor) -> Tensor:
    """``log(1 + e^l)`` at full precision for every ``l`` (``F.softplus`` returns ``l`` itself past 20, a
    relative error ``e^-20 ~ 2e-9`` that float64 conversions at high logsnr would show)."""
    return torch.logaddexp(l, torch.zeros_like(l))


def _args(z: Tensor, other: Tensor, names: tuple[str, str], logsnr: Scalar, *, posinf: bool = True,
          neginf: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Checked ``(z, other, logsnr)``, the data upcast to the coefficient dtype (float32 or float64):
    a 0-d float32 coefficient would not promote bf16/fp16 data, and the math would run in bf16.
    ``posinf`` / ``neginf``: whether the conversion is defined at ``logsnr = +inf`` / ``-inf``."""
    check_float(z, names[0])
    check_float(other, names[1])
    check_same_shape(z, other, names[0], names[1])
    l = per_sample(logsnr, "logsnr", z, posinf=posinf, neginf=neginf)
    return z.to(l.dtype), other.to(l.dtype), l


def x_from_eps(z: Tensor, eps: Tensor, logsnr: Scalar) -> Tensor:
    """``x = (z - sigma eps) / alpha = z sqrt(1 + e^-l) - eps e^(-l/2)``; undefined at ``logsnr = -inf``."""
    z_, eps_, l = _args(z, eps, ("z", "eps"), logsnr, neginf=False)
    return (z_ * torch.exp(0.5 * _softplus(-l)) - eps_ * torch.exp(-0.5 * l)).to(z.dtype)


def eps_from_x(z: Tensor, x: Tensor, logsnr: Scalar) -> Tensor:
    """``eps = (z - alpha x) / sigma = z sqrt(1 + e^l) - x e^(l/2)``; undefined at ``logsnr = +inf``."""
    z_, x_, l = _args(z, x, ("z", "x"), logsnr, posinf=False)
    return (z_ * torch.exp(0.5 * _softplus(l)) - x_ * torch.exp(0.5 * l)).to(z.dtype)


def v_from_x_eps(x: Tensor, eps: Tensor, logsnr: Scalar) -> Tensor:
    """``v = alpha eps - sigma x`` [PD Sec. 4]."""
    x_, eps_, l = _args(x, eps, ("x", "eps"), logsnr)
    return (torch.sigmoid(l).sqrt() * eps_ - torch.sigmoid(-l).sqrt() * x_).to(x.dtype)


def x_from_v(z: Tensor, v: Tensor, logsnr: Scalar) -> Tensor:
    """``x = alpha z - sigma v``."""
    z_, v_, l = _args(z, v, ("z", "v"), logsnr)
    return (torch.sigmoid(l).sqrt() * z_ - torch.sigmoid(-l).sqrt() * v_).to(z.dtype)


def eps_from_v(z: Tensor, v: Tensor, logsnr: Scalar) -> Tensor:
    """``eps = sigma z + alpha v``."""
    z_, v_, l = _args(z, v, ("z", "v"), logsnr)
    return (torch.sigmoid(-l).sqrt() * z_ + torch.sigmoid(l).sqrt() * v_).to(z.dtype)


def v_from_x(z: Tensor, x: Tensor, logsnr: Scalar) -> Tensor:
    """``v = (alpha z - x) / sigma = z e^(l/2) - x sqrt(1 + e^l)`` (eps eliminated); undefined at ``+inf``."""
    z_, x_, l = _args(z, x, ("z", "x"), logsnr, posinf=False)
    return (z_ * torch.exp(0.5 * l) - x_ * torch.exp(0.5 * _softplus(l))).to(z.dtype)


def v_from_eps(z: Tensor, eps: Tensor, logsnr: Scalar) -> Tensor:
    """``v = (eps - sigma z) / alpha`` (eliminating x); undefined at ``logsnr = -inf``."""
    z_, eps_, l = _args(z, eps, ("z", "eps"), logsnr, neginf=False)
    inv_alpha = torch.exp(0.5 * _softplus(-l))
    return ((eps_ - torch.sigmoid(-l).sqrt() * z_) * inv_alpha).to(z.dtype)


def score_from_eps(eps: Tensor, logsnr: Scalar) -> Tensor:
    """``grad_z log q(z_t) = -eps / sigma`` [SDE Eq. 4 / Tweedie], with ``1/sigma = sqrt(1 + e^l)``; undefined at
    ``logsnr = +inf``."""
    check_float(eps, "eps")
    l = per_sample(logsnr, "logsnr", eps, neginf=True)
    return (-eps.to(l.dtype) * torch.exp(0.5 * _softplus(l))).to(eps.dtype)


def eps_from_score(score: Tensor, logsnr: Scalar) -> Tensor:
    """``eps = -sigma * score``."""
    check_float(score, "score")
    l = per_sample(logsnr, "logsnr", score, posinf=True, neginf=True)
    return (-score.to(l.dtype) * torch.sigmoid(-l).sqrt()).to(score.dtype)


def edm_precond(sigma: Scalar, *, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning [EDM Table 1, Eq. 7]; ``D(x) = c_skip x + c_out F(c_in x, c_noise)``.

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``. Shapes as ``sigma`` (> 0, finite).
    Computed through ``r = hypot(sigma, sd)`` (``c_skip = (sd / r)^2``, ``c_out = sigma (sd / r)``, ``c_in = 1 / r``)
    so that ``sigma^2`` never overflows: ``sigma = 1e20`` in float32 gives ``c_out = sd``.
    """
    s = as_coef(sigma, "sigma")
    check_range(s, "sigma", low=0.0, low_open=True)
    sd = check_number(sigma_data, "sigma_data", low=0.0, low_open=True)
    r = torch.hypot(s, torch.full_like(s, sd))
    sd_over_r = sd / r
    c_skip = sd_over_r.square()
    c_out = s * sd_over_r
    c_in = 1.0 / r
    c_noise = torch.log(s) / 4
    return c_skip, c_out, c_in, c_noise


def split_net_output(out: object, x: Tensor, *, learned: bool, setting: str) -> tuple[Tensor, Tensor | None]:
    """A network's output checked against the input ``x``: ``(prediction, None)``, or with a learned variance the
    two halves of dim 1, ``(prediction, v_raw)`` [iDDPM Sec. 3.1: the net returns ``2C`` channels].

    ``setting`` names the caller's argument that asked for the learned variance, for the error message.
    """
    if not isinstance(out, Tensor):
        raise TypeError(f"net: expected the network to return a tensor, got {type(out).__name__}")
    v_raw = None
    if learned:
        if out.ndim < 2 or out.shape[1] != 2 * x.shape[1]:
            raise ValueError(f"net: expected {2 * x.shape[1]} channels in dim 1 with {setting}, "
                             f"got shape {tuple(out.shape)}")
        out, v_raw = out.chunk(2, dim=1)
    if out.shape != x.shape:
        raise ValueError(f"net: expected an output of shape {tuple(x.shape)}, got {tuple(out.shape)}")
    return out, v_raw
