"""A tiny denoising run on random data, launched by tests/test_recipe_machinery.py.

``python tests/_tiny_train.py [flags]`` (or under torchrun) trains a small MLP for a few steps with
:func:`recipes.loop.train`; ``--step-delay`` slows each step so a test can kill it mid-run.
``--importance`` adds recipe-owned state (a loss history that steers where noise levels are drawn, in the
spirit of improved DDPM's importance sampling); ``--classifier`` trains a second model (a noise-level
classifier with its own Adam) on the same batches.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from recipes.config import parse_cli
from recipes.distributed import Rand, close_distributed, init_distributed
from recipes.loop import Trainable, TrainResult, train
from recipes.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class TinyConfig(TrainConfig):
    """A tiny denoiser on random 4x4 images."""

    n_data: int = 48  # number of random training images
    width: int = 32  # hidden width of the MLP
    step_delay: float = 0.0  # seconds to sleep per step (lets a test kill the run mid-way)
    importance: bool = False  # draw noise levels by a loss history kept as recipe-owned state
    classifier: bool = False  # also train a noise-level classifier (a second model with its own optimizer)


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


class LossHistory:
    """Running mean loss per quarter of the noise range; quarters are drawn with probability ~ sqrt(mean loss)."""

    def __init__(self) -> None:
        self.values, self.count = torch.ones(4, dtype=torch.float64), 0

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.count = state["values"].clone(), int(state["count"])

    def draw(self, rand: Rand, b: int) -> Tensor:
        """u in [0, 1): a quarter q by the history, then uniform inside it."""
        cdf = torch.cumsum(self.values.sqrt() / self.values.sqrt().sum(), 0)
        q = torch.searchsorted(cdf, rand.rand(b, dtype=torch.float64)).clamp(max=3)
        return ((q + rand.rand(b, dtype=torch.float64)) / 4).float()

    def update(self, u: Tensor, loss: Tensor) -> None:
        q = (u * 4).long().clamp(0, 3)
        for k in range(4):
            if (q == k).any():
                self.values[k] = 0.9 * self.values[k] + 0.1 * loss.detach().double()[q == k].mean()
        self.count += 1


def history_loss(model: nn.Module, batch: list[Tensor], rand: Rand, history: LossHistory, *,
                 step_delay: float = 0.0) -> tuple[Tensor, Tensor]:
    (x,) = batch
    u = history.draw(rand, x.shape[0])
    sigma = torch.exp(4 * u - 2)
    z = x + sigma[:, None, None, None] * rand.randn_like(x)
    pred = model(torch.cat([z.flatten(1), sigma.log()[:, None]], dim=1)).view_as(x)
    loss = (pred - x).square().flatten(1).mean(1)
    history.update(u, loss)
    if step_delay:
        time.sleep(step_delay)
    return loss, u


def classifier_loss(model: nn.Module, batch: list[Tensor], rand: Rand) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the noise quarter predicted from z."""
    (x,) = batch
    u = rand.rand(x.shape[0])
    z = x + torch.exp(4 * u - 2)[:, None, None, None] * rand.randn_like(x)
    return nn.functional.cross_entropy(model(z), (u * 4).long().clamp(0, 3), reduction="none"), u


def tiny_parts(config: TinyConfig) -> dict:
    """The keyword arguments of ``train`` for ``config``: model, data, loss, recipe state and extra models."""
    parts: dict = {"model": tiny_model(config), "dataset": tiny_data(config)}
    if config.importance:
        history = LossHistory()
        parts["state"] = {"history": history}
        parts["loss_fn"] = lambda m, b, r: history_loss(m, b, r, history, step_delay=config.step_delay)
    else:
        parts["loss_fn"] = lambda m, b, r: tiny_loss(m, b, r, step_delay=config.step_delay)
    if config.classifier:
        torch.manual_seed(4321)
        classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        parts["extra_models"] = {"classifier": Trainable(
            classifier, classifier_loss, optimizer_fn=lambda p: torch.optim.Adam(p, lr=1e-2), grad_clip=1.0)}
    return parts


def run(config: TinyConfig, resume=None) -> TrainResult:
    dist = init_distributed(config.device)
    try:
        return train(config, **tiny_parts(config), resume=resume, dist=dist, recipe="tiny")
    finally:
        close_distributed(dist)


def main(argv: list[str] | None = None) -> TrainResult:
    cli = parse_cli(TinyConfig, PRESETS, sys.argv[1:] if argv is None else argv)
    return run(cli.config, cli.resume)


if __name__ == "__main__":
    main()
