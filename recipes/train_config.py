"""The training loop's settings, :class:`TrainConfig`; a recipe's config subclasses it and adds its own fields."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from .config import check_config_types, check_finite_floats

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training-loop settings; a recipe's config subclasses this and adds its own fields."""

    RUN_LOCAL_FIELDS: ClassVar[tuple[str, ...]] = ("out_dir", "keep_checkpoints")

    out_dir: str = "runs/default"  # checkpoints, their JSON configs, TensorBoard events and sample grids
    seed: int = 0  # seeds the data order, the training noise and every RNG (per rank)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    steps: int = 1000  # total optimizer steps
    max_seconds: float | None = None  # stop training after this many seconds of this process, save, then sample
    batch_size: int = 128  # global batch: all ranks together
    optimizer: Literal["adamw", "adam"] = "adamw"  # adamw: decoupled weight decay; adam: no weight decay (DDPM)
    lr: float = 1e-3  # peak learning rate
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after the warm-up: hold, or decay to 0
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps (0: none)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Adam (beta1, beta2)
    adam_eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay, not applied to 1-D parameters (biases, norms)
    grad_clip: float | None = None  # clip the global gradient norm to this value (none: no clipping)
    ema_halflife_kimg: float = 500.0  # EMA half-life in thousands of training images
    ema_rampup_ratio: float | None = 0.05  # EMA half-life at most this fraction of the images seen (none: off)
    ema_rate: float | None = None  # a fixed EMA decay per step instead of the half-life, as in DDPM/ADM (0.9999)
    bf16: bool = True  # bf16 autocast of the forward pass on CUDA (no effect on CPU)
    compile: bool | None = None  # torch.compile the network (none: on when training on CUDA, off on a CPU)
    compile_mode: CompileMode = "default"  # torch.compile mode when compiling (reduce-overhead: CUDA graphs)
    channels_last: bool = False  # keep the model's weights in channels-last memory format (faster convs on CUDA)
    num_workers: int = 0  # DataLoader worker processes per rank
    log_every: int = 100  # steps between TensorBoard scalars (and non-finite loss checks)
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # how many of the newest checkpoints stay on disk
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        check_config_types(self)
        check_finite_floats(self)
        for name, low in (("steps", 0), ("batch_size", 1), ("warmup_steps", 0), ("num_workers", 0),
                          ("log_every", 1), ("sample_every", 0), ("checkpoint_every", 1),
                          ("keep_checkpoints", 1), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a float > 0, got {self.lr}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds: expected a float > 0 or none, got {self.max_seconds}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas: expected two floats in [0, 1), got {self.adam_betas}")
        for name in ("adam_eps", "weight_decay", "ema_halflife_kimg"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a float >= 0, got {getattr(self, name)}")
        if self.optimizer == "adam" and self.weight_decay != 0:
            raise ValueError(f"weight_decay: expected 0 with optimizer 'adam' (use 'adamw' for decay), "
                             f"got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected a float > 0 or none, got {self.grad_clip}")
        if self.ema_rate is not None and not 0 <= self.ema_rate <= 1:
            raise ValueError(f"ema_rate: expected a float in [0, 1] or none, got {self.ema_rate}")
        if self.ema_rampup_ratio is not None and not self.ema_rampup_ratio > 0:
            raise ValueError(f"ema_rampup_ratio: expected a float > 0 or none, got {self.ema_rampup_ratio}")
