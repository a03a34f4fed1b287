"""A tiny denoising run on random data, launched by tests/test_recipe_machinery.py.

``python tests/_tiny_train.py [flags]`` (or under torchrun) trains a small MLP for a few steps with
:func:`recipes.train_loop.train`; ``--step-delay`` slows each step so a test can kill it mid-run.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from recipes.common import TrainConfig, parse_cli
from recipes.train_loop import Rand, TrainResult, close_distributed, init_distributed, train


@dataclasses.dataclass(frozen=True)
class TinyConfig(TrainConfig):
    """A tiny denoiser on random 4x4 images."""

    n_data: int = 48  # number of random training images
    width: int = 32  # hidden width of the MLP
    step_delay: float = 0.0  # seconds to sleep per step (lets a test kill the run mid-way)


PRESETS = {
    "tiny": TinyConfig(out_dir="runs/tiny", steps=24, batch_size=8, lr=1e-2, warmup_steps=10, log_every=4,
                       checkpoint_every=6, keep_checkpoints=10, ema_halflife_kimg=0.02, grad_clip=10.0,
                       progress=False, device="cpu"),
}


def tiny_model(config: TinyConfig) -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Flatten(), nn.Linear(17, config.width), nn.SiLU(), nn.Linear(config.width, 16))


def tiny_data(config: TinyConfig) -> TensorDataset:
    x = torch.randn(config.n_data, 1, 4, 4, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x)


def tiny_loss(model: nn.Module, batch: list[Tensor], rand: Rand, *, step_delay: float = 0.0) -> tuple[Tensor, Tensor]:
    """x-prediction on ``z = x + sigma * n`` with ``log sigma ~ U(-2, 2)``; position = the uniform."""
    (x,) = batch
    u = rand.rand(x.shape[0])
    sigma = torch.exp(4 * u - 2)
    z = x + sigma[:, None, None, None] * rand.randn_like(x)
    pred = model(torch.cat([z.flatten(1), sigma.log()[:, None]], dim=1)).view_as(x)
    if step_delay:
        time.sleep(step_delay)
    return (pred - x).square().flatten(1).mean(1), u


def run(config: TinyConfig, resume=None) -> TrainResult:
    dist = init_distributed(config.device)
    try:
        return train(config, model=tiny_model(config), dataset=tiny_data(config),
                     loss_fn=lambda m, b, r: tiny_loss(m, b, r, step_delay=config.step_delay),
                     resume=resume, dist=dist)
    finally:
        close_distributed(dist)


def main(argv: list[str] | None = None) -> TrainResult:
    cli = parse_cli(TinyConfig, PRESETS, sys.argv[1:] if argv is None else argv)
    return run(cli.config, cli.resume)


if __name__ == "__main__":
    main()
