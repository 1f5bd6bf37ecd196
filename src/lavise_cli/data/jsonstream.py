"""Read the arrays of a large JSON document one element at a time (COCO annotation files,
Visual Genome's ``objects.json``).

``json.load`` of a COCO train file holds the whole document as Python objects (≈ 2.6 GB for a
448 MB file); :func:`stream_arrays` walks the top-level object and hands each element of the
arrays asked for to a callback, so only one element (and a read buffer) is held at a time.
Elements of the other arrays are decoded and dropped one by one; other values are returned.
:func:`stream_list` does the same for a document that is one top-level array (VG's files).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError

READ = 1 << 20  # characters read at a time
_WS = " \t\n\r"


class ArrayLength(int):
    """What :func:`stream_arrays` returns for an array: its number of elements."""


class NotAnObject(DataError):
    """The document is valid so far but not a JSON object."""


class NotAList(DataError):
    """The document is valid so far but not a JSON array."""


class _Reader:
    def __init__(self, fh: Any, path: Path) -> None:
        self.fh, self.path = fh, path
        self.buf, self.pos, self.eof = "", 0, False
        self.base = 0  # characters of the file before buf[0]
        self.decoder = json.JSONDecoder()

    def bad(self, what: str) -> DataError:
        return DataError(f"{self.path} is not valid JSON ({what}); the file is damaged: get it again")

    def more(self, at_least: int = READ) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(max(READ, at_least))
        if not chunk:
            self.eof = True
            return False
        self.base += self.pos
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not white space ("" at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.bad(f"expected {ch!r} at character {self.base + self.pos}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        want = READ
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.more(want):
                    want *= 2  # a long element: read more each time (no quadratic re-scan)
                    continue
                raise self.bad(e.msg) from None
            if end >= len(self.buf) and not self.eof and self.more(want):
                continue  # a number may go on in the next read
            self.pos = end
            return obj

    def items(self, fn: Callable[[Any], None] | None, where: str) -> int:
        """After an array's ``[``: each element to ``fn`` (None: decoded and dropped) up to and
        including its ``]``; returns the number of elements."""
        n = 0
        if self.peek() == "]":
            self.pos += 1
            return n
        while True:
            v = self.value()
            n += 1
            if fn is not None:
                fn(v)
            c = self.peek()
            self.pos += 1
            if c == "]":
                return n
            if c != ",":
                raise self.bad(f"expected ',' or ']' in {where}")

    def end(self) -> None:
        """Only white space may follow the top-level value (as ``json.load`` requires)."""
        if self.peek() != "":
            raise self.bad(f"extra data at character {self.base + self.pos}")


def _open(path: Path) -> Any:
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _not_utf8(path: Path) -> DataError:
    return DataError(f"{path} is not valid JSON (not UTF-8 text); the file is damaged: get it again")


def _opening(r: _Reader, bracket: str, other: DataError) -> None:
    """Step over the document's opening ``bracket``; ``other`` when the document is valid JSON so
    far but of another kind (another value starts there), a damaged-file error otherwise."""
    first = r.peek()
    if first != bracket:
        if first and first in "{[\"-0123456789tfn":
            raise other
        raise r.bad(f"expected '{bracket}' at the start")
    r.pos += 1


def stream_arrays(path: str | Path, handlers: Mapping[str, Callable[[Any], None]]) -> dict[str, Any]:
    """Walk the JSON object in ``path``: each element of an array under a key in ``handlers`` goes
    to that handler, in order; other arrays are skipped element by element; other values are
    returned as ``{key: value}`` (arrays as their :class:`ArrayLength`)."""
    path = Path(path)
    fh = _open(path)
    out: dict[str, Any] = {}
    with fh:
        r = _Reader(fh, path)
        try:
            _opening(r, "{", NotAnObject(f"{path} holds JSON that is not an object"))
            if r.peek() == "}":
                return out
            while True:
                key = r.value()
                if not isinstance(key, str):
                    raise r.bad("an object key is not a string")
                r.expect(":")
                if r.peek() == "[":
                    r.pos += 1
                    out[key] = ArrayLength(r.items(handlers.get(key), repr(key)))
                else:
                    out[key] = r.value()
                c = r.peek()
                r.pos += 1
                if c == "}":
                    break
                if c != ",":
                    raise r.bad("expected ',' or '}' after a top-level value")
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    return out


def stream_list(path: str | Path, fn: Callable[[Any], None] | None = None) -> int:
    """Walk the JSON array in ``path``: each element goes to ``fn`` (None: only counted), in
    order; returns the number of elements.  A document that is valid so far but not an array
    raises :class:`NotAList`; a damaged one, :class:`DataError` saying so."""
    path = Path(path)
    with _open(path) as fh:
        r = _Reader(fh, path)
        try:
            _opening(r, "[", NotAList(f"{path} holds JSON that is not an array"))
            n = r.items(fn, "the top-level array")
            r.end()
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    return n
