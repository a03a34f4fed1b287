"""The Gaussian forward process and its posteriors, in log-SNR.

``q(z_t | x) = N(alpha_t x, sigma_t^2 I)`` with ``alpha_t^2 = sigmoid(logsnr_t)``; ``s`` is the
earlier, less noisy time (``logsnr_s > logsnr_t``).

References:
    [VDM] Kingma, Salimans, Poole, Ho 2021, "Variational Diffusion Models", Sec. 3 and App. A.
    [DDPM] Ho, Jain, Abbeel 2020, Eq. 6-7 (mu-tilde, beta-tilde).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._util import Scalar, _assert_queued, as_coef, check_float, check_same_shape, coef_dtype, per_sample

__all__ = ["diffuse", "transition", "transition_logvar", "posterior", "posterior_logvar", "learned_range_logvar"]


def diffuse(x: Tensor, eps: Tensor, logsnr: Scalar) -> Tensor:
    """Sample ``z_t = alpha_t x + sigma_t eps`` from ``q(z_t | x)``. ``x, eps: (B, ...)``; ``logsnr: [] or [B]``.

    ``logsnr = +inf`` gives ``z = x`` (clean data), ``-inf`` gives ``z = eps`` (pure noise); NaN raises."""
    check_float(x, "x")
    check_float(eps, "eps")
    check_same_shape(x, eps, "x", "eps")
    l = per_sample(logsnr, "logsnr", x, posinf=True, neginf=True)
    alpha, sigma = torch.sigmoid(l).sqrt(), torch.sigmoid(-l).sqrt()
    # Data upcast to the coefficient dtype: a 0-d float32 coefficient would not promote bf16 data.
    return (alpha * x.to(l.dtype) + sigma * eps.to(l.dtype)).to(x.dtype)


def _check_order(ls: Tensor, lt: Tensor) -> None:
    """ValueError unless ``logsnr_s >= logsnr_t`` (a reversed pair would give a negative variance)."""
    if _assert_queued(ls, ls < lt, "logsnr_s: expected logsnr_s >= logsnr_t"):
        return
    if (ls < lt).any():
        gap = (ls - lt).min().item()
        raise ValueError(f"logsnr_s: expected logsnr_s >= logsnr_t (s is the less noisy time), got "
                         f"min(logsnr_s - logsnr_t) = {gap:.6g}")


def _pair(logsnr_s: Scalar, logsnr_t: Scalar) -> tuple[Tensor, Tensor]:
    """Checked ``(logsnr_s, logsnr_t)``: no NaN (``+/-inf`` allowed), one device, ``logsnr_s >= logsnr_t``."""
    dtype = coef_dtype(logsnr_s, logsnr_t)
    ls = as_coef(logsnr_s, "logsnr_s", dtype=dtype, posinf=True, neginf=True)
    lt = as_coef(logsnr_t, "logsnr_t", dtype=dtype, device=ls.device, posinf=True, neginf=True)
    _check_order(ls, lt)
    return ls, lt


def _gap(ls: Tensor, lt: Tensor) -> Tensor:
    """``logsnr_t - logsnr_s`` (<= 0), with 0 where the two are equal, also at equal infinities (where the
    difference would be NaN: a step of length zero)."""
    return torch.where(ls == lt, torch.zeros_like(lt), lt - ls)


def transition(logsnr_s: Scalar, logsnr_t: Scalar) -> tuple[Tensor, Tensor]:
    """``q(z_t | z_s) = N(alpha_ts z_s, var_ts)`` [VDM Eq. 3-4].

    ``alpha_ts = alpha_t / alpha_s = exp((logsigmoid(l_t) - logsigmoid(l_s)) / 2)`` and
    ``var_ts = sigma_t^2 - alpha_ts^2 sigma_s^2 = -sigma_t^2 expm1(l_t - l_s)`` (stable when
    ``l_s ~ l_t``). Shapes broadcast; no padding to data rank. ``logsnr_s >= logsnr_t``, else ValueError;
    ``+/-inf`` allowed (``l_t = -inf``: ``alpha_ts = 0``, ``var_ts = 1``), NaN raises.
    """
    ls, lt = _pair(logsnr_s, logsnr_t)
    same = ls == lt
    alpha_ts = torch.where(same, torch.ones_like(lt), torch.exp(0.5 * (F.logsigmoid(lt) - F.logsigmoid(ls))))
    var_ts = -torch.sigmoid(-lt) * torch.expm1(_gap(ls, lt))
    return alpha_ts, var_ts


def transition_logvar(logsnr_s: Scalar, logsnr_t: Scalar) -> Tensor:
    """``log var_ts = log(1 - alpha_t^2 / alpha_s^2) = log sigma_t^2 + log(-expm1(l_t - l_s))`` [VDM Eq. 4]: the log
    of :func:`transition`'s ``var_ts``, DDPM's step variance ``beta_t`` of a (respaced) chain [iDDPM Sec. 4].

    ``-inf`` for ``l_s = l_t``; ``l_s = +inf`` gives ``log sigma_t^2``. Shapes broadcast; ``logsnr_s >= logsnr_t``.
    """
    ls, lt = _pair(logsnr_s, logsnr_t)
    return F.logsigmoid(-lt) + torch.log(-torch.expm1(_gap(ls, lt)))


def learned_range_logvar(frac: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """``log Sigma = frac log beta + (1 - frac) log beta~`` [iDDPM Eq. 15, their v]: the learned interpolation
    between the step variance (:func:`transition_logvar`) and the posterior one (:func:`posterior_logvar`).

    ``frac`` in [0, 1] is the weight (a network output ``v_raw`` in [-1, 1] maps to ``(v_raw + 1) / 2``); the
    three tensors broadcast. Not clamped, as in iDDPM's code.
    """
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def posterior_logvar(logsnr_s: Scalar, logsnr_t: Scalar) -> Tensor:
    """``log var`` of ``q(z_s | z_t, x)``: ``log sigma_s^2 + log(-expm1(l_t - l_s))`` [VDM Eq. 32].

    ``-inf`` when ``l_s = +inf`` (the last step onto clean data) or ``l_s = l_t``; ``l_t = -inf`` gives
    ``log sigma_s^2``.
    """
    ls, lt = _pair(logsnr_s, logsnr_t)
    return F.logsigmoid(-ls) + torch.log(-torch.expm1(_gap(ls, lt)))


def posterior(x: Tensor, z_t: Tensor, logsnr_s: Scalar, logsnr_t: Scalar) -> tuple[Tensor, Tensor]:
    """``q(z_s | z_t, x) = N(mean, var)`` [VDM Eq. 31-32; DDPM Eq. 6-7 on discrete tables].

    ``mean = (SNR_t/SNR_s)(alpha_s/alpha_t) z_t + alpha_s (1 - SNR_t/SNR_s) x`` and
    ``var = sigma_s^2 (1 - SNR_t/SNR_s)``, with ``1 - SNR_t/SNR_s = -expm1(l_t - l_s)``.

    Args:
        x: clean data ``(B, ...)``; z_t: the noisy latent, same shape.
        logsnr_s, logsnr_t: ``[]`` or ``[B]``, ``logsnr_s >= logsnr_t`` (else ValueError), no NaN.
            ``logsnr_s = +inf`` is allowed (then ``mean = x``, ``var = 0``), and so is ``logsnr_t = -inf``
            (``z_t`` is pure noise and tells nothing: ``mean = alpha_s x``, ``var = sigma_s^2``).
    Returns:
        ``mean`` in ``x``'s dtype and ``var`` as a float32/64 coefficient padded to ``x``'s rank.
    """
    check_float(x, "x")
    check_float(z_t, "z_t")
    check_same_shape(x, z_t, "x", "z_t")
    dtype = coef_dtype(logsnr_s, logsnr_t, x)
    ls = per_sample(logsnr_s, "logsnr_s", x, dtype=dtype, posinf=True, neginf=True)
    lt = per_sample(logsnr_t, "logsnr_t", x, dtype=dtype, posinf=True, neginf=True)
    _check_order(ls, lt)
    gap = _gap(ls, lt)
    # c_z = (SNR_t / SNR_s)(alpha_s / alpha_t): 1 for a step of length zero, 0 where either end is infinite
    # (the finite formula would give inf - inf there).
    finite = torch.isfinite(ls) & torch.isfinite(lt)
    ls_f, lt_f = torch.where(finite, ls, 0.0), torch.where(finite, lt, 0.0)
    c_z = torch.exp(gap + 0.5 * (F.logsigmoid(ls_f) - F.logsigmoid(lt_f)))
    c_z = torch.where(gap == 0, torch.ones_like(c_z), torch.where(finite, c_z, torch.zeros_like(c_z)))
    one_minus = -torch.expm1(gap)
    alpha_s = torch.sigmoid(ls).sqrt()
    mean = c_z * z_t.to(dtype) + alpha_s * one_minus * x.to(dtype)
    var = torch.sigmoid(-ls) * one_minus
    return mean.to(x.dtype), var
