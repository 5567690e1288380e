"""Ray's cost per job (docs/workers.md): a local Ray with 2 one-CPU workers, 200 empty jobs, then 50 jobs that
each carry a 1.1 MB string (the size of the reward text every evaluation job takes along).

    .venv/bin/python -m bench.studies.ray_overhead
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from ramp_cpp.executor import make_executor


def noop(x: object) -> object:
    return x


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="rayo-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    try:
        t = time.perf_counter()
        ex = make_executor(2, None, 1, 0)
        init = time.perf_counter() - t
        ex.map(noop, list(range(4)))  # the workers started
        t = time.perf_counter()
        ex.map(noop, list(range(200)))
        empty = (time.perf_counter() - t) / 200
        text = "x" * 1_100_000
        t = time.perf_counter()
        ex.map(noop, [text] * 50)
        carrying = (time.perf_counter() - t) / 50
        ex.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"init_s": init, "per_empty_job_ms": 1e3 * empty, "per_1.1MB_job_ms": 1e3 * carrying}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
