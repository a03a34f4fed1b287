"""A pytest plugin (``-p benchmarks.gpu_session.bench_plugin``): as each test finishes, append one JSON line with its
outcome and, for pytest-benchmark tests, the timing statistics and ``extra_info`` to ``$KDIFF_BENCH_JSONL`` (flushed
and fsync'ed). pytest-benchmark writes its own JSON only when the whole session ends; this keeps every finished
benchmark of a run that is killed at its time budget."""

from __future__ import annotations

import json
import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("KDIFF_BENCH_JSONL")
    if not path or report.when != "call":
        return
    record = {"nodeid": item.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 3)}
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None:
        record["group"] = getattr(bench, "group", None)
        record["extra_info"] = dict(getattr(bench, "extra_info", {}))
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        if stats is not None:
            record.update(mean_s=stats.mean, stddev_s=stats.stddev, rounds=stats.rounds)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
