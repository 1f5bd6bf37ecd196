"""The `lavise` command line: a thin Typer shell over the library."""

from __future__ import annotations

import importlib

from .app import app

# Each module registers its commands on `app`; a module that is not there yet is skipped.
for _mod in ("download_cmd", "data_cmd", "train_cmd", "explain_cmd", "visual_cmd"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while a command is being written
        if e.name != f"{__name__}.{_mod}":
            raise


def main() -> None:
    app()


__all__ = ["app", "main"]
