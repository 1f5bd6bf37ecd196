"""The index's on-disk layout: one folder per split of columnar ``.npy`` arrays, written as
chunks of images come and memory-mapped when read.

``<split>/`` holds, for N images and P (image, concept) pairs sorted by image::

    image_id.npy      int64 (N,)     the dataset's image ids
    height.npy        int32 (N,)
    width.npy         int32 (N,)
    file.npy          uint8          the image files (relative paths, UTF-8), one after another
    file_offsets.npy  int64 (N+1,)   image i's file is file[file_offsets[i]:file_offsets[i+1]]
    pair_offsets.npy  int64 (N+1,)   image i's pairs are pairs pair_offsets[i]:pair_offsets[i+1]
    pair_concept.npy  int64 (P,)     each pair's concept
    rle.npy           uint8          each pair's mask as COCO RLE counts (ASCII), one after another
    rle_offsets.npy   int64 (P+1,)   pair k's counts are rle[rle_offsets[k]:rle_offsets[k+1]]
    split.json        {"images": N, "pairs": P, "dropped": {...}}

Nothing is read whole: an image's masks are read by offset, so memory does not grow with the
dataset, and the writer keeps only a chunk of images at a time. The numeric columns are
memory-mapped; the byte columns (``file``, ``rle``: nearly all of the index's bytes) are read
with positional reads (``os.pread``), so that the pages a pass over every image touches stay in
the page cache and do not pile up in the process's resident memory as a mapping's would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

HEADER = 128  # bytes reserved for the .npy header, rewritten with the final shape on close
COLUMNS = {"image_id": np.int64, "height": np.int32, "width": np.int32, "file": np.uint8,
           "file_offsets": np.int64, "pair_offsets": np.int64, "pair_concept": np.int64,
           "rle": np.uint8, "rle_offsets": np.int64}


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    d = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (np.dtype(dtype).str, n)
    body = d.encode("latin1")
    pad = HEADER - 10 - len(body) - 1
    if pad < 0:
        raise ValueError("npy header too long")
    return b"\x93NUMPY\x01\x00" + (HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class NpyAppender:
    """A 1-d ``.npy`` file written by appending; its header gets the final length on ``close``."""

    def __init__(self, path: Path, dtype: Any) -> None:
        self.dtype, self.n = np.dtype(dtype), 0
        self.fh = open(path, "wb")
        self.fh.write(_npy_header(self.dtype, 0))

    def append(self, values: Any) -> None:
        a = np.ascontiguousarray(values, dtype=self.dtype)
        self.fh.write(a.tobytes())
        self.n += a.size

    def append_bytes(self, data: bytes) -> None:
        assert self.dtype == np.uint8
        self.fh.write(data)
        self.n += len(data)

    def close(self) -> None:
        self.fh.seek(0)
        self.fh.write(_npy_header(self.dtype, self.n))
        self.fh.close()


class SplitWriter:
    """Writes one split's columns as images come (``add_image``), then ``close(dropped)``."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.cols = {k: NpyAppender(folder / f"{k}.npy", dt) for k, dt in COLUMNS.items()}
        self.images = self.pairs = self.file_bytes = self.rle_bytes = 0
        for k in ("file_offsets", "pair_offsets", "rle_offsets"):
            self.cols[k].append([0])

    def add_image(self, image_id: int, file: str, height: int, width: int,
                  concepts: Sequence[int], rles: Sequence[bytes]) -> None:
        """One image and its pairs (``concepts`` sorted, one RLE counts string each)."""
        c = self.cols
        c["image_id"].append([image_id])
        c["height"].append([height])
        c["width"].append([width])
        f = file.encode("utf-8")
        c["file"].append_bytes(f)
        self.file_bytes += len(f)
        c["file_offsets"].append([self.file_bytes])
        if len(concepts):
            c["pair_concept"].append(concepts)
            ends = []
            for r in rles:
                c["rle"].append_bytes(r)
                self.rle_bytes += len(r)
                ends.append(self.rle_bytes)
            c["rle_offsets"].append(ends)
        self.pairs += len(concepts)
        c["pair_offsets"].append([self.pairs])
        self.images += 1

    def close(self, dropped: dict[str, int]) -> None:
        for a in self.cols.values():
            a.close()
        (self.folder / "split.json").write_text(json.dumps(
            {"images": self.images, "pairs": self.pairs, "dropped": dropped}, indent=1))


class SplitColumns:
    """The memory-mapped columns of one split (see the module's docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        meta = json.loads((folder / "split.json").read_text())
        self.n_images, self.n_pairs = int(meta["images"]), int(meta["pairs"])
        self.dropped: dict[str, int] = meta.get("dropped", {})
        self._maps: dict[str, np.ndarray] = {}
        self._files: dict[str, tuple[int, int, int]] = {}  # byte column -> (pid, fd, data offset)
        self.check()

    def __getstate__(self) -> dict[str, Any]:
        # another process maps and opens the files itself (a copy would read them whole)
        return {**self.__dict__, "_maps": {}, "_files": {}}

    def __del__(self) -> None:
        for pid, fd, _ in getattr(self, "_files", {}).values():
            if pid == os.getpid():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def span(self, name: str, a: int, b: int) -> bytes:
        """Bytes ``a:b`` of the byte column ``name`` (``file`` or ``rle``), by a positional read."""
        if b <= a:
            return b""
        if not hasattr(os, "pread"):  # no positional reads here (Windows): slice the mapping
            return bytes(self[name][a:b])
        got = self._files.get(name)
        if got is None or got[0] != os.getpid():  # opened per process (a forked worker reopens)
            offset = int(np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False).offset)
            got = (os.getpid(), os.open(self.folder / f"{name}.npy", os.O_RDONLY), offset)
            self._files[name] = got
        data = os.pread(got[1], b - a, got[2] + a)
        if len(data) != b - a:
            raise ValueError(f"{self.folder / name}.npy is shorter than its offsets say: run `lavise preprocess` again")
        return data

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._maps:
            a = np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if a.dtype != np.dtype(COLUMNS[name]) or a.ndim != 1:
                raise ValueError(f"{self.folder / name}.npy has dtype {a.dtype}, expected {np.dtype(COLUMNS[name])}")
            self._maps[name] = a
        return self._maps[name]

    def check(self) -> None:
        """Lengths agree with split.json (a damaged or partial folder is refused, not misread)."""
        n, p = self.n_images, self.n_pairs
        want = {"image_id": n, "height": n, "width": n, "file_offsets": n + 1, "pair_offsets": n + 1,
                "pair_concept": p, "rle_offsets": p + 1}
        for k, size in want.items():
            if len(self[k]) != size:
                raise ValueError(f"{self.folder / k}.npy has {len(self[k])} rows, expected {size}")

    def file(self, i: int) -> str:
        o = self["file_offsets"]
        return self.span("file", int(o[i]), int(o[i + 1])).decode("utf-8")

    def rle(self, k: int) -> bytes:
        o = self["rle_offsets"]
        return self.span("rle", int(o[k]), int(o[k + 1]))

    def image(self, i: int) -> dict[str, Any]:
        return {"id": int(self["image_id"][i]), "file": self.file(i),
                "height": int(self["height"][i]), "width": int(self["width"][i])}


class ImageTable(Sequence[dict[str, Any]]):
    """A split's images as ``{"id", "file", "height", "width"}`` dicts, read from the columns
    when asked for (``rows``: this split's images among the columns', None for all)."""

    def __init__(self, cols: SplitColumns, rows: np.ndarray | None) -> None:
        self.cols, self.rows = cols, rows

    def __len__(self) -> int:
        return self.cols.n_images if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return i if self.rows is None else int(self.rows[i])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.cols.image(self._row(int(i)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


class RleTable(Sequence[str]):
    """A split's RLE counts strings by pair, read by offset (``pairs``: rows among the columns')."""

    def __init__(self, cols: SplitColumns, pairs: np.ndarray | None) -> None:
        self.cols, self.pairs = cols, pairs

    def __len__(self) -> int:
        return self.cols.n_pairs if self.pairs is None else len(self.pairs)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k %= len(self)
        return self.cols.rle(k if self.pairs is None else int(self.pairs[k])).decode("ascii")
