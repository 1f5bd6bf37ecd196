"""What the streamed COCO-format readers (instances in coco.py, panoptic in panoptic.py) share.

Both walk an annotation file element by element (:func:`lavise_cli.data.validate.stream_coco`)
and keep nothing per element but numbers: :class:`Spill` holds the byte strings they must keep
(segmentations, file names) in a temporary file, :class:`CocoImages` the categories and images
as columns, and finds each annotation's image among them.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from typing import Any

import numpy as np


def int64(a: array) -> np.ndarray:
    """An ``array('q')`` as an int64 numpy view (empty arrays too)."""
    return np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64)


class Spill:
    """Byte strings appended to a temporary file and read back by number (``os.pread``)."""

    def __init__(self, prefix: str) -> None:
        self.fh = tempfile.TemporaryFile(prefix=prefix)
        self.offsets = array("q", [0])  # string k is bytes offsets[k]:offsets[k + 1] of the file
        self._unflushed = False

    def add(self, data: bytes) -> int:
        self.fh.write(data)
        self.offsets.append(self.offsets[-1] + len(data))
        self._unflushed = True
        return len(self.offsets) - 2

    def get(self, k: int) -> bytes:
        if self._unflushed:
            self.fh.flush()
            self._unflushed = False
        a, b = self.offsets[k], self.offsets[k + 1]
        return os.pread(self.fh.fileno(), b - a, a)

    def add_text(self, text: str) -> int:
        return self.add(text.encode("utf-8", "surrogatepass"))

    def text(self, k: int) -> str:
        return self.get(k).decode("utf-8", "surrogatepass")

    def close(self) -> None:
        self.fh.close()


class CocoImages:
    """A COCO-format file's categories and images as :func:`stream_coco` hands them over: the
    ids and sizes as columns, the file names spilled (``names``)."""

    def __init__(self, names: Spill) -> None:
        self.names = names
        self.cats: dict[int, str] = {}
        self.ids, self.heights, self.widths, self.name = array("q"), array("q"), array("q"), array("q")

    def on_category(self, c: dict[str, Any]) -> None:
        self.cats[int(c["id"])] = str(c["name"])

    def on_image(self, im: dict[str, Any]) -> None:
        self.ids.append(im["id"])
        self.heights.append(im["height"])
        self.widths.append(im["width"])
        self.name.append(self.names.add_text(im["file_name"]))

    def file(self, j: int) -> str:
        """The file name of image ``j`` (in file order)."""
        return self.names.text(int(self.name[j]))

    def known_categories(self) -> np.ndarray:
        return np.fromiter(self.cats, dtype=np.int64, count=len(self.cats))

    def locate(self, ann_img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(order, sorted_ids, rank, known)``: the images sorted by id (``order[r]``, the file
        position of the image of rank ``r``; a repeated id: its last entry, as in pycocotools'
        index), and per annotation of ``ann_img`` its image's rank and whether the id is listed."""
        id_arr = int64(self.ids)
        order = np.argsort(id_arr, kind="stable")
        sorted_ids = id_arr[order]
        last = np.ones(len(sorted_ids), dtype=bool)
        last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
        order, sorted_ids = order[last], sorted_ids[last]
        rank = np.clip(np.searchsorted(sorted_ids, ann_img), 0, max(len(sorted_ids) - 1, 0))
        known = (sorted_ids[rank] == ann_img) if len(sorted_ids) else np.zeros(len(ann_img), bool)
        return order, sorted_ids, rank, known
