"""The shared recipe machinery: config <-> CLI, EMA, warm-up, data order, atomic checkpoints, exact
resume (in process and after SIGKILL), the NaN stop, TensorBoard scalars, and a 2-rank gloo run.

Training runs use the tiny MLP denoiser of ``tests/_tiny_train.py`` on random 4x4 images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # recipes/ is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

import _tiny_train as tiny  # noqa: E402

from recipes.checkpoints import (  # noqa: E402
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from recipes.config import (  # noqa: E402
    build_parser,
    config_from_dict,
    config_to_dict,
    config_to_flags,
    parse_cli,
)
from recipes.distributed import Dist, Rand, ResumableBatchSampler, init_distributed  # noqa: E402
from recipes.grids import make_grid, write_grid  # noqa: E402
from recipes.loop import NonFiniteLossError, train  # noqa: E402
from recipes.optim import adamw, autocast, ema_decay, ema_update, lr_at  # noqa: E402
from recipes.train_config import TrainConfig  # noqa: E402

TINY = Path(tiny.__file__)
STATE_KEYS = ("model", "ema", "optimizer", "sampler", "generator", "rng", "extra_models", "recipe_state")


# ----------------------------------------------------------------------------------------------
# Config <-> CLI
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoConfig(TrainConfig):
    """A config with every supported field type."""

    name: str = "demo"  # a free-form run name
    # channel multiplier per resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)
    dropout: float | None = None  # dropout probability (none: no dropout layer)
    solver: Literal["heun", "euler"] = "heun"  # sampler for the grids
    class_cond: bool = True  # condition on labels


DEMO_PRESETS = {"small": DemoConfig(steps=10), "large": DemoConfig(steps=1000, channel_mult=(1, 2, 4, 4))}


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
demo_configs = st.builds(
    DemoConfig,
    name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    channel_mult=st.lists(st.integers(-10**12, 10**12), max_size=4).map(tuple),
    dropout=st.none() | finite,
    solver=st.sampled_from(["heun", "euler"]),
    class_cond=st.booleans(),
    steps=st.integers(0, 10**9),
    lr=st.floats(min_value=1e-300, max_value=1e300),
    grad_clip=st.none() | st.floats(min_value=1e-6, max_value=1e6),
    adam_betas=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
    bf16=st.booleans(),
    compile=st.none() | st.booleans(),
    compile_mode=st.sampled_from(["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
    device=st.sampled_from(["auto", "cpu", "cuda"]),
)


@given(demo_configs)
def test_config_round_trips_through_flags_and_json(config):
    flags = config_to_flags(config)
    cli = parse_cli(DemoConfig, DEMO_PRESETS, flags, default_preset="large")
    assert cli.config == config and cli.resume is None and cli.preset == "large"
    assert config_from_dict(DemoConfig, json.loads(json.dumps(config_to_dict(config)))) == config


def test_preset_then_flags_override():
    cli = parse_cli(DemoConfig, DEMO_PRESETS, ["--preset", "large", "--steps", "7", "--batch-size=16",
                                              "--no-class-cond", "--dropout", "0.25", "--solver", "euler"])
    expected = dataclasses.replace(DEMO_PRESETS["large"], steps=7, batch_size=16, class_cond=False, dropout=0.25,
                                   solver="euler")
    assert cli.config == expected
    assert parse_cli(DemoConfig, DEMO_PRESETS, []).config == DEMO_PRESETS["small"]  # first preset by default


def test_optional_bool_flags():
    """``bool | None`` fields take ``--x``, ``--no-x`` and ``--x=none`` (the loop's compile: none = on CUDA only)."""
    for argv, expected in (([], None), (["--compile"], True), (["--no-compile"], False), (["--compile=none"], None),
                           (["--compile", "false"], False), (["--compile=true"], True)):
        assert parse_cli(DemoConfig, DEMO_PRESETS, argv).config.compile is expected


def test_compile_defaults_to_cuda_only_and_passes_its_mode(monkeypatch):
    from recipes import loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not loop.compiles(DemoConfig(), cpu) and loop.compiles(DemoConfig(), cuda)
    assert loop.compiles(DemoConfig(compile=True), cpu) and not loop.compiles(DemoConfig(compile=False), cuda)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: seen.append(kw) or net)
    model = torch.nn.Linear(2, 2)
    dist = Dist(rank=0, world_size=1, local_rank=0, device=cpu)
    assert loop._wrap(model, DemoConfig(), dist) is model and seen == []
    loop._wrap(model, DemoConfig(compile=True, compile_mode="reduce-overhead"), dist)
    assert seen == [{"mode": "reduce-overhead"}]


def test_help_comes_from_field_comments():
    text = build_parser(DemoConfig, DEMO_PRESETS, default_preset="large").format_help()
    for comment in ("a free-form run name", "channel multiplier per resolution (large: 1,2,4,4)",
                    "global batch: all ranks together", "dropout probability (none: no dropout layer)"):
        assert comment in " ".join(text.split())


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], r"--preset: expected one of \['large', 'small'\], got 'huge'"),
    (["--steps", "ten"], r"--steps: expected an int, got 'ten'"),
    (["--lr", "fast"], r"--lr: expected a float, got 'fast'"),
    (["--solver", "rk4"], r"--solver: expected one of heun\|euler, got 'rk4'"),
    (["--adam-betas", "0.9"], r"--adam-betas: expected comma-separated \(a float, a float\), got '0.9'"),
    (["--dropout", "half"], r"--dropout: expected a float or none, got 'half'"),
    (["--stepz", "3"], r"unknown flag '--stepz' \(did you mean --steps\?\)"),
    (["--batch_size=4"], r"unknown flag '--batch_size=4' \(did you mean --batch-size\?\)"),
    (["--steps", "-5"], r"steps: expected an int >= 0, got -5"),
    (["--steps"], r"--steps.*expected one argument"),
    (["--compile=maybe"], r"--compile: expected true/false or none, got 'maybe'"),
    (["--compile-mode", "fast"], r"--compile-mode: expected one of default\|reduce-overhead\|max-autotune\|"
                                 r"max-autotune-no-cudagraphs, got 'fast'"),
])
def test_bad_flags_raise_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_cli(DemoConfig, DEMO_PRESETS, argv)


def test_config_field_types_are_checked():
    with pytest.raises(TypeError, match=r"steps: expected an int, got '5'"):
        DemoConfig(steps="5")
    with pytest.raises(TypeError, match=r"channel_mult\[1\]: expected an int, got 2.5"):
        DemoConfig(channel_mult=(1, 2.5))
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        config_from_dict(DemoConfig, {"bogus": 1})
    with pytest.raises(TypeError, match=r"presets\['x'\]: expected a DemoConfig, got TrainConfig"):
        parse_cli(DemoConfig, {"x": TrainConfig()}, [])


def test_resume_flag_takes_the_saved_config(tmp_path):
    run = tmp_path / "run"
    saved = DemoConfig(out_dir=str(run), steps=5, lr=3e-4, channel_mult=(1, 3))
    # nothing to resume yet: a fresh start from the preset
    fresh = parse_cli(DemoConfig, DEMO_PRESETS, ["--out-dir", str(run), "--resume"])
    assert fresh.resume is None and fresh.config == dataclasses.replace(DEMO_PRESETS["small"], out_dir=str(run))
    for step in (2, 4):
        save_checkpoint({"model": {}}, config_to_dict(saved), out_dir=run, step=step, recipe="demo")
    record = json.loads(checkpoint_path(run, 4).with_suffix(".json").read_text())
    assert record == {"recipe": "demo", "step": 4, "config": config_to_dict(saved)}
    for argv in (["--out-dir", str(run), "--resume"], ["--resume", str(run)],
                 ["--resume", str(checkpoint_path(run, 4))]):
        cli = parse_cli(DemoConfig, DEMO_PRESETS, [*argv, "--steps", "9", "--out-dir", str(run)])
        assert cli.resume == checkpoint_path(run, 4)
        assert cli.config == dataclasses.replace(saved, steps=9)
    with pytest.raises(ValueError, match=r"--resume: expected a checkpoint file or a run directory, got '.*nope'"):
        parse_cli(DemoConfig, DEMO_PRESETS, ["--resume", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match=r"--resume: expected a directory holding ckpt-\*\.pt"):
        parse_cli(DemoConfig, DEMO_PRESETS, ["--resume", str(tmp_path)])


# ----------------------------------------------------------------------------------------------
# EMA, warm-up, autocast
# ----------------------------------------------------------------------------------------------


@given(st.floats(0, 1), st.integers(1, 30), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_ema_of_a_constant_matches_the_closed_form(decay, k, seed, dtype):
    """k updates towards a fixed p: ema_k = p + decay^k (ema_0 - p), computed in float64."""
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(3, 4, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)]
    e0 = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    ema = [e.clone() for e in e0]
    storage = [e.data_ptr() for e in ema]
    for _ in range(k):
        ema_update(ema, p, decay)
    for e, e_init, param in zip(ema, e0, p):
        target = param.double() + decay**k * (e_init.double() - param.double())
        assert e.dtype == torch.float32
        torch.testing.assert_close(e.double(), target, rtol=0, atol=1e-6 * k)
    assert [e.data_ptr() for e in ema] == storage  # in place


def test_ema_update_errors():
    a = [torch.zeros(3)]
    with pytest.raises(ValueError, match=r"decay: expected a float in \[0, 1\], got 1.5"):
        ema_update(a, [torch.ones(3)], 1.5)
    with pytest.raises(ValueError, match=r"params: expected 1 tensors"):
        ema_update(a, [], 0.5)
    with pytest.raises(ValueError, match=r"params\[0\]: expected shape \(3,\), got \(4,\)"):
        ema_update(a, [torch.ones(4)], 0.5)


@given(st.integers(1, 512), st.integers(1, 200))
def test_ema_halflife_halves_the_weight(batch_size, n_batches):
    """After halflife_images / batch_size updates, the weight left on the starting value is 1/2."""
    halflife = batch_size * n_batches
    decays = [ema_decay(batch_size=batch_size, halflife_images=halflife, images_seen=1e12) for _ in range(n_batches)]
    assert math.prod(decays) == pytest.approx(0.5, rel=1e-12)
    # ramp-up: the half-life is capped by ratio * images seen, so the decay grows with the images seen
    ramp = [ema_decay(batch_size=batch_size, halflife_images=halflife, images_seen=s, rampup_ratio=0.05)
            for s in (0, batch_size, 10 * halflife, 40 * halflife)]
    assert ramp[0] == 0.0 and ramp == sorted(ramp)
    assert ramp[-1] == ema_decay(batch_size=batch_size, halflife_images=halflife, images_seen=0)


@given(st.floats(1e-6, 1.0), st.integers(1, 50))
def test_warmup_is_linear_then_constant(lr, warmup):
    values = [lr_at(s, lr=lr, warmup_steps=warmup) for s in range(warmup + 5)]
    steps = np.diff(values[:warmup])
    np.testing.assert_allclose(steps, lr / warmup, rtol=1e-9)
    assert values[0] == pytest.approx(lr / warmup) and values[warmup - 1:] == [lr] * 6
    assert lr_at(3, lr=lr, warmup_steps=0) == lr


def test_adamw_groups_and_cpu_autocast_is_a_no_op():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = adamw(net.parameters(), lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(net[0].weight)}
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), enabled=True):
        assert (a @ a).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Data order, noise, RNG state, distributed setup
# ----------------------------------------------------------------------------------------------


@given(st.integers(1, 5), st.sampled_from([1, 2, 4]), st.integers(0, 30), st.integers(0, 2**32), st.integers(0, 20))
def test_sampler_epochs_shards_and_resume(share, world, extra, seed, k):
    batch = share * world
    n = batch + extra
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    whole = ResumableBatchSampler(n, batch_size=batch, seed=seed)
    per_epoch = n // batch
    epoch = [b for _, b in zip(range(per_epoch), iter(whole))]
    flat = [i for b in epoch for i in b]
    assert len(flat) == len(set(flat)) == per_epoch * batch and set(flat) <= set(range(n))
    # each rank's shares, concatenated in rank order, are the single-process global batches
    ranks = [iter(ResumableBatchSampler(n, batch_size=batch, seed=seed, rank=r, world_size=world))
             for r in range(world)]
    glob = iter(ResumableBatchSampler(n, batch_size=batch, seed=seed))
    for _ in range(per_epoch):
        assert [i for it in ranks for i in next(it)] == next(glob)
    assert next(glob, None) is None  # one pass is the rest of one epoch
    # state after k consumed batches continues exactly where an uninterrupted stream goes
    def stream(sampler, count):
        out = []
        while len(out) < count:
            for b in sampler:
                out.append(b)
                sampler.advance()
                if len(out) == count:
                    break
        return out

    expected = stream(ResumableBatchSampler(n, batch_size=batch, seed=seed), k + 3)[k:]
    first = ResumableBatchSampler(n, batch_size=batch, seed=seed)
    stream(first, k)
    second = ResumableBatchSampler(n, batch_size=batch, seed=seed)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert stream(second, 3) == expected
    assert first.state_dict()["epoch"] == k // per_epoch
    # no global RNG was touched
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"batch_size: expected a positive multiple of world_size=2, got 3"):
        ResumableBatchSampler(10, batch_size=3, seed=0, world_size=2)
    with pytest.raises(ValueError, match=r"dataset: expected at least batch_size=8 samples, got 5"):
        ResumableBatchSampler(5, batch_size=8, seed=0)
    s = ResumableBatchSampler(10, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"sampler state: expected n=10, got 11"):
        s.load_state_dict({**s.state_dict(), "n": 11})


@pytest.mark.parametrize("world", [2, 3])
def test_rand_is_independent_of_sharding(world):
    single = Rand(torch.Generator().manual_seed(5)).randn(world * 4, 3)
    shards = [Rand(torch.Generator().manual_seed(5), r, world).randn(4, 3) for r in range(world)]
    assert torch.equal(torch.cat(shards), single)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    draw = lambda: (torch.rand(3), np.random.rand(3), random.random())  # noqa: E731
    first = draw()
    draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    again = draw()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE: expected an integer environment variable, got 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK: expected 0 <= RANK < WORLD_SIZE=2, got 2"),
])
def test_distributed_env_errors(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        init_distributed("cpu")
    with pytest.raises(ValueError, match=r"device: expected 'auto', 'cpu' or 'cuda', got 'gpu'"):
        init_distributed("gpu")


# ----------------------------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, n, nrow", [(1, 5, 2), (3, 4, None), (3, 7, 3)])
def test_make_grid_layout_and_png(tmp_path, channels, n, nrow):
    levels = torch.randint(0, 256, (n, channels, 3, 5), generator=torch.Generator().manual_seed(n))
    images = levels.double() / 127.5 - 1  # exactly representable 8-bit levels
    grid = write_grid(images, tmp_path / "g.png", nrow=nrow, padding=1, min_size=0)
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    assert grid.shape == (rows * 4 + 1, cols * 6 + 1, channels) and grid.dtype == torch.uint8
    mask = torch.ones(grid.shape[:2], dtype=torch.bool)
    for i in range(n):
        top, left = 1 + (i // cols) * 4, 1 + (i % cols) * 6
        assert torch.equal(grid[top:top + 3, left:left + 5].permute(2, 0, 1), levels[i].to(torch.uint8))
        mask[top:top + 3, left:left + 5] = False
    assert (grid[mask] == 0).all()
    png = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(png.reshape(grid.shape), grid.numpy())
    white = torch.full((2, 2, 1), 255, dtype=torch.uint8)
    assert torch.equal(make_grid(torch.full((1, 1, 2, 2), 5.0), padding=0, min_size=0), white)  # clipped to 8 bits


@pytest.mark.parametrize("size, factor", [(8, 4), (3, 11), (28, 2), (32, 1), (40, 1)])
def test_small_images_are_enlarged_by_nearest_neighbour(size, factor):
    """Each pixel becomes a factor x factor block (factor = ceil(32 / size)); cells are >= 32 px; nothing blends."""
    levels = torch.randint(0, 256, (5, 1, size, size), generator=torch.Generator().manual_seed(size))
    grid = make_grid(levels.double() / 127.5 - 1, nrow=5, padding=2)
    cell = size * factor
    assert cell >= 32 and grid.shape == (cell + 4, 5 * (cell + 2) + 2, 1)
    for i in range(5):
        left = 2 + i * (cell + 2)
        block = grid[2:2 + cell, left:left + cell, 0]
        expected = levels[i, 0].to(torch.uint8)[:, None, :, None].expand(size, factor, size, factor)
        assert torch.equal(block, expected.reshape(cell, cell))
    assert make_grid(torch.zeros(100, 1, 8, 8), padding=2).shape == (342, 342, 1)  # the digits grid: 10 x 10 cells


def test_make_grid_errors():
    with pytest.raises(ValueError, match=r"images: expected a \(N, C, H, W\) tensor with C in \(1, 3, 4\), got \(3, 4"):
        make_grid(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match=r"images: expected a floating-point tensor"):
        make_grid(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def test_a_crash_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    config = config_to_dict(tiny.PRESETS["tiny"])
    old = save_checkpoint({"model": {"w": torch.arange(10.0)}}, config, out_dir=tmp_path, step=3)
    before = old.read_bytes()
    real_save = torch.save

    def save_half_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    for step in (3, 4):  # overwrite an existing checkpoint, then write a new one
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint({"model": {"w": torch.zeros(10)}}, config, out_dir=tmp_path, step=step)
    monkeypatch.undo()
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003.json", "ckpt-00000003.pt"]
    assert torch.equal(load_checkpoint(old)["model"]["w"], torch.arange(10.0))
    (tmp_path / "bad.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match=r"checkpoint: '.*bad.pt' is not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"checkpoint: expected an existing file, got '.*missing.pt'"):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------
# Training in process: exact resume, logging, the NaN stop
# ----------------------------------------------------------------------------------------------


def tiny_config(out_dir: Path, **changes) -> tiny.TinyConfig:
    return dataclasses.replace(tiny.PRESETS["tiny"], out_dir=str(out_dir), **changes)


def run_tiny(config, *, resume=None, record=None, nan_at_call=None, sample_fn=None):
    calls = []

    def loss_fn(model, batch, rand):
        loss, u = tiny.tiny_loss(model, batch, rand)
        calls.append(None)
        if len(calls) == nan_at_call:
            loss = loss * float("nan")
        if record is not None:
            record.append((loss.detach().double().numpy(), u.double().numpy()))
        return loss, u

    return train(config, model=tiny.tiny_model(config), loss_fn=loss_fn, dataset=tiny.tiny_data(config),
                 sample_fn=sample_fn, resume=resume, dist=Dist())


def assert_bitwise(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training_state(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["step"] == b["step"]
    for key in STATE_KEYS:
        assert_bitwise(a[key], b[key], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny preset uninterrupted (24 steps, checkpoints every 6), with the per-sample losses recorded."""
    config = tiny_config(tmp_path_factory.mktemp("reference"))
    record = []
    result = run_tiny(config, record=record)
    return config, record, result


def test_resume_in_process_is_bitwise(reference, tmp_path):
    full, _, result = reference
    part = dataclasses.replace(full, out_dir=str(tmp_path), steps=7)  # stops inside a log interval
    run_tiny(part)
    with pytest.warns(UserWarning, match=r"config fields differ from the checkpoint's: \['steps'\]"):
        resumed = run_tiny(dataclasses.replace(part, steps=24), resume=checkpoint_path(tmp_path, 7))
    assert resumed.step == 24 and resumed.checkpoint == checkpoint_path(tmp_path, 24)
    assert_same_training_state(checkpoint_path(full.out_dir, 24), checkpoint_path(tmp_path, 24))
    assert load_checkpoint(checkpoint_path(tmp_path, 24))["sampler"]["epoch"] == 4  # crossed four epochs
    moved = (result.model[1].weight - tiny.tiny_model(full)[1].weight).abs().max()
    assert moved > 1e-2


def test_sample_grids_do_not_disturb_training(reference, tmp_path):
    full, _, _ = reference

    def sample_fn(ema, generator, extras):
        torch.rand(100)  # a careless sampler touching the global RNG
        return torch.tanh(ema(torch.randn(6, 17, generator=generator)).view(6, 1, 4, 4))

    run_tiny(dataclasses.replace(full, out_dir=str(tmp_path), sample_every=10), sample_fn=sample_fn)
    assert_same_training_state(checkpoint_path(full.out_dir, 24), checkpoint_path(tmp_path, 24))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step-00000010.png", "step-00000020.png", "step-00000024.png"]


def test_tensorboard_scalars_match_the_per_sample_losses(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, record, _ = reference
    events = EventAccumulator(str(Path(config.out_dir) / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "loss/noise_q1",
            "loss/noise_q4"} <= set(events.Tags()["scalars"])
    logged = [e.step for e in events.Scalars("train/loss")]
    assert logged == [4, 6, 8, 12, 16, 18, 20, 24]  # log_every=4, plus the checkpoint steps
    start = 0
    for i, step in enumerate(logged):
        loss = np.concatenate([r[0] for r in record[start:step]])
        u = np.concatenate([r[1] for r in record[start:step]])
        assert events.Scalars("train/loss")[i].value == pytest.approx(loss.mean(), rel=1e-6)
        quarter = np.digitize(u, [0.25, 0.5, 0.75])
        for q in range(4):
            if (quarter == q).any():
                value = [e.value for e in events.Scalars(f"loss/noise_q{q + 1}") if e.step == step]
                assert value == [pytest.approx(loss[quarter == q].mean(), rel=1e-6)]
        assert events.Scalars("train/lr")[i].value == pytest.approx(config.lr * min(1, step / 10), rel=1e-6)
        start = step
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s") + events.Scalars("train/grad_norm"))


def test_nan_loss_stops_with_the_last_checkpoint_intact(reference, tmp_path):
    full, _, _ = reference
    config = dataclasses.replace(full, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"at step 10 \(stopped at step 12\); the last good checkpoint, "
                                                 r".*ckpt-00000006.pt, is intact") as info:
        run_tiny(config, nan_at_call=10)
    assert info.value.step == 10 and info.value.checkpoint == checkpoint_path(tmp_path, 6)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000006.json", "ckpt-00000006.pt"]
    assert_same_training_state(checkpoint_path(full.out_dir, 6), checkpoint_path(tmp_path, 6))


def rich_config(out_dir: Path, **changes) -> tiny.TinyConfig:
    return tiny_config(out_dir, importance=True, classifier=True, **changes)


@pytest.fixture(scope="module")
def rich_reference(tmp_path_factory):
    """The tiny preset with a loss history (recipe-owned state) and a second model, uninterrupted."""
    config = rich_config(tmp_path_factory.mktemp("rich"))
    train(config, **tiny.tiny_parts(config), dist=Dist(), recipe="tiny")
    return config


def test_recipe_state_and_a_second_model_resume_bitwise(rich_reference, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    part = rich_config(tmp_path, steps=7)
    train(part, **tiny.tiny_parts(part), dist=Dist(), recipe="tiny")
    full = dataclasses.replace(part, steps=24)
    with pytest.warns(UserWarning, match=r"\['steps'\]"):
        result = train(full, **tiny.tiny_parts(full), dist=Dist(), recipe="tiny", resume=checkpoint_path(tmp_path, 7))
    assert_same_training_state(checkpoint_path(rich_reference.out_dir, 24), checkpoint_path(tmp_path, 24))
    saved = load_checkpoint(checkpoint_path(tmp_path, 24))
    assert saved["recipe"] == "tiny" and saved["recipe_state"]["history"]["count"] == 24
    assert not torch.equal(saved["recipe_state"]["history"]["values"], torch.ones(4, dtype=torch.float64))
    classifier = saved["extra_models"]["classifier"]
    assert classifier["optimizer"]["param_groups"][0]["lr"] == 3e-3  # its own optimizer and rate, not the config's
    assert (classifier["model"]["1.weight"] - classifier["ema"]["1.weight"]).abs().max() > 0
    assert set(result.extra) == {"classifier"} and "classifier/loss" in result.metrics
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"classifier/loss", "classifier/grad_norm"} <= set(events.Tags()["scalars"])
    # a checkpoint without the state this run declares is refused, naming both sides
    plain = tiny_config(tmp_path / "plain", steps=2)
    run_tiny(plain)
    with pytest.raises(ValueError, match=r"extra models \[\] and recipe state \[\]; this run has \['classifier'\]"):
        train(full, **tiny.tiny_parts(full), dist=Dist(), resume=checkpoint_path(tmp_path / "plain", 2))


def test_max_seconds_stops_saves_and_resumes_exactly(reference, tmp_path):
    full, _, _ = reference
    grids = []

    def sample_fn(ema, generator, extras):
        grids.append(sorted(p.name for p in tmp_path.glob("ckpt-*.pt")))  # what is on disk when sampling starts
        return torch.zeros(1, 1, 4, 4)

    config = dataclasses.replace(full, out_dir=str(tmp_path), step_delay=0.05, max_seconds=0.3)
    result = train(config, **tiny.tiny_parts(config), sample_fn=sample_fn, dist=Dist())
    assert result.stopped_early and 1 <= result.step < 24
    assert result.checkpoint == checkpoint_path(tmp_path, result.step) and result.checkpoint.is_file()
    assert grids == [[result.checkpoint.name]]  # saved before the final grid was drawn
    again = dataclasses.replace(config, step_delay=0.0, max_seconds=None)
    with pytest.warns(UserWarning):
        done = train(again, **tiny.tiny_parts(again), dist=Dist(), resume=result.checkpoint)
    assert done.step == 24 and not done.stopped_early
    assert_same_training_state(checkpoint_path(full.out_dir, 24), checkpoint_path(tmp_path, 24))


def test_non_finite_weights_are_never_written(tmp_path):
    config = tiny_config(tmp_path, steps=3, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"lr: expected a finite float, got inf"):
        dataclasses.replace(config, lr=math.inf)
    with pytest.raises(ValueError, match=r"--lr: expected a finite float, got nan"):
        parse_cli(tiny.TinyConfig, tiny.PRESETS, ["--lr", "nan"])
    # a schedule that overshoots to inf: the loss and gradient of step 1 are finite, the weights after it are not
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights of model .* at step 1 .*no checkpoint"):
        train(config, **tiny.tiny_parts(config), dist=Dist(), lr_fn=lambda step: math.inf)
    assert not list(tmp_path.glob("ckpt-*"))


def test_a_run_directory_is_locked(tmp_path):
    from recipes.checkpoints import RunDirectoryLockedError, RunLock

    config = tiny_config(tmp_path, steps=2)
    with RunLock(tmp_path), pytest.raises(RunDirectoryLockedError, match=rf"in use by another run \(pid {os.getpid()}"):
        run_tiny(config)
    assert not list(tmp_path.glob("ckpt-*"))
    assert run_tiny(config).step == 2  # released: the directory is usable again


def test_resume_takes_paths_and_retention_from_this_run(tmp_path):
    foreign = tmp_path / "foreign"
    saved = DemoConfig(out_dir=str(foreign), keep_checkpoints=1, steps=5)
    save_checkpoint({"model": {}}, config_to_dict(saved), out_dir=foreign, step=5)
    cli = parse_cli(DemoConfig, DEMO_PRESETS, ["--resume", str(checkpoint_path(foreign, 5))])
    assert cli.config.out_dir == DEMO_PRESETS["small"].out_dir and cli.config.keep_checkpoints == 2
    assert cli.config.steps == 5  # the rest of the run's settings do come from the checkpoint
    cli = parse_cli(DemoConfig, DEMO_PRESETS, ["--resume", str(foreign), "--out-dir", str(tmp_path / "mine")])
    assert cli.config.out_dir == str(tmp_path / "mine")


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules_match_their_closed_forms(schedule):
    lr, warm, total = 0.5, 4, 20
    for step in range(total + 3):
        ramp = min(1.0, (step + 1) / warm)
        p = min(1.0, max(0.0, (step - warm) / (total - warm)))
        decay = {"constant": 1.0, "linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p))}[schedule]
        got = lr_at(step, lr=lr, warmup_steps=warm, schedule=schedule, total_steps=total)
        assert got == pytest.approx(lr * ramp * decay, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(3, lr=lr, warmup_steps=0, schedule="cosine")


def test_adam_without_decay_is_pluggable(tmp_path):
    from recipes.optim import make_optimizer

    config = tiny_config(tmp_path, steps=3, optimizer="adam")
    model = tiny.tiny_model(config)
    opt = make_optimizer(model.parameters(), config)
    assert type(opt) is torch.optim.Adam and all(g["weight_decay"] == 0 for g in opt.param_groups)
    assert type(make_optimizer(model.parameters(), tiny_config(tmp_path))) is torch.optim.AdamW
    with pytest.raises(ValueError, match=r"weight_decay: expected 0 with optimizer 'adam'"):
        tiny_config(tmp_path, optimizer="adam", weight_decay=0.1)
    result = run_tiny(config)
    assert type(result.optimizer) is torch.optim.Adam


class EpochTagged(torch.utils.data.Dataset):
    """Random images that also report the epoch their (worker's copy of the) dataset was set to."""

    def __init__(self, n: int) -> None:
        self.x, self.epoch = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)), -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], self.epoch


def test_the_dataset_epoch_reaches_dataloader_workers(tmp_path):
    config = tiny_config(tmp_path, steps=14, num_workers=1)  # 6 steps per epoch
    seen = []

    def loss_fn(model, batch, rand):
        x, epoch = batch
        seen.append(epoch.tolist())
        return tiny.tiny_loss(model, [x], rand)

    train(config, model=tiny.tiny_model(config), loss_fn=loss_fn, dataset=EpochTagged(48), dist=Dist())
    assert seen == [[0] * 8] * 6 + [[1] * 8] * 6 + [[2] * 8] * 2


def test_a_fixed_ema_rate_of_zero_copies_the_weights(tmp_path):
    result = run_tiny(tiny_config(tmp_path, steps=3, ema_rate=0.0))
    for e, p in zip(result.ema.parameters(), result.model.parameters()):
        assert torch.equal(e, p)
    with pytest.raises(ValueError, match=r"ema_rate: expected a float in \[0, 1\] or none, got 1.5"):
        tiny_config(tmp_path, ema_rate=1.5)


def test_loss_fn_contract_errors(tmp_path):
    config = tiny_config(tmp_path, steps=1)
    with pytest.raises(ValueError, match=r"loss_fn: expected \(loss, noise position\) of shapes \(8,\) and \(8,\)"):
        train(config, model=tiny.tiny_model(config), dataset=tiny.tiny_data(config), dist=Dist(),
              loss_fn=lambda m, b, r: (torch.zeros(8, 1), torch.zeros(8)))
    with pytest.raises(ValueError, match=r"loss_fn: expected noise positions in \[0, 1\], got 8 outside"):
        train(config, model=tiny.tiny_model(config), dataset=tiny.tiny_data(config), dist=Dist(),
              loss_fn=lambda m, b, r: (m(torch.zeros(8, 17)).sum(1), torch.full((8,), 2.0)))


# ----------------------------------------------------------------------------------------------
# Subprocesses: SIGKILL and resume, torchrun with 2 gloo ranks
# ----------------------------------------------------------------------------------------------


def launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as f:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """The tiny preset on 2 gloo ranks under torchrun; started as soon as a test asks, waited for on demand."""
    out = tmp_path_factory.mktemp("torchrun")
    proc = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                   str(TINY), f"--out-dir={out}"], out / "log.txt")

    def done() -> Path:
        finish(proc, out / "log.txt")
        return out

    yield done
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigkill_then_resume_equals_an_uninterrupted_run(rich_reference, torchrun_run, tmp_path):
    """With recipe-owned state (a loss history) and a second model (a classifier with its own Adam) included."""
    # (torchrun_run is requested here only so that it runs alongside this test)
    victim = launch([sys.executable, str(TINY), f"--out-dir={tmp_path}", "--step-delay=0.15", "--importance",
                     "--classifier"], tmp_path / "log.txt")
    deadline = time.monotonic() + 240
    while not checkpoint_path(tmp_path, 6).exists():
        assert victim.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    time.sleep(0.3)  # a couple of steps past the checkpoint
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert not checkpoint_path(tmp_path, 24).exists()
    with pytest.warns(UserWarning, match=r"\['step_delay'\]"):
        result = tiny.main([f"--out-dir={tmp_path}", "--resume", "--step-delay=0"])
    assert result.step == 24
    assert_same_training_state(checkpoint_path(rich_reference.out_dir, 24), checkpoint_path(tmp_path, 24))


def test_torchrun_two_gloo_ranks_match_one_process(reference, torchrun_run):
    """Same global batch of 8 (4 per rank): parameters after 24 AdamW steps agree to 1e-5 (the gradient
    all-reduce sums in another order), and the all-reduced logged metrics agree to rtol 1e-5."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, ref = torchrun_run(), Path(reference[0].out_dir)
    one, two = load_checkpoint(checkpoint_path(ref, 24)), load_checkpoint(checkpoint_path(out, 24))
    early = load_checkpoint(checkpoint_path(ref, 6))
    assert two["world_size"] == 2 and len(two["rng"]) == 2 and one["sampler"] == two["sampler"]
    assert not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"])  # per-rank seeds
    for key in ("model", "ema"):
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=0, atol=1e-5)
            assert (value - early[key][name]).abs().max() > 1e-3  # training moved far more than the tolerance
    assert len(list((out / "tb").iterdir())) == 1  # only rank 0 logs
    scalars = []
    for run in (ref, out):
        events = EventAccumulator(str(run / "tb"))
        events.Reload()
        scalars.append({tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
                        if tag.startswith("loss/") or tag in ("train/loss", "train/grad_norm")})
    assert scalars[0].keys() == scalars[1].keys()
    for tag, values in scalars[0].items():
        np.testing.assert_allclose(scalars[1][tag], values, rtol=1e-5, err_msg=tag)
