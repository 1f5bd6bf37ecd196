"""What every subcommand shares: the store, the consoles, JSON output and error handling."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import errors as errors_module
from ..fetch.http import human_size  # noqa: F401  (one unit system: binary, as the bars)
from ..distributed import RankDone
from ..errors import LaviseError, ShareDone
from ..store import Store

def lazy(module: str, name: str) -> Any:
    """``lavise_cli.<module>.<name>``, imported at its first call: the command modules import no
    torch when they load, so `lavise --version`, `--help` and `lavise store` start fast."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"lavise_cli.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


# `--precision` of every command that runs the backbone (lavise_cli.runtime.resolve_precision).
PRECISION_HELP = ("Backbone precision: auto (bf16 on CUDA with bf16 and on CPUs with AVX512-BF16/AMX, fp16 on "
                  "other CUDA, else fp32), fp32, bf16, fp16. Part of every cache key.")

# Results go to stdout; progress bars and messages to stderr, so `--json` stays parseable.
out = Console()
err = Console(stderr=True)


@dataclass
class State:
    home: str | None = None
    quiet: bool = False
    _store: Store | None = field(default=None, repr=False)

    @property
    def store(self) -> Store:
        if self._store is None:
            st = Store(self.home)
            check_store_root(st)
            self._store = st
            # What interrupted commands left behind (their writers are gone) goes first; cheap.
            with contextlib.suppress(OSError):
                self._store.clean_temporaries()
        return self._store


def check_store_root(st: Store) -> None:
    """One clear line when the store's root cannot be a folder: a regular file, or a path that
    cannot be created (``/proc/x``, a missing read-only mount).  The root is created when absent."""
    where = "pass --home a folder you can write to (or set LAVISE_HOME)"
    for p in (st.root, st.cache):
        if p.exists() and not p.is_dir():
            raise LaviseError(f"the store folder {p} is a file, not a folder: {where}")
    try:
        st.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaviseError(f"cannot create the store folder {st.root} ({e.strerror or e}): {where}") from None
    if not st.root.is_dir():  # e.g. a path under a file
        raise LaviseError(f"cannot use {st.root} as the store folder: {where}")


state = State()

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a :class:`LaviseError` into one red line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RankDone:  # a torchrun rank other than 0, done with the command's passes
            raise typer.Exit(0) from None
        except ShareDone as e:  # --shard: this share is done, not a failure
            info(str(e))
            raise typer.Exit(0) from None
        except LaviseError as e:
            tell_other_ranks(e)
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            tell_other_ranks(e)
            err.print("[yellow]interrupted[/]: nothing complete was overwritten; run the same command again to continue (add --resume to `lavise train`)")
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
        except (typer.Exit, typer.Abort, click_exceptions()):
            raise
        except OSError as e:
            tell_other_ranks(e)
            # Last resort: the file system said no (read-only store, disk full, permissions).
            if debug():
                raise
            err.print(Text.assemble(("error:", "bold red"), " ", os_error_line(e)), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as e:
            tell_other_ranks(e)
            # Last resort: a bug in lavise (or in a library it calls) -- one line, not a traceback.
            if debug():
                raise
            msg = " ".join(str(e).split())[:300]
            err.print(Text.assemble(("error:", "bold red"), f" internal error: {type(e).__name__}: {msg} "
                                    "(set LAVISE_DEBUG=1 for the traceback, and please report it)"),
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def tell_other_ranks(e: BaseException) -> None:
    """Under torchrun, a failing rank sends its message to the others (they stop with it)."""
    from .. import distributed

    if distributed.current().group and not isinstance(e, distributed.RankFailed):
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else (" ".join(str(e).split())[:300] or type(e).__name__)
        distributed.fail(f"{what} (rank {distributed.current().rank})")


def debug() -> bool:
    """``LAVISE_DEBUG=1``: unexpected exceptions keep their traceback (the test suite sets it)."""
    return os.environ.get("LAVISE_DEBUG", "").strip().lower() not in {"", "0", "false", "no"}


def click_exceptions() -> type[BaseException]:
    """The click exception base Typer uses (usage errors raised inside a command)."""
    return typer.BadParameter.__mro__[2]  # ClickException, vendored or not


def os_error_line(e: OSError) -> str:
    """One line for an operating-system error: what, which path, and what to do."""
    path = e.filename if e.filename is not None else ""
    what = e.strerror or str(e)
    where = f" {path}" if path else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space (see `lavise store`, `lavise store rm`) or use --home on a larger disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "the store must be writable: fix the permissions or pass --home a folder you can write to"
    else:
        todo = "check that path (or pass --home another folder)"
    return f"cannot use{where}: {what}; {todo}"


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN/Infinity replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # a numpy / torch scalar
        return finite_json(obj.item())
    return obj


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: temporaries are removed and complete entries kept."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def handle_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C (the command line's entry point calls this)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout (non-finite numbers become ``null``)."""
    text = json.dumps(json.loads(json.dumps(finite_json(obj), default=str)), indent=2, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def warn_trained_on(session: Any) -> None:
    """One warning line when the target set shares images with the explainer's training images."""
    if session.overlap:
        err.print(f"[yellow]warning:[/] {session.overlap} of the {session.cache.n} target images were used to train "
                  f"explainer {session.entry.name}: results on them are optimistic; use held-out images "
                  "(the default --split, or other --dataset/--image-dir images)", highlight=False, soft_wrap=True)


def check_number(option: str, value: float | None, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A numeric option must be finite and within its range; else one clear line (exit 2)."""
    if value is None:
        return
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x) or "finite"
        raise LaviseError(f"{option} must be a number {rng}, got {value:g}")


def info(msg: str) -> None:
    if not state.quiet:
        err.print(msg, highlight=False, soft_wrap=True)  # long paths stay whole, copyable


errors_module.notice_hook = lambda msg: info(msg)  # the library's notices, as messages (silenced by -q)


class RateColumn(ProgressColumn):
    """Items per second of a task, e.g. images/s."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def _duration(seconds: float) -> str:
    """3 s, 2 min 19 s, 1 h 05 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class PlainProgress(Progress):
    """Progress for a stderr that is no terminal (CI logs, ``nohup``, SLURM): plain lines instead of bars.

    The same API as Rich's (``add_task``/``update``/``advance``), no live display; a task prints
    a line when ``interval`` seconds passed since its last one, and a final line when it is done,
    e.g. ``feature pass resnet18: 120/5000 images (2.4 %), 35.1 img/s, 2 min 19 s left``.
    """

    def __init__(self, *columns: Any, interval: float = 5.0, transfer: bool = False, **kw: Any):
        super().__init__(*columns, disable=True, **kw)
        self.interval = interval
        self.transfer = transfer
        self._printed: dict[Any, float] = {}  # task id -> time of its last line
        self._finished: set[Any] = set()
        self._line_lock = threading.Lock()

    def add_task(self, description: str, *args: Any, **kw: Any) -> Any:
        task_id = super().add_task(description, *args, **kw)
        self._printed[task_id] = time.monotonic()
        return task_id

    def update(self, task_id: Any, **kw: Any) -> None:
        super().update(task_id, **kw)
        self._report(task_id)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _amount(self, n: float) -> str:
        return human_size(n) if self.transfer else f"{int(n):,}"

    def line(self, task: Task) -> str:
        """One plain line for ``task``: done/total, percent, rate, time left (or taken, once done)."""
        if task.total is None:  # no count to show: how long it has been running, or took
            took = _duration(task.elapsed or 0.0)
            return f"{task.description}: done in {took}" if task.id in self._finished else \
                f"{task.description}: running for {took}"
        unit = task.fields.get("unit", "it")
        units = {"img": "images", "it": "items", "epoch": "epochs", "filter": "filters"}.get(unit, unit)
        parts = [f"{task.description}: {self._amount(task.completed)}"
                 + (f"/{self._amount(task.total)}" if task.total is not None else "")
                 + ("" if self.transfer else f" {units}")
                 + (f" ({task.percentage:.1f} %)" if task.total else "")]
        speed = task.finished_speed or task.speed
        if speed:
            parts.append(f"{human_size(speed)}/s" if self.transfer else f"{speed:,.1f} {unit}/s")
        if task.finished:
            parts.append(f"done in {_duration(task.finished_time or task.elapsed or 0.0)}")
        elif task.time_remaining is not None:
            parts.append(f"{_duration(task.time_remaining)} left")
        return ", ".join(parts)

    def _report(self, task_id: Any, final: bool = False) -> None:
        with self._line_lock:
            if task_id in self._finished:
                return
            task = self._tasks.get(task_id)
            if task is None:
                return
            now = time.monotonic()
            done = task.finished or final
            if not done and now - self._printed.get(task_id, now) < self.interval:
                return
            self._printed[task_id] = now
            if done:
                self._finished.add(task_id)
                if task.total is not None and task.finished_time is None:
                    task.finished_time = task.elapsed  # ended early (e.g. early stopping): the time taken
            err.print(self.line(task), markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:  # a final line for tasks that never said they were done (e.g. no total)
            for task_id in list(self._tasks):
                self._report(task_id, final=True)
        super().__exit__(exc_type, exc, tb)


def progress_interval() -> float:
    """Seconds between plain progress lines: LAVISE_PROGRESS_SECONDS, default 5."""
    try:
        return max(0.0, float(os.environ.get("LAVISE_PROGRESS_SECONDS", "5")))
    except ValueError:
        return 5.0


def progress(transfer: bool = False) -> Progress:
    """A Rich progress bar on stderr (hidden with --quiet); plain lines every few seconds when
    stderr is no terminal (see :class:`PlainProgress`)."""
    if not state.quiet and not err.is_terminal:
        return PlainProgress(interval=progress_interval(), transfer=transfer, console=err)
    if transfer:
        cols = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        ]
    else:
        cols = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
    return Progress(*cols, console=err, disable=state.quiet, transient=False)


