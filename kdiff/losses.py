"""Per-sample regression losses and their weightings over the noise level; every loss returns ``[B]``.

One prediction, three targets. With ``z = alpha x + sigma eps``, ``v = alpha eps - sigma x`` and
``SNR = alpha^2 / sigma^2 = exp(logsnr)``, a network output determines ``x_hat``, ``eps_hat`` and
``v_hat`` together (any one fixes the other two given ``z``), and their errors are proportional:

    eps - eps_hat = -(alpha / sigma) (x - x_hat)                     (from eps = (z - alpha x) / sigma)
    v - v_hat     = alpha (eps - eps_hat) - sigma (x - x_hat)
                  = -((alpha^2 + sigma^2) / sigma) (x - x_hat) = -(x - x_hat) / sigma

so ``||x - x_hat||^2 = (sigma^2 / alpha^2) ||eps - eps_hat||^2 = sigma^2 ||v - v_hat||^2``, i.e.

    L_eps = SNR L_x,    L_v = L_x / sigma^2 = (1 + SNR) L_x = L_eps / alpha^2.

A weight ``w_a`` on the ``a``-loss is the weight ``w_a c_a / c_b`` on the ``b``-loss, with
``c_x = 1``, ``c_eps = SNR``, ``c_v = 1 + SNR`` (:func:`mse_conversion`).

References:
    [SD] Hoogeboom, Heek, Salimans 2023, "simple diffusion" (eps-loss on a v-network; multiscale loss).
    [MinSNR] Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy".
    [EDM] Karras et al. 2022, Table 1 (lambda(sigma)) and App. B.6.
    [PD] Salimans, Ho 2022, "Progressive Distillation", Sec. 4 (v-parametrization).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._util import (
    Scalar,
    as_coef,
    check_choice,
    check_float,
    check_number,
    check_range,
    check_same_shape,
    coef_dtype,
    per_sample_flat,
)
from .param import eps_from_v

__all__ = ["mse", "mse_conversion", "eps_mse_from_v", "weight_min_snr", "weight_edm", "multiscale_mse"]

_TARGETS = ("eps", "x", "v")


def _check_target(target: str, name: str) -> str:
    return check_choice(target, name, _TARGETS)


def _log_c(logsnr: Tensor, target: str) -> Tensor:
    """``log c_target`` with ``L_target = c_target L_x``: ``c_x = 1``, ``c_eps = SNR``, ``c_v = 1 + SNR``."""
    if target == "x":
        return torch.zeros_like(logsnr)
    if target == "eps":
        return logsnr
    return torch.logaddexp(logsnr, torch.zeros_like(logsnr))  # log(1 + SNR); F.softplus cuts off past 20


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """``mean((pred - target)^2)`` over every dim but the first. ``pred, target: (B, ...)`` -> ``[B]``.

    Accumulates in float32 (float64 for float64 inputs) and returns that dtype, also for bf16/fp16 data.
    An empty batch (B = 0) gives an empty ``[0]``.
    """
    check_float(pred, "pred")
    check_float(target, "target")
    check_same_shape(pred, target, "pred", "target")
    if pred.ndim == 0:
        raise ValueError("pred: expected a batch of shape (B, ...), got a 0-d tensor")
    dtype = coef_dtype(pred, target)
    diff = pred.to(dtype) - target.to(dtype)
    return per_sample_flat(diff.pow(2)).mean(dim=1)


def mse_conversion(logsnr: Scalar, *, from_target: str = "eps", to_target: str = "x") -> Tensor:
    """``w = c_to / c_from`` so that ``L_to = w L_from`` for one prediction (module docstring).

    ``c_x = 1``, ``c_eps = SNR``, ``c_v = 1 + SNR``: e.g. eps -> x is ``sigma^2 / alpha^2 = exp(-logsnr)``,
    x -> v is ``1 + SNR``, eps -> v is ``1 / alpha^2``. Computed in log space; shapes as ``logsnr`` (finite).
    """
    _check_target(from_target, "from_target")
    _check_target(to_target, "to_target")
    l = as_coef(logsnr, "logsnr")
    return torch.exp(_log_c(l, to_target) - _log_c(l, from_target))


def eps_mse_from_v(v_pred: Tensor, z: Tensor, eps: Tensor, logsnr: Scalar) -> Tensor:
    """``mse(sigma z + alpha v_pred, eps) = alpha^2 mse(v_pred, v)`` [SD]: a v-network trained on the eps-loss.

    ``v_pred, z, eps: (B, ...)``; ``logsnr: [] or [B]``. Returns ``[B]``; ``eps_hat`` is formed in float32
    (float64 for float64 inputs), not in a bf16/fp16 data dtype.
    """
    check_float(v_pred, "v_pred")
    check_float(z, "z")
    check_float(eps, "eps")
    check_same_shape(z, v_pred, "z", "v_pred")
    check_same_shape(z, eps, "z", "eps")
    dtype = coef_dtype(v_pred, z, eps)
    return mse(eps_from_v(z.to(dtype), v_pred.to(dtype), logsnr), eps)


def weight_min_snr(logsnr: Scalar, *, gamma: float = 5.0, target: str = "eps") -> Tensor:
    """Min-SNR-gamma loss weight [MinSNR]: the x-loss weight ``min(SNR, gamma)`` moved to ``target``.

    eps: ``min(SNR, gamma) / SNR``; x: ``min(SNR, gamma)``; v: ``min(SNR, gamma) / (SNR + 1)``.
    Computed as ``exp(min(logsnr, log gamma) - log c_target)`` (for eps ``exp(min(0, log gamma - logsnr))``);
    shapes as ``logsnr``. The limits are defined: ``logsnr = -inf`` gives 1 (eps), 0 (x, v); ``+inf`` gives
    0 (eps, v), ``gamma`` (x). ``gamma = inf`` is no clipping.
    """
    _check_target(target, "target")
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool)) or not gamma > 0:
        raise ValueError(f"gamma: expected a number > 0, got {gamma!r}")
    l = as_coef(logsnr, "logsnr", posinf=True, neginf=True)
    log_gamma = math.log(gamma)
    if target == "eps":  # min(SNR, gamma) / SNR, with no inf - inf at logsnr = -inf
        return torch.exp(torch.clamp(log_gamma - l, max=0.0))
    return torch.exp(torch.clamp(l, max=log_gamma) - _log_c(l, target))


def weight_edm(sigma: Scalar, *, sigma_data: float = 0.5) -> Tensor:
    """EDM loss weight [EDM Table 1]: ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2``.

    ``sigma`` > 0, a float, ``[]`` or ``[B]`` (``+inf`` gives the limit ``1 / sd^2``); shapes as ``sigma``.
    """
    s = as_coef(sigma, "sigma", posinf=True)
    check_range(s, "sigma", low=0.0, low_open=True)
    sd = check_number(sigma_data, "sigma_data", low=0.0, low_open=True)
    return 1.0 / s.square() + 1.0 / sd**2


def multiscale_mse(pred: Tensor, target: Tensor, *, base: int = 32) -> Tensor:
    """Simple diffusion's multiscale loss [SD]: ``sum_s (1/s) (1/s^2) ||D_s[pred - target]||^2``
    for ``s = d, d/2, ..., base``, ``D_s`` average pooling to ``s x s``. ``(B, C, d, d)`` -> ``[B]``.

    Delegates to :func:`kdiff.kernels.multiscale_mse` (fused kernel, dispatch as in that package).
    """
    check_float(pred, "pred")
    check_float(target, "target")
    check_same_shape(pred, target, "pred", "target")
    from .kernels import multiscale_mse as kernel  # loaded on first use: importing kdiff stays free of numba/Triton

    return kernel(pred, target, base=base)
