"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), end to end.

Training: preconditioning ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (Table 1, Eq. 7), noise levels
``ln sigma ~ N(P_mean, P_std^2)`` and the weighting ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
(Eq. 8, Table 1), so the loss is ``lambda(sigma) ||D(x + sigma n, sigma) - x||^2`` per sample. Class labels are
dropped to the network's "no label" index with probability ``label_dropout``, which makes the same network
usable unconditionally and with classifier-free guidance.
Sampling: Heun's 2nd-order method on the Karras grid, 18 steps = 35 network evaluations (Algorithm 1); the
stochastic sampler (Algorithm 2) through ``--s-churn``.

    python -m recipes.edm                       # the digits default: CPU, a few minutes
    python -m recipes.edm --preset fashion      # Fashion-MNIST 32x32, class-conditional, one GPU
    python -m recipes.edm --preset fashion-uncond
    python -m recipes.edm --preset cifar10      # the paper's CIFAR-10 setting, for users who have the data
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from kdiff import data, losses, metrics, nets, schedules, solvers
from kdiff.denoisers import edm_denoiser
from kdiff.guidance import cfg_batched

from .common import TrainConfig, parse_cli, seed_globals
from .train_loop import Dist, NonFiniteLossError, Rand, close_distributed, init_distributed, train, write_grid

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EDMConfig(TrainConfig):
    """The EDM recipe: data, network, loss and sampler settings on top of the training loop's."""

    data: str = "digits"  # training data: 'digits' (bundled, packed on first use) or a kdiff HDF5 file
    eval_data: str = "digits-test"  # held-out split for the quality number: 'digits-test' or a kdiff HDF5 file
    image_size: int = 8  # images are padded (never resized) to this size
    flip: bool = False  # random horizontal flips (off for digits and clothes with text-like structure)
    net: str = "unet_digits"  # a name in kdiff.nets.CONFIGS
    net_channels: int | None = None  # override the network's base width (none: the named config's)
    dropout: float | None = None  # override the network's dropout (none: the named config's)
    conditional: bool = True  # train with class labels (and label dropout for classifier-free guidance)
    label_dropout: float = 0.1  # probability a label is replaced by the "no label" index
    sigma_data: float = 0.5  # data standard deviation assumed by the preconditioning
    p_mean: float = -1.2  # mean of ln(sigma) during training
    p_std: float = 1.2  # standard deviation of ln(sigma) during training
    solver: Literal["heun", "euler", "dpmpp_2m", "ddim", "ddpm"] = "heun"  # sampler
    sample_steps: int = 18  # sampler steps (Heun: 2 * steps - 1 network evaluations)
    sigma_min: float = 0.002  # smallest nonzero noise level of the sampling grid
    sigma_max: float = 80.0  # largest noise level of the sampling grid
    rho: float = 7.0  # Karras grid exponent
    s_churn: float = 0.0  # stochastic sampler's churn (0: deterministic Algorithm 1)
    guidance: float = 1.0  # classifier-free guidance scale (1: conditional, 0: unconditional)
    grid_samples: int = 100  # images in each sample grid written during training
    eval_samples: int = 1000  # samples drawn after training for the quality number (0: skip)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.net not in nets.CONFIGS:
            raise ValueError(f"net: expected one of {', '.join(nets.CONFIGS)}, got {self.net!r}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout: expected a probability in [0, 1], got {self.label_dropout}")
        for name in ("sigma_data", "p_std", "sigma_min", "sigma_max", "rho"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a float > 0, got {getattr(self, name)}")
        if self.sample_steps < 1 or self.grid_samples < 1 or self.eval_samples < 0:
            raise ValueError(f"sample_steps, grid_samples, eval_samples: expected >= 1, >= 1, >= 0, got "
                             f"{self.sample_steps}, {self.grid_samples}, {self.eval_samples}")


PRESETS: dict[str, EDMConfig] = {
    # CPU, a few minutes: 1,437 8x8 digits, class-conditional, a 4-level check by a digit classifier.
    "digits": EDMConfig(out_dir="runs/edm-digits", steps=1500, batch_size=128, lr=2e-3, warmup_steps=100,
                        ema_halflife_kimg=20.0, log_every=50, checkpoint_every=500, net="unet_digits",
                        net_channels=32, dropout=0.0, eval_samples=1000),
    # Fashion-MNIST padded to 32x32 for one GPU (meant for ~10 min on an H100; not yet timed on one).
    # Pack the data first (README).
    "fashion": EDMConfig(out_dir="runs/edm-fashion", data="data/fashion-train.h5", eval_data="data/fashion-test.h5",
                         image_size=32, net="unet_fashion", steps=30000, batch_size=256, lr=1e-3, warmup_steps=1000,
                         ema_halflife_kimg=500.0, log_every=200, sample_every=5000, checkpoint_every=5000,
                         num_workers=4, eval_samples=50000),
    "fashion-uncond": EDMConfig(out_dir="runs/edm-fashion-uncond", data="data/fashion-train.h5",
                                eval_data="data/fashion-test.h5", image_size=32, net="unet_fashion",
                                conditional=False, label_dropout=0.0, steps=30000, batch_size=256, lr=1e-3,
                                warmup_steps=1000, ema_halflife_kimg=500.0, log_every=200, sample_every=5000,
                                checkpoint_every=5000, num_workers=4, eval_samples=50000),
    # EDM's CIFAR-10 setting (Table 7): batch 512, lr 1e-3, EMA half-life 500k images, dropout 0.13, flips,
    # 200M images; the ADM-style network from kdiff.nets stands in for the paper's DDPM++.
    "cifar10": EDMConfig(out_dir="runs/edm-cifar10", data="data/cifar10-train.h5", eval_data="data/cifar10-test.h5",
                         image_size=32, flip=True, net="ddpm_cifar10", dropout=0.13, conditional=False,
                         label_dropout=0.0, steps=390625, batch_size=512, lr=1e-3, warmup_steps=19531,
                         ema_halflife_kimg=500.0, log_every=500, sample_every=10000, checkpoint_every=10000,
                         num_workers=8, eval_samples=50000),
}

DIGITS_FILES = {"digits": ("train", "data/digits-train.h5"), "digits-test": ("test", "data/digits-test.h5")}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def resolve_data(name: str) -> Path:
    """A kdiff HDF5 path for ``name``: the bundled digits are packed on first use, anything else must exist."""
    if name in DIGITS_FILES:
        split, path = DIGITS_FILES[name]
        path = Path(path)
        if not path.is_file():
            data.write_packed(path, data.pack_digits(split=split), split=split)
        return path
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"data: no file {name!r}. Pack it first, e.g. `python -m kdiff.data pack "
                                f"/usr/share/datasets/fashion-mnist --out {name}` (see the README).")
    return path


def dataset_for(config: EDMConfig) -> data.H5Dataset:
    return data.H5Dataset(resolve_data(config.data), size=config.image_size, fit="pad",
                          flip_p=0.5 if config.flip else 0.0, seed=config.seed)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(config: EDMConfig, *, in_channels: int, num_classes: int | None) -> nn.Module:
    """The network ``F(c_in x, c_noise, labels)`` of ``config.net`` sized to the data."""
    overrides: dict[str, object] = {"image_size": config.image_size, "in_channels": in_channels,
                                    "num_classes": num_classes}
    if config.net_channels is not None:
        overrides["channels"] = config.net_channels
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    return nets.build(config.net, **overrides)


def num_classes_of(model: nn.Module) -> int | None:
    return getattr(getattr(model, "cfg", None), "num_classes", None)


def denoiser(model: nn.Module, config: EDMConfig, labels: Tensor | None):
    """``denoise(x, sigma)`` for sampling: EDM preconditioning around ``model``, with CFG when labelled."""
    num_classes = num_classes_of(model)
    if labels is None or num_classes is None:
        return edm_denoiser(lambda x, c_noise: model(x, c_noise, None), sigma_data=config.sigma_data)
    if config.guidance == 1.0:
        return edm_denoiser(lambda x, c_noise: model(x, c_noise, labels), sigma_data=config.sigma_data)

    def labelled(x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        return edm_denoiser(lambda xx, c_noise: model(xx, c_noise, y), sigma_data=config.sigma_data)(x, sigma)

    return cfg_batched(labelled, labels, scale=config.guidance, null_label=num_classes)


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def make_loss_fn(config: EDMConfig, num_classes: int | None):
    def loss_fn(net: nn.Module, batch: Sequence[Tensor], rand: Rand) -> tuple[Tensor, Tensor]:
        """EDM Eq. 8 per sample: ``lambda(sigma) mean((D(x + sigma n, sigma) - x)^2)``; position = Phi(u)."""
        x, labels = batch
        b = x.shape[0]
        u = rand.randn(b).to(x.device)
        sigma = schedules.sigma_lognormal(u, p_mean=config.p_mean, p_std=config.p_std)
        noise = rand.randn_like(x)
        y = None
        if num_classes is not None:
            keep = rand.rand(b).to(x.device) >= config.label_dropout
            y = torch.where(keep, labels.to(x.device), torch.full_like(labels.to(x.device), num_classes))
        denoise = edm_denoiser(lambda xx, c_noise: net(xx, c_noise, y), sigma_data=config.sigma_data)
        denoised = denoise(x + sigma.view(-1, *[1] * (x.ndim - 1)) * noise, sigma)
        loss = losses.weight_edm(sigma, sigma_data=config.sigma_data) * losses.mse(denoised.float(), x.float())
        position = 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))
        return loss, position

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def sigmas_for(config: EDMConfig) -> Tensor:
    return schedules.sigmas_karras(config.sample_steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                                   rho=config.rho)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard normal image per seed (EDM's per-sample seeds): image ``i`` depends on ``seeds[i]`` only."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds]).to(device)


@torch.no_grad()
def generate(model: nn.Module, config: EDMConfig, seeds: Sequence[int], labels: Tensor | None, *,
             shape: tuple[int, int, int], batch_size: int = 256, progress: bool = False) -> Tensor:
    """Samples in [-1, 1], one per seed, ``(N, C, H, W)`` float32 on CPU.

    With a deterministic solver (Heun, Euler, DPM-Solver++(2M), DDIM with eta 0, no churn) image ``i`` is a function
    of ``seeds[i]`` (and ``labels[i]``) alone, as in EDM's generate.py; stochastic solvers draw their later noise
    from a generator seeded by the batch's first seed.
    """
    device = next(model.parameters()).device
    sigmas = sigmas_for(config)
    out = []
    starts = range(0, len(seeds), batch_size)
    if progress and len(starts) > 1:
        from tqdm import tqdm
        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        chunk = list(seeds[start:start + batch_size])
        y = labels[start:start + len(chunk)].to(device) if labels is not None else None
        x = initial_noise(chunk, shape, device) * sigmas[0].item()
        gen = torch.Generator(device).manual_seed(int(chunk[0]) + 1_000_003)
        x = solvers.sample(denoiser(model, config, y), x.float(), sigmas, solver=config.solver,
                           s_churn=config.s_churn, generator=gen, progress=progress and len(seeds) <= batch_size)
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def grid_labels(n: int, num_classes: int | None) -> Tensor | None:
    return None if num_classes is None else torch.arange(n) % num_classes


def make_sample_fn(config: EDMConfig, shape: tuple[int, int, int]):
    def sample_fn(ema: nn.Module, generator: torch.Generator) -> Tensor:
        seeds = torch.randint(0, 2**31 - 1, (config.grid_samples,), generator=generator, device=generator.device)
        return generate(ema, config, seeds.tolist(), grid_labels(config.grid_samples, num_classes_of(ema)),
                        shape=shape)

    return sample_fn


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(ema: nn.Module, config: EDMConfig, *, shape: tuple[int, int, int], out_dir: Path,
             progress: bool = True) -> dict[str, float]:
    """Draw ``config.eval_samples`` samples (seeds 0..N-1, labels cycling through the classes), save them as HDF5
    and a PNG grid, and score them: digit-classifier accuracy for 8x8 digits, FID against ``eval_data`` otherwise."""
    n = config.eval_samples
    num_classes = num_classes_of(ema)
    labels = grid_labels(n, num_classes)
    t0 = time.perf_counter()
    images = generate(ema, config, list(range(n)), labels, shape=shape, progress=progress)
    seconds = time.perf_counter() - t0
    u8 = data.uint8_from_x(images).permute(0, 2, 3, 1).numpy()
    data.write_h5(out_dir / "samples.h5", u8, None if labels is None else labels.numpy(), split="test",
                  source=f"recipes.edm: {config.solver}, {config.sample_steps} steps, guidance {config.guidance}")
    write_grid(images[:100], out_dir / "samples.png")
    result = {"sample_seconds": seconds}
    if config.eval_data in DIGITS_FILES and shape == (1, 8, 8) and labels is not None:
        result["digits_accuracy"] = metrics.digits_accuracy(u8, labels.numpy())
        test_u8, test_labels = data.digits_arrays(split="test")
        result["digits_accuracy_real_test"] = metrics.digits_accuracy(test_u8, test_labels)
    elif config.eval_data not in DIGITS_FILES:
        result["fid"] = metrics.fid(u8, resolve_data(config.eval_data), progress=progress)
    return result


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def run(config: EDMConfig, *, resume: Path | None = None, dist: Dist | None = None) -> dict[str, float]:
    dist = dist or init_distributed(config.device)
    dataset = dataset_for(config)
    c, h, w = dataset[0][0].shape
    num_classes = len(dataset.class_names) if config.conditional else None
    if config.conditional and not num_classes:
        raise ValueError(f"conditional: the data {config.data!r} has no class names; use --no-conditional")
    seed_globals(config.seed)  # the initial weights depend on the seed only, not on what ran before
    model = build_model(config, in_channels=c, num_classes=num_classes)
    if dist.rank == 0:
        print(f"edm: {config.net} with {nets.count_params(model):,} parameters, {len(dataset):,} training images "
              f"{c}x{h}x{w}, {config.steps} steps of {config.batch_size} on {dist.device}", file=sys.stderr)
    result = train(config, model=model, loss_fn=make_loss_fn(config, num_classes), dataset=dataset,
                   sample_fn=make_sample_fn(config, (c, h, w)), resume=resume, dist=dist)
    scores: dict[str, float] = dict(result.metrics)
    if dist.rank == 0 and config.eval_samples > 0:
        scores.update(evaluate(result.ema, config, shape=(c, h, w), out_dir=Path(config.out_dir),
                               progress=config.progress))
        for key, value in scores.items():
            if key.startswith(("digits", "fid")):
                print(f"{key}: {value:.4f}")
        print(f"samples: {Path(config.out_dir) / 'samples.png'}  checkpoint: {result.checkpoint}  "
              f"tensorboard: tensorboard --logdir {Path(config.out_dir) / 'tb'}")
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cli = parse_cli(EDMConfig, PRESETS, argv, default_preset="digits", prog="python -m recipes.edm")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed(cli.config.device)
    try:
        run(cli.config, resume=cli.resume, dist=dist)
    except (FileNotFoundError, NonFiniteLossError) as e:  # a missing data file, a diverged run: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close_distributed(dist)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
