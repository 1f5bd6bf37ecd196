"""Reference datasets in the store: registering local copies, and removing datasets.

* :func:`register_coco` / :func:`register_vg` / :func:`register_broden` check a folder laid out as the dataset ships and
  record it as a ``datasets`` entry (the offline route: the data stays where it is; the entry
  keeps the sha256 of each annotation file as its inputs);
* :func:`describe_dataset` says what a registered dataset is (format, folder, images per split);
* :func:`downloads_dir` is where ``lavise download`` keeps what it fetched for a dataset;
* :func:`remove_dataset` forgets a dataset and deletes what was downloaded for it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, LaviseError
from ..store import Entry, FileDigests, Store, discard

SPLITS = ("train", "val")


def split_names(split: str) -> list[str]:
    """``train``/``val`` as a one-element list, ``all`` as both; anything else is refused."""
    if split == "all":
        return list(SPLITS)
    if split not in SPLITS:
        raise LaviseError(f"unknown split {split!r}; use train, val or all")
    return [split]


def _check_coco_json(path: Path, required: Sequence[str], panoptic: bool = False) -> int:
    """Check a COCO-format file element by element (never held whole: a COCO train file would take
    ≈ 2.9 GB as Python objects) and return its number of images."""
    from .jsonstream import ArrayLength, NotAnObject, stream_arrays
    from .validate import annotation_problem, category_problem, coco_error, image_problem

    counts = dict.fromkeys(("categories", "images", "annotations"), 0)

    def checked(key: str, check: Any) -> Any:
        def handle(x: Any) -> None:
            if (msg := check(x, counts[key])) is not None:
                raise coco_error(path, msg, panoptic)
            counts[key] += 1
        return handle

    try:
        top = stream_arrays(path, {"categories": checked("categories", category_problem),
                                   "images": checked("images", image_problem),
                                   "annotations": checked("annotations",
                                                          lambda a, k: annotation_problem(a, k, panoptic))})
    except NotAnObject:
        raise DataError(f"{path} is not a COCO annotation file: expected a JSON object with {', '.join(required)}") from None
    missing = [k for k in required if not isinstance(top.get(k), ArrayLength)]
    if missing:
        raise DataError(f"{path} is not a COCO annotation file: no {', '.join(repr(k) for k in missing)} list")
    return int(top["images"])


def _coco_split(root: Path, split: str, panoptic: bool) -> dict[str, Any]:
    """Check one split of a COCO layout; return its settings block."""
    images = root / f"{split}2017"
    if panoptic:
        ann = root / "annotations" / f"panoptic_{split}2017.json"
        masks = root / "annotations" / f"panoptic_{split}2017"
        if not masks.is_dir():
            raise DataError(
                f"{root}: {ann.relative_to(root)} is there but its PNG folder annotations/{masks.name}/ is missing"
                f" (unzip annotations/{masks.name}.zip into annotations/)"
            )
        if next(masks.glob("*.png"), None) is None:
            raise DataError(f"{root}: annotations/{masks.name}/ holds no PNG segment maps")
    else:
        ann = root / "annotations" / f"instances_{split}2017.json"
    if not images.is_dir():
        other = "val" if split == "train" else "train"
        raise DataError(
            f"{root}: {ann.relative_to(root)} is there but the images folder {images.name}/ is missing;"
            f" add it, or register only the other split (--split {other})"
        )
    num_images = _check_coco_json(ann, ("images", "annotations", "categories"), panoptic)
    block: dict[str, Any] = {"annotations": str(ann), "images": str(images)}
    if panoptic:
        block["masks"] = str(masks)
    block["num_images"] = num_images
    return block


def _coco_layout_error(root: Path, panoptic: bool) -> DataError:
    if panoptic:
        want = "annotations/panoptic_{train,val}2017.json with annotations/panoptic_{train,val}2017/*.png"
    else:
        want = "annotations/instances_{train,val}2017.json"
    return DataError(
        f"no COCO {'panoptic' if panoptic else 'instances'} annotations in {root}: expected {want}"
        f" and the images in {{train,val}}2017/ (either split may be missing, not both)"
    )


def register_coco(
    store: Store,
    root: Path,
    name: str = "coco",
    *,
    panoptic: bool = False,
    splits: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Entry:
    """Check a COCO 2017 folder laid out as COCO ships it and register it as dataset ``name``.

    Instances: ``annotations/instances_{split}2017.json`` and images in ``{split}2017/``.
    Panoptic: ``annotations/panoptic_{split}2017.json``, its PNGs in
    ``annotations/panoptic_{split}2017/`` and images in ``{split}2017/``.  ``splits=None``
    takes every split whose annotation file is there (at least one must be); a split whose
    annotation file is there must be complete.  Nothing is copied: the entry records where
    the data is, and the sha256 of each annotation file as its inputs.
    """
    root = Path(root).expanduser().resolve()
    store.path("datasets", name)  # validates the name before any work
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give the folder that holds annotations/ and train2017/ or val2017/")
    prefix = "panoptic" if panoptic else "instances"
    present = [s for s in SPLITS if (root / "annotations" / f"{prefix}_{s}2017.json").is_file()]
    if splits is None:
        wanted = present
        if not wanted:
            raise _coco_layout_error(root, panoptic)
    else:
        wanted = list(splits)
        for s in wanted:
            split_names(s)
            if s not in present:
                raise DataError(f"{root}: split {s!r} asked for, but annotations/{prefix}_{s}2017.json is missing")
    blocks = {s: _coco_split(root, s, panoptic) for s in wanted}
    digest = FileDigests(store)
    inputs = {f"{s}.annotations": digest(blocks[s]["annotations"]) for s in wanted}
    settings = {"format": "coco-panoptic" if panoptic else "coco", "root": str(root), "splits": blocks}
    with store.writing("datasets", name, inputs=inputs, settings=settings, extra=extra):
        pass
    return store.get("datasets", name)


VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "images")


def register_vg(store: Store, root: Path, name: str = "vg", *, extra: dict[str, Any] | None = None) -> Entry:
    """Check a Visual Genome 1.4 folder and register it as dataset ``name`` (split ``train``).

    Needs ``objects.json`` and at least one image folder (``VG_100K/``, ``VG_100K_2/`` or
    ``images/``); ``image_data.json`` and ``object_synsets.json`` are recorded when present.
    """
    root = Path(root).expanduser().resolve()
    store.path("datasets", name)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give the folder that holds objects.json and VG_100K/")
    objects = root / "objects.json"
    if not objects.is_file():
        raise DataError(f"no Visual Genome objects.json in {root} (unzip objects.json.zip there)")
    with open(objects, "rb") as fh:
        if fh.read(64).lstrip()[:1] != b"[":
            raise DataError(f"{objects} is not a Visual Genome objects file (expected a JSON list)")
    dirs = [root / d for d in VG_IMAGE_DIRS if (root / d).is_dir()]
    if not dirs:
        raise DataError(f"no Visual Genome images in {root}: expected VG_100K/ and/or VG_100K_2/")
    block: dict[str, Any] = {"annotations": str(objects), "images": str(dirs[0]), "image_dirs": [str(d) for d in dirs]}
    for key, fname in (("image_data", "image_data.json"), ("synsets", "object_synsets.json")):
        if (root / fname).is_file():
            block[key] = str(root / fname)
    if "image_data" in block:
        from .jsonstream import NotAList, stream_list

        try:  # counted element by element: the file is never held whole
            block["num_images"] = stream_list(root / "image_data.json")
        except NotAList:
            block["num_images"] = 0
    else:
        block["num_images"] = sum(1 for d in dirs for e in os.scandir(d) if e.is_file())
    inputs = {"train.annotations": FileDigests(store)(objects)}
    settings = {"format": "vg", "root": str(root), "splits": {"train": block}}
    with store.writing("datasets", name, inputs=inputs, settings=settings, extra=extra):
        pass
    return store.get("datasets", name)


def register_broden(store: Store, root: Path, name: str = "broden", *, extra: dict[str, Any] | None = None) -> Entry:
    """Check a Broden folder (NetDissect's format, e.g. ``broden1_224/``) and register it as ``name``.

    Needs ``index.csv`` (``image,split,ih,iw,sh,sw`` and the category columns), ``label.csv`` and
    ``images/``; the splits are index.csv's ``train`` and ``val`` rows.  Nothing is copied.
    """
    from .formats.broden import META_COLUMNS, index_columns, read_labels

    root = Path(root).expanduser().resolve()
    store.path("datasets", name)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give the Broden folder that holds index.csv, label.csv and images/")
    index_csv, label_csv, images = root / "index.csv", root / "label.csv", root / "images"
    for f in (index_csv, label_csv):
        if not f.is_file():
            raise DataError(f"no Broden {f.name} in {root}: expected index.csv, label.csv and images/ "
                            "(as NetDissect's script/dlbroden.sh unpacks broden1_224)")
    if not images.is_dir():
        raise DataError(f"no Broden images/ folder in {root}")
    header = index_columns(index_csv)
    categories = [c for c in header if c not in META_COLUMNS]
    if not categories:
        raise DataError(f"{index_csv} has no category column (e.g. object, part, material, scene, texture, color)")
    if not read_labels(label_csv):
        raise DataError(f"{label_csv} lists no label")
    counts: dict[str, int] = {}
    with open(index_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            split = (row.get("split") or "").strip()
            if split in SPLITS:
                counts[split] = counts.get(split, 0) + 1
    if not counts:
        raise DataError(f"{index_csv} has no image of split train or val")
    digest = FileDigests(store)
    blocks = {s: {"annotations": str(index_csv), "labels": str(label_csv), "images": str(images), "num_images": n}
              for s, n in sorted(counts.items(), key=lambda kv: SPLITS.index(kv[0]))}
    inputs = {f"{s}.annotations": digest(index_csv) for s in blocks} | {"labels": digest(label_csv)}
    settings = {"format": "broden", "root": str(root), "categories": categories, "splits": blocks}
    with store.writing("datasets", name, inputs=inputs, settings=settings, extra=extra):
        pass
    return store.get("datasets", name)


def describe_dataset(entry: Entry) -> dict[str, Any]:
    """What a registered dataset is, in the terms a person reads: ``format``, ``root`` and
    ``splits`` (split name -> number of images), from its manifest."""
    settings = entry.manifest.get("settings", {})
    splits = {s: int(b.get("num_images", 0)) for s, b in settings.get("splits", {}).items()}
    return {"format": settings.get("format"), "root": settings.get("root"), "splits": splits}


def downloads_dir(store: Store, name: str) -> Path:
    """Where the archives and the unpacked files of downloaded dataset ``name`` live."""
    store.path("datasets", name)
    return store.root / "downloads" / name


@dataclass(frozen=True)
class Removed:
    """What :func:`remove_dataset` deleted: ``downloads`` (the folder, or None when there was
    none or it was kept) and ``freed``, the bytes of its files."""

    name: str
    downloads: Path | None = None
    freed: int = 0


def remove_dataset(store: Store, name: str, *, keep_downloads: bool = False) -> Removed:
    """Remove dataset ``name`` from the store, and what ``lavise download`` fetched for it.

    The folder under ``<store root>/downloads/<name>/`` (archives, part files, unpacked data)
    goes too unless ``keep_downloads``; a dataset registered from a local folder only forgets
    that folder, which is never touched.  Each deletion is one rename (see
    :func:`~lavise_cli.store.discard`), so an interrupted removal leaves nothing half there.
    """
    store.remove("datasets", name)
    dl = downloads_dir(store, name)
    if keep_downloads or not dl.is_dir():
        return Removed(name)
    freed = sum(f.stat().st_size for f in dl.rglob("*") if f.is_file())
    discard(dl)
    return Removed(name, dl, freed)
