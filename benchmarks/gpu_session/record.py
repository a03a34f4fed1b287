"""The session record and the guards around each step: time budgets, subprocesses with timeouts, append-and-fsync.

Every step's result goes to ``DIR/gpu-session.md`` (appended) and ``DIR/gpu-session.json`` (rewritten atomically)
the moment it is known, both flushed and fsync'ed, so a session cut short by its time limit keeps everything measured
until then. A step that raises is recorded as ``failed`` with the tail of its traceback and the next step runs; a
subprocess that outlives its budget is killed with its whole process group and recorded as ``timeout`` with the tail
of its output. Budgets: when step ``i`` starts, it gets ``remaining * share_i / sum(share_j, j >= i)`` seconds, so
time a step leaves unused flows to the later ones and no step can take the time reserved for those after it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository root: children run there
MIN_STEP_SECONDS = 3.0  # a step offered less than this is recorded as skipped
TAIL_CHARS = 3000  # how much of a failing step's output or traceback is kept in the record


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fsync_append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tail(text: str, chars: int = TAIL_CHARS) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


@dataclasses.dataclass
class Outcome:
    """What a step returns: ``status`` ok | failed | timeout, a markdown body, raw numbers, an error text."""

    status: str = "ok"
    md: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Step:
    """A named step: ``run(budget_s) -> Outcome``; ``share`` is its part of the stage budget (seconds at nominal)."""

    name: str
    share: float
    run: Callable[[float], Outcome]
    cap_s: float | None = None  # at most this many seconds, whatever the share gives


class Session:
    """One stage's record in ``out_dir``, with a wall-clock deadline ``budget_s`` from now."""

    def __init__(self, out_dir: str | Path, *, stage: str, budget_s: float, smoke: bool, argv: Sequence[str]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "logs").mkdir(exist_ok=True)
        self.md_path, self.json_path = self.out_dir / "gpu-session.md", self.out_dir / "gpu-session.json"
        self.start, self.budget_s = time.monotonic(), float(budget_s)
        self.doc = self._load_json()
        self.entry: dict[str, Any] = {"stage": stage, "smoke": smoke, "started": utc_now(), "budget_s": budget_s,
                                      "argv": list(argv), "steps": []}
        self.doc["stages"].append(self.entry)
        self._write_json()
        mode = " (smoke: CPU, toy sizes)" if smoke else ""
        _fsync_append(self.md_path, f"\n## Stage `{stage}`{mode}\n\nStarted {self.entry['started']}, budget "
                                    f"{budget_s:.0f} s: `python -m benchmarks.gpu_session {' '.join(argv)}`\n")

    def _load_json(self) -> dict[str, Any]:
        if self.json_path.is_file():
            try:
                doc = json.loads(self.json_path.read_text())
                if isinstance(doc, dict) and isinstance(doc.get("stages"), list):
                    return doc
            except (OSError, ValueError):
                pass
            self.json_path.replace(self.json_path.with_suffix(f".unreadable-{int(time.time())}.json"))
        return {"format": 1, "stages": []}

    def _write_json(self) -> None:
        _fsync_replace(self.json_path, json.dumps(self.doc, indent=1, default=str) + "\n")

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def log_path(self, name: str) -> Path:
        return self.out_dir / "logs" / f"{len(self.entry['steps']):02d}-{name}.log"

    def note(self, text: str) -> None:
        """Append free text to the markdown record now."""
        _fsync_append(self.md_path, text if text.endswith("\n") else text + "\n")

    def run_step(self, name: str, run: Callable[[float], Outcome], budget_s: float) -> Outcome:
        """Run one step with ``budget_s`` seconds; record it before (as running) and after; never raise."""
        record: dict[str, Any] = {"name": name, "status": "running", "started": utc_now(),
                                  "budget_s": round(budget_s, 1)}
        self.entry["steps"].append(record)
        if budget_s < MIN_STEP_SECONDS:
            outcome = Outcome("skipped", f"skipped: {budget_s:.1f} s left for it")
            record.update(status="skipped", seconds=0.0)
            self._write_json()
            self.note(f"\n### {name}\n\n{outcome.md}\n")
            return outcome
        self._write_json()
        self.note(f"\n### {name}\n\n_started {record['started']}, budget {budget_s:.0f} s_\n")
        t0 = time.monotonic()
        try:
            outcome = run(budget_s)
        except Exception as e:  # a step's failure is data, and the next step runs
            outcome = Outcome("failed", error=tail("".join(traceback.format_exception(e))))
        seconds = time.monotonic() - t0
        record.update(status=outcome.status, seconds=round(seconds, 2), data=outcome.data)
        if outcome.error:
            record["error"] = outcome.error
        self._write_json()
        body = [f"**{outcome.status}** in {seconds:.1f} s"]
        if outcome.md:
            body.append(outcome.md.rstrip())
        if outcome.error:
            body.append("```\n" + outcome.error.rstrip() + "\n```")
        self.note("\n" + "\n\n".join(body) + "\n")
        return outcome

    def run_steps(self, steps: Sequence[Step], *, shares: bool = True) -> list[Outcome]:
        """Run ``steps`` in order, step ``i`` with ``remaining * share_i / sum(later shares)`` seconds, or with all
        that remains when not ``shares`` (smoke runs: their times say nothing about a GPU's); ``cap_s`` applies."""
        outcomes = []
        for i, step in enumerate(steps):
            later = sum(s.share for s in steps[i:])
            budget = max(self.remaining(), 0.0)
            if shares:
                budget = budget * step.share / later if later > 0 else 0.0
            if step.cap_s is not None:
                budget = min(budget, step.cap_s)
            outcomes.append(self.run_step(step.name, step.run, budget))
        return outcomes

    def finish(self) -> None:
        counts: dict[str, int] = {}
        for s in self.entry["steps"]:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        self.entry.update(finished=utc_now(), seconds=round(time.monotonic() - self.start, 1), counts=counts)
        self._write_json()
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        self.note(f"\nStage finished {self.entry['finished']} after {self.entry['seconds']:.0f} s: {summary}.\n")


# --------------------------------------------------------------------------------------------- subprocesses


@dataclasses.dataclass
class Proc:
    """A finished (or killed) child: exit code (None when killed), whether it ran out of time, seconds, output."""

    argv: list[str]
    rc: int | None
    timed_out: bool
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def outcome(self, md: str = "", data: dict[str, Any] | None = None) -> Outcome:
        """ok, or failed/timeout with the output's tail as the error."""
        data = {"rc": self.rc, "seconds": round(self.seconds, 2), **(data or {})}
        if self.ok:
            return Outcome("ok", md, data)
        why = f"killed after {self.seconds:.0f} s (time budget)" if self.timed_out else f"exit code {self.rc}"
        return Outcome("timeout" if self.timed_out else "failed", md, data, f"{why}\n{tail(self.output)}")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: this one, with the repository first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _kill_group(p: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (its DataLoader and compile workers too), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(argv: Sequence[str], *, timeout: float, log: Path, env: dict[str, str] | None = None) -> Proc:
    """Run ``argv`` in the repository root, output to ``log``; kill its process group after ``timeout`` seconds."""
    argv = [str(a) for a in argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "wb") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        p = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env or child_env(), start_new_session=True)
        timed_out = False
        try:
            p.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if p.poll() is None:
                _kill_group(p)
    seconds = time.monotonic() - t0
    return Proc(argv, None if timed_out else p.returncode, timed_out, seconds,
                log.read_text(encoding="utf-8", errors="replace"))


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a recipe run directory (:func:`recipes.checkpoints.latest_checkpoint`), imported
    on use so that this orchestrating process does not load torch until it needs to."""
    from recipes.checkpoints import latest_checkpoint as latest

    return latest(run_dir)


def run_task(session: Session, name: str, task: str, kwargs: dict[str, Any], *, timeout: float) -> Outcome:
    """Run ``tasks.<task>(**kwargs)`` in a child process; its result dict becomes the outcome's data (its ``md``
    entry the markdown)."""
    result_path = session.out_dir / "logs" / f".{name}.result.json"
    result_path.unlink(missing_ok=True)
    proc = run_process(python("-m", "benchmarks.gpu_session.worker", task, json.dumps(kwargs), str(result_path)),
                       timeout=timeout, log=session.log_path(name))
    data: dict[str, Any] = {}
    if proc.ok and result_path.is_file():
        data = json.loads(result_path.read_text())
        result_path.unlink()
    elif proc.ok:
        return Outcome("failed", error=f"the task wrote no result\n{tail(proc.output)}")
    md = str(data.pop("md", ""))
    return proc.outcome(md, data)
