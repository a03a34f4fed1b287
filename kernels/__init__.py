"""kdiff.kernels: custom kernels for the hot paths of diffusion training.

Each op has a plain-torch reference (``*_ref``), a Triton implementation (forward and backward)
and, where it pays, a numba CPU kernel. Dispatch: a CUDA tensor goes to Triton; a CPU tensor to
numba where there is one, else to the reference; ``TRITON_INTERPRET=1`` sends CPU tensors through
the Triton code; ``KDIFF_KERNELS=auto|triton|numba|torch`` overrides.
"""

from .attention import attention, attention_ref
from .multiscale import multiscale_mse, multiscale_mse_ref

__all__ = ["attention", "attention_ref", "multiscale_mse", "multiscale_mse_ref"]
