"""Classifier-free and classifier guidance as denoiser wrappers, and ADM's guided VP updates.

Conventions:

- ``cfg``: ``D = D_uncond + scale (D_cond - D_uncond)``. ``scale = 1`` is the conditional model,
  ``scale = 0`` the unconditional one. Ho & Salimans write ``eps = (1 + w) eps_cond - w eps_uncond``
  [CFG Eq. 6], so ``scale = 1 + w`` (their ``w = 0`` is plain conditional sampling); codes that
  write ``eps_uncond + g (eps_cond - eps_uncond)`` use ``g = scale``. At fixed ``(x, sigma)``,
  eps, v and denoised are affine in one another, so combining any of them gives the same result.
- ``classifier_guidance``: ``D' = D + scale sigma^2 grad_x log p(y | x, sigma)`` in EDM space,
  from ``grad log p(x | y) = grad log p(x) + grad log p(y | x)`` and Tweedie's
  ``D = x + sigma^2 grad log p(x)``. ``scale`` is ADM's ``s``: it equals :func:`guided_eps`
  with the same ``s`` on a VP model. With the exact class posterior, ``scale = 1`` is the exact
  class-conditional denoiser.

References:
    [CFG] Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6.
    [ADM] Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Algorithms 1 and 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._util import Scalar, check_float, check_same_shape, coef_dtype, per_sample
from .denoisers import Denoise

__all__ = ["cfg", "cfg_batched", "classifier_guidance", "grad_log_prob", "guided_mean", "guided_eps"]


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    return float(scale)


def _combine(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """``uncond + scale (cond - uncond)`` by ``torch.lerp`` in float32 at least, exact at ``scale`` = 0 and 1."""
    check_same_shape(uncond, cond, "denoise_uncond output", "denoise_cond output")
    dtype = coef_dtype(uncond, cond)
    return torch.lerp(uncond.to(dtype), cond.to(dtype), scale).to(uncond.dtype)


def cfg(denoise_cond: Denoise, denoise_uncond: Denoise, *, scale: float) -> Denoise:
    """``D(x, sigma) = D_uncond(x, sigma) + scale (D_cond(x, sigma) - D_uncond(x, sigma))`` [CFG Eq. 6, scale = 1 + w].

    Two forward passes; :func:`cfg_batched` does both in one. ``x: (B, ...)``.
    """
    scale = _check_scale(scale)

    def denoise(x: Tensor, sigma: Scalar) -> Tensor:
        return _combine(denoise_uncond(x, sigma), denoise_cond(x, sigma), scale)

    return denoise


def cfg_batched(denoise: Callable[[Tensor, Scalar, Tensor], Tensor], labels: Tensor, *, scale: float,
                null_label: int) -> Denoise:
    """:func:`cfg` in one forward pass: ``denoise([x; x], [sigma; sigma], [labels; null])`` split in halves.

    ``denoise(x, sigma, labels)`` is a label-conditioned model trained with label dropout, where
    ``null_label`` is the reserved "no label" index [CFG Alg. 1]. ``labels: (B,)`` int64.
    The returned ``denoise(x, sigma)`` takes ``sigma`` as a float, ``[]`` or ``[B]``.
    """
    scale = _check_scale(scale)
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.ndim != 1:
        raise TypeError(f"labels: expected a 1-D integer tensor, got {labels!r}")
    if isinstance(null_label, bool) or not isinstance(null_label, int):
        raise TypeError(f"null_label: expected an int, got {type(null_label).__name__}")

    def guided(x: Tensor, sigma: Scalar) -> Tensor:
        check_float(x, "x")
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels: expected length B={x.shape[0]} (the batch of x), got {labels.shape[0]}")
        if isinstance(sigma, Tensor) and sigma.ndim == 1:
            sigma = torch.cat([sigma, sigma])
        both = torch.cat([labels, torch.full_like(labels, null_label)]).to(x.device)
        out = denoise(torch.cat([x, x]), sigma, both)
        if out.shape[0] != 2 * x.shape[0]:
            raise ValueError(f"denoise: expected a batch of {2 * x.shape[0]} (cond and uncond), got {out.shape[0]}")
        cond, uncond = out.chunk(2)
        return _combine(uncond, cond, scale)

    return guided


def _grad_x(fn: Callable[[Tensor], Tensor], x: Tensor, name: str) -> Tensor:
    """``grad_x sum_b fn(x)_b`` by autograd, also inside ``torch.no_grad``; ``fn(x)`` must be ``[B]``."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = fn(xg)
        if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{name}: expected one value per sample, shape ({x.shape[0]},), got {got}")
        (grad,) = torch.autograd.grad(out.sum(), xg)
    return grad


def grad_log_prob(classifier: Callable[[Tensor, Scalar], Tensor], x: Tensor, sigma: Scalar, y: Tensor) -> Tensor:
    """``grad_x log p(y | x, sigma) = grad_x log_softmax(classifier(x, sigma))[y]`` by autograd.

    ``classifier(x, sigma) -> logits (B, K)``; ``x: (B, ...)``; ``y: (B,)`` int64 class indices.
    Returns the gradient shaped like ``x`` [ADM Sec. 4.1].
    """
    check_float(x, "x")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.shape != (x.shape[0],):
        raise ValueError(f"y: expected an integer tensor of shape ({x.shape[0]},), got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")

    def log_prob(xg: Tensor) -> Tensor:
        logits = classifier(xg, sigma)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier: expected logits of shape ({x.shape[0]}, K), got {tuple(logits.shape)}")
        return torch.log_softmax(logits, dim=-1).gather(1, y.to(logits.device)[:, None])[:, 0]

    return _grad_x(log_prob, x, "classifier")


def classifier_guidance(denoise: Denoise, log_prob: Callable[[Tensor, Scalar], Tensor], *, scale: float) -> Denoise:
    """``D'(x, sigma) = D(x, sigma) + scale sigma^2 grad_x log p(y | x, sigma)`` [ADM Sec. 4, in EDM space].

    ``log_prob(x, sigma) -> (B,)`` is ``log p(y | x, sigma)`` with the requested labels bound in
    (for a classifier: ``log_softmax(logits)[y]``); its gradient comes from autograd.
    """
    scale = _check_scale(scale)

    def guided(x: Tensor, sigma: Scalar) -> Tensor:
        check_float(x, "x")
        denoised = denoise(x, sigma)
        s = per_sample(sigma, "sigma", x)
        grad = _grad_x(lambda xg: log_prob(xg, sigma), x, "log_prob")
        return (denoised.to(s.dtype) + scale * s**2 * grad.to(s.dtype)).to(x.dtype)

    return guided


def guided_mean(mean: Tensor, var: Scalar, grad: Tensor, *, scale: float) -> Tensor:
    """``mean + scale var grad`` [ADM Alg. 1]: the reverse step's mean shifted along ``grad log p(y | z_t)``.

    ``mean, grad: (B, ...)``; ``var``: the step's variance, a float, ``[]``, ``[B]`` or a tensor
    shaped like ``mean`` (a learned per-element variance).
    """
    scale = _check_scale(scale)
    check_float(mean, "mean")
    check_float(grad, "grad")
    check_same_shape(mean, grad, "mean", "grad")
    if isinstance(var, Tensor) and var.ndim == mean.ndim and var.ndim > 1:
        check_float(var, "var")
        check_same_shape(mean, var, "mean", "var")
        v = var.to(coef_dtype(var, mean))
    else:
        v = per_sample(var, "var", mean)
    return (mean.to(v.dtype) + scale * v * grad.to(v.dtype)).to(mean.dtype)


def guided_eps(eps: Tensor, sigma: Scalar, grad: Tensor, *, scale: float) -> Tensor:
    """``eps - scale sqrt(1 - alpha_bar) grad`` [ADM Alg. 2]; ``sigma = sqrt(1 - alpha_bar)`` is the VP std.

    ``eps, grad: (B, ...)`` with ``grad = grad_z log p(y | z_t)``; ``sigma``: float, ``[]`` or ``[B]``
    (the VP noise std, not the EDM sigma).
    """
    scale = _check_scale(scale)
    check_float(eps, "eps")
    check_float(grad, "grad")
    check_same_shape(eps, grad, "eps", "grad")
    s = per_sample(sigma, "sigma", eps)
    return (eps.to(s.dtype) - scale * s * grad.to(s.dtype)).to(eps.dtype)
