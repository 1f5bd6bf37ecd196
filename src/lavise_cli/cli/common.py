"""What every subcommand shares: the store, the consoles, JSON output and error handling."""

from __future__ import annotations

import functools
import json
import sys
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

from ..download import human_size  # noqa: F401  (one unit system: binary, as the bars)
from ..errors import LaviseError
from ..store import Store

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
            self._store = Store(self.home)
        return self._store


state = State()

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a :class:`LaviseError` into one red line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LaviseError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: nothing complete was overwritten; run the same command again to continue (add --resume to `lavise train`)")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn_trained_on(session: Any) -> None:
    """One warning line when the target set shares images with the explainer's training images."""
    if session.overlap:
        err.print(f"[yellow]warning:[/] {session.overlap} of the {session.cache.n} target images were used to train "
                  f"explainer {session.entry.name}: results on them are optimistic; use held-out images "
                  "(the default --split, or other --dataset/--image-dir images)", highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    if not state.quiet:
        err.print(msg, highlight=False, soft_wrap=True)  # long paths stay whole, copyable


class RateColumn(ProgressColumn):
    """Items per second of a task, e.g. images/s."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def progress(transfer: bool = False) -> Progress:
    """A Rich progress bar on stderr (hidden with --quiet)."""
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


