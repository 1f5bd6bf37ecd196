"""Structural checks of COCO-format annotation files: a malformed file is refused with one line
naming the first bad entry (values inside a well-formed entry, e.g. a bad polygon, are instead
counted and left out by preprocessing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def category_problem(c: Any, k: int) -> str | None:
    if not isinstance(c, dict) or not _whole(c.get("id")) or not isinstance(c.get("name"), str):
        return f"category #{k} needs a whole-number 'id' and a text 'name' (got {str(c)[:80]})"
    return None


def image_problem(im: Any, k: int) -> str | None:
    if not isinstance(im, dict) or not _whole(im.get("id")) or not isinstance(im.get("file_name"), str) \
            or not _whole(im.get("width")) or not _whole(im.get("height")):
        return (f"image #{k} needs a whole-number 'id', 'width', 'height' and a text 'file_name' "
                f"(got {str(im)[:80]})")
    return None


def annotation_problem(a: Any, k: int, panoptic: bool = False) -> str | None:
    if panoptic:
        ok = isinstance(a, dict) and _whole(a.get("image_id")) and isinstance(a.get("file_name"), str) \
            and isinstance(a.get("segments_info"), list) \
            and all(isinstance(s, dict) and _whole(s.get("id")) and _whole(s.get("category_id"))
                    for s in a["segments_info"])
        if not ok:
            return (f"annotation #{k} needs a whole-number 'image_id', a text 'file_name' and "
                    f"'segments_info' entries with whole-number 'id' and 'category_id' (got {str(a)[:80]})")
    elif not isinstance(a, dict) or not all(_whole(a.get(f)) for f in ("id", "image_id", "category_id")):
        return f"annotation #{k} needs whole-number 'id', 'image_id' and 'category_id' (got {str(a)[:80]})"
    return None


def coco_error(path: Path, what: str, panoptic: bool = False) -> DataError:
    return DataError(f"{path} is not a well-formed COCO {'panoptic' if panoptic else 'instances'} file: "
                     f"{what}; fix the file")


def check_coco(doc: Any, path: Path, panoptic: bool = False) -> None:
    """Raise :class:`DataError` unless ``doc`` has the COCO structure lavise reads."""

    def bad(what: str) -> DataError:
        return coco_error(path, what, panoptic)

    if not isinstance(doc, dict):
        raise bad("expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise bad(f"no {key!r} list")
    for key, fn in (("categories", category_problem), ("images", image_problem)):
        for k, x in enumerate(doc[key]):
            if (msg := fn(x, k)) is not None:
                raise bad(msg)
    for k, a in enumerate(doc["annotations"]):
        if (msg := annotation_problem(a, k, panoptic)) is not None:
            raise bad(msg)


def stream_coco(path: Path, on_category: Any, on_image: Any, on_annotation: Any, panoptic: bool = False) -> dict[str, Any]:
    """Walk a COCO-format file element by element (:func:`.jsonstream.stream_arrays`), checking
    each entry as :func:`check_coco` does and handing it to its callback; the whole document is
    never in memory.  Returns the top-level values that are not arrays (arrays as their lengths)."""
    from .jsonstream import ArrayLength, NotAnObject, stream_arrays

    counts = {"categories": 0, "images": 0, "annotations": 0}

    def checked(key: str, check: Any, fn: Any) -> Any:
        def handle(x: Any) -> None:
            if (msg := check(x, counts[key])) is not None:
                raise coco_error(path, msg, panoptic)
            counts[key] += 1
            fn(x)
        return handle

    try:
        top = stream_arrays(path, {
            "categories": checked("categories", category_problem, on_category),
            "images": checked("images", image_problem, on_image),
            "annotations": checked("annotations", lambda a, k: annotation_problem(a, k, panoptic), on_annotation)})
    except NotAnObject:
        raise coco_error(path, "expected a JSON object with images, annotations and categories", panoptic) from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(top.get(key), ArrayLength):
            raise coco_error(path, f"no {key!r} list", panoptic)
    return top
