"""``python -m benchmarks.gpu_session.worker TASK KWARGS_JSON RESULT_JSON``: run one task of
:mod:`benchmarks.gpu_session.tasks` in this (child) process and write its result as JSON; exit 1 with the traceback
on stderr if it raises."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: python -m benchmarks.gpu_session.worker TASK KWARGS_JSON RESULT_JSON, got {argv}",
              file=sys.stderr)
        return 2
    from .tasks import TASKS

    name, kwargs, result_path = argv[0], json.loads(argv[1]), Path(argv[2])
    if name not in TASKS:
        print(f"TASK: expected one of {sorted(TASKS)}, got {name!r}", file=sys.stderr)
        return 2
    result = TASKS[name](**kwargs)
    tmp = result_path.with_name(f".{result_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, default=float))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
