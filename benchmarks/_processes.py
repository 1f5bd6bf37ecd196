"""A ``lavise`` command run as its own process, timed, with its peak memory (no torch imported here)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measured_run(home: Path, *args: str, env: dict[str, str]) -> tuple[float, float, str]:
    """``lavise --home HOME *args`` as a child process: (wall seconds, peak RSS in MiB, stdout).

    Peak RSS is ``os.wait4``'s ``ru_maxrss``: the largest resident set of the process or of any of
    its children (workers), not their sum.  A failing command ends the benchmark with its stderr.
    """
    cmd = [sys.executable, "-m", "lavise_cli", "--home", str(home), *args]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        secs = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, errs = out.read().decode(), err.read().decode()
    if code != 0:
        sys.exit(f"lavise {' '.join(args)} failed ({code}):\n{errs[-3000:]}")
    return secs, usage.ru_maxrss / 1024, text
