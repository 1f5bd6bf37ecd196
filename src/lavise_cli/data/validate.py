"""Structural checks of COCO-format annotation files: a malformed file is refused with one line
naming the first bad entry (values inside a well-formed entry, e.g. a bad polygon, are instead
counted and left out by preprocessing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_coco(doc: Any, path: Path, panoptic: bool = False) -> None:
    """Raise :class:`DataError` unless ``doc`` has the COCO structure lavise reads."""

    def bad(what: str) -> DataError:
        return DataError(f"{path} is not a well-formed COCO {'panoptic' if panoptic else 'instances'} file: "
                         f"{what}; fix the file")

    if not isinstance(doc, dict):
        raise bad("expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise bad(f"no {key!r} list")
    for k, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not _whole(c.get("id")) or not isinstance(c.get("name"), str):
            raise bad(f"category #{k} needs a whole-number 'id' and a text 'name' (got {str(c)[:80]})")
    for k, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not _whole(im.get("id")) or not isinstance(im.get("file_name"), str) \
                or not _whole(im.get("width")) or not _whole(im.get("height")):
            raise bad(f"image #{k} needs a whole-number 'id', 'width', 'height' and a text 'file_name' "
                      f"(got {str(im)[:80]})")
    for k, a in enumerate(doc["annotations"]):
        if panoptic:
            ok = isinstance(a, dict) and _whole(a.get("image_id")) and isinstance(a.get("file_name"), str) \
                and isinstance(a.get("segments_info"), list) \
                and all(isinstance(s, dict) and _whole(s.get("id")) and _whole(s.get("category_id"))
                        for s in a["segments_info"])
            if not ok:
                raise bad(f"annotation #{k} needs a whole-number 'image_id', a text 'file_name' and "
                          f"'segments_info' entries with whole-number 'id' and 'category_id' (got {str(a)[:80]})")
        elif not isinstance(a, dict) or not all(_whole(a.get(f)) for f in ("id", "image_id", "category_id")):
            raise bad(f"annotation #{k} needs whole-number 'id', 'image_id' and 'category_id' (got {str(a)[:80]})")
