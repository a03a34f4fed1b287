"""Command-line errors of the recipes end as one ``error:`` line naming the flag, exit code 2, no traceback,
and before any training step: nothing is written to the run directory."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from kdiff import data
from recipes import edm
from recipes import sample as sample_cli
from recipes.checkpoints import save_checkpoint
from recipes.config import config_to_dict
from recipes.image import DataInfo, build_net

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--steps", "1", "--eval-samples", "0", "--no-progress", "--net", "unet_tiny"]


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the digits are packed under ./data on first use


def one_error_line(capsys, flag: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert flag in lines[0], lines[0]
    return lines[0]


def bad_files(tmp_path):
    good = tmp_path / "good.h5"
    data.write_h5(good, np.zeros((40, 8, 8, 1), np.uint8), split="train", source="zeros")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:1000])
    layout = tmp_path / "layout.h5"
    with h5py.File(layout, "w") as f:
        f["pixels"] = np.zeros((4, 8, 8), np.uint8)
    text = tmp_path / "notes.txt"
    text.write_text("not a directory")
    return {"truncated": truncated, "layout": layout, "text": text}


CASES = {
    "guidance nan": (["--guidance", "nan"], "--guidance"),
    "churn with dpmpp_2m": (["--solver", "dpmpp_2m", "--s-churn", "5"], "--s-churn"),
    "sigma-min above sigma-max": (["--sigma-min", "100"], "--sigma-min"),
    "lr inf": (["--lr", "inf"], "--lr"),
    "batch larger than the data": (["--batch-size", "5000"], "--batch-size"),
    "image size 4": (["--image-size", "4"], "--image-size"),
    "odd width": (["--net-channels", "7", "--net", "unet_digits"], "--net-channels"),
    "truncated data": (["--data", "{truncated}"], "--data"),
    "wrong layout data": (["--data", "{layout}"], "--data"),
    "missing eval data": (["--eval-data", "missing.h5", "--eval-samples", "10"], "--eval-data"),
    "file as out-dir": (["--out-dir", "{text}"], "--out-dir"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_training_flags_fail_before_the_first_step(case, tmp_path, capsys):
    files = bad_files(tmp_path)
    argv, flag = CASES[case]
    argv = [a.format(**files) for a in argv]
    out_dir = ["--out-dir", str(tmp_path / "run")] if "--out-dir" not in argv else []
    assert edm.main([*FAST, *out_dir, *argv]) == 2
    one_error_line(capsys, flag)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path, capsys):
    assert edm.main([*FAST, "--out-dir", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "'cuda' requested" in one_error_line(capsys, "--device")


def test_sampling_errors(tmp_path, capsys):
    config = edm.PRESETS["digits"]
    info = DataInfo((1, 8, 8), 10, 8)
    model = build_net(config, info)
    run = tmp_path / "run"
    save_checkpoint({"ema": model.state_dict(), "info": info.to_dict()}, config_to_dict(config), out_dir=run, step=1,
                    recipe="edm")
    assert sample_cli.main([str(run), "--batch-size", "0"]) == 2
    one_error_line(capsys, "--batch-size")
    assert sample_cli.main([str(run), "--solver", "dpmpp_2m", "--s-churn", "5", "--num", "2", "--steps", "2"]) == 2
    one_error_line(capsys, "--s-churn")
    assert sample_cli.main([str(run), "--num", "2", "--out", str(tmp_path / "run" / "ckpt-00000001.json")]) == 2
    one_error_line(capsys, "--out")
    # weights that disagree with the config they were saved with
    wider = build_net(edm.PRESETS["digits"].__class__(**{**config_to_dict(config), "net_channels": 16,
                                                          "adam_betas": tuple(config.adam_betas)}), info)
    save_checkpoint({"ema": wider.state_dict(), "info": info.to_dict()}, config_to_dict(config), out_dir=run, step=2,
                    recipe="edm")
    assert sample_cli.main([str(run), "--num", "2"]) == 2
    assert "do not fit the network its config describes" in one_error_line(capsys, "checkpoint")
    assert sample_cli.main([str(tmp_path / "nowhere")]) == 2
    one_error_line(capsys, "checkpoint")


def test_a_second_run_in_a_locked_directory_names_the_holder(tmp_path, capsys):
    import os

    from recipes.checkpoints import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        assert edm.main([*FAST, "--out-dir", str(run)]) == 2
    line = one_error_line(capsys, "--out-dir")
    assert f"is in use by another run (pid {os.getpid()} on " in line
    assert not list(run.glob("ckpt-*"))


def test_sampling_in_bf16_stays_close_to_float32(tmp_path, capsys):
    """``--precision bf16`` runs the network under autocast (on a CPU too): the same seeds give images that differ
    from float32's (the option takes effect) by a few uint8 levels, not by different pictures."""
    config = dataclasses.replace(edm.PRESETS["digits"], net="unet_tiny")
    info = DataInfo((1, 8, 8), 10, 8)
    torch.manual_seed(0)
    model = build_net(config, info)
    with torch.no_grad():  # the output layer starts at zero, which would leave the images to the preconditioning
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "run"
    save_checkpoint({"ema": model.state_dict(), "info": info.to_dict()}, config_to_dict(config), out_dir=run, step=1,
                    recipe="edm")
    images = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert sample_cli.main([str(run), "--num", "8", "--steps", "4", "--precision", precision,
                                "--out", str(out)]) == 0
        images[precision] = data.read_h5(out / "samples.h5")[0].astype(np.int64)
    assert sample_cli.main([str(run), "--seeds", "100-107", "--steps", "4", "--out", str(tmp_path / "other")]) == 0
    other = data.read_h5(tmp_path / "other" / "samples.h5")[0].astype(np.int64)
    diff = np.abs(images["fp32"] - images["bf16"])
    assert diff.max() > 0  # bf16 rounding reached the pixels
    # the same pictures up to rounding (measured: 0.75 levels on average), where other seeds' images differ by
    # about 113 levels
    assert diff.mean() < np.abs(images["fp32"] - other).mean() / 10
    capsys.readouterr()
    assert sample_cli.main([str(run), "--precision", "fp16"]) == 2
    one_error_line(capsys, "--precision")
