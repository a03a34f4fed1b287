"""Draw samples from any recipe's checkpoint: any solver, steps, guidance scale, per-sample seeds.

    python -m recipes.sample runs/edm-digits --num 100 --solver heun --steps 18 --guidance 2.0
    python -m recipes.sample runs/edm-fashion/ckpt-00030000.pt --seeds 0-49999 --out runs/edm-fashion/samples-50k

The checkpoint names the recipe that wrote it and its config; the recipe rebuilds the network from them.
Besides the options below, the recipe's sampling fields can be overridden (for EDM: ``--solver --guidance
--sigma-min --sigma-max --rho --s-churn``; ``--steps`` sets ``sample_steps``). Image ``i`` is drawn from seed
``i`` alone (for deterministic solvers), so any single image can be regenerated with ``--seeds i``. Output:
``OUT/samples.h5`` (uint8 images, the labels used) and ``OUT/samples.png`` (the first 100). EMA weights are used.
``--precision bf16`` runs the network under bf16 autocast (convolutions and matmuls in bf16; the samplers keep their
state in float64 and the preconditioning in float32, which autocast leaves alone); ``--compile`` compiles it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import torch

from kdiff import data

from .config import RaisingArgumentParser, parse_value, type_name
from .grids import write_grid
from .image import Loaded, grid_labels, load_for_sampling, sample_images, write_samples


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: expected 'cpu' or 'auto' on this machine ('cuda' requested, but torch sees no "
                         "CUDA device)")
    return torch.device(name)


def _parser() -> argparse.ArgumentParser:
    p = RaisingArgumentParser(prog="python -m recipes.sample", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("checkpoint", help="a checkpoint file or run directory (its newest checkpoint)")
    p.add_argument("--num", type=int, default=100, help="number of samples (seeds 0..num-1) unless --seeds is given")
    p.add_argument("--seeds", default=None, help="explicit seeds, e.g. '0-49999' or '3,17'")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the training config's)")
    p.add_argument("--label", type=int, default=None, help="one class for every sample (default: cycle classes)")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampler batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="network arithmetic: fp32, or bf16 autocast (the sampler's state stays float64)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for sampling")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/samples-<solver>-<steps>)")
    return p


def _apply_overrides(loaded: Loaded, rest: list[str], steps: int | None) -> object:
    """The checkpoint's config with ``--steps`` and the recipe's sampling fields given as flags."""
    recipe, config = loaded.recipe, loaded.config
    hints = typing.get_type_hints(recipe.config)
    p = RaisingArgumentParser(prog="python -m recipes.sample", allow_abbrev=False)
    for name in recipe.sampling_fields:
        if name != "sample_steps":
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                           help=type_name(hints[name]))
    namespace, unknown = p.parse_known_args(rest)
    if unknown:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in recipe.sampling_fields if n != "sample_steps")
        raise ValueError(f"unknown flag {unknown[0]!r}; recipe {recipe.name!r} takes the sampling flags {flags} "
                         "besides the options in --help")
    changes = {name: parse_value(text, hints[name], f"--{name.replace('_', '-')}")
               for name, text in vars(namespace).items()}
    if steps is not None:
        changes["sample_steps"] = steps
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampling settings: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return 0
    try:
        args, rest = _parser().parse_known_args(argv)
        if args.num < 1:
            raise ValueError(f"--num: expected an int >= 1, got {args.num}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
        device = _device(args.device)
        seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.num))
        loaded = load_for_sampling(args.checkpoint, device=device)
        config = _apply_overrides(loaded, rest, args.steps)
        num_classes = loaded.info.num_classes
        if args.label is not None and (num_classes is None or not 0 <= args.label < num_classes):
            raise ValueError(f"--label: expected a class in [0, {num_classes}) of a labelled model, got {args.label}")
        labels = grid_labels(0, num_classes)
        if num_classes is not None:
            labels = (torch.full((len(seeds),), args.label) if args.label is not None
                      else torch.tensor(seeds) % num_classes)
        ckpt_dir = loaded.path.parent
        out = Path(args.out) if args.out else ckpt_dir / f"samples-{config.solver}-{config.sample_steps}"
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: expected a directory (or a new path), got the file {str(out)!r}")
        model = torch.compile(loaded.model) if args.compile else loaded.model
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch but the last has one shape
        region = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                  else contextlib.nullcontext())
        try:
            with region:
                images = sample_images(loaded.recipe, model, config, loaded.info, seeds, labels,
                                       extras=loaded.extras, batch_size=args.batch_size, progress=True)
        except (ValueError, TypeError) as e:
            flags = ", ".join("--" + f.replace("_", "-") for f in loaded.recipe.sampling_fields)
            raise ValueError(f"sampling settings ({flags.replace('--sample-steps', '--steps')}): {e}") from None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    u8 = data.uint8_from_x(images).permute(0, 2, 3, 1).numpy()
    write_samples(out / "samples.h5", u8, labels, loaded.info,
                  source=f"recipes.sample {args.checkpoint} ({loaded.recipe.name}): {config.solver}, "
                         f"{config.sample_steps} steps, guidance {config.guidance}, seeds {seeds[0]}..{seeds[-1]}")
    write_grid(images[:100], out / "samples.png")
    print(f"{len(seeds)} samples: {out / 'samples.h5'}  grid: {out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
