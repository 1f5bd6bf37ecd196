"""The Typer application and its global options."""

from __future__ import annotations

from typing import Optional

import typer

from .. import __version__
from ..errors import LaviseError
from .common import err, state

app = typer.Typer(
    name="lavise",
    help=(
        "Explain what the filters of a convolutional network have learned, in words (LaViSE).\n\n"
        "Typical session:\n\n"
        "  lavise download coco --split val\n\n"
        "  lavise download glove\n\n"
        "  lavise preprocess coco\n\n"
        "  lavise train resnet18 coco\n\n"
        "  lavise explain --filters 150,275\n\n"
        "  lavise evaluate --recall 5,10,20\n\n"
        "  lavise heatmap --filters 150,275"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lavise-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    home: Optional[str] = typer.Option(
        None, "--home", envvar="LAVISE_HOME", help="Root of the artifact store (default: the user data dir)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or messages; results and errors only."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    shard: Optional[str] = typer.Option(
        None, "--shard", envvar="LAVISE_SHARD", metavar="I/N",
        help="Run only share I of N (0 <= I < N) of each pass over images and leave its shards, e.g. one "
             "array job of a cluster scheduler; the last share to finish (or any later run) completes the "
             "command. Under torchrun the ranks share the passes without it. See docs/distributed.md."),
) -> None:
    state.home = home
    state.quiet = quiet
    state._store = None
    from .. import distributed

    try:
        ctx = distributed.setup(shard)
    except LaviseError as e:  # a bad --shard: one line, as every command's errors
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    if ctx.group and ctx.rank != 0:
        state.quiet = True  # other ranks print nothing but errors
