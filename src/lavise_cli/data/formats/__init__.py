"""Reference-data formats as plug-ins: each turns a registered dataset into per-split mask pairs.

A format is a function ``build(settings, options, workers, progress) -> Built`` registered under
the name that ``lavise download``/``register_*`` writes into the dataset's manifest
(``settings["format"]``).  ``preprocess`` looks the format up here and does the rest (concepts,
word vectors, the seen/unseen split, the index files) the same way for every format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import LaviseError


@dataclass
class Built:
    """What a format builds from a dataset.

    ``splits``: split name -> ``{"images": [{"id", "file", "height", "width"}], "pair_image",
    "pair_cat", "rle", "dropped"}`` (pairs are (image, category) with the union mask as COCO RLE
    counts; ``file`` is relative to that split's image folder).  ``categories``: category id ->
    name.  ``image_dirs``: split -> folder, when the format decides it (else the dataset's own).
    ``labels_final``: names are already concept labels (no ``clean_label``).  ``info``: recorded
    in the index and the summary (e.g. how the format split the images).
    """

    splits: dict[str, dict[str, Any]]
    categories: dict[int, str]
    image_dirs: dict[str, str] = field(default_factory=dict)
    labels_final: bool = False
    info: dict[str, Any] = field(default_factory=dict)


Builder = Callable[..., Built]
_FORMATS: dict[str, Callable[[], Builder]] = {}


def register_format(name: str, loader: Callable[[], Builder]) -> None:
    """Register ``loader`` (returns the build function; imported lazily) as format ``name``."""
    _FORMATS[name] = loader


def get_format(name: str) -> Builder:
    if name not in _FORMATS:
        raise LaviseError(f"preprocessing datasets of format {name!r} is not supported; "
                          f"supported formats: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]()


def _coco() -> Builder:
    from .coco import build_instances

    return build_instances


def _coco_panoptic() -> Builder:
    from .coco import build_panoptic

    return build_panoptic


def _vg() -> Builder:
    from .vg import build_vg

    return build_vg


register_format("coco", _coco)
register_format("coco-panoptic", _coco_panoptic)
register_format("vg", _vg)
