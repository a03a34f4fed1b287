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
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiff import data, losses, metrics, nets, param, schedules
from kdiff.denoisers import vp_denoiser
from kdiff.guidance import cfg_batched

from .checkpoints import RunLock, seed_globals
from .distributed import Dist, Rand, init_distributed
from .grids import write_grid
from .image import (
    DIGITS_FILES,
    DataInfo,
    Denoise,
    ImageConfig,
    ImageRecipe,
    build_net,
    check_sampling,
    crop_to,
    data_info,
    dataset_for,
    grid_labels,
    resolve_data,
    sample_images,
    write_samples,
)
from .loop import LossFn, train

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------



@dataclasses.dataclass(frozen=True)
class SimpleConfig(ImageConfig):
    """The simple-diffusion recipe: schedule, loss and enlargement on top of the image recipes' fields."""

    net: str = "unet_digits32"  # a name in kdiff.nets.CONFIGS
    conditional: bool = False  # train with class labels (and label dropout for classifier-free guidance)
    enlarge: int = 4  # nearest-neighbour enlargement of the data: the model sees image_size * enlarge pixels
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
    solver: Literal["ddpm", "ddim", "dpmpp_2m", "heun", "euler"] = "ddpm"  # sampler (ddpm: the paper's ancestral)
    sample_steps: int = 256  # sampler steps, uniform in t

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("enlarge", "noise_size", "noise_size_low", "multiscale_base"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)}")
        if self.noise_size_high is not None and self.noise_size_high < self.noise_size_low:
            raise ValueError(f"noise_size_high: expected none or >= noise_size_low={self.noise_size_low}, "
                             f"got {self.noise_size_high}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"logsnr_min, logsnr_max: expected logsnr_min < logsnr_max, got "
                             f"{self.logsnr_min}, {self.logsnr_max}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma: expected a float > 0, got {self.min_snr_gamma}")

    @property
    def resolution(self) -> int:
        """The pixel resolution the model sees: ``image_size * enlarge``."""
        return self.image_size * self.enlarge


_IMAGENET = dict(data="data/imagenet{s}-train.h5", eval_data="data/imagenet{s}-train.h5", enlarge=1,
                 flip=True, conditional=True, label_dropout=0.0, schedule="shifted", noise_size=64, loss="eps",
                 multiscale_base=32, batch_size=2048, lr=1e-4, warmup_steps=10000,
                 ema_rate=0.9999, steps=500000, log_every=500, sample_every=10000, checkpoint_every=10000,
                 num_workers=8, eval_samples=50000, sample_steps=512)


def _imagenet(size: int, net: str) -> SimpleConfig:
    kw = {k: v.format(s=size) if isinstance(v, str) and "{s}" in v else v for k, v in _IMAGENET.items()}
    return SimpleConfig(out_dir=f"runs/simple-imagenet{size}-{net.split('_')[1]}", image_size=size, net=net,
                        multiscale=size > 128, **kw)


PRESETS: dict[str, SimpleConfig] = {
    # CPU, about 3.5 min of one core: the 8x8 digits enlarged 4x to 32x32, unconditional, the digits Frechet distance.
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
    # The paper's ImageNet settings; its FIDs (against the training set): U-Net 2.26 / 3.76 / 4.30 and U-ViT
    # 1.94 / 2.77 / 3.54 at 128 / 256 / 512. Shift to 64, eps-loss on v, multiscale loss from 256 up; the
    # optimizer settings and the length are this recipe's choice, not the paper's.
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


def build_model(config: SimpleConfig, info: DataInfo) -> nn.Module:
    """The network ``v_hat(z, logsnr, labels)`` of ``config.net`` at the model's (enlarged) resolution: ``info`` is
    the enlarged view (:func:`enlarged_info`)."""
    return build_net(config, info)


def enlarged_info(config: SimpleConfig, info: DataInfo) -> DataInfo:
    """The model's view of the data: ``info`` with its sides (and the unpadded data size) times ``enlarge``."""
    c, h, w = info.shape
    k = config.enlarge
    return DataInfo((c, h * k, w * k), info.num_classes, None if info.data_size is None else info.data_size * k)


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


def make_loss_fn(config: SimpleConfig, info: DataInfo, state: dict[str, Any] | None = None) -> LossFn:
    """``loss_fn(net, (x, labels), rand) -> (loss [b], t [b])`` for batches at the stored resolution."""
    schedule = logsnr_schedule(config)
    num_classes = info.num_classes

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


def start_scale(config: SimpleConfig, sigmas: Tensor) -> float:
    """The VP prior ``z_T ~ N(0, I)`` on the samplers' axis: ``x_T = n / alpha_T = n sqrt(1 + sigma_T^2)``."""
    return math.sqrt(1.0 + float(sigmas[0]) ** 2)


def denoiser(model: nn.Module, config: SimpleConfig, labels: Tensor | None,
             extras: Mapping[str, nn.Module] | None = None) -> Denoise:
    """``denoise(x, sigma)`` of the v-prediction network (``vp_denoiser``, conditioned on the log-SNR), with
    classifier-free guidance when labelled and ``guidance != 1``."""
    num_classes = getattr(getattr(model, "cfg", None), "num_classes", None)
    if labels is None or num_classes is None or config.guidance == 1.0:
        y = labels if num_classes is not None else None
        return vp_denoiser(lambda z, logsnr: model(z, logsnr, y), param="v")

    def labelled(x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        return vp_denoiser(lambda z, logsnr: model(z, logsnr, y), param="v")(x, sigma)

    return cfg_batched(labelled, labels, scale=config.guidance, null_label=num_classes)


@dataclasses.dataclass(frozen=True)
class SimpleRecipe(ImageRecipe):
    """The image recipe whose ``run`` is this module's (enlarged data, reduced scoring)."""

    def run(self, config: Any, *, resume: Path | None = None, dist: Dist | None = None) -> dict[str, float]:
        return run(config, resume=resume, dist=dist)


RECIPE = SimpleRecipe(name="simple", config=SimpleConfig, presets=PRESETS, default_preset="digits32",
                      loss=make_loss_fn, denoiser=denoiser, sigmas=sigmas_for, start_scale=start_scale,
                      build_model=build_model)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(ema: nn.Module, config: SimpleConfig, info: DataInfo, *, out_dir: Path,
             progress: bool = True) -> dict[str, float]:
    """Draw ``eval_samples`` samples (seeds 0..N-1, labels cycling), save them (HDF5 and a grid) at the model's
    resolution, reduce them to the data's (crop the padding, ``enlarge x enlarge`` average pooling, which returns a
    training image exactly) and score them there: the digits Frechet distance and its real-data floor (and the
    digit classifier's accuracy when labelled) for the digits, FID against ``eval_data`` otherwise."""
    n = config.eval_samples
    labels = grid_labels(n, info.num_classes)
    t0 = time.perf_counter()
    images = sample_images(RECIPE, ema, config, info, list(range(n)), labels, progress=progress)
    result = {"sample_seconds": time.perf_counter() - t0}
    write_samples(out_dir / "samples.h5", data.uint8_from_x(images).permute(0, 2, 3, 1).numpy(), labels, info,
                  source=f"recipes.simple: {config.solver}, {config.sample_steps} steps, guidance {config.guidance}")
    write_grid(images[:100], out_dir / "samples.png")
    small = reduce(crop_to(images, info.data_size), config.enlarge)
    u8 = data.uint8_from_x(small).permute(0, 2, 3, 1).numpy()
    if config.eval_data in DIGITS_FILES and u8.shape[1:] == (8, 8, 1):
        result["digits_fd"] = metrics.digits_frechet_distance(u8)
        result["digits_fd_real_train"] = metrics.digits_frechet_floor()
        if labels is not None:
            result["digits_accuracy"] = metrics.digits_accuracy(u8, labels.numpy())
    elif config.eval_data not in DIGITS_FILES:
        result["fid"] = metrics.fid(u8, resolve_data(config.eval_data), progress=progress)
    return result


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def run(config: SimpleConfig, *, resume: Path | None = None, dist: Dist | None = None) -> dict[str, float]:
    """The image machinery's run (``recipes.image.run``) with two changes of its own: the model sees the data
    enlarged (``enlarged_info``; the loss enlarges each batch) and the samples are scored reduced back."""
    if not isinstance(config, SimpleConfig):
        raise TypeError(f"config: expected a SimpleConfig, got {type(config).__name__}")
    dist = dist or init_distributed(config.device)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir: expected a directory (or a new path), got the file {str(out_dir)!r}")
    dataset = dataset_for(config)
    if config.batch_size > len(dataset):
        raise ValueError(f"--batch-size: expected at most the {len(dataset)} training images of {config.data!r}, "
                         f"got {config.batch_size}")
    stored = data_info(config, dataset)
    info = enlarged_info(config, stored)
    seed_globals(config.seed)  # the initial weights depend on the seed only
    try:
        model = build_model(config, info)
    except (ValueError, TypeError) as e:
        raise ValueError(f"network settings (--net, --net-channels, --dropout, --image-size, --enlarge): {e}") from None
    check_sampling(RECIPE, model, config, info)
    if dist.rank == 0:
        print(f"simple: {config.net} with {nets.count_params(model):,} parameters, {len(dataset):,} training images "
              f"{'x'.join(map(str, stored.shape))} enlarged to {'x'.join(map(str, info.shape))}, {config.schedule} "
              f"schedule, {config.loss}-loss{' (multiscale)' if config.multiscale else ''}, {config.steps} steps of "
              f"{config.batch_size} on {dist.device}", file=sys.stderr)
    lock = RunLock(out_dir) if dist.rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        def sample_fn(ema: nn.Module, generator: torch.Generator, extras: Mapping[str, nn.Module]) -> Tensor:
            seeds = torch.randint(0, 2**31 - 1, (config.grid_samples,), generator=generator, device=generator.device)
            return sample_images(RECIPE, ema, config, info, seeds.tolist(),
                                 grid_labels(config.grid_samples, info.num_classes))

        result = train(config, model=model, loss_fn=make_loss_fn(config, info), dataset=dataset, sample_fn=sample_fn,
                       resume=resume, dist=dist, recipe=RECIPE.name, info=info.to_dict(), lock=False)
        scores: dict[str, float] = dict(result.metrics)
        if dist.rank == 0 and config.eval_samples > 0:
            scores.update(evaluate(result.ema, config, info, out_dir=out_dir, progress=config.progress))
            for key, value in scores.items():
                if key.startswith(("digits", "fid")):
                    print(f"{key}: {value:.4f}")
        if dist.rank == 0:
            print(f"samples: {out_dir / 'samples.png'}  checkpoint: {result.checkpoint}", file=sys.stderr)
    finally:
        if lock is not None:
            lock.release()
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipes.simple [flags]``: bad input ends as one ``error: ...`` line and exit code 2."""
    return RECIPE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
