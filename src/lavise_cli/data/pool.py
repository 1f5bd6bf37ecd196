"""A process pool for per-image work while building an index (probing images, drawing masks).

Workers die with the command that started them (even on ``kill -9``; see :mod:`lavise_cli.procs`)
and are ended at once on Ctrl-C or SIGTERM.  Small jobs (or ``workers <= 1``) run in this process.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Sequence

from ..errors import DataError
from ..procs import die_with_parent

IN_PROCESS_BELOW = 64  # fewer jobs than this run in this process: a pool would cost more than it saves


def probe(path: str) -> tuple[str, str | None, int, int]:
    """``(status, mode, height, width)`` of one image file, in a worker process; ``status`` is
    ``"ok"``, ``"missing"`` or ``"corrupt"`` (then mode is None and the size 0 x 0)."""
    from .images import probe_image

    try:
        mode, h, w = probe_image(path)
        return "ok", mode, h, w
    except DataError as e:
        return ("missing" if "does not exist" in str(e) else "corrupt"), None, 0, 0


def pool_map(fn: Any, args: Sequence[tuple[Any, ...]], workers: int, progress: Any, desc: str) -> list[Any]:
    """``[fn(*a) for a in args]``, in order, over ``workers`` processes, advancing a ``progress``
    task (rich ``Progress``, or None) called ``desc`` per job."""
    task = progress.add_task(desc, total=len(args), unit="img") if progress is not None else None
    results: list[Any] = []
    if workers <= 1 or len(args) < IN_PROCESS_BELOW:
        for a in args:
            results.append(fn(*a))
            if task is not None:
                progress.advance(task)
        return results
    # Workers die with this process (even on `kill -9`); on Ctrl-C or SIGTERM they are ended at once.
    ex = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        for r in ex.map(fn, *zip(*args), chunksize=16):
            results.append(r)
            if task is not None:
                progress.advance(task)
    except BaseException:
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.kill()
        raise
    ex.shutdown()
    return results
