"""The image-recipe skeleton: data, model building, generation, evaluation, grids, ``run`` and ``main``.

A system (EDM, DDPM, ...) is an :class:`ImageRecipe`: its config class (a subclass of :class:`ImageConfig`),
presets, and four functions of its own (loss, denoiser, sampling grid and, optionally, the starting noise
scale); everything else here is shared. See :mod:`recipes` for the recipe author's guide.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdiff import data, metrics, nets, solvers

from .checkpoints import (
    RunDirectoryLockedError,
    RunLock,
    find_checkpoint,
    load_checkpoint,
    seed_globals,
)
from .config import Cli, config_from_dict, parse_cli
from .distributed import Dist, close_distributed, init_distributed
from .grids import write_grid
from .loop import LossFn, NonFiniteError, Stateful, Trainable, train
from .train_config import TrainConfig

Denoise = Callable[[Tensor, Tensor], Tensor]

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageConfig(TrainConfig):
    """What every image recipe has: data, network, sampler and evaluation settings on top of the training loop's."""

    data: str = "digits"  # training data: 'digits' (bundled, packed on first use) or a kdiff HDF5 file
    eval_data: str = "digits-test"  # held-out split for the quality number: 'digits-test' or a kdiff HDF5 file
    image_size: int = 8  # images are padded (never resized) to this size
    flip: bool = False  # random horizontal flips (off for digits and clothes with text-like structure)
    net: str = "unet_digits"  # a name in kdiff.nets.CONFIGS
    net_channels: int | None = None  # override the network's base width (none: the named config's)
    dropout: float | None = None  # override the network's dropout (none: the named config's)
    conditional: bool = True  # train with class labels (and label dropout for classifier-free guidance)
    label_dropout: float = 0.1  # probability a label is replaced by the "no label" index
    solver: Literal["heun", "euler", "dpmpp_2m", "ddim", "ddpm"] = "heun"  # sampler
    sample_steps: int = 18  # sampler steps (Heun: 2 * steps - 1 network evaluations)
    guidance: float = 1.0  # classifier-free guidance scale (1: conditional, 0: unconditional)
    grid_samples: int = 100  # images in each sample grid written during training
    eval_samples: int = 1000  # samples drawn after training for the quality number (0: skip)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.net not in nets.CONFIGS:
            raise ValueError(f"net: expected one of {', '.join(nets.CONFIGS)}, got {self.net!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size: expected an int >= 8, got {self.image_size}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout: expected a probability in [0, 1], got {self.label_dropout}")
        if self.net_channels is not None and self.net_channels < 1:
            raise ValueError(f"net_channels: expected an int >= 1 or none, got {self.net_channels}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1) or none, got {self.dropout}")
        if self.sample_steps < 1 or self.grid_samples < 1 or self.eval_samples < 0:
            raise ValueError(f"sample_steps, grid_samples, eval_samples: expected >= 1, >= 1, >= 0, got "
                             f"{self.sample_steps}, {self.grid_samples}, {self.eval_samples}")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the model is built for: one image's ``shape`` (C, H, W) and the number of classes (None: unlabelled).

    ``data_size`` is the stored images' side before padding to ``image_size`` (FID crops samples back to it).
    Recorded in every checkpoint, so sampling never guesses it from weights.
    """

    shape: tuple[int, int, int]
    num_classes: int | None
    data_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "num_classes": self.num_classes, "data_size": self.data_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataInfo:
        return cls(tuple(int(s) for s in d["shape"]), d["num_classes"], d.get("data_size"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def _sigma_max_start(config: Any, sigmas: Tensor) -> float:
    return float(sigmas[0])


def _no_options(config: Any) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class ImageRecipe:
    """One system on the shared image machinery. See the guide in :mod:`recipes`.

    Attributes:
        name: the module's name under ``recipes/`` (``"edm"``), or a full dotted module path for a recipe that
            lives elsewhere; written into every checkpoint, and how ``recipes.sample`` finds this recipe again.
        config: the config class (an :class:`ImageConfig` subclass).
        presets: named configs; ``default_preset`` is used without ``--preset``.
        loss: ``loss(config, info, state) -> loss_fn(net, batch, rand) -> (loss [b], position [b])``.
        denoiser: ``denoiser(model, config, labels, extras) -> denoise(x, sigma)`` (EDM space), labels (B,) or None;
            ``extras`` maps extra models' names to their EMA modules.
        sigmas: ``sigmas(config) -> (n + 1,)`` decreasing noise levels ending in 0, the sampling grid.
        start_scale: ``start_scale(config, sigmas) -> s``: the first sample is ``s * n`` (default ``sigmas[0]``;
            a VP model starts at ``sqrt(1 + sigma_max^2)``).
        solver_options: ``solver_options(config) -> dict`` of extra keywords for ``kdiff.solvers.sample``.
        build_model: ``build_model(config, info) -> nn.Module`` (default :func:`build_net`).
        new_state: ``new_state(config, info) -> {name: obj}``, recipe-owned state saved in checkpoints.
        extra_models: ``extra_models(config, info, state) -> {name: Trainable}``, trained beside the main model.
        sampling_fields: config fields ``recipes.sample`` may override (``--sigma-max 40``).
    """

    name: str
    config: type[ImageConfig]
    presets: Mapping[str, ImageConfig]
    loss: Callable[[Any, DataInfo, dict[str, Any]], LossFn]
    denoiser: Callable[[nn.Module, Any, Tensor | None, Mapping[str, nn.Module]], Denoise]
    sigmas: Callable[[Any], Tensor]
    default_preset: str | None = None
    start_scale: Callable[[Any, Tensor], float] = _sigma_max_start
    solver_options: Callable[[Any], dict[str, Any]] = _no_options
    build_model: Callable[[Any, DataInfo], nn.Module] | None = None
    new_state: Callable[[Any, DataInfo], dict[str, Stateful]] | None = None
    extra_models: Callable[[Any, DataInfo, dict[str, Any]], dict[str, Trainable]] | None = None
    sampling_fields: tuple[str, ...] = ("solver", "sample_steps", "guidance")

    def __post_init__(self) -> None:
        if not self.presets:
            raise ValueError(f"presets: expected at least one preset for recipe {self.name!r}, got none")
        if self.default_preset is not None and self.default_preset not in self.presets:
            raise ValueError(f"default_preset: expected one of {sorted(self.presets)}, got {self.default_preset!r}")
        known = {f.name for f in dataclasses.fields(self.config)}
        unknown = [f for f in self.sampling_fields if f not in known]
        if unknown:
            raise ValueError(f"sampling_fields: expected fields of {self.config.__name__}, got unknown {unknown}")

    @property
    def prog(self) -> str:
        return f"python -m recipes.{self.name}" if "." not in self.name else f"python -m {self.name}"

    def model_for(self, config: Any, info: DataInfo) -> nn.Module:
        return (self.build_model or build_net)(config, info)

    def parse(self, argv: Sequence[str] | None = None) -> Cli:
        return parse_cli(self.config, dict(self.presets), argv, default_preset=self.default_preset, prog=self.prog)

    def run(self, config: Any, *, resume: Path | None = None, dist: Dist | None = None) -> dict[str, float]:
        return run(self, config, resume=resume, dist=dist)

    def main(self, argv: Sequence[str] | None = None) -> int:
        return main(self, argv)


def find_recipe(name: str) -> ImageRecipe:
    """The ``RECIPE`` of module ``recipes.<name>`` (or of the dotted module ``name``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"recipe: expected a module name such as 'edm', got {name!r}")
    module_name = f"{__package__}.{name}" if "." not in name else name
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"recipe: no module {module_name!r} for recipe {name!r} ({e})") from None
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, ImageRecipe):
        raise ValueError(f"recipe: module {module_name!r} has no RECIPE (an ImageRecipe)")
    return recipe


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

DIGITS_FILES = {"digits": ("train", "data/digits-train.h5"), "digits-test": ("test", "data/digits-test.h5")}


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


def dataset_for(config: ImageConfig) -> data.H5Dataset:
    return data.H5Dataset(resolve_data(config.data), size=config.image_size, fit="pad",
                          flip_p=0.5 if config.flip else 0.0, seed=config.seed)


def _with_flag(flag: str, fn: Callable[[Any], Any], config: Any) -> Any:
    """``fn(config)``, with a ValueError or missing file reported as ``flag: ...``."""
    try:
        return fn(config)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def data_info(config: ImageConfig, dataset: data.H5Dataset) -> DataInfo:
    """The model's image shape and classes for ``dataset`` under ``config`` (ValueError for unlabelled data)."""
    c = dataset.info.image_shape[2]
    num_classes = len(dataset.class_names) if config.conditional else None
    if config.conditional and not num_classes:
        raise ValueError(f"--conditional: the data {config.data!r} has no class names; use --no-conditional")
    return DataInfo((c, config.image_size, config.image_size), num_classes, max(dataset.info.image_shape[:2]))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_net(config: ImageConfig, info: DataInfo) -> nn.Module:
    """The network ``F(x, c_noise, labels)`` of ``config.net`` sized to the data (width/dropout overrides applied)."""
    overrides: dict[str, object] = {"image_size": info.shape[1], "in_channels": info.shape[0],
                                    "num_classes": info.num_classes}
    if config.net_channels is not None:
        overrides["channels"] = config.net_channels
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    return nets.build(config.net, **overrides)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard normal image per seed (EDM's per-sample seeds): image ``i`` depends on ``seeds[i]`` only."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds]).to(device)


@torch.no_grad()
def generate(denoiser: Callable[[Tensor | None], Denoise], sigmas: Tensor, seeds: Sequence[int],
             labels: Tensor | None, *, shape: tuple[int, int, int], device: torch.device | str = "cpu",
             solver: str = "heun", solver_options: Mapping[str, Any] | None = None, start_scale: float | None = None,
             batch_size: int = 256, progress: bool = False) -> Tensor:
    """Samples in [-1, 1], one per seed, ``(N, C, H, W)`` float32 on CPU.

    ``denoiser(labels_of_the_batch) -> denoise(x, sigma)``; the start is ``start_scale * n_i`` (default
    ``sigmas[0]``) with ``n_i`` drawn from ``seeds[i]`` alone, then ``kdiff.solvers.sample`` runs ``solver``
    over ``sigmas``. With a deterministic solver image ``i`` is a function of ``seeds[i]`` (and ``labels[i]``)
    alone, as in EDM's generate.py; stochastic solvers draw later noise from a generator seeded by the batch's
    first seed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if labels is not None and labels.shape != (len(seeds),):
        raise ValueError(f"labels: expected shape ({len(seeds)},) (one per seed), got {tuple(labels.shape)}")
    device = torch.device(device)
    scale = float(sigmas[0]) if start_scale is None else float(start_scale)
    out = []
    starts = range(0, len(seeds), batch_size)
    if progress and len(starts) > 1:
        from tqdm import tqdm
        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        chunk = list(seeds[start:start + batch_size])
        y = labels[start:start + len(chunk)].to(device) if labels is not None else None
        x = initial_noise(chunk, shape, device) * scale
        gen = torch.Generator(device).manual_seed(int(chunk[0]) + 1_000_003)
        x = solvers.sample(denoiser(y), x.float(), sigmas, solver=solver, generator=gen,
                           progress=progress and len(seeds) <= batch_size, **dict(solver_options or {}))
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def grid_labels(n: int, num_classes: int | None) -> Tensor | None:
    """Labels cycling through the classes, ``i % num_classes`` (None for an unlabelled model)."""
    return None if num_classes is None else torch.arange(n) % num_classes


def sample_images(recipe: ImageRecipe, model: nn.Module, config: Any, info: DataInfo, seeds: Sequence[int],
                  labels: Tensor | None, *, extras: Mapping[str, nn.Module] | None = None, batch_size: int = 256,
                  progress: bool = False) -> Tensor:
    """:func:`generate` with the recipe's denoiser, sampling grid, start scale and solver options for ``config``."""
    extras = dict(extras or {})
    sigmas = recipe.sigmas(config)
    return generate(lambda y: recipe.denoiser(model, config, y, extras), sigmas, seeds, labels, shape=info.shape,
                    device=next(model.parameters()).device, solver=config.solver,
                    solver_options=recipe.solver_options(config), start_scale=recipe.start_scale(config, sigmas),
                    batch_size=batch_size, progress=progress)


def check_sampling(recipe: ImageRecipe, model: nn.Module, config: Any, info: DataInfo,
                   extras: Mapping[str, nn.Module] | None = None) -> None:
    """Draw one image with ``model`` as it is, so a bad sampling option fails before training, not after it.

    Any ValueError/TypeError of the grid, the solver or the denoiser is re-raised naming the sampling flags.
    """
    was_training = model.training
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]):
            sample_images(recipe, model, config, info, [0], grid_labels(1, info.num_classes), extras=extras)
    except (ValueError, TypeError) as e:
        flags = ", ".join("--" + f.replace("_", "-") for f in recipe.sampling_fields)
        raise ValueError(f"sampling settings ({flags}): {e}") from None
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def crop_to(x: Tensor, size: int | None) -> Tensor:
    """The centre ``size x size`` of (..., H, W), undoing :func:`kdiff.data.pad_to` (same offsets)."""
    h, w = x.shape[-2:]
    if size is None or (h <= size and w <= size):
        return x
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def write_samples(path: Path, u8: Any, labels: Tensor | None, info: DataInfo, *, source: str) -> Path:
    """Samples as a kdiff HDF5 file; labelled samples name their classes ("0".."K-1"), so tools can tell them
    from unlabelled ones (whose labels are all 0)."""
    names = [str(i) for i in range(info.num_classes)] if labels is not None and info.num_classes else []
    return data.write_h5(path, u8, None if labels is None else labels.numpy(), split="test", source=source,
                         class_names=names)


def evaluate(recipe: ImageRecipe, ema: nn.Module, config: Any, info: DataInfo, *, out_dir: Path,
             extras: Mapping[str, nn.Module] | None = None, progress: bool = True) -> dict[str, float]:
    """Draw ``config.eval_samples`` samples (seeds 0..N-1, labels cycling through the classes), save them as HDF5
    and a PNG grid, and score them: for the 8x8 digits the Frechet distance in a digit classifier's feature space
    (with its real-train-vs-real-test floor) and, for labelled samples, the classifier's accuracy; FID against
    ``eval_data`` otherwise (samples cropped back to the data's size when they were padded)."""
    n = config.eval_samples
    labels = grid_labels(n, info.num_classes)
    t0 = time.perf_counter()
    images = sample_images(recipe, ema, config, info, list(range(n)), labels, extras=extras, progress=progress)
    seconds = time.perf_counter() - t0
    u8 = data.uint8_from_x(images).permute(0, 2, 3, 1).numpy()
    write_samples(out_dir / "samples.h5", u8, labels, info,
                  source=f"recipes.{recipe.name}: {config.solver}, {config.sample_steps} steps, "
                         f"guidance {config.guidance}")
    write_grid(images[:100], out_dir / "samples.png")
    result = {"sample_seconds": seconds}
    if config.eval_data in DIGITS_FILES and info.shape == (1, 8, 8):
        result["digits_fd"] = metrics.digits_frechet_distance(u8)
        result["digits_fd_real_train"] = metrics.digits_frechet_floor()
        if labels is not None:
            result["digits_accuracy"] = metrics.digits_accuracy(u8, labels.numpy())
            test_u8, test_labels = data.digits_arrays(split="test")
            result["digits_accuracy_real_test"] = metrics.digits_accuracy(test_u8, test_labels)
    elif config.eval_data not in DIGITS_FILES:
        cropped = data.uint8_from_x(crop_to(images, info.data_size)).permute(0, 2, 3, 1).numpy()
        result["fid"] = metrics.fid(cropped, resolve_data(config.eval_data), progress=progress)
    return result


# ----------------------------------------------------------------------------------------------
# Run and main
# ----------------------------------------------------------------------------------------------


def run(recipe: ImageRecipe, config: Any, *, resume: Path | None = None, dist: Dist | None = None
        ) -> dict[str, float]:
    """Train ``config`` with ``recipe`` (resuming ``resume``), then sample and score on rank 0.

    Before the first step the whole config is checked: the data and network are built and one image is sampled
    with the untrained network, so no setting can fail only after training. The final checkpoint is written
    before any sampling.
    """
    if not isinstance(config, recipe.config):
        raise TypeError(f"config: expected a {recipe.config.__name__}, got {type(config).__name__}")
    dist = dist or init_distributed(config.device)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir: expected a directory (or a new path), got the file {str(out_dir)!r}")
    dataset = _with_flag("--data", dataset_for, config)
    if config.eval_samples > 0 and config.eval_data not in DIGITS_FILES:  # scored at the end: check it now
        _with_flag("--eval-data", lambda c: data.read_info(resolve_data(c.eval_data)), config)
        try:
            metrics.inception_path()
        except ImportError as e:
            raise ValueError(f"--eval-data: FID against {config.eval_data!r} needs the Inception network ({e}); "
                             "or pass --eval-samples 0") from None
    if config.batch_size > len(dataset):
        raise ValueError(f"--batch-size: expected at most the {len(dataset)} training images of {config.data!r}, "
                         f"got {config.batch_size}")
    info = data_info(config, dataset)
    seed_globals(config.seed)  # the initial weights depend on the seed only, not on what ran before
    try:
        model = recipe.model_for(config, info)
    except (ValueError, TypeError) as e:
        raise ValueError(f"network settings (--net, --net-channels, --dropout, --image-size): {e}") from None
    state = dict(recipe.new_state(config, info)) if recipe.new_state is not None else {}
    extra_models = dict(recipe.extra_models(config, info, state)) if recipe.extra_models is not None else {}
    model.to(dist.device)
    check_sampling(recipe, model, config, info, {k: t.module.to(dist.device) for k, t in extra_models.items()})
    lock = RunLock(out_dir) if dist.rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if dist.rank == 0:
            print(f"{recipe.name}: {config.net} with {nets.count_params(model):,} parameters, {len(dataset):,} "
                  f"training images {'x'.join(map(str, info.shape))}, {config.steps} steps of {config.batch_size} "
                  f"on {dist.device}", file=sys.stderr)

        def sample_fn(ema: nn.Module, generator: torch.Generator, extras: Mapping[str, nn.Module]) -> Tensor:
            seeds = torch.randint(0, 2**31 - 1, (config.grid_samples,), generator=generator, device=generator.device)
            return sample_images(recipe, ema, config, info, seeds.tolist(),
                                 grid_labels(config.grid_samples, info.num_classes), extras=extras)

        result = train(config, model=model, loss_fn=recipe.loss(config, info, state), dataset=dataset,
                       sample_fn=sample_fn, resume=resume, dist=dist, extra_models=extra_models, state=state,
                       recipe=recipe.name, info=info.to_dict(), lock=False)
        scores: dict[str, float] = dict(result.metrics)
        if dist.rank == 0 and config.eval_samples > 0:
            extras = {name: ema for name, (_, ema) in result.extra.items()}
            scores.update(evaluate(recipe, result.ema, config, info, out_dir=out_dir, extras=extras,
                                   progress=config.progress))
            for key, value in scores.items():
                if key.startswith(("digits", "fid")):
                    print(f"{key}: {value:.4f}")
            print(f"samples: {out_dir / 'samples.png'}", end="  ")
        if dist.rank == 0:
            print(f"checkpoint: {result.checkpoint}  tensorboard: tensorboard --logdir {out_dir / 'tb'}")
    finally:
        if lock is not None:
            lock.release()
    return scores


def main(recipe: ImageRecipe, argv: Sequence[str] | None = None, *,
         run_fn: Callable[..., dict[str, Any]] | None = None) -> int:
    """``python -m recipes.NAME [flags]``: bad input ends as one ``error: ...`` line on stderr and exit code 2.

    ``run_fn(config, resume=, dist=)`` replaces ``recipe.run`` for recipes with a run of their own."""
    dist = None
    try:
        cli = recipe.parse(argv)
        dist = init_distributed(cli.config.device)
        (run_fn or recipe.run)(cli.config, resume=cli.resume, dist=dist)
    except (ValueError, FileNotFoundError, NonFiniteError, RunDirectoryLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist is not None:
            close_distributed(dist)
    return 0


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint for sampling
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready to sample from: its recipe, config, data info, EMA model and extra models' EMAs."""

    path: Path
    recipe: ImageRecipe
    config: Any
    info: DataInfo
    model: nn.Module
    extras: dict[str, nn.Module]


def load_for_sampling(checkpoint: str | Path, *, device: torch.device | str = "cpu") -> Loaded:
    """Rebuild the EMA models of any recipe's checkpoint from what it records (recipe, config, data info)."""
    path = find_checkpoint(checkpoint)
    state = load_checkpoint(path)
    if not state.get("recipe") or "info" not in state:
        raise ValueError(f"checkpoint: {str(path)!r} does not record its recipe and data info (written by an "
                         "older version, or not by a recipe)")
    recipe = find_recipe(state["recipe"])
    config = config_from_dict(recipe.config, state["config"])
    info = DataInfo.from_dict(state["info"])
    device = torch.device(device)

    def restore(module: nn.Module, weights: Mapping[str, Tensor], what: str) -> nn.Module:
        try:
            module.load_state_dict(weights)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ValueError(f"checkpoint: the {what} weights in {str(path)!r} do not fit the network its config "
                             f"describes ({' '.join(first[:2])[:300]})") from None
        return module.to(device).eval().requires_grad_(False)

    model = restore(recipe.model_for(config, info), state["ema"], "EMA")
    extras: dict[str, nn.Module] = {}
    if state.get("extra_models"):
        recipe_state = dict(recipe.new_state(config, info)) if recipe.new_state is not None else {}
        built = recipe.extra_models(config, info, recipe_state) if recipe.extra_models is not None else {}
        for name, saved in state["extra_models"].items():
            if name not in built:
                raise ValueError(f"checkpoint: {str(path)!r} holds an extra model {name!r} that recipe "
                                 f"{recipe.name!r} does not build")
            extras[name] = restore(built[name].module, saved["ema"] if saved["ema"] is not None else saved["model"],
                                   name)
    return Loaded(path, recipe, config, info, model, extras)
