"""Reference-data formats as plug-ins: each turns a registered dataset into per-split mask pairs.

A format is a function ``build(settings, options, workers, progress) -> Built`` registered under
the name that ``lavise download``/``register_*`` writes into the dataset's manifest
(``settings["format"]``).  ``preprocess`` looks the format up here and does the rest (concepts,
word vectors, the seen/unseen split, the index files) the same way for every format.  Every
format decides which images it keeps with :func:`accept_images` (missing, corrupt, or of another
size than annotated: dropped and named in ``dropped.txt``; not RGB: converted and counted).

The formats: ``coco`` (COCO instances, :mod:`.coco`), ``coco-panoptic`` (:mod:`.panoptic`),
``vg`` (Visual Genome, :mod:`.vg`) and ``broden`` (NetDissect's Broden, :mod:`.broden`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
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
    in the index and the summary (e.g. how the format split the images); read after the splits are
    written, so a streamed format may complete it as its chunks go (VG's kept images per split).

    A split may also be *streamed* (large datasets): ``{"chunks": iterable, "dropped": Counter,
    "dropped_images": list}``, where each chunk is a dict like the above for a block of images
    (``pair_image`` counts from the chunk's first image) and the iterable fills ``dropped`` and
    ``dropped_images`` as it goes; ``preprocess`` writes each chunk to the index as it comes, so
    neither the pairs nor their masks are ever all in memory.  RLE counts may be ``str`` or ``bytes``.
    """

    splits: dict[str, dict[str, Any]]
    categories: dict[int, str]
    image_dirs: dict[str, str] = field(default_factory=dict)
    labels_final: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    """An image a format would keep: ``path`` (probed, and named in ``dropped.txt`` when dropped),
    ``size`` the ``(height, width)`` its annotation says (None: not checked), ``problem`` a
    format's own reason to drop it (e.g. ``"missing mask"``), ``mask_size`` the ``(height, width)``
    of the format's own mask file, which must equal the image's."""

    path: str
    size: tuple[Any, Any] | None = None
    problem: str | None = None
    mask_size: tuple[int, int] | None = None


def accept_images(candidates: Sequence[Candidate], workers: int, progress: Any, desc: str,
                  dropped: Counter[str], gone: list[tuple[str, str]]) -> list[tuple[int, int] | None]:
    """Probe every candidate image (in ``workers`` processes) and decide which are kept.

    Returns, per candidate, its ``(height, width)`` when kept, else None.  Each dropped image is
    counted in ``dropped`` (``images missing``/``images corrupt``/``images with a PROBLEM``/
    ``images whose size differs from the annotation``) and appended to ``gone`` as
    ``(path, reason)``; a kept image that is not RGB is counted as ``images converted from MODE (kept)``.
    """
    from ..pool import pool_map, probe

    probes = pool_map(probe, [(c.path,) for c in candidates], workers, progress, desc)
    return [judge_image(c, p, dropped, gone) for c, p in zip(candidates, probes)]


def judge_image(c: Candidate, probed: tuple[str, str | None, int, int], dropped: Counter[str],
                gone: list[tuple[str, str]]) -> tuple[int, int] | None:
    """One candidate's verdict given its probe ``(status, mode, height, width)`` (see
    :func:`accept_images`; for formats that probe an image in the same worker job as its masks)."""
    status, mode, h, w = probed
    if status != "ok":
        dropped[f"images {status}"] += 1
        gone.append((c.path, f"image {status}"))
    elif c.problem is not None:
        dropped[f"images with a {c.problem}"] += 1
        gone.append((c.path, f"image with a {c.problem}"))
    elif (c.size is not None and (h, w) != tuple(c.size)) or (c.mask_size is not None and c.mask_size != (h, w)):
        dropped["images whose size differs from the annotation"] += 1
        said = c.size if c.size is not None else (None, None)
        mask = f", its mask {c.mask_size[1]}x{c.mask_size[0]}" if c.mask_size is not None else ""
        gone.append((c.path, f"image is {w}x{h}{mask}, the annotation says {said[1]}x{said[0]}"))
    else:
        if mode != "RGB":
            dropped[f"images converted from {mode} (kept)"] += 1
        return (h, w)
    return None


def add_image(split: dict[str, Any], image: dict[str, Any], pairs: Sequence[tuple[Any, str]]) -> None:
    """Append one accepted image (its record) and its (concept, RLE) pairs to a split in the
    lists form (``images``, ``pair_image``, ``pair_cat``, ``rle``)."""
    row = len(split["images"])
    split["images"].append(image)
    for concept, rle in pairs:
        split["pair_image"].append(row)
        split["pair_cat"].append(concept)
        split["rle"].append(rle)


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
    from .panoptic import build_panoptic

    return build_panoptic


def _vg() -> Builder:
    from .vg import build_vg

    return build_vg


def _broden() -> Builder:
    from .broden import build_broden

    return build_broden


register_format("coco", _coco)
register_format("coco-panoptic", _coco_panoptic)
register_format("vg", _vg)
register_format("broden", _broden)
