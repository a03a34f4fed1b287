"""Named network configurations: the papers' architectures and small ones for CPU tests and quick runs.

``CONFIGS[name]`` is a frozen config dataclass; ``build(name, **overrides)`` returns the module
(``build("adm_imagenet64", attention="sdpa")``). Build big ones under ``torch.device("meta")`` to
count parameters without allocating memory.

Sources of the published shapes:
    ddpm_cifar10       [DDPM App. B]: ch 128, mult 1-2-2-2, 2 blocks, attention at 16x16, dropout 0.1 (35.7M).
    iddpm_*            [iDDPM Sec. 2.4, 3.1 and its released run flags]: 3 blocks, 4 heads, attention at
                       16x16 and 8x8, AdaGN, learned variance; CIFAR-10 dropout 0.3.
    adm_imagenet*      [ADM Table 1, App. C and its released run flags]: AdaGN, BigGAN resampling,
                       attention at 32, 16, 8; 64: ch 192, mult 1-2-3-4, 3 blocks, 64 channels per
                       head, dropout 0.1; 128: ch 256, mult 1-1-2-3-4, 2 blocks, 4 heads;
                       256: ch 256, mult 1-1-2-2-4-4, 2 blocks, 64 channels per head.
    adm_classifier_*   [ADM Sec. 4.1, App. C]: width 128, the diffusion model's multipliers, depth 4
                       (64x64) or 2, attention at 32, 16, 8, attention pooling at 8x8.
    uvit_imagenet*     [SD Sec. 3.2-3.4]: convolutional levels 128-256-512 down to 16x16, 36
                       transformer blocks of width 2048, dropout 0.1 except at the highest resolution;
                       256 and 512 reach 128x128 through 1 or 2 levels of the 5/3 wavelet transform.

References:
    [DDPM] Ho, Jain, Abbeel 2020. [iDDPM] Nichol, Dhariwal 2021. [ADM] Dhariwal, Nichol 2021.
    [SD] Hoogeboom, Heek, Salimans 2023, "simple diffusion".
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .classifier import ClassifierConfig, NoisyClassifier
from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig
from .uvit import UViT, UViTConfig

__all__ = ["CONFIGS", "build", "count_params"]

_ADM = dict(adagn=True, biggan=True, learn_variance=True, attn_resolutions=(32, 16, 8), num_classes=1000)
_IDDPM = dict(channels=128, num_blocks=3, attn_resolutions=(16, 8), num_heads=4, adagn=True, learn_variance=True)
_ADM_CLS = dict(channels=128, attn_resolutions=(32, 16, 8), head_channels=64, adagn=True, biggan=True,
                num_classes=1000)
_UVIT = dict(channels=(128, 256, 512), num_blocks=2, conv_dropout=(0.0, 0.1, 0.1), width=2048, depth=36,
             head_channels=128, dropout=0.1, num_classes=1000)

CONFIGS: dict[str, UNetConfig | UViTConfig | ClassifierConfig | MLPConfig] = {
    # published architectures
    "ddpm_cifar10": UNetConfig(image_size=32, channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2,
                               attn_resolutions=(16,), dropout=0.1),
    "iddpm_cifar10": UNetConfig(image_size=32, channel_mult=(1, 2, 2, 2), dropout=0.3, **_IDDPM),
    "iddpm_imagenet64": UNetConfig(image_size=64, channel_mult=(1, 2, 3, 4), **_IDDPM),
    "adm_imagenet64": UNetConfig(image_size=64, channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                                 head_channels=64, dropout=0.1, **_ADM),
    "adm_imagenet128": UNetConfig(image_size=128, channels=256, channel_mult=(1, 1, 2, 3, 4), num_blocks=2,
                                  num_heads=4, **_ADM),
    "adm_imagenet256": UNetConfig(image_size=256, channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_blocks=2,
                                  head_channels=64, **_ADM),
    "adm_classifier_imagenet64": ClassifierConfig(image_size=64, channel_mult=(1, 2, 3, 4), num_blocks=4, **_ADM_CLS),
    "adm_classifier_imagenet128": ClassifierConfig(image_size=128, channel_mult=(1, 1, 2, 3, 4), num_blocks=2,
                                                   **_ADM_CLS),
    "adm_classifier_imagenet256": ClassifierConfig(image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), num_blocks=2,
                                                   **_ADM_CLS),
    "uvit_imagenet128": UViTConfig(image_size=128, **_UVIT),
    "uvit_imagenet256": UViTConfig(image_size=256, input_transform="legall53", input_levels=1, **_UVIT),
    "uvit_imagenet512": UViTConfig(image_size=512, input_transform="legall53", input_levels=2, **_UVIT),
    # small ones: CPU tests, the digits (8x8) and Fashion-MNIST (28x28 padded to 32x32) runs
    "unet_tiny": UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                            num_heads=2, norm_groups=8, adagn=True, biggan=True, num_classes=10),
    "unet_digits": UNetConfig(image_size=8, in_channels=1, channels=64, channel_mult=(1, 2), num_blocks=2,
                              attn_resolutions=(4,), head_channels=32, adagn=True, dropout=0.1, norm_groups=16,
                              num_classes=10),
    "unet_fashion": UNetConfig(image_size=32, in_channels=1, channels=64, channel_mult=(1, 1, 2), num_blocks=2,
                               attn_resolutions=(16, 8), head_channels=32, adagn=True, biggan=True, dropout=0.1,
                               num_classes=10),
    "uvit_tiny": UViTConfig(image_size=16, channels=(16, 32), conv_dropout=(0.0, 0.0), width=32, depth=2,
                            head_channels=8, dropout=0.0, norm_groups=8, num_classes=10),
    "uvit_fashion": UViTConfig(image_size=32, in_channels=1, channels=(64, 128), conv_dropout=(0.0, 0.1), width=256,
                               depth=6, head_channels=64, dropout=0.1, num_classes=10),
    "mlp_digits": MLPConfig(image_size=8, in_channels=1, width=256, depth=3),
    "classifier_tiny": ClassifierConfig(image_size=8, channels=16, channel_mult=(1, 2), num_blocks=1,
                                        attn_resolutions=(4,), num_heads=2, norm_groups=8, adagn=True, biggan=True,
                                        num_classes=10),
}


def build(name: str, **overrides: object) -> nn.Module:
    """The network of ``CONFIGS[name]`` with fields replaced by ``overrides``."""
    if name not in CONFIGS:
        raise ValueError(f"name: expected one of {', '.join(CONFIGS)}, got {name!r}")
    cfg = replace(CONFIGS[name], **overrides)
    if isinstance(cfg, UViTConfig):
        return UViT(cfg)
    if isinstance(cfg, ClassifierConfig):
        return NoisyClassifier(cfg)
    if isinstance(cfg, MLPConfig):
        return MLP(cfg)
    return UNet(cfg)


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
