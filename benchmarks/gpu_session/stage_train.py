"""Stage 1, ``--stage train``: environment, GPU tests, benchmark reports, then the EDM Fashion-MNIST run.

The EDM run leaves in the work folder (git-ignored, never carried) what stage 2 needs: the packed test split, the
first 10k training images, two sample files (seeds 0..9,999 and 10,000..49,999) and ``state.json`` naming them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .record import (
    ROOT,
    Outcome,
    Session,
    Step,
    child_env,
    latest_checkpoint,
    python,
    run_process,
    run_task,
    tail,
)


@dataclasses.dataclass(frozen=True)
class EDMPlan:
    """The EDM run of stage 1 (the reasons are in the package docstring)."""

    net: str = "unet_fashion"  # kdiff.nets config: 5.56M parameters, attention at 16x16 and 8x8
    net_channels: int | None = None  # None: the config's 64
    image_size: int | None = None  # None: the preset's 32 (28x28 padded)
    batch_size: int = 1024  # 4x the preset: the step is launch-bound at 256, so 4x the images cost ~1.3x the time
    lr: float = 2e-3  # sqrt(4) x the preset's 1e-3 for 4x the batch (Adam)
    warmup_steps: int = 200  # ~10% of the ~2,000 steps the budget should allow
    dropout: float = 0.0  # ~30 epochs: underfitting, not overfitting, limits the FID
    compile: bool = True  # torch.compile of the network (retried without it if the compiled run dies early)
    num_workers: int = 8  # DataLoader processes (16 cores)
    checkpoint_every: int = 200  # the time guard's loss is at most this many steps
    steps: int = 1_000_000  # never reached: the wall clock ends training
    startup_s: float = 45.0  # of the training budget, kept for start-up, data loading, the final save
    sample_batch: int = 2500  # sampling batch (bf16 autocast)
    sample_steps: int = 18  # Heun steps: 35 network evaluations
    sample_seeds: tuple[str, str] = ("0-9999", "10000-49999")  # two calls: FID at 10k survives a cut-short second
    grid_samples: int = 100


# Smoke: the same network at 16x16 (toy 12x12 images) and width 32, a few steps, 100 samples in 3 Heun steps.
SMOKE_PLAN = EDMPlan(net_channels=32, image_size=16, batch_size=8, lr=1e-3, warmup_steps=0, compile=False,
                     num_workers=0, checkpoint_every=2, steps=4, startup_s=0.0, sample_batch=100, sample_steps=3,
                     sample_seeds=("0-19", "20-99"), grid_samples=4)


# Shares of the report steps (35 s otherwise): the training-step table compiles unet_fashion and ddpm_cifar10
# (30-90 s each on an H100), and its rows print as they are measured, so a cut keeps the finished ones; the profile
# runs a few eager steps.
REPORT_SHARES = {"train": 80, "profile": 25}

# The benchmark CLIs have no size option; on a 2-core CPU the multiscale table takes ~2 minutes (torch.compile of the
# reference at 512x512), so smoke runs cut each report and benchmark suite at this many seconds (a recorded timeout
# there exercises the guard; what finished is kept).
SMOKE_REPORT_CAP_S = 10.0

# --------------------------------------------------------------------------------------------- discovery


def gpu_test_files() -> list[str]:
    """Test files that mention the ``gpu`` mark (collecting only these keeps pytest's start-up short)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8", errors="replace"))


def report_ops() -> list[str]:
    """The ops ``benchmarks.report`` has a module for: ``benchmarks/report_<op>.py``."""
    return sorted(p.stem.removeprefix("report_") for p in (ROOT / "benchmarks").glob("report_*.py"))


def bench_files(ops: list[str]) -> list[str]:
    """pytest-benchmark suites not already covered by a report op (the networks' training-step throughput)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("test_bench_*.py")
                  if p.stem.removeprefix("test_bench_") not in ops)


def recipe_has_max_seconds() -> bool:
    """Whether ``recipes`` knows the wall-clock stop ``--max-seconds``."""
    return any("max_seconds" in p.read_text(encoding="utf-8", errors="replace")
               for p in (ROOT / "recipes").rglob("*.py"))


# --------------------------------------------------------------------------------------------- parsing


_TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)
_SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|deselected|error|errors|xfailed).*) in ([\d.]+)s",
                      re.MULTILINE)


def parse_pytest(output: str) -> dict[str, Any]:
    """Per-outcome counts from ``pytest -v`` lines (so a killed run still counts what finished), failing test ids,
    and the final summary line when there is one."""
    counts: dict[str, int] = {}
    failed = []
    for test, outcome in _TEST_LINE.findall(output):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(test)
    found = _SUMMARY.findall(output)
    return {"counts": counts, "failed": failed, "summary": found[-1][0] if found else None}


def parse_tables(text: str) -> list[dict[str, Any]]:
    """Markdown tables in ``text``: [{"title": the last ### heading before it, "columns": [...], "rows": [[...]]}]."""
    tables, title, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: "):
            columns = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append({"title": title, "columns": columns, "rows": rows})
            continue
        i += 1
    return tables


def _num(text: str) -> float | None:
    match = re.match(r"^-?[\d.]+(?:e-?\d+)?", text.replace(",", "").strip())
    return float(match.group(0)) if match else None


def goal_rows(op: str, tables: list[dict[str, Any]]) -> list[list[str]]:
    """[goal, measured, ratio to goal] for the goals in BENCHMARKS.md that a report table lets us check."""
    out: list[list[str]] = []
    for table in tables:
        col = {c: j for j, c in enumerate(table["columns"])}
        rows = [dict(zip(table["columns"], r)) for r in table["rows"] if len(r) == len(col)]
        if op == "multiscale" and {"(B, C, d)", "provider", "ms", "% of copy BW"} <= col.keys():
            for shape in ("(32, 3, 256)", "(8, 3, 512)"):
                for dtype in ("bfloat16", "float32"):
                    cell = {r["provider"]: r for r in rows if r["(B, C, d)"] == shape and r["dtype"] == dtype}
                    if "triton" not in cell:
                        continue
                    ms = _num(cell["triton"]["ms"])
                    kernel_bw = _num(cell["triton"].get("kernel % of copy", ""))
                    bw = _num(cell["triton"]["% of copy BW"])
                    if kernel_bw is not None:  # the goal is the kernel's; the wall-time figure when not profiled
                        out.append([f"multiscale {shape} {dtype}: kernel >= 85% of copy bandwidth",
                                    f"{kernel_bw:.0f}%", f"{kernel_bw / 85:.2f}"])
                    elif bw is not None:
                        out.append([f"multiscale {shape} {dtype}: >= 85% of copy bandwidth", f"{bw:.0f}%",
                                    f"{bw / 85:.2f}"])
                    overhead = _num(cell["triton"].get("wall / busy", ""))
                    if overhead:
                        out.append([f"multiscale {shape} {dtype}: wall <= 1.3x GPU busy time", f"{overhead:.2f}x",
                                    f"{1.3 / overhead:.2f}"])
                    for other, goal in (("torch", 5.0), ("compile", 1.5)):
                        other_ms = _num(cell.get(other, {}).get("ms", ""))
                        if ms and other_ms:
                            out.append([f"multiscale {shape} {dtype}: >= {goal}x {other}", f"{other_ms / ms:.2f}x",
                                        f"{other_ms / ms / goal:.2f}"])
        if op == "attention" and {"pass", "N", "D"} <= col.keys():
            for r in rows:
                n, ratio = int(_num(r["N"]) or 0), _num(r.get("triton / best SDPA", ""))
                if ratio is not None:
                    goal = 1.0 if (r["pass"] != "fwd" or n <= 256) else 1.1
                    out.append([f"attention {r['pass']} N {n} D {r['D']}: >= {goal}x best SDPA", f"{ratio:.2f}x",
                                f"{ratio / goal:.2f}"])
                tf = _num(r.get("triton TFLOP/s", ""))
                if r["pass"] == "fwd" and n == 4096 and r["D"] == "64" and tf is not None:
                    out.append(["attention fwd N 4096 D 64: >= 400 TFLOP/s", f"{tf:.0f}", f"{tf / 400:.2f}"])
                sdpa_ms = [_num(r[c]) for c in col if c.startswith("sdpa") and c.endswith(" ms")]
                sdpa_ms = [t for t in sdpa_ms if t]
                shipped = _num(r.get("kdiff-auto ms", ""))
                if n <= 256 and shipped and sdpa_ms:  # what users get: the dispatch, kernel or SDPA
                    best = min(sdpa_ms)
                    out.append([f"attention {r['pass']} N {n} D {r['D']}: kdiff dispatch >= 1.0x best SDPA",
                                f"{best / shipped:.2f}x", f"{best / shipped:.2f}"])
        if op == "train" and {"net", "batch", "variant", "img/s"} <= col.keys():
            fashion = [r for r in rows if r["net"] == "unet_fashion" and r["batch"] == "256"]
            rates = [(_num(r["img/s"]), r["variant"]) for r in fashion if _num(r["img/s"])]
            if rates:
                rate, variant = max(rates)
                out.append([f"unet_fashion batch 256: >= 12,800 img/s (4x 3,200), best variant {variant}",
                            f"{rate:,.0f}", f"{rate / 12800:.2f}"])
    return out


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(r) + " |" for r in rows)])


# --------------------------------------------------------------------------------------------- steps


def _environment(session: Session, smoke: bool) -> Callable[[float], Outcome]:
    return lambda budget: run_task(session, "environment", "environment", {"smoke": smoke}, timeout=budget)


def _gpu_tests(session: Session) -> Callable[[float], Outcome]:
    def run(budget: float) -> Outcome:
        files = gpu_test_files()
        if not files:
            return Outcome("ok", "no test file carries the gpu mark")
        proc = run_process(python("-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v", "-rfE", *files),
                           timeout=budget, log=session.log_path("gpu-tests"))
        parsed = parse_pytest(proc.output)
        counts = ", ".join(f"{v} {k}" for k, v in sorted(parsed["counts"].items())) or "none finished"
        md = f"`pytest -m gpu` over {len(files)} files: {parsed['summary'] or counts}"
        if parsed["failed"]:
            md += "\n\nFailed:\n" + "\n".join(f"- `{t}`" for t in parsed["failed"][:40])
        return proc.outcome(md, {"files": files, **parsed})
    return run


def _report(session: Session, op: str, smoke: bool) -> Callable[[float], Outcome]:
    def run(budget: float) -> Outcome:
        argv = python("-m", "benchmarks.report", "--op", op, "--quick", *(["--device", "cpu"] if smoke else []))
        proc = run_process(argv, timeout=budget, log=session.log_path(f"bench-{op}"))
        start = proc.output.find("Device:")
        text = proc.output[start:] if start >= 0 else ""
        tables = parse_tables(text)
        goals = goal_rows(op, tables)
        md = re.sub(r"^(#+) ", r"\1## ", text.strip(), flags=re.MULTILINE)  # below the step; rows printed so far
        if goals:
            md += "\n\nAgainst the goals in BENCHMARKS.md (ratio >= 1 meets the goal):\n\n"
            md += _md_table(["goal", "measured", "ratio to goal"], goals)
        return proc.outcome(md, {"tables": tables, "goals": goals})
    return run


def _bench_file(session: Session, path: str) -> Callable[[float], Outcome]:
    stem = Path(path).stem

    def run(budget: float) -> Outcome:
        lines = session.out_dir / f"{stem}.jsonl"  # one line per finished test, kept if the run is killed
        lines.unlink(missing_ok=True)
        argv = python("-m", "pytest", path, "-p", "no:cacheprovider", "-p", "benchmarks.gpu_session.bench_plugin",
                      "-v", "--benchmark-columns=mean,stddev,rounds")
        proc = run_process(argv, timeout=budget, log=session.log_path(stem),
                           env=child_env({"KDIFF_BENCH_JSONL": str(lines)}))
        found = [json.loads(line) for line in lines.read_text().splitlines()] if lines.is_file() else []
        rows = []
        for b in found:
            extra, mean = b.get("extra_info", {}), b.get("mean_s")
            rate = extra.get("images_per_s")
            others = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in extra.items() if k != "images_per_s")
            rows.append([b["nodeid"].split("::")[-1], b["outcome"], f"{mean * 1e3:.2f}" if mean else "-",
                         f"{rate:,.0f}" if isinstance(rate, (int, float)) else "-", others])
        md = _md_table(["test", "outcome", "mean ms", "img/s", "extra_info"], rows) if rows else ""
        return proc.outcome(md, {"benchmarks": found})
    return run


class EDMRun:
    """Stage 1's EDM steps, sharing the work folder and ``state.json`` (what stage 2 reads)."""

    def __init__(self, session: Session, *, work: Path, data: str | None, plan: EDMPlan, smoke: bool) -> None:
        self.session, self.work, self.data, self.plan, self.smoke = session, work, data, plan, smoke
        self.run_dir = work / "edm"
        self.state: dict[str, Any] = {"samples": []}

    def _save_state(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "state.json").write_text(json.dumps(self.state, indent=1) + "\n")

    def pack(self, budget: float) -> Outcome:
        outcome = run_task(self.session, "edm-data", "pack_data",
                           {"source": self.data, "work": str(self.work)}, timeout=budget)
        if outcome.status == "ok":
            self.state.update(data=outcome.data["paths"], reference_n=outcome.data["counts"]["test"])
            self._save_state()
        return outcome

    def train_argv(self, *, compile: bool, max_seconds: float | None) -> list[str]:
        p, data = self.plan, self.state["data"]
        argv = python("-m", "recipes.edm", "--preset", "fashion", "--data", data["train"], "--eval-data", data["test"],
                      "--out-dir", str(self.run_dir), "--net", p.net, "--steps", str(p.steps),
                      "--batch-size", str(p.batch_size), "--lr", str(p.lr), "--warmup-steps", str(p.warmup_steps),
                      "--dropout", str(p.dropout), "--compile" if compile else "--no-compile",
                      "--num-workers", str(p.num_workers), "--checkpoint-every", str(p.checkpoint_every),
                      "--log-every", str(min(100, p.checkpoint_every)), "--sample-every", "0",
                      "--grid-samples", str(p.grid_samples), "--eval-samples", "0", "--no-progress", "--seed", "0")
        if p.net_channels is not None:
            argv += ["--net-channels", str(p.net_channels)]
        if p.image_size is not None:
            argv += ["--image-size", str(p.image_size)]
        if self.smoke:
            argv += ["--device", "cpu"]
        if max_seconds is not None:
            argv += ["--max-seconds", f"{max_seconds:.0f}"]
        return argv

    def train(self, budget: float) -> Outcome:
        """Train until the budget ends: ``--max-seconds`` where the recipe has it, else killed by the time guard
        after its last checkpoint (atomic checkpoints make that safe). A compiled run that dies before its first
        checkpoint is retried without ``torch.compile`` in the time left."""
        if "data" not in self.state:
            return Outcome("failed", error="no packed data (the edm-data step failed)")
        clean_stop = recipe_has_max_seconds()
        attempts: list[dict[str, Any]] = []
        deadline_budget, compile = budget, self.plan.compile
        proc = None
        for attempt in range(2):
            max_seconds = max(deadline_budget - self.plan.startup_s, 10.0) if clean_stop else None
            if self.smoke:
                max_seconds = 120.0 if clean_stop else None  # exercises the flag; the smoke run stops at --steps
            proc = run_process(self.train_argv(compile=compile, max_seconds=max_seconds), timeout=deadline_budget,
                               log=self.session.log_path(f"edm-train-{attempt}"))
            ckpt = latest_checkpoint(self.run_dir)
            attempts.append({"compile": compile, "max_seconds": max_seconds, "rc": proc.rc,
                             "timed_out": proc.timed_out, "seconds": round(proc.seconds, 1),
                             "checkpoint": str(ckpt) if ckpt else None})
            deadline_budget -= proc.seconds
            if ckpt is not None or not compile or deadline_budget < 60 or attempt == 1:
                break
            compile = False  # the compiled run died before saving anything: once more, eager
        ckpt = latest_checkpoint(self.run_dir)
        data = {"attempts": attempts, "clean_stop_flag": clean_stop, "plan": dataclasses.asdict(self.plan)}
        stop = (f"the recipe's --max-seconds {attempts[-1]['max_seconds']:.0f}" if clean_stop
                else "this command's time guard (killed after its last checkpoint)")
        md = (f"`recipes.edm --preset fashion`, {self.plan.net}, batch {self.plan.batch_size}, lr {self.plan.lr}, "
              f"bf16 autocast on CUDA, compile {attempts[-1]['compile']}; wall-clock limit: {stop}; ran "
              f"{proc.seconds:.0f} s in {len(attempts)} attempt(s); newest checkpoint: {ckpt.name if ckpt else 'none'}")
        if ckpt is None:
            return Outcome("failed", md, data, f"no checkpoint written\n{tail(proc.output)}")
        self.state["checkpoint"] = str(ckpt)
        self._save_state()
        if proc.ok or (proc.timed_out and not clean_stop):
            return Outcome("ok", md, data)
        return proc.outcome(md, data)

    def export(self, budget: float) -> Outcome:
        return run_task(self.session, "edm-export", "export_ema",
                        {"run_dir": str(self.run_dir), "out": str(self.session.out_dir / "edm-fashion-ema-fp16.pt")},
                        timeout=budget)

    def sample(self, part: int, *, precision: str = "bf16") -> Callable[[float], Outcome]:
        """Sample file ``part`` of the plan's seeds in bf16 (``state["samples"][part]``), or, with ``precision``
        fp32, the first part's seeds again in float32 (``state["samples_fp32"]``: the precision check)."""
        def run(budget: float) -> Outcome:
            ckpt = self.state.get("checkpoint")
            if ckpt is None:
                return Outcome("failed", error="no checkpoint to sample from (training failed)")
            seeds = self.plan.sample_seeds[part]
            out = self.work / (f"samples-{part}" if precision == "bf16" else f"samples-{part}-{precision}")
            argv = python("-m", "recipes.sample", ckpt, "--seeds", seeds, "--solver", "heun",
                          "--steps", str(self.plan.sample_steps), "--batch-size", str(self.plan.sample_batch),
                          "--precision", precision, "--out", str(out), *(["--device", "cpu"] if self.smoke else []))
            proc = run_process(argv, timeout=budget, log=self.session.log_path(f"edm-sample-{part}-{precision}"))
            h5 = out / "samples.h5"
            lo, hi = (int(x) for x in seeds.split("-"))
            md = (f"seeds {seeds} ({hi - lo + 1:,} samples), Heun {self.plan.sample_steps} steps "
                  f"({2 * self.plan.sample_steps - 1} evaluations), `--precision {precision}`, "
                  f"batch {self.plan.sample_batch}: {proc.seconds:.1f} s including start-up "
                  f"({(hi - lo + 1) / proc.seconds:,.0f} samples/s)")
            if proc.ok and h5.is_file():
                if precision == "bf16":
                    files = self.state["samples"]
                    files[part:] = [str(h5)]
                else:
                    self.state[f"samples_{precision}"] = str(h5)
                self._save_state()
                grid = out / "samples.png"
                if grid.is_file() and precision == "bf16":
                    (self.session.out_dir / f"edm-samples-{part}.png").write_bytes(grid.read_bytes())
            return proc.outcome(md, {"seeds": seeds, "file": str(h5), "precision": precision})
        return run


def steps(session: Session, *, work: Path, data: str | None, smoke: bool) -> list[Step]:
    """Stage 1's steps in order, each with its share of the budget (seconds at the nominal 490 s)."""
    ops = report_ops()
    plan = EDMPlan()
    if smoke:  # toy 12x12 data is padded to 16x16; real 28x28 data to the preset's 32x32
        plan = SMOKE_PLAN if data is None else dataclasses.replace(SMOKE_PLAN, image_size=None)
    edm = EDMRun(session, work=work, data=data, plan=plan, smoke=smoke)
    cap = SMOKE_REPORT_CAP_S if smoke else None
    return [Step("environment", 15, _environment(session, smoke)),
            Step("gpu-tests", 40, _gpu_tests(session)),
            *(Step(f"bench-{op}", REPORT_SHARES.get(op, 35), _report(session, op, smoke), cap) for op in ops),
            *(Step(Path(f).stem.replace("test_", ""), 30, _bench_file(session, f), cap) for f in bench_files(ops)),
            Step("edm-data", 10, edm.pack),
            Step("edm-train", 240, edm.train),
            Step("edm-export", 6, edm.export),
            Step("edm-sample-10k", 20, edm.sample(0)),
            Step("edm-sample-40k", 60, edm.sample(1)),
            Step("edm-sample-10k-fp32", 25, edm.sample(0, precision="fp32"))]
