"""An exactly solvable test bed: data from a Gaussian mixture, everything in float64 closed form.

Data ``y ~ sum_k pi_k N(mu_k, S_k)`` in ``D`` dimensions; a noisy point ``x = y + sigma n`` has the
density ``p_sigma(x) = sum_k pi_k N(x; mu_k, S_k + sigma^2 I)``. With ``C_k = S_k + sigma^2 I``:

- class posterior ``p(k | x, sigma) = softmax_k(log pi_k + log N(x; mu_k, C_k))``;
- conditional denoiser ``E[y | x, k] = mu_k + S_k C_k^-1 (x - mu_k)`` (Gaussian conditioning);
- denoiser ``E[y | x] = sum_k p(k | x, sigma) E[y | x, k]``;
- score ``grad_x log p_sigma(x) = -sum_k p(k | x, sigma) C_k^-1 (x - mu_k)``.

A single Gaussian is the mixture with one component. The module is plain code for the tests; it
imports nothing from kdiff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


def _log_normalize(logits: Tensor) -> Tensor:
    """``logits - logsumexp(logits)`` over the last dim (``torch.log_softmax``'s threaded kernel is
    very slow on tiny tensors on a loaded 2-core machine)."""
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


@dataclass(frozen=True)
class GaussianMixture:
    weights: Tensor  # (K,) mixture weights pi_k, summing to 1
    means: Tensor  # (K, D) component means mu_k
    covs: Tensor  # (K, D, D) component covariances S_k (symmetric positive definite)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_classes(self) -> int:
        return self.means.shape[0]

    def mean(self) -> Tensor:
        """``E[y] = sum_k pi_k mu_k``; ``(D,)``."""
        return self.weights @ self.means

    def cov(self) -> Tensor:
        """``Cov[y] = sum_k pi_k (S_k + mu_k mu_k^T) - E[y] E[y]^T``; ``(D, D)``."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - m[:, None] * m[None, :]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` draws ``(y, k)``: ``y`` of shape ``(n, D)`` float64 and labels ``k`` of shape ``(n,)`` int64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[k]
        e = torch.randn(n, self.dim, 1, dtype=torch.float64, generator=generator)
        return self.means[k] + (chol @ e)[..., 0], k

    @cached_property
    def _eig(self) -> tuple[Tensor, Tensor]:
        """``S_k = U_k diag(lam_k) U_k^T``: ``(lam (K, D), U (K, D, D))``."""
        return torch.linalg.eigh(self.covs)

    def _noisy(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(C_k^-1 (x - mu_k), log N(x; mu_k, C_k))`` for every point and component: ``(B, K, D)``, ``(B, K)``.

        With ``S_k = U_k diag(lam_k) U_k^T``, ``C_k^-1 = U_k diag(1 / (lam_k + sigma^2)) U_k^T``.
        """
        x = x.to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2  # (B or 1, 1, 1)
        lam, u = self._eig
        c = lam[None] + s2  # eigenvalues of C_k: (B or 1, K, D)
        r = torch.einsum("kji,bkj->bki", u, x[:, None, :] - self.means[None])  # U_k^T (x - mu_k)
        sol = torch.einsum("kij,bkj->bki", u, r / c)
        logpdf = -0.5 * ((r * r / c).sum(-1) + torch.log(c).sum(-1) + self.dim * math.log(2 * math.pi))
        return sol, logpdf

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """``log p_sigma(x)``; ``x: (B, D)``, ``sigma`` a float or ``(B,)``; returns ``(B,)``."""
        _, logpdf = self._noisy(x, sigma)
        return torch.logsumexp(torch.log(self.weights) + logpdf, dim=-1)

    def class_log_posterior(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """``log p(k | x, sigma)``; ``(B, K)``."""
        _, logpdf = self._noisy(x, sigma)
        return _log_normalize(torch.log(self.weights) + logpdf)

    def class_log_posterior_grad(self, x: Tensor, sigma: float | Tensor, k: int | Tensor) -> Tensor:
        """``grad_x log p(k | x, sigma) = -C_k^-1 (x - mu_k) + sum_j p(j | x, sigma) C_j^-1 (x - mu_j)``; ``(B, D)``."""
        sol, logpdf = self._noisy(x, sigma)
        post = _log_normalize(torch.log(self.weights) + logpdf).exp()
        idx = torch.as_tensor(k).expand(x.shape[0])
        return -sol[torch.arange(x.shape[0]), idx] + (post[..., None] * sol).sum(1)

    def denoise_class(self, x: Tensor, sigma: float | Tensor, k: int | Tensor) -> Tensor:
        """``E[y | x, class k] = x - sigma^2 C_k^-1 (x - mu_k)`` (equal to ``mu_k + S_k C_k^-1 (x - mu_k)``)."""
        sol, _ = self._noisy(x, sigma)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        idx = torch.as_tensor(k).expand(x.shape[0])
        return x.to(torch.float64) - s2 * sol[torch.arange(x.shape[0]), idx]

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """``E[y | x] = x + sigma^2 grad log p_sigma(x)`` (Tweedie), written as the posterior-weighted sum."""
        sol, logpdf = self._noisy(x, sigma)
        post = _log_normalize(torch.log(self.weights) + logpdf).exp()  # (B, K)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        return x.to(torch.float64) - s2 * (post[..., None] * sol).sum(1)


def two_d_mixture() -> GaussianMixture:
    """Three well separated, correlated components in 2-D with unequal weights."""
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.5, -2.5]], dtype=torch.float64)
    covs = torch.tensor([
        [[0.30, 0.10], [0.10, 0.20]],
        [[0.25, -0.08], [-0.08, 0.35]],
        [[0.20, 0.00], [0.00, 0.15]],
    ], dtype=torch.float64)
    return GaussianMixture(weights, means, covs)


def single_gaussian() -> GaussianMixture:
    """One correlated Gaussian in 3-D."""
    means = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.4, 0.8, 0.0], [-0.2, 0.3, 0.6]], dtype=torch.float64)
    return GaussianMixture(torch.ones(1, dtype=torch.float64), means, (a @ a.T)[None])
