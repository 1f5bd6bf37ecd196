"""The `lavise` command line: a thin Typer shell over the library."""

from __future__ import annotations

import importlib
import signal

from .app import app
from .common import handle_sigterm

# Each module registers its commands on `app`; a module that is not there yet is skipped.
for _mod in ("download_cmd", "data_cmd", "train_cmd", "explain_cmd", "visual_cmd", "compare_cmd", "relevant_cmd"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while a command is being written
        if e.name != f"{__name__}.{_mod}":
            raise


def main() -> None:
    handle_sigterm()
    try:
        app()
    except KeyboardInterrupt:  # outside a command (e.g. while it starts): no traceback
        raise SystemExit(130) from None
    finally:  # the command is over: a SIGTERM while the interpreter shuts down just ends it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from .. import distributed

        distributed.shutdown()  # a torchrun rank leaves its process group on every exit path


__all__ = ["app", "main"]
