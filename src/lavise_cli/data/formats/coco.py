"""COCO instances and COCO panoptic (any COCO-format file) as a format plug-in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Built


def build_instances(settings: dict[str, Any], options: dict[str, Any], workers: int, progress: Any) -> Built:
    from ..index import _build_instances_split

    splits, names = {}, {}
    for split, info in settings["splits"].items():
        splits[split], cats = _build_instances_split(Path(info["annotations"]), Path(info["images"]), workers, progress)
        for cid, n in cats.items():
            names.setdefault(cid, n)
    return Built(splits, names)


def build_panoptic(settings: dict[str, Any], options: dict[str, Any], workers: int, progress: Any) -> Built:
    from ..index import _build_panoptic_split

    splits, names = {}, {}
    for split, info in settings["splits"].items():
        splits[split], cats = _build_panoptic_split(Path(info["annotations"]), Path(info["images"]),
                                                    Path(info["masks"]), workers, progress)
        for cid, n in cats.items():
            names.setdefault(cid, n)
    return Built(splits, names)
