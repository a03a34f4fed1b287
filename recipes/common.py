"""What every recipe composes: config -> CLI, EMA, AdamW with warm-up, autocast, atomic checkpoints.

A recipe's config is a frozen dataclass (usually a subclass of :class:`TrainConfig`) whose fields
carry a trailing ``# comment``; :func:`parse_cli` turns it into flags (``--batch-size 64``,
``--no-bf16``, ``--preset NAME``, ``--resume [PATH]``), and the resolved config is written as JSON
next to every checkpoint. Checkpoints are ``OUT_DIR/ckpt-<step>.pt`` (+ ``.json``), written to a
temporary file first and renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import json
import os
import random
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

C = TypeVar("C")

CHECKPOINT_GLOB = "ckpt-*.pt"
_RESERVED = ("preset", "resume", "help")
_AUTO = "<latest>"


# ----------------------------------------------------------------------------------------------
# Config -> CLI
# ----------------------------------------------------------------------------------------------


def _check_type(value: Any, tp: Any, name: str, *, from_json: bool = False) -> Any:
    """``value`` as an instance of the annotation ``tp``; TypeError naming ``name`` otherwise.

    Supported annotations: ``int, float, str, bool``, ``X | None``, ``Literal[...]``,
    ``tuple[X, ...]`` and ``tuple[X, Y]``. JSON lists are accepted for tuples when ``from_json``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(TypeError):
                return _check_type(value, arg, name, from_json=from_json)
    elif origin is Literal:
        if value in args:
            return value
        raise TypeError(f"{name}: expected one of {list(args)}, got {value!r}")
    elif origin is tuple:
        if isinstance(value, tuple) or (from_json and isinstance(value, list)):
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(items) == len(value):
                return tuple(_check_type(v, t, f"{name}[{i}]", from_json=from_json)
                             for i, (v, t) in enumerate(zip(value, items)))
            raise TypeError(f"{name}: expected a tuple of {len(items)} values, got {len(value)}")
    else:
        raise TypeError(f"{name}: unsupported config field type {tp!r}")
    raise TypeError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is tuple:
        inner = [_type_name(args[0]), "..."] if len(args) == 2 and args[1] is Ellipsis else map(_type_name, args)
        return "comma-separated (" + ", ".join(inner) + ")"
    return {int: "an int", float: "a float", str: "a string", bool: "true/false"}.get(tp, repr(tp))


def _from_text(text: str, tp: Any, flag: str) -> Any:
    """Parse a flag's text into the annotation ``tp``; ValueError naming ``flag`` on failure."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ValueError(f"{flag}: expected {_type_name(tp)}, got {text!r}")
    if tp is str:
        return text
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise bad
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise bad from None
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() == "none":
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ValueError):
                return _from_text(text, arg, flag)
        raise bad
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise bad
    if origin is tuple:
        parts = text.split(",") if text.strip() else []
        items = args[:1] * len(parts) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(parts):
            raise bad
        return tuple(_from_text(p.strip(), t, flag) for p, t in zip(parts, items))
    raise TypeError(f"{flag}: unsupported config field type {tp!r}")


def _to_text(value: Any) -> str:
    """The flag text that :func:`_from_text` parses back into ``value``."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(_to_text(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


@functools.cache
def _class_comments(klass: type) -> dict[str, str]:
    """Field name -> its trailing ``# comment`` (or the comment lines right above it) in ``klass``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        if text or above:
            found[node.target.id] = " ".join(text or above)
    return found


def field_help(cls: type) -> dict[str, str]:
    """Help text per field: ``field(metadata={"help": ...})``, else the field's comment in the source."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(_class_comments(klass))
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            helps[f.name] = str(f.metadata["help"])
    return helps


def check_config_types(config: Any) -> None:
    """TypeError naming the field if a dataclass field's value does not match its annotation."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        _check_type(getattr(config, f.name), hints[f.name], f.name)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-ready primitives (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Rebuild a config from :func:`config_to_dict`'s output; fields missing from ``values`` take defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config: unknown fields {unknown} for {cls.__name__} (known: {sorted(names)})")
    return cls(**{k: _check_type(v, hints[k], k, from_json=True) for k, v in values.items()})


def config_to_flags(config: Any) -> list[str]:
    """Flags that :func:`parse_cli` turns back into ``config``: ``--name=value``, ``--x``/``--no-x`` for booleans.

    Strings inside tuples must not contain commas, and a string ``none`` in an optional field reads as None.
    """
    flags = []
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags.append(f"--{flag}={_to_text(value)}")
    return flags


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ValueError instead of exiting, so errors can be caught and tested."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


def build_parser(cls: type, presets: dict[str, Any], *, default_preset: str, prog: str | None = None
                 ) -> argparse.ArgumentParser:
    """``--preset``, ``--resume [PATH]`` and one flag per field of ``cls`` (help from the field comments)."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    summary = (cls.__doc__ or "").strip().splitlines()
    parser = _Parser(prog=prog, allow_abbrev=False, description=summary[0] if summary else None)
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"starting configuration, one of {sorted(presets)} (default: {default_preset}); "
                             "flags override it")
    parser.add_argument("--resume", nargs="?", const=_AUTO, default=None, metavar="PATH",
                        help="continue a run: a checkpoint file, a run directory, or nothing for the latest "
                             "checkpoint in --out-dir (a fresh start when there is none); the run's saved config "
                             "is used, and flags given here override it")
    for f in dataclasses.fields(cls):
        if f.name in _RESERVED:
            raise TypeError(f"{cls.__name__}.{f.name}: the field name is reserved for a command-line option")
        tp = hints[f.name]
        flag = f"--{f.name.replace('_', '-')}"
        shown = _to_text(getattr(presets[default_preset], f.name))
        text = f"{helps.get(f.name, '')} ({default_preset}: {shown})".strip().replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{text} [{_type_name(tp)}]")
    return parser


class Cli(NamedTuple):
    """What :func:`parse_cli` resolved: the config to run, the checkpoint to resume (or None), the preset."""

    config: Any
    resume: Path | None
    preset: str


def parse_cli(cls: type[C], presets: dict[str, C], argv: Sequence[str] | None = None, *,
              default_preset: str | None = None, prog: str | None = None) -> Cli:
    """Resolve ``preset <- flags`` (or ``checkpoint config <- flags`` with ``--resume``) into a config.

    Raises ValueError naming the flag for an unknown preset or flag, or a value that does not parse.
    """
    if not presets:
        raise ValueError("presets: expected at least one preset, got an empty dict")
    for name, preset in presets.items():
        if not isinstance(preset, cls):
            raise TypeError(f"presets[{name!r}]: expected a {cls.__name__}, got {type(preset).__name__}")
    default_preset = default_preset or next(iter(presets))
    parser = build_parser(cls, presets, default_preset=default_preset, prog=prog)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [o for a in parser._actions for o in a.option_strings]
        hint = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
        raise ValueError(f"unknown flag {unknown[0]!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                         + f"; see --help for the {len(options)} flags")
    preset = namespace.preset or default_preset
    if preset not in presets:
        raise ValueError(f"--preset: expected one of {sorted(presets)}, got {preset!r}")
    hints = typing.get_type_hints(cls)
    overrides = {}
    for f in dataclasses.fields(cls):
        if hasattr(namespace, f.name):
            raw = getattr(namespace, f.name)
            flag = f"--{f.name.replace('_', '-')}"
            overrides[f.name] = raw if isinstance(raw, bool) else _from_text(raw, hints[f.name], flag)
    base = presets[preset]
    resume = None
    if namespace.resume is not None:
        out_dir = overrides.get("out_dir", getattr(base, "out_dir", "."))
        resume = _locate_checkpoint(namespace.resume, out_dir)
        if resume is not None:
            base = read_checkpoint_config(cls, resume)
    return Cli(dataclasses.replace(base, **overrides), resume, preset)


def _locate_checkpoint(arg: str, out_dir: str) -> Path | None:
    if arg == _AUTO:
        return latest_checkpoint(out_dir)
    path = Path(arg)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"--resume: expected a directory holding {CHECKPOINT_GLOB}, got {arg!r} (none there)")
        return found
    if not path.is_file():
        raise ValueError(f"--resume: expected a checkpoint file or a run directory, got {arg!r} (does not exist)")
    return path


# ----------------------------------------------------------------------------------------------
# The fields the training loop reads
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training-loop settings; a recipe's config subclasses this and adds its own fields."""

    out_dir: str = "runs/default"  # checkpoints, their JSON configs, TensorBoard events and sample grids
    seed: int = 0  # seeds the data order, the training noise and every RNG (per rank)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else CPU
    steps: int = 1000  # total optimizer steps
    batch_size: int = 128  # global batch: all ranks together
    lr: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps (0: none)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay, not applied to 1-D parameters (biases, norms)
    grad_clip: float | None = None  # clip the global gradient norm to this value (none: no clipping)
    ema_halflife_kimg: float = 500.0  # EMA half-life in thousands of training images
    ema_rampup_ratio: float | None = 0.05  # EMA half-life at most this fraction of the images seen (none: off)
    ema_rate: float | None = None  # a fixed EMA decay per step instead of the half-life, as in DDPM/ADM (0.9999)
    bf16: bool = True  # bf16 autocast of the forward pass on CUDA (no effect on CPU)
    compile: bool = False  # torch.compile the model
    num_workers: int = 0  # DataLoader worker processes per rank
    log_every: int = 100  # steps between TensorBoard scalars (and non-finite loss checks)
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # how many of the newest checkpoints stay on disk
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        check_config_types(self)
        for name, low in (("steps", 0), ("batch_size", 1), ("warmup_steps", 0), ("num_workers", 0),
                          ("log_every", 1), ("sample_every", 0), ("checkpoint_every", 1),
                          ("keep_checkpoints", 1), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a float > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas: expected two floats in [0, 1), got {self.adam_betas}")
        for name in ("adam_eps", "weight_decay", "ema_halflife_kimg"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a float >= 0, got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected a float > 0 or none, got {self.grad_clip}")
        if self.ema_rate is not None and not 0 <= self.ema_rate <= 1:
            raise ValueError(f"ema_rate: expected a float in [0, 1] or none, got {self.ema_rate}")
        if self.ema_rampup_ratio is not None and not self.ema_rampup_ratio > 0:
            raise ValueError(f"ema_rampup_ratio: expected a float > 0 or none, got {self.ema_rampup_ratio}")


# ----------------------------------------------------------------------------------------------
# EMA, optimizer, precision
# ----------------------------------------------------------------------------------------------


def ema_update(ema_params: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * param``, in place, in the EMA's own dtype (keep it fp32).

    Polyak averaging of the weights; ``decay = 0`` copies ``params``. Shapes match pairwise.
    """
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"params: expected {len(ema_params)} tensors (one per EMA tensor), got {len(params)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a float in [0, 1], got {decay}")
    with torch.no_grad():
        for i, (e, p) in enumerate(zip(ema_params, params)):
            if e.shape != p.shape:
                raise ValueError(f"params[{i}]: expected shape {tuple(e.shape)}, got {tuple(p.shape)}")
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


def ema_decay(*, batch_size: int, halflife_images: float, images_seen: float,
              rampup_ratio: float | None = None) -> float:
    """``0.5 ** (batch_size / h)``, ``h = min(halflife_images, rampup_ratio * images_seen)``.

    EDM (Karras et al., 2022), App. F: the EMA weight of a sample halves every ``h`` images; the
    ramp-up keeps ``h`` below a fraction of the images seen, so early EMAs forget the initialization.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    if not halflife_images >= 0 or not images_seen >= 0:
        raise ValueError(f"halflife_images, images_seen: expected >= 0, got {halflife_images}, {images_seen}")
    h = halflife_images if rampup_ratio is None else min(halflife_images, rampup_ratio * images_seen)
    return 0.5 ** (batch_size / max(h, 1e-8))


def lr_at(step: int, *, lr: float, warmup_steps: int) -> float:
    """``lr * min(1, (step + 1) / warmup_steps)``: linear warm-up, then constant (step counts from 0)."""
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step, warmup_steps: expected ints >= 0, got {step}, {warmup_steps}")
    return lr if warmup_steps == 0 else lr * min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (the schedule is a plain function of the step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) with weight decay on matrices/kernels only, fused on CUDA."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)


def autocast(device: torch.device, *, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# RNG state and checkpoints
# ----------------------------------------------------------------------------------------------


def seed_globals(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG's state: torch CPU, CUDA (when ``device`` is CUDA), numpy, Python ``random``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: typing.Callable[[typing.BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content; the temporary
    file is removed on exceptions (after a kill it stays behind as ``.NAME.tmp-PID``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def checkpoint_steps(out_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``out_dir``, ascending (temporary files are ignored)."""
    steps = []
    for p in Path(out_dir).glob(CHECKPOINT_GLOB):
        with contextlib.suppress(ValueError):
            steps.append(int(p.stem.removeprefix("ckpt-")))
    return sorted(steps)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    steps = checkpoint_steps(out_dir)
    return checkpoint_path(out_dir, steps[-1]) if steps else None


def save_checkpoint(state: dict[str, Any], config: Any, *, out_dir: str | Path, step: int,
                    keep: int | None = None) -> Path:
    """Write ``ckpt-<step>.pt`` (``state``, ``step`` and the config) then ``ckpt-<step>.json`` (the
    resolved config, for people and tools), each atomically; then delete all but the ``keep`` newest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(out_dir, step)
    config_dict = config_to_dict(config)
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: torch.save({**state, "step": step, "config": config_dict}, f))
    atomic_write(path.with_suffix(".json"), lambda f: f.write(text.encode()))
    if keep is not None:
        for old in checkpoint_steps(out_dir)[:-keep]:
            checkpoint_path(out_dir, old).unlink(missing_ok=True)
            checkpoint_path(out_dir, old).with_suffix(".json").unlink(missing_ok=True)
    return path


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete ``.*.tmp-PID`` files a killed writer left in ``out_dir`` (call from one process only)."""
    stale = list(Path(out_dir).glob(".*.tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state dict, on CPU (``mmap``: tensors read lazily); ValueError naming a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: expected an existing file, got {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any unpickling failure means a bad file
        raise ValueError(f"checkpoint: {str(path)!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise ValueError(f"checkpoint: {str(path)!r} lacks a step and a config; not written by save_checkpoint")
    return state


def read_checkpoint_config(cls: type[C], path: str | Path) -> C:
    """The config stored inside a checkpoint (memory-mapped: the weights are not read)."""
    return config_from_dict(cls, load_checkpoint(path, mmap=True)["config"])
