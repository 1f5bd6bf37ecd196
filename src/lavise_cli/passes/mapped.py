"""Rows of a tensor stored across safetensors shards, read through a memory mapping.

``lavise train`` reads the cached pooled features ``z`` (fp16, pairs x d) this way instead of
loading them: the explainer's batches are gathered from the mapped shards, so the process's
memory does not grow with the number of pairs (3.5 GB of ``z`` for COCO train at d = 2048).

A safetensors file is an 8-byte little-endian header length ``N``, a JSON header giving each
tensor's ``dtype``, ``shape`` and ``data_offsets`` (relative to byte ``8 + N``), then the data;
each shard's tensor is mapped read-only with :mod:`mmap` and viewed with :func:`numpy.frombuffer`
(no copy).  Pages of a file mapping that were touched count in the resident set; they are given
back (``madvise(MADV_DONTNEED)``, Linux, Python >= 3.8; the page cache keeps them) whenever the
gathers since the last time may have mapped :data:`RELEASE_BYTES`, so the resident memory stays
bounded (elsewhere nothing is given back: the OS reclaims clean file pages under pressure).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

# safetensors dtype names -> numpy dtypes (those a cached row tensor can have)
_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": None, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
          np.dtype(np.float64): torch.float64, np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
          np.dtype(np.int16): torch.int16, np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8}

RELEASE_BYTES = 64 << 20  # give mapped pages back once gathers may have mapped this much
# What a fault may map: the page cache holds files in folios of up to 2 MB (Linux >= 6.x maps a
# whole folio, or 64 KB "fault-around", at a fault), so the rows a gather touches are counted in
# 2 MB blocks of their files.
BLOCK = 2 << 20
COPY_BYTES = 32 << 20  # rows copied at a time by ``tensor`` and ``to_device``


def _map_tensor(path: Path, name: str) -> tuple[mmap.mmap, np.ndarray, int]:
    """``name`` of the safetensors file ``path`` as a read-only (rows, ...) numpy view of a
    mapping, with the mapping and the byte offset of the tensor's data in the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise DataError(f"{path} is not a safetensors file (truncated)")
            (n,) = struct.unpack("<Q", head)
            header = json.loads(fh.read(n))
            info = header.get(name)
            if info is None:
                raise DataError(f"{path} holds no tensor {name!r}")
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise DataError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which cannot be mapped")
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot map {path}: {e}") from e
    count = int(np.prod(shape)) if shape else 1
    if end - begin != count * np.dtype(dtype).itemsize or 8 + n + end > len(mm):
        raise DataError(f"{path}: tensor {name!r} does not fit its data offsets")
    arr = np.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin).reshape(shape)
    return mm, arr, 8 + n + begin


class MappedRows:
    """Rows of a 2-D tensor stored as consecutive parts (one per shard file), memory-mapped.

    ``rows(idx)`` gives exactly ``z[idx].float()`` of the tensor ``z`` the parts concatenate to
    (restricted by the row map, when there is one); ``select`` and ``cat`` compose row maps
    without reading anything.
    """

    def __init__(self, parts: Sequence[np.ndarray], maps: Sequence[mmap.mmap | None] | None = None, *,
                 width: int | None = None, row_map: torch.Tensor | None = None, offsets: Sequence[int] | None = None):
        self._parts = list(parts)
        self._maps = list(maps) if maps is not None else [None] * len(self._parts)  # the mapping of each part
        if len(self._maps) != len(self._parts):
            raise ValueError("one mapping (or None) per part")
        # where each part's data starts in its file, for counting the file's blocks a gather touches
        self._offsets = torch.tensor(list(offsets) if offsets is not None else [0] * len(self._parts), dtype=torch.int64)
        if len(self._offsets) != len(self._parts):
            raise ValueError("one offset per part")
        if not self._parts and width is None:
            raise ValueError("MappedRows without parts needs the row width")
        self.width = int(self._parts[0].shape[1]) if self._parts else int(width)  # type: ignore[arg-type]
        dtypes = {p.dtype for p in self._parts}
        if any(p.ndim != 2 or p.shape[1] != self.width for p in self._parts) or len(dtypes) > 1:
            raise DataError("the mapped parts do not have one row width and dtype")
        self.dtype = _TORCH[dtypes.pop()] if dtypes else torch.float16
        sizes = [len(p) for p in self._parts]
        self._starts = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)  # part k holds [starts[k], starts[k+1])
        self.total = int(self._starts[-1])
        self.row_map = None if row_map is None else row_map.to(torch.int64)
        self._row_bytes = self.width * np.dtype(self._parts[0].dtype).itemsize if self._parts else 0
        self._blocks = 0  # blocks gathered from since the mapped pages were last given back
        self._dirty: set[int] = set()  # the parts they are in

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def open(cls, files: Sequence[Path], name: str, *, width: int | None = None) -> MappedRows:
        """The tensor ``name`` of each file in ``files``, concatenated in that order."""
        maps, parts, offsets = [], [], []
        for f in files:
            mm, arr, off = _map_tensor(Path(f), name)
            maps.append(mm)
            parts.append(arr)
            offsets.append(off)
        return cls(parts, maps, width=width, offsets=offsets)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> MappedRows:
        """An in-memory tensor seen as rows (no mapping): for tests and small data."""
        return cls([t.contiguous().numpy()], width=t.shape[1])

    def select(self, idx: torch.Tensor) -> MappedRows:
        """The rows ``idx`` (int64 indices or a bool mask) of these rows, in that order."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).squeeze(1)
        idx = idx.to(torch.int64)
        return MappedRows(self._parts, self._maps, width=self.width, offsets=self._offsets.tolist(),
                          row_map=idx.clone() if self.row_map is None else self.row_map[idx])

    @staticmethod
    def cat(items: Sequence[MappedRows]) -> MappedRows:
        """The rows of each of ``items`` one after the other (sharing their mappings)."""
        if len(items) == 1:
            return items[0]
        if not items or len({m.width for m in items}) != 1:
            raise ValueError("cat needs rows of one width")
        parts, maps, offsets, rmaps, offset = [], [], [], [], 0
        for m in items:
            parts.extend(m._parts)
            maps.extend(m._maps)
            offsets.extend(m._offsets.tolist())
            rmaps.append((torch.arange(m.total) if m.row_map is None else m.row_map) + offset)
            offset += m.total
        identity = all(m.row_map is None for m in items)
        return MappedRows(parts, maps, width=items[0].width, offsets=offsets,
                          row_map=None if identity else torch.cat(rmaps))

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.total if self.row_map is None else len(self.row_map)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.width))

    def rows(self, idx: torch.Tensor | slice, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Rows ``idx`` as a new (len(idx), d) tensor: float32 by default (exactly ``z[idx].float()``),
        the stored dtype with ``dtype=None``."""
        if isinstance(idx, slice):
            idx = torch.arange(*idx.indices(len(self)))
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if len(idx) and int(idx.min()) < 0:  # as a tensor indexes: from the end
            idx = torch.where(idx < 0, idx + len(self), idx)
        glob = idx if self.row_map is None else self.row_map[idx]
        out = torch.empty((len(glob), self.width), dtype=self.dtype)
        if len(glob):
            if len(glob) > 1:  # in file order: each block of a file is touched in one run
                order = torch.argsort(glob)
                self._gather_sorted(glob[order], got := torch.empty_like(out))
                out.index_copy_(0, order, got)
            else:
                self._gather_sorted(glob, out)
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def _gather_sorted(self, glob: torch.Tensor, out: torch.Tensor) -> None:
        """Rows ``glob`` (sorted global rows) into ``out``, giving the mapped pages back whenever
        the blocks touched since the last time reach :data:`RELEASE_BYTES`."""
        if int(glob[0]) < 0 or int(glob[-1]) >= self.total:
            raise IndexError(f"row index out of range for {self.total} rows")
        part = torch.searchsorted(self._starts, glob, right=True) - 1
        local = glob - self._starts[part]
        blk = part * (1 << 40) + (self._offsets[part] + local * self._row_bytes) // BLOCK
        new = torch.ones(len(blk), dtype=torch.int64)
        new[1:] = (blk[1:] != blk[:-1]).long()
        nblk = new.cumsum(0)  # blocks touched up to each row
        budget = max(1, RELEASE_BYTES // BLOCK)
        s, n = 0, len(glob)
        while s < n:
            room = budget - self._blocks  # >= 1: released when it reaches 0
            e = int(torch.searchsorted(nblk, nblk[s] - 1 + room, right=True))
            ks, counts = torch.unique_consecutive(part[s:e], return_counts=True)
            a = s
            for k, c in zip(ks.tolist(), counts.tolist()):
                got = np.take(self._parts[k], local[a:a + c].numpy(), axis=0)
                out[a:a + c] = torch.from_numpy(got)
                self._dirty.add(k)
                a += c
            self._blocks += int(nblk[e - 1] - nblk[s]) + 1
            if self._blocks >= budget:
                self.release()
            s = e

    def _chunk_rows(self) -> int:
        return max(1, COPY_BYTES // max(self._row_bytes, 1))

    def tensor(self) -> torch.Tensor:
        """All the rows as one in-memory tensor of the stored dtype."""
        out = torch.empty(tuple(self.shape), dtype=self.dtype)
        chunk = self._chunk_rows()
        for s in range(0, len(self), chunk):
            out[s:s + chunk] = self.rows(slice(s, s + chunk), dtype=None)
        self.release()
        return out

    def to_device(self, device: torch.device | str) -> torch.Tensor:
        """All the rows in the stored dtype on ``device``, copied :data:`COPY_BYTES` at a time
        (host memory stays flat)."""
        out = torch.empty(tuple(self.shape), dtype=self.dtype, device=device)
        chunk = self._chunk_rows()
        for s in range(0, len(self), chunk):
            out[s:s + chunk] = self.rows(slice(s, s + chunk), dtype=None).to(device)
        self.release()
        return out

    def release(self) -> None:
        """Give the mapped pages back to the OS (they stay in the page cache); a no-op where
        ``madvise`` is not available."""
        dirty, self._dirty, self._blocks = self._dirty, set(), 0
        advise = getattr(mmap, "MADV_DONTNEED", None)
        if advise is None:
            return
        for k in sorted(dirty):
            mm = self._maps[k]
            if mm is None:
                continue
            try:
                mm.madvise(advise)
            except (AttributeError, OSError, ValueError):
                return

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in their stored dtype (len x d x itemsize)."""
        return len(self) * self.width * self.dtype.itemsize
