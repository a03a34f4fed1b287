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
- ``sigma`` is always EDM's noise level (``x = y + sigma n``). ADM's VP quantities keep VP names:
  the latent ``z = alpha x`` with ``alpha = 1 / sqrt(1 + sigma^2)``, its noise std
  ``sigma_vp = sqrt(1 - alpha_bar) = sigma / sqrt(1 + sigma^2)``, and ``grad_z = grad_x / alpha``.
- A noisy classifier ``(z, noise_cond) -> logits`` becomes the EDM-space ``log_prob(x, sigma, y)``
  through :func:`noisy_classifier_log_prob`, so guiding any kdiff denoiser reads::

      log_prob = noisy_classifier_log_prob(classifier, alphas_bar=alphas_bar)  # trained on table indices
      guided = classifier_guidance(denoise, log_prob, y=labels, scale=2.0)
      images = solvers.sample(guided, noise, sigmas)

References:
    [CFG] Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6.
    [ADM] Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", Algorithms 1 and 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._util import Scalar, _checking, check_float, check_range, check_same_shape, coef_dtype, per_sample
from .denoisers import Denoise, timestep_from_sigma
from .schedules import alpha_sigma, logsnr_from_sigma

__all__ = ["cfg", "cfg_batched", "classifier_guidance", "label_log_prob", "noisy_classifier_log_prob",
           "grad_log_prob", "guided_mean", "guided_eps", "LogProb"]

LogProb = Callable[..., Tensor]
"""``log_prob(x, sigma, y) -> (B,)``, or ``log_prob(x, sigma)`` with the labels bound in."""


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


def _labels(y: Tensor | int, batch: int) -> Tensor:
    """``y`` as int64 ``(B,)``: a Python int (one class for the batch) or an integer ``[]`` or ``(B,)`` tensor."""
    if isinstance(y, bool) or not isinstance(y, (int, Tensor)):
        raise TypeError(f"y: expected class indices as an int or an integer tensor of shape ({batch},), "
                        f"got {type(y).__name__}")
    if isinstance(y, int):
        return torch.full((batch,), y, dtype=torch.int64)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y: expected an integer tensor of class indices, got dtype {y.dtype}")
    if y.ndim == 0:
        return y.to(torch.int64).expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"y: expected an integer tensor of shape ({batch},), got {tuple(y.shape)}")
    return y.to(torch.int64)


def label_log_prob(logits: Tensor, y: Tensor | int) -> Tensor:
    """``log p(y | .) = log_softmax(logits)[y]`` per sample, computed in float32 at least.

    ``logits: (B, K)``; ``y``: an int or an integer ``(B,)`` tensor with values in ``[0, K)``
    (else TypeError / ValueError naming ``y``). Returns ``(B,)``.
    """
    check_float(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits: expected shape (B, K), got {tuple(logits.shape)}")
    labels = _labels(y, logits.shape[0]).to(logits.device)
    k = logits.shape[1]
    if _checking() and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"y: expected class indices in [0, {k - 1}] (the classifier has K={k} classes), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    lp = torch.log_softmax(logits.to(coef_dtype(logits)), dim=-1)
    return lp.gather(1, labels[:, None])[:, 0]


def noisy_classifier_log_prob(classifier: Callable[[Tensor, Tensor], Tensor], *, alphas_bar: Tensor | None = None,
                              nearest: bool = False,
                              noise_cond: Callable[[Tensor], Tensor] | None = None) -> LogProb:
    """``log p(y | x, sigma) = log_softmax(classifier(z, c))[y]`` with ``z = x / sqrt(1 + sigma^2)`` [ADM Sec. 4.1].

    Turns a classifier trained on VP latents ``z_t = alpha_t x_0 + sigma_t eps`` into the EDM-space
    ``log_prob(x, sigma, y)`` that :func:`classifier_guidance` takes. ``c`` is the noise
    conditioning the classifier was trained with, from ``logsnr = -2 log sigma``:

    - default: ``c = logsnr``;
    - ``alphas_bar`` (a discrete ``(T,)`` table): ``c = t``, the table index of
      :func:`kdiff.denoisers.timestep_from_sigma` (a float, or the nearest int64 with ``nearest=True``);
    - ``noise_cond``: ``c = noise_cond(logsnr)``, any map ``(B,) -> (B,)`` (e.g. a continuous ``t``).

    The returned function takes ``x: (B, ...)`` float, ``sigma > 0`` (float, ``[]`` or ``[B]``), and
    ``y`` (an int or an integer ``(B,)`` tensor in ``[0, K)``) and returns ``(B,)``; its gradient in
    ``x`` flows through ``z``, so ``grad_x = alpha grad_z``. ``c`` is float32, or float64 for float64 ``x``.
    """
    if alphas_bar is not None and noise_cond is not None:
        raise ValueError("noise_cond: expected either alphas_bar or noise_cond, got both")
    if alphas_bar is not None:
        check_float(alphas_bar, "alphas_bar")
    if noise_cond is not None and not callable(noise_cond):
        raise TypeError(f"noise_cond: expected a callable logsnr -> conditioning, got {type(noise_cond).__name__}")

    def log_prob(x: Tensor, sigma: Scalar, y: Tensor | int) -> Tensor:
        check_float(x, "x")
        s = per_sample(sigma, "sigma", x)
        check_range(s, "sigma", low=0.0, low_open=True)
        s_b = s.reshape(-1).expand(x.shape[0])
        logsnr = logsnr_from_sigma(s_b)
        alpha = per_sample(alpha_sigma(logsnr)[0], "alpha", x)
        z = (alpha * x.to(alpha.dtype)).to(x.dtype)
        if alphas_bar is not None:
            c = timestep_from_sigma(s_b, alphas_bar, nearest=nearest)
        elif noise_cond is not None:
            c = noise_cond(logsnr)
        else:
            c = logsnr
        if isinstance(c, Tensor) and c.is_floating_point():
            c = c.to(coef_dtype(x))
        logits = classifier(z, c)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"classifier: expected logits of shape ({x.shape[0]}, K), got {got}")
        return label_log_prob(logits, y)

    return log_prob


def grad_log_prob(classifier: Callable[[Tensor, Scalar], Tensor], z: Tensor, noise_cond: Scalar,
                  y: Tensor | int) -> Tensor:
    """``grad_z log p(y | z) = grad_z log_softmax(classifier(z, noise_cond))[y]`` by autograd [ADM Sec. 4.1].

    The gradient in the classifier's own input: ``z: (B, ...)`` and ``noise_cond`` (anything the
    classifier takes, e.g. the VP latent ``z_t`` and its timestep ``t`` for ADM's Algorithms 1 and 2).
    ``classifier(z, noise_cond) -> logits (B, K)``; ``y``: an int or an integer ``(B,)`` tensor in
    ``[0, K)``. Returns the gradient shaped like ``z``, also inside ``torch.no_grad``.
    """
    check_float(z, "z")
    labels = _labels(y, z.shape[0])

    def log_prob(zg: Tensor) -> Tensor:
        logits = classifier(zg, noise_cond)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != z.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"classifier: expected logits of shape ({z.shape[0]}, K), got {got}")
        return label_log_prob(logits, labels)

    return _grad_x(log_prob, z, "classifier")


def classifier_guidance(denoise: Denoise, log_prob: LogProb, *, scale: float, y: Tensor | int | None = None) -> Denoise:
    """``D'(x, sigma) = D(x, sigma) + scale sigma^2 grad_x log p(y | x, sigma)`` [ADM Sec. 4, in EDM space].

    ``log_prob(x, sigma, y) -> (B,)`` is ``log p(y | x, sigma)`` (:func:`noisy_classifier_log_prob`
    builds it from a noisy classifier); with ``y=None`` it is called as ``log_prob(x, sigma)``, the
    labels bound in. Its gradient comes from autograd. A denoiser returning ``(denoised, frac)``
    (a learned variance, ``denoisers.vp_denoiser``) gives ``(guided, frac)``.
    """
    scale = _check_scale(scale)
    if y is not None:  # type and dtype now; the batch is checked at each call
        _labels(y, y.shape[0] if isinstance(y, Tensor) and y.ndim == 1 else 1)

    def guided(x: Tensor, sigma: Scalar) -> Tensor | tuple[Tensor, Tensor]:
        check_float(x, "x")
        out = denoise(x, sigma)
        denoised, frac = out if isinstance(out, tuple) else (out, None)
        if scale == 0.0:
            return out
        s = per_sample(sigma, "sigma", x)
        fn = (lambda xg: log_prob(xg, sigma)) if y is None else (lambda xg: log_prob(xg, sigma, y))
        grad = _grad_x(fn, x, "log_prob")
        result = (denoised.to(s.dtype) + scale * s**2 * grad.to(s.dtype)).to(x.dtype)
        return result if frac is None else (result, frac)

    return guided


def _variance(var: Scalar, like: Tensor) -> Tensor:
    """A step variance as a coefficient broadcastable to ``like``: a float, ``[]``, ``[B]``, or a tensor
    of ``like``'s rank whose dims are 1 or match (``(B, 1, ..., 1)`` from ``process.posterior``, or
    per element); ValueError if negative or NaN."""
    if isinstance(var, Tensor) and var.ndim == like.ndim and var.ndim > 1:
        check_float(var, "var")
        if any(a not in (1, b) for a, b in zip(var.shape, like.shape)):
            raise ValueError(f"var: expected a shape broadcastable to {tuple(like.shape)} (the shape of mean), "
                             f"got {tuple(var.shape)}")
        v = var.to(device=like.device, dtype=coef_dtype(var, like))
    else:
        v = per_sample(var, "var", like)
    check_range(v, "var", low=0.0)
    return v


def guided_mean(mean: Tensor, var: Scalar, grad: Tensor, *, scale: float) -> Tensor:
    """``mean + scale var grad`` [ADM Alg. 1]: the reverse step's mean shifted along ``grad log p(y | z_t)``.

    All three in one frame: ADM's is VP, ``mean`` of ``z_{t-1}``, ``var`` its variance, and
    ``grad = grad_{z_t} log p(y | z_t)`` (:func:`grad_log_prob`). ``mean, grad: (B, ...)``;
    ``var >= 0``: a float, ``[]``, ``[B]``, the ``(B, 1, ..., 1)`` variance of ``process.posterior``,
    or a tensor shaped like ``mean`` (a learned per-element variance).
    """
    scale = _check_scale(scale)
    check_float(mean, "mean")
    check_float(grad, "grad")
    check_same_shape(mean, grad, "mean", "grad")
    v = _variance(var, mean)
    return (mean.to(v.dtype) + scale * v * grad.to(v.dtype)).to(mean.dtype)


def guided_eps(eps: Tensor, sigma_vp: Scalar, grad: Tensor, *, scale: float) -> Tensor:
    """``eps - scale sigma_vp grad`` with ``sigma_vp = sqrt(1 - alpha_bar_t)`` [ADM Alg. 2].

    VP frame: ``eps: (B, ...)`` the model's noise prediction at ``z_t``, ``grad = grad_{z_t} log p(y | z_t)``
    (:func:`grad_log_prob`), ``sigma_vp`` the VP noise std in ``[0, 1]`` (float, ``[]`` or ``[B]``;
    from EDM's sigma: ``sigma / sqrt(1 + sigma^2)``). The same update in EDM's frame is
    ``eps - scale sigma grad_x``, since ``grad_x = alpha grad_z`` and ``sigma = sigma_vp / alpha``.
    """
    scale = _check_scale(scale)
    check_float(eps, "eps")
    check_float(grad, "grad")
    check_same_shape(eps, grad, "eps", "grad")
    s = per_sample(sigma_vp, "sigma_vp", eps)
    check_range(s, "sigma_vp", low=0.0, high=1.0)
    return (eps.to(s.dtype) - scale * s * grad.to(s.dtype)).to(eps.dtype)
