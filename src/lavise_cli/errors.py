"""Errors that the command line turns into one clear line and a non-zero exit code."""


class LaviseError(Exception):
    """A user-facing error: a bad argument, missing data, an incompatible artifact.

    The message is one line that says what went wrong and what to do about it.
    """

    exit_code = 2


class DataError(LaviseError):
    """Input data (dataset, image, archive, checksum) is missing or corrupt."""

    exit_code = 3
