"""kdiff: the math of diffusion models (DDPM, DDIM, Improved DDPM, ADM, EDM, simple diffusion) as
small stateless functions, with custom kernels in :mod:`kdiff.kernels`.

One noise coordinate runs through the library: the log signal-to-noise ratio ``logsnr``, with
``alpha^2 = sigmoid(logsnr)``, ``sigma^2 = sigmoid(-logsnr)``, ``z = alpha x + sigma eps``, and the
EDM noise level ``sigma_ve = exp(-logsnr / 2)``. Samplers work in EDM space through one model
contract, ``denoise(x, sigma) -> x0_hat``.
"""

from . import param, process, schedules

__version__ = "0.1.0"
__all__ = ["param", "process", "schedules"]
