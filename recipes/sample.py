"""Draw samples from a trained recipe checkpoint: any solver, steps, guidance scale, per-sample seeds.

    python -m recipes.sample runs/edm-digits --num 100 --solver heun --steps 18 --guidance 2.0
    python -m recipes.sample runs/edm-fashion/ckpt-00030000.pt --seeds 0-49999 --out runs/edm-fashion/samples-50k

Image ``i`` is drawn from ``seed i`` alone (for deterministic solvers), so any single image can be regenerated
with ``--seeds i``. Output: ``OUT/samples.h5`` (uint8 images, the labels used) and ``OUT/samples.png`` (the first
100). The EMA weights are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from kdiff import data

from . import edm
from .common import config_from_dict, latest_checkpoint, load_checkpoint
from .train_loop import write_grid


def parse_seeds(text: str) -> list[int]:
    """``"0-99"``, ``"5"`` or ``"1,4,9-12"`` -> a list of ints (ranges inclusive)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError as e:
            raise ValueError(f"--seeds: expected ints and ranges like '0-99' or '1,4,9-12', got {text!r}") from e
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds: expected at least one seed, all >= 0, got {text!r}")
    return seeds


def load_model(checkpoint: str | Path, *, device: torch.device) -> tuple[torch.nn.Module, edm.EDMConfig, tuple]:
    """The EMA network of a recipes.edm checkpoint (a file, or a run directory: its newest checkpoint)."""
    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"checkpoint: expected a checkpoint file or a run directory with one, got {str(path)!r}")
        path = found
    state = load_checkpoint(path)
    config = config_from_dict(edm.EDMConfig, state["config"])
    ema_state = state["ema"]
    # The network's shape comes from the saved weights: input channels and label table.
    in_channels = next(v for k, v in ema_state.items() if k.endswith("weight") and v.ndim == 4).shape[1]
    label_rows = [v.shape[0] for k, v in ema_state.items() if "label" in k and k.endswith("weight") and v.ndim == 2]
    num_classes = label_rows[0] - 1 if label_rows and config.conditional else None
    model = edm.build_model(config, in_channels=in_channels, num_classes=num_classes)
    model.load_state_dict(ema_state)
    model.to(device).eval().requires_grad_(False)
    return model, config, (in_channels, config.image_size, config.image_size)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a recipes.edm checkpoint file or run directory (newest checkpoint)")
    p.add_argument("--num", type=int, default=100, help="number of samples (seeds 0..num-1) unless --seeds is given")
    p.add_argument("--seeds", default=None, help="explicit seeds, e.g. '0-49999' or '3,17'")
    p.add_argument("--solver", default=None, choices=["heun", "euler", "dpmpp_2m", "ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the training config's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1: conditional)")
    p.add_argument("--s-churn", type=float, default=None, help="EDM stochastic sampler churn (0: deterministic)")
    p.add_argument("--label", type=int, default=None, help="one class for every sample (default: cycle classes)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/samples-<solver>-<steps>)")
    args = p.parse_args(argv)
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        model, config, shape = load_model(args.checkpoint, device=device)
        changes = {k: v for k, v in (("solver", args.solver), ("sample_steps", args.steps),
                                     ("guidance", args.guidance), ("s_churn", args.s_churn)) if v is not None}
        config = dataclasses.replace(config, **changes)
        if args.num < 1:
            raise ValueError(f"--num: expected >= 1, got {args.num}")
        seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.num))
        num_classes = edm.num_classes_of(model)
        if args.label is not None and (num_classes is None or not 0 <= args.label < num_classes):
            raise ValueError(f"--label: expected a class in [0, {num_classes}) of a labelled model, got {args.label}")
        labels = None
        if num_classes is not None:
            labels = (torch.full((len(seeds),), args.label) if args.label is not None
                      else torch.tensor(seeds) % num_classes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpt_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    out = Path(args.out) if args.out else ckpt_dir / f"samples-{config.solver}-{config.sample_steps}"
    images = edm.generate(model, config, seeds, labels, shape=shape, batch_size=args.batch_size, progress=True)
    u8 = data.uint8_from_x(images).permute(0, 2, 3, 1).numpy()
    data.write_h5(out / "samples.h5", u8, None if labels is None else labels.numpy(), split="test",
                  source=f"recipes.sample {args.checkpoint}: {config.solver}, {config.sample_steps} steps, "
                         f"guidance {config.guidance}, seeds {seeds[0]}..{seeds[-1]}")
    write_grid(images[:100], out / "samples.png")
    print(f"{len(seeds)} samples: {out / 'samples.h5'}  grid: {out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
