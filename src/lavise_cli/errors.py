"""Errors that the command line turns into one clear line and a non-zero exit code."""


class LaviseError(Exception):
    """A user-facing error: a bad argument, missing data, an incompatible artifact.

    The message is one line that says what went wrong and what to do about it.
    """

    exit_code = 2


class DataError(LaviseError):
    """Input data (dataset, image, archive, checksum) is missing or corrupt."""

    exit_code = 3


def _stderr_notice(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


# Where the library's informational lines go (e.g. "the classifier head was ignored"); the command
# line points it at its own message printer, which --quiet silences.
notice_hook = _stderr_notice


def notice(msg: str) -> None:
    """One informational line for the user."""
    notice_hook(msg)


class ShareDone(LaviseError):
    """``--shard I/N``: this process ran its share of a pass; the pass is complete once every share
    has run (then any lavise command publishes it and goes on).  Not a failure: exit code 0."""

    exit_code = 0
