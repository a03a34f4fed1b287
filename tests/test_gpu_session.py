"""benchmarks.gpu_session: the record survives failing, raising and hanging steps; budgets are shared as documented;
the parsers read what pytest and benchmarks.report print; and both stages run end to end in --smoke mode."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.gpu_session import stage_train
from benchmarks.gpu_session.record import Outcome, Session, Step, python, run_process

ROOT = Path(__file__).resolve().parents[1]


def _steps(doc):
    return {s["name"]: s for stage in doc["stages"] for s in stage["steps"]}


def test_a_raising_step_and_a_hanging_child_are_recorded_and_the_next_steps_run(tmp_path):
    session = Session(tmp_path, stage="unit", budget_s=60, smoke=True, argv=["--stage", "unit"])

    def raises(budget):
        return {"a": 1}["b"]  # KeyError, with a traceback

    def hangs(budget):
        return run_process(python("-c", "import time; print('started', flush=True); time.sleep(120)"),
                           timeout=budget, log=session.log_path("hangs")).outcome()

    t0 = time.monotonic()
    session.run_steps([Step("first", 1, lambda b: Outcome("ok", "first ran", {"x": 1})),
                       Step("raises", 1, raises),
                       Step("hangs", 1, hangs, cap_s=3.5),
                       Step("last", 1, lambda b: Outcome("ok", "last ran"))])
    session.finish()
    assert time.monotonic() - t0 < 40  # the hanging child was killed at its budget, not waited for
    doc = json.loads((tmp_path / "gpu-session.json").read_text())
    steps = _steps(doc)
    assert [s["name"] for s in doc["stages"][0]["steps"]] == ["first", "raises", "hangs", "last"]
    assert [steps[n]["status"] for n in ("first", "raises", "hangs", "last")] == ["ok", "failed", "timeout", "ok"]
    assert "KeyError" in steps["raises"]["error"] and "Traceback" in steps["raises"]["error"]
    assert "started" in steps["hangs"]["error"] and steps["hangs"]["seconds"] < 20
    assert doc["stages"][0]["counts"] == {"ok": 2, "failed": 1, "timeout": 1}
    md = (tmp_path / "gpu-session.md").read_text()
    for text in ("### first", "first ran", "### raises", "KeyError", "### hangs", "**timeout**", "### last",
                 "last ran", "2 ok"):
        assert text in md


def test_budgets_follow_the_shares_and_unused_time_flows_on(tmp_path):
    session = Session(tmp_path, stage="unit", budget_s=100, smoke=True, argv=[])
    given = []

    def take(budget):
        given.append(budget)
        return Outcome()

    session.run_steps([Step("a", 1, take), Step("b", 3, take), Step("c", 1, take, cap_s=5), Step("d", 1, take)])
    # a gets 100 * 1/6; nearly all of it is left, so b gets ~100 * 3/5; c is capped; d gets what is left
    assert given[0] == pytest.approx(100 / 6, abs=0.5)
    assert given[1] == pytest.approx(100 * 3 / 5, abs=0.5)
    assert given[2] == 5
    assert given[3] == pytest.approx(100, abs=1)
    session.run_step("late", take, 1.0)  # below the minimum: recorded as skipped, not run
    assert len(given) == 4 and _steps(json.loads(session.json_path.read_text()))["late"]["status"] == "skipped"


def test_parse_pytest_counts_what_finished_and_names_failures():
    out = ("tests/test_a.py::test_x[1-bf16] PASSED                        [ 10%]\n"
           "tests/test_a.py::test_x[2-fp32] FAILED                        [ 20%]\n"
           "tests/test_b.py::test_y SKIPPED (needs a CUDA device)          [ 30%]\n"
           "========= 1 failed, 1 passed, 1 skipped, 4 deselected in 3.21s =========\n")
    parsed = stage_train.parse_pytest(out)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["failed"] == ["tests/test_a.py::test_x[2-fp32]"]
    assert parsed["summary"] == "1 failed, 1 passed, 1 skipped, 4 deselected"
    killed = stage_train.parse_pytest(out.splitlines(keepends=True)[0])
    assert killed["counts"] == {"passed": 1} and killed["summary"] is None


def test_goal_ratios_from_report_tables():
    text = """### Multiscale loss
| (B, C, d) | dtype | provider | ms | GB/s | % of copy BW | speed-up vs torch | peak MiB |
|---|---|---|---|---|---|---|---|
| (32, 3, 256) | bfloat16 | triton | 0.50 | 1700 | 57% | 6.00x | 12 |
| (32, 3, 256) | bfloat16 | torch | 3.00 | 1 | 1% | 1.00x | 120 |
| (32, 3, 256) | bfloat16 | compile | 1.00 | 1 | 1% | 3.00x | 60 |
"""
    tables = stage_train.parse_tables(text)
    assert tables[0]["title"] == "Multiscale loss" and len(tables[0]["rows"]) == 3
    goals = {g[0]: g[1:] for g in stage_train.goal_rows("multiscale", tables)}
    assert goals["multiscale (32, 3, 256) bfloat16: >= 85% of copy bandwidth"] == ["57%", f"{57 / 85:.2f}"]
    assert goals["multiscale (32, 3, 256) bfloat16: >= 5.0x torch"] == ["6.00x", "1.20"]
    assert goals["multiscale (32, 3, 256) bfloat16: >= 1.5x compile"] == ["2.00x", f"{2 / 1.5:.2f}"]
    attention = ("| pass | B | H | N | D | dtype | triton ms | triton TFLOP/s | best SDPA TFLOP/s "
                 "| triton / best SDPA |\n") + """|---|---|---|---|---|---|---|---|---|---|
| fwd | 4 | 32 | 4096 | 64 | bfloat16 | 1 | 421 | 463 | 0.91 |
| fwd+bwd | 64 | 8 | 256 | 64 | bfloat16 | 1 | 41 | 96 | 0.43 |
"""
    goals = {g[0]: g[1:] for g in stage_train.goal_rows("attention", stage_train.parse_tables(attention))}
    assert goals["attention fwd N 4096 D 64: >= 1.1x best SDPA"] == ["0.91x", f"{0.91 / 1.1:.2f}"]
    assert goals["attention fwd N 4096 D 64: >= 400 TFLOP/s"] == ["421", f"{421 / 400:.2f}"]
    assert goals["attention fwd+bwd N 256 D 64: >= 1.0x best SDPA"] == ["0.43x", "0.43"]
    profiled = ("| (B, C, d) | dtype | provider | ms | GB/s | % of copy BW | speed-up vs torch | peak MiB "
                "| GPU busy us | wall / busy | kernel us | kernel % of copy |\n" + "|---" * 12 + "|\n") + """\
| (8, 3, 512) | float32 | triton | 0.10 | 1 | 40% | 9.00x | 12 | 50 | 2.00 | 30 | 88% |
"""
    goals = {g[0]: g[1:] for g in stage_train.goal_rows("multiscale", stage_train.parse_tables(profiled))}
    assert goals["multiscale (8, 3, 512) float32: kernel >= 85% of copy bandwidth"] == ["88%", f"{88 / 85:.2f}"]
    assert goals["multiscale (8, 3, 512) float32: wall <= 1.3x GPU busy time"] == ["2.00x", "0.65"]
    assert not any("(8, 3, 512) float32: >= 85%" in g for g in goals)  # the wall figure only when not profiled
    dispatch = """| pass | B | H | N | D | dtype | triton ms | kdiff-auto ms | sdpa ms | sdpa-flash ms | sdpa-cudnn ms |
|---|---|---|---|---|---|---|---|---|---|---|
| fwd+bwd | 64 | 8 | 256 | 64 | bfloat16 | 2.0 | 0.8 | 0.9 | 1.2 | 0.6 |
| fwd+bwd | 4 | 8 | 1024 | 64 | bfloat16 | 2.0 | 2.0 | 0.9 | 1.2 | 0.6 |
"""
    goals = {g[0]: g[1:] for g in stage_train.goal_rows("attention", stage_train.parse_tables(dispatch))}
    assert goals == {"attention fwd+bwd N 256 D 64: kdiff dispatch >= 1.0x best SDPA": ["0.75x", "0.75"]}
    train = """| net | batch | variant | ms/step | img/s | GFLOP/step |
|---|---|---|---|---|---|
| unet_fashion | 256 | eager | 80.0 | 3200 | 1590 |
| unet_fashion | 256 | bf16+cl+fused+compile | 20.0 | 12800 | 1590 |
| ddpm_cifar10 | 128 | eager | 80.0 | 99999 | 1590 |
"""
    goals = stage_train.goal_rows("train", stage_train.parse_tables(train))
    assert goals == [["unet_fashion batch 256: >= 12,800 img/s (4x 3,200), best variant bf16+cl+fused+compile",
                      "12,800", "1.00"]]


@pytest.fixture(scope="module")
def inception_fp16(tmp_path_factory):
    """The FID network stored in float16, as it is carried to an offline GPU machine."""
    from kdiff import metrics

    try:
        net = metrics.load_inception()
    except ImportError as e:
        pytest.skip(f"the eval extra is not installed: {e}")
    path = tmp_path_factory.mktemp("fid") / "inception-fp16.pt"
    torch.jit.save(net.half(), str(path))
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_smoke_train_then_fid_writes_every_step(tmp_path, inception_fp16):
    out, work = tmp_path / "out", tmp_path / "work"
    for stage, extra in (("train", []), ("fid", ["--inception", str(inception_fp16)])):
        done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--stage", stage, "--smoke",
                               "--out", str(out), "--work", str(work), *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "gpu-session.json").read_text())
    md = (out / "gpu-session.md").read_text()
    assert [s["stage"] for s in doc["stages"]] == ["train", "fid"]
    ops = stage_train.report_ops()
    train_names = ["environment", "gpu-tests", *(f"bench-{op}" for op in ops),
                   *(Path(f).stem.replace("test_", "") for f in stage_train.bench_files(ops)),
                   "edm-data", "edm-train", "edm-export", "edm-sample-10k", "edm-sample-40k", "edm-sample-10k-fp32"]
    fid_names = ["inception", "fid-reference", "fid-10k", "fid-50k", "fid-train-vs-test", "fid-precision"]
    for stage, names in zip(doc["stages"], (train_names, fid_names)):
        assert [s["name"] for s in stage["steps"]] == names
        for s in stage["steps"]:
            assert f"### {s['name']}" in md
            assert s["status"] in ("ok", "failed", "timeout")
            assert s["status"] == "ok" or s["error"]  # a failure carries its reason, it is not raised
    steps = _steps(doc)
    # the chain stage 2 depends on must work on the CPU; benchmarks may be cut by the smoke time cap
    for name in ("environment", "gpu-tests", "edm-data", "edm-train", "edm-export", "edm-sample-10k",
                 "edm-sample-40k", "edm-sample-10k-fp32", *fid_names):
        assert steps[name]["status"] == "ok", (name, steps[name].get("error"))
    ema = torch.load(out / "edm-fashion-ema-fp16.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in ema["ema"].values() if v.is_floating_point())
    assert (out / "edm-fashion-ema-fp16.pt").stat().st_size < 16 * 2**20 and "config" in ema
    assert "float16" in steps["inception"]["data"]["stored_dtypes"]
    assert steps["fid-10k"]["data"]["n"] == 4 and steps["fid-50k"]["data"]["n"] == 8
    for name in ("fid-10k", "fid-50k", "fid-train-vs-test"):
        assert np.isfinite(steps[name]["data"]["fid"]) and steps[name]["data"]["fid"] > 0
    precision = steps["fid-precision"]["data"]
    assert precision["n"] == 4 and precision["fid_bf16"] == pytest.approx(steps["fid-10k"]["data"]["fid"], rel=1e-4)
    assert all(np.isfinite(precision[k]) for k in ("fid_fp32", "fid_bf16_other_seeds", "seed_gap", "precision_gap"))
    assert 0 <= precision["pixel_mean_abs_diff"] < 255
