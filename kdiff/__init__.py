"""kdiff: the math of diffusion models (DDPM, DDIM, Improved DDPM, ADM, EDM, simple diffusion) as
small stateless functions, with custom kernels in :mod:`kdiff.kernels`.

One noise coordinate runs through the library: the log signal-to-noise ratio ``logsnr``, with
``alpha^2 = sigmoid(logsnr)``, ``sigma^2 = sigmoid(-logsnr)``, ``z = alpha x + sigma eps``, and the
EDM noise level ``sigma_ve = exp(-logsnr / 2)``. Samplers work in EDM space through one model
contract, ``denoise(x, sigma) -> x0_hat``.

The math modules are imported with the package; ``kdiff.nets``, ``kdiff.data``, ``kdiff.metrics`` and
``kdiff.kernels`` load on first use.
"""

import importlib

from . import denoisers, elbo, guidance, losses, param, process, schedules, solvers
from ._util import set_value_checks

__version__ = "0.1.0"
__all__ = ["set_value_checks", "schedules", "process", "param", "losses", "elbo", "solvers", "denoisers", "guidance",
           "nets", "data", "metrics", "kernels"]

_LAZY = ("nets", "data", "metrics", "kernels")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kdiff' has no attribute {name!r}")
