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


class WorkerPool:
    """Worker processes kept for a whole build (``with WorkerPool(workers) as pool``), so chunks of
    images go through the same workers; ``workers <= 1`` runs everything in this process.  The
    workers start on the first chunk big enough to need them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._ex: ProcessPoolExecutor | None = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ex is None:
            return
        if exc[0] is not None:
            self._kill()
        else:
            self._ex.shutdown()
        self._ex = None

    def _kill(self) -> None:
        assert self._ex is not None
        procs = list((getattr(self._ex, "_processes", None) or {}).values())
        self._ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.kill()

    def map(self, fn: Any, args: Sequence[tuple[Any, ...]], progress: Any = None, task: Any = None) -> list[Any]:
        """``[fn(*a) for a in args]`` in order, advancing ``task`` of ``progress`` per job."""
        results: list[Any] = []
        if self.workers <= 1 or (self._ex is None and len(args) < IN_PROCESS_BELOW):
            for a in args:
                results.append(fn(*a))
                if task is not None:
                    progress.advance(task)
            return results
        if self._ex is None:
            # Workers die with this process (even on `kill -9`); on Ctrl-C or SIGTERM they are ended at once.
            self._ex = ProcessPoolExecutor(max_workers=self.workers, initializer=die_with_parent,
                                           initargs=(os.getpid(),))
        try:
            for r in self._ex.map(fn, *zip(*args), chunksize=16):
                results.append(r)
                if task is not None:
                    progress.advance(task)
        except BaseException:
            self._kill()
            self._ex = None
            raise
        return results


def pool_map(fn: Any, args: Sequence[tuple[Any, ...]], workers: int, progress: Any, desc: str) -> list[Any]:
    """``[fn(*a) for a in args]``, in order, over ``workers`` processes, advancing a ``progress``
    task (rich ``Progress``, or None) called ``desc`` per job."""
    task = progress.add_task(desc, total=len(args), unit="img") if progress is not None else None
    if not args:
        return []
    with WorkerPool(workers) as pool:
        return pool.map(fn, args, progress, task)
