"""simple diffusion (Hoogeboom, Heek, Salimans 2023, "simple diffusion: End-to-end diffusion for high resolution
images"), end to end.

Training (Sec. 2-3): continuous time ``t ~ U[0, 1]``, the cosine log-SNR schedule shifted to the image size
(``logsnr_cosine_shifted``, reference ``noise_size``, Sec. 3.1) or interpolated between two shifts
(``logsnr_cosine_interpolated``), ``z = alpha x + sigma eps``; the network predicts ``v = alpha eps - sigma x``
and is trained with the eps-loss ``||eps_hat - eps||^2``, ``eps_hat = sigma z + alpha v_hat`` (the paper's
weighting; the v-loss and min-SNR are options), optionally through the multiscale loss (Sec. 3.2:
``sum_s (1/s) (1/s^2) ||D_s[eps_hat - eps]||^2`` for ``s = d, d/2, ..., base``). Networks: the U-Net with
its depth at 16x16 and dropout only at low resolutions, or the U-ViT, both with the 5/3 wavelet input
downsampling for 256 and 512 pixels (Sec. 3.3-3.4).
Sampling: the ancestral sampler of the paper (DDPM steps uniform in t, from the VP prior), or DDIM /
DPM-Solver++(2M), on the grid ``schedules.sigmas_from_schedule``.

    python -m recipes.simple                            # digits32, the default: CPU, a few minutes
    python -m recipes.simple --schedule cosine          # the same without the resolution shift
    python -m recipes.simple --preset fashion64         # Fashion-MNIST enlarged to 64x64, one GPU
    python -m recipes.simple --preset imagenet128-unet  # the paper's settings, for users who have the data

digits32 are scikit-learn's 8x8 digits enlarged 4x with nearest-neighbour: a 32x32 image whose information
resolution is 8x8, the situation the schedule shift is for. Their quality number is the digits Frechet
distance with samples reduced back to 8x8 (4x4 average pooling, which returns a training image exactly).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiff import losses, nets, param, schedules, solvers
from kdiff.denoisers import vp_denoiser

from .common import TrainConfig, parse_cli, seed_globals
from .edm import DIGITS_FILES, resolve_data
from .train_loop import Dist, NonFiniteLossError, Rand, close_distributed, init_distributed, train, write_grid

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "shifted", "interpolated")
LOSSES = ("eps", "v", "min_snr")


@dataclasses.dataclass(frozen=True)
class SimpleConfig(TrainConfig):
    """The simple-diffusion recipe: data, network, schedule, loss and sampler on top of the training loop's."""

    data: str = "digits"  # training data: 'digits' (bundled, packed on first use) or a kdiff HDF5 file
    eval_data: str = "digits-test"  # held-out split for the quality number: 'digits-test' or a kdiff HDF5 file
    image_size: int = 8  # stored images are padded (fit='pad') or centre-cropped and resized (fit='resize') to this
    fit: Literal["pad", "resize"] = "pad"  # how stored images are brought to image_size
    enlarge: int = 4  # nearest-neighbour enlargement after that: the model sees image_size * enlarge pixels
    flip: bool = False  # random horizontal flips
    net: str = "unet_digits32"  # a name in kdiff.nets.CONFIGS
    net_channels: int | None = None  # override the network's base width (U-Net only; none: the named config's)
    dropout: float | None = None  # override the network's dropout (none: the named config's)
    conditional: bool = False  # train with class labels (and label dropout)
    label_dropout: float = 0.1  # probability a label is replaced by the "no label" index
    schedule: Literal["cosine", "shifted", "interpolated"] = "shifted"  # log-SNR schedule [SD Sec. 3.1]
    noise_size: int = 64  # shifted: the reference resolution whose plain cosine schedule is matched
    noise_size_low: int = 32  # interpolated: the strongly shifted end, used at high noise (t -> 1)
    noise_size_high: int | None = None  # interpolated: the end used at low noise (none: the model's resolution)
    logsnr_min: float = -15.0  # log-SNR of the unshifted cosine schedule at t = 1
    logsnr_max: float = 15.0  # log-SNR of the unshifted cosine schedule at t = 0
    loss: Literal["eps", "v", "min_snr"] = "eps"  # v-prediction trained on the eps-loss, the v-loss, or min-SNR v
    min_snr_gamma: float = 5.0  # loss='min_snr': the SNR cap gamma
    multiscale: bool = False  # the multiscale loss [SD Sec. 3.2] instead of the plain mean square
    multiscale_base: int = 32  # the coarsest multiscale level (pixels)
    solver: Literal["ddpm", "ddim", "dpmpp_2m"] = "ddpm"  # sampler: ancestral (the paper's), DDIM, DPM-Solver++(2M)
    sample_steps: int = 256  # sampler steps, uniform in t
    grid_samples: int = 100  # images in each sample grid written during training
    eval_samples: int = 1000  # samples drawn after training for the quality number (0: skip)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.net not in nets.CONFIGS:
            raise ValueError(f"net: expected one of {', '.join(nets.CONFIGS)}, got {self.net!r}")
        for name in ("image_size", "enlarge", "noise_size", "noise_size_low", "multiscale_base", "sample_steps",
                     "grid_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)}")
        if self.noise_size_high is not None and self.noise_size_high < self.noise_size_low:
            raise ValueError(f"noise_size_high: expected none or >= noise_size_low={self.noise_size_low}, "
                             f"got {self.noise_size_high}")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples: expected an int >= 0, got {self.eval_samples}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout: expected a probability in [0, 1], got {self.label_dropout}")
        low, high = self.logsnr_min, self.logsnr_max
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"logsnr_min, logsnr_max: expected finite logsnr_min < logsnr_max, got "
                             f"{self.logsnr_min}, {self.logsnr_max}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma: expected a float > 0, got {self.min_snr_gamma}")

    @property
    def resolution(self) -> int:
        """The pixel resolution the model sees: ``image_size * enlarge``."""
        return self.image_size * self.enlarge


_IMAGENET = dict(data="data/imagenet{s}-train.h5", eval_data="data/imagenet{s}-train.h5", fit="resize", enlarge=1,
                 flip=True, conditional=True, label_dropout=0.0, schedule="shifted", noise_size=64, loss="eps",
                 multiscale_base=32, batch_size=2048, lr=1e-4, warmup_steps=10000,
                 ema_rate=0.9999, steps=500000, log_every=500, sample_every=10000, checkpoint_every=10000,
                 num_workers=8, eval_samples=50000, sample_steps=512)


def _imagenet(size: int, net: str) -> SimpleConfig:
    kw = {k: v.format(s=size) if isinstance(v, str) and "{s}" in v else v for k, v in _IMAGENET.items()}
    return SimpleConfig(out_dir=f"runs/simple-imagenet{size}-{net.split('_')[1]}", image_size=size, net=net,
                        multiscale=size > 128, **kw)


PRESETS: dict[str, SimpleConfig] = {
    # CPU, a few minutes: the 8x8 digits enlarged 4x to 32x32, unconditional, the digits Frechet distance.
    "digits32": SimpleConfig(out_dir="runs/simple-digits32", steps=1000, batch_size=64, lr=2e-3, warmup_steps=100,
                             ema_halflife_kimg=10.0, log_every=50, checkpoint_every=500, noise_size=8,
                             multiscale_base=8, sample_steps=32, eval_samples=1000),
    # Fashion-MNIST padded to 32x32 and enlarged 2x to 64x64, one GPU (not yet timed on one). Pack the data
    # first (README). The shift to noise_size 32 undoes the enlargement, as noise_size 8 does for digits32.
    "fashion64": SimpleConfig(out_dir="runs/simple-fashion64", data="data/fashion-train.h5",
                              eval_data="data/fashion-test.h5", image_size=32, enlarge=2, net="unet_fashion64",
                              conditional=True, noise_size=32, multiscale=True, multiscale_base=32,
                              steps=30000, batch_size=256, lr=5e-4, warmup_steps=1000, ema_halflife_kimg=500.0,
                              log_every=200, sample_every=5000, checkpoint_every=5000, num_workers=4,
                              sample_steps=256, eval_samples=50000),
    # The paper's ImageNet settings [SD Table 5-7 (FID train, no guidance)]: U-Net 2.26 / 3.76 / 4.30 and
    # U-ViT 1.94 / 2.77 / 3.54 at 128 / 256 / 512. Shift to 64, eps-loss on v, multiscale loss from 256 up.
    # Data: class subfolders of images centre-cropped and resized to the size, then
    #   python -m kdiff.data pack imagenet-128/train --out data/imagenet128-train.h5
    **{f"imagenet{s}-{kind}": _imagenet(s, f"{'sd_unet' if kind == 'unet' else 'uvit'}_imagenet{s}")
       for s in (128, 256, 512) for kind in ("unet", "uvit")},
}

PUBLISHED_FID = {"imagenet128-unet": 2.26, "imagenet256-unet": 3.76, "imagenet512-unet": 4.30,
                 "imagenet128-uvit": 1.94, "imagenet256-uvit": 2.77, "imagenet512-uvit": 3.54}


# ----------------------------------------------------------------------------------------------
# Schedule, data, model
# ----------------------------------------------------------------------------------------------


def logsnr_schedule(config: SimpleConfig) -> Callable[[Tensor], Tensor]:
    """``t -> logsnr`` of the configured schedule at the model's pixel resolution."""
    bounds = dict(logsnr_min=config.logsnr_min, logsnr_max=config.logsnr_max)
    if config.schedule == "cosine":
        return partial(schedules.logsnr_cosine, **bounds)
    if config.schedule == "shifted":
        return partial(schedules.logsnr_cosine_shifted, image_size=config.resolution, noise_size=config.noise_size,
                       **bounds)
    return partial(schedules.logsnr_cosine_interpolated, image_size=config.resolution,
                   noise_size_low=config.noise_size_low, noise_size_high=config.noise_size_high, **bounds)


def enlarge(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour enlargement ``(B, C, H, W) -> (B, C, factor H, factor W)``: every pixel a block."""
    return x if factor == 1 else x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def reduce(x: Tensor, factor: int) -> Tensor:
    """``factor x factor`` average pooling, the inverse of :func:`enlarge` on enlarged images."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def build_model(config: SimpleConfig, *, in_channels: int, num_classes: int | None) -> nn.Module:
    """The network ``v_hat(z, logsnr, labels)`` of ``config.net`` sized to the data."""
    overrides: dict[str, object] = {"image_size": config.resolution, "in_channels": in_channels,
                                    "num_classes": num_classes}
    if config.net_channels is not None:
        overrides["channels"] = config.net_channels
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    return nets.build(config.net, **overrides)


def num_classes_of(model: nn.Module) -> int | None:
    return getattr(getattr(model, "cfg", None), "num_classes", None)


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def simple_loss(v_pred: Tensor, x: Tensor, eps: Tensor, z: Tensor, logsnr: Tensor, config: SimpleConfig) -> Tensor:
    """The per-sample loss ``[B]`` of a v-prediction: eps-loss, v-loss or min-SNR v-loss, each through the plain
    mean square or the multiscale loss; computed in float32 at least.

    eps-loss: ``L(eps_hat, eps)`` with ``eps_hat = sigma z + alpha v_hat`` (``= alpha^2 L(v_hat, v)`` for the plain
    mean square) [SD Sec. 2]; v-loss: ``L(v_hat, v)``; min-SNR: ``min(SNR, gamma) / (SNR + 1) L(v_hat, v)``.
    """
    dtype = torch.promote_types(v_pred.dtype, torch.float32)
    v_pred, x, eps, z = v_pred.to(dtype), x.to(dtype), eps.to(dtype), z.to(dtype)
    if config.loss == "eps" and not config.multiscale:
        return losses.eps_mse_from_v(v_pred, z, eps, logsnr)
    if config.loss == "eps":
        pred, target = param.eps_from_v(z, v_pred, logsnr), eps
    else:
        pred, target = v_pred, param.v_from_x_eps(x, eps, logsnr)
    per_sample = (losses.multiscale_mse(pred, target, base=config.multiscale_base) if config.multiscale
                  else losses.mse(pred, target))
    if config.loss == "min_snr":
        per_sample = losses.weight_min_snr(logsnr, gamma=config.min_snr_gamma, target="v") * per_sample
    return per_sample


def make_loss_fn(config: SimpleConfig, num_classes: int | None):
    schedule = logsnr_schedule(config)

    def loss_fn(net: nn.Module, batch: Sequence[Tensor], rand: Rand) -> tuple[Tensor, Tensor]:
        """Continuous-time VP training: ``t ~ U[0, 1]``, ``z = alpha x + sigma eps``, loss of ``v_hat(z, logsnr)``;
        position = t."""
        x, labels = batch
        x = enlarge(x, config.enlarge)
        b = x.shape[0]
        t = rand.rand(b).to(x.device)
        logsnr = schedule(t)
        eps = rand.randn_like(x)
        alpha, sigma = (c.view(-1, *[1] * (x.ndim - 1)) for c in schedules.alpha_sigma(logsnr))
        z = alpha * x + sigma * eps
        y = None
        if num_classes is not None:
            keep = rand.rand(b).to(x.device) >= config.label_dropout
            y = torch.where(keep, labels.to(x.device), torch.full_like(labels.to(x.device), num_classes))
        v_pred = net(z, logsnr, y)
        return simple_loss(v_pred, x, eps, z, logsnr, config), t

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def sigmas_for(config: SimpleConfig) -> Tensor:
    """The sampler's grid: the schedule at ``sample_steps`` uniform times from t = 1, then 0."""
    return schedules.sigmas_from_schedule(logsnr_schedule(config), config.sample_steps)


def denoiser(model: nn.Module, labels: Tensor | None):
    """``denoise(x, sigma)`` of the v-prediction network (``vp_denoiser``, conditioning on the log-SNR)."""
    return vp_denoiser(lambda z, logsnr: model(z, logsnr, labels), param="v")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard normal image per seed: image ``i`` depends on ``seeds[i]`` only."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds]).to(device)


@torch.no_grad()
def generate(model: nn.Module, config: SimpleConfig, seeds: Sequence[int], labels: Tensor | None, *,
             shape: tuple[int, int, int], batch_size: int = 256) -> Tensor:
    """Samples in [-1, 1] at the model's resolution, ``(N, C, H, W)`` float32 on CPU. The start is the VP prior
    ``z_T ~ N(0, I)``, i.e. ``x_T = n sqrt(1 + sigma_T^2)`` on the samplers' axis (``sigmas_from_schedule``)."""
    device = next(model.parameters()).device
    sigmas = sigmas_for(config)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        y = labels[start:start + len(chunk)].to(device) if labels is not None else None
        x = initial_noise(chunk, shape, device) * math.sqrt(1.0 + sigmas[0].item() ** 2)
        gen = torch.Generator(device).manual_seed(int(chunk[0]) + 1_000_003)
        x = solvers.sample(denoiser(model, y), x.float(), sigmas, solver=config.solver, generator=gen)
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def make_sample_fn(config: SimpleConfig, shape: tuple[int, int, int]):
    def sample_fn(ema: nn.Module, generator: torch.Generator) -> Tensor:
        seeds = torch.randint(0, 2**31 - 1, (config.grid_samples,), generator=generator, device=generator.device)
        n = num_classes_of(ema)
        labels = None if n is None else torch.arange(config.grid_samples) % n
        return generate(ema, config, seeds.tolist(), labels, shape=shape)

    return sample_fn


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def run(config: SimpleConfig, *, resume: Path | None = None, dist: Dist | None = None) -> dict[str, float]:
    from kdiff import data

    dist = dist or init_distributed(config.device)
    dataset = data.H5Dataset(resolve_data(config.data), size=config.image_size, fit=config.fit,
                             flip_p=0.5 if config.flip else 0.0, seed=config.seed)
    c, h, w = dataset[0][0].shape
    num_classes = len(dataset.class_names) if config.conditional else None
    seed_globals(config.seed)
    model = build_model(config, in_channels=c, num_classes=num_classes)
    shape = (c, h * config.enlarge, w * config.enlarge)
    if dist.rank == 0:
        print(f"simple: {config.net} with {nets.count_params(model):,} parameters, {len(dataset):,} training images "
              f"{c}x{h}x{w} enlarged to {shape[1]}x{shape[2]}, {config.schedule} schedule, {config.loss}-loss"
              f"{' (multiscale)' if config.multiscale else ''}, {config.steps} steps of {config.batch_size}",
              file=sys.stderr)
    result = train(config, model=model, loss_fn=make_loss_fn(config, num_classes), dataset=dataset,
                   sample_fn=make_sample_fn(config, shape), resume=resume, dist=dist)
    scores: dict[str, float] = dict(result.metrics)
    if dist.rank == 0 and config.eval_samples > 0:
        n = config.eval_samples
        labels = None if num_classes is None else torch.arange(n) % num_classes
        images = generate(result.ema, config, list(range(n)), labels, shape=shape)
        write_grid(images[:100], Path(config.out_dir) / "samples.png")
        torch.save(images, Path(config.out_dir) / "samples.pt")
        if config.eval_data in DIGITS_FILES:
            scores["frechet_pixels"] = pixel_frechet(reduce(images, config.enlarge))
            print(f"frechet_pixels: {scores['frechet_pixels']:.4f}")
    return scores


def pixel_frechet(images: Tensor) -> float:
    """Frechet distance of 8x8 samples to the real test digits in raw pixel space (a stand-in metric)."""
    from kdiff import data, metrics

    test, _ = data.digits_arrays(split="test")
    u8 = data.uint8_from_x(images).permute(0, 2, 3, 1).numpy()
    a = u8.reshape(len(u8), -1).astype("float64") / 255.0
    b = test.reshape(len(test), -1).astype("float64") / 255.0
    mu_a, s_a = metrics.feature_stats(a)
    mu_b, s_b = metrics.feature_stats(b)
    return metrics.frechet_distance(mu_a, s_a, mu_b, s_b)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cli = parse_cli(SimpleConfig, PRESETS, argv, default_preset="digits32", prog="python -m recipes.simple")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed(cli.config.device)
    try:
        run(cli.config, resume=cli.resume, dist=dist)
    except (FileNotFoundError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close_distributed(dist)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
