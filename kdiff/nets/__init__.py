"""Networks for diffusion models: the ADM U-Net family, simple diffusion's U-ViT, ADM's noisy classifier.

Every denoising network maps ``(x, noise_cond, labels=None) -> out`` with ``x: (B, C, H, W)``,
``noise_cond`` a float or ``(B,)`` tensor fed to the noise-level embedding as is (EDM's ``c_noise``,
the log-SNR, or a timestep), and ``labels: (B,)`` integers in ``[0, num_classes]`` where
``num_classes`` is the reserved "no label" index used for classifier-free guidance (``None`` means
"no label" for the whole batch). Attention goes through :func:`kdiff.kernels.attention`.
"""

from .classifier import AttentionPool2d, ClassifierConfig, NoisyClassifier
from .configs import CONFIGS, build, count_params
from .dwt import downsample_input, dwt, idwt, upsample_output
from .layers import (
    AdaGN,
    Downsample,
    GroupNorm32,
    LabelEmbedding,
    NoiseEmbedding,
    ResBlock,
    SelfAttention2d,
    TransformerBlock,
    Upsample,
    drop_labels,
    null_labels,
    sinusoidal_embedding,
)
from .mlp import MLP, MLPConfig
from .unet import TrunkConfig, UNet, UNetConfig
from .uvit import UViT, UViTConfig

__all__ = [
    "UNet", "UNetConfig", "TrunkConfig", "UViT", "UViTConfig", "NoisyClassifier", "ClassifierConfig",
    "CONFIGS", "build", "count_params", "dwt", "idwt", "downsample_input", "upsample_output",
    "drop_labels", "null_labels", "sinusoidal_embedding", "NoiseEmbedding", "LabelEmbedding", "GroupNorm32",
    "AdaGN", "ResBlock", "Downsample", "Upsample", "SelfAttention2d", "TransformerBlock", "AttentionPool2d",
    "MLP", "MLPConfig",
]
