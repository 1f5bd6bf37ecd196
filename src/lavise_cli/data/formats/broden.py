"""Broden (NetDissect's Broadly and Densely Labeled Dataset) as a format plug-in.

The format is the one NetDissect's ``joinseg.py`` writes and its ``loadseg.py`` reads
(CSAILVision/NetDissect; the README it writes into every Broden folder):

* ``index.csv``: ``image,split,ih,iw,sh,sw`` then one column per category (Broden 1: ``color,
  object, material, part, scene, texture``).  ``image`` is relative to ``images/``; ``ih x iw`` is
  the image's size and ``sh x sw`` the segmentation's.  A category cell holds zero or more
  ``;``-separated entries: a decimal number is a whole-image label (scene, texture), anything else
  a PNG (relative to ``images/``) whose pixel label is ``R + 256 * G`` (0: unlabelled);
* ``label.csv``: ``number,name,category,frequency,coverage,syns`` (``category`` like
  ``material(36);object(3)``); label numbers are shared by every category;
* ``category.csv`` and ``c_<category>.csv`` (per-category dense codes): not needed here.

Per image and label, the union of that label's pixels over the chosen categories' PNGs is one
mask, brought from ``sh x sw`` to the image's ``ih x iw`` by nearest neighbour (each image pixel
takes the label of the segmentation pixel it falls in); a whole-image label is a mask of the whole
image.  Concept names are label.csv's names without the one-letter suffix NetDissect adds to tell
sources apart (``street-s`` scene, ``red-c`` colour), so ``street``, ``red``.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

from ...errors import DataError
from ..pool import pool_map
from . import Built, Candidate, accept_images, add_image

META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
BRODEN_CATEGORIES = ("object", "part", "material", "scene", "texture", "color")
SPLITS = ("train", "val")
_SUFFIX = re.compile(r"-[a-z]$")
_NUMBER = re.compile(r"^\d+$")


def concept_name(name: str) -> str:
    """label.csv's name as a concept: NetDissect's source suffix dropped (``street-s`` -> ``street``)."""
    return _SUFFIX.sub("", name.strip())


def _reader(path: Path) -> Iterator[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)
    except (OSError, UnicodeError, csv.Error) as e:
        raise DataError(f"cannot read Broden file {path}: {e}") from None


def index_columns(index_csv: Path) -> list[str]:
    """The header of ``index.csv``; a clear error when it lacks the metadata columns."""
    try:
        with open(index_csv, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeError, csv.Error) as e:
        raise DataError(f"cannot read Broden file {index_csv}: {e}") from None
    missing = [c for c in META_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{index_csv} is not a Broden index: no column {', '.join(missing)} "
                        f"(expected {','.join(META_COLUMNS)},<categories>)")
    return header


def read_labels(label_csv: Path) -> dict[int, tuple[str, set[str]]]:
    """label.csv: number -> (name, the categories it is listed in)."""
    out: dict[int, tuple[str, set[str]]] = {}
    for row in _reader(label_csv):
        num, name = (row.get("number") or "").strip(), row.get("name")
        if not _NUMBER.match(num) or name is None:
            raise DataError(f"{label_csv} is not a Broden label file: expected columns number,name,category,... "
                            f"with whole label numbers, got {row}")
        cats = {m.group(1) for m in re.finditer(r"([^;(]+)\(\d*\)", row.get("category") or "")}
        out[int(num)] = (name, {c.strip() for c in cats})
    return out


def _entries(cell: str | None) -> list[int | str]:
    """A category cell: ``;``-separated whole-image label numbers and PNG paths (empty ones skipped)."""
    out: list[int | str] = []
    for e in (cell or "").split(";"):
        e = e.strip()
        if e:
            out.append(int(e) if _NUMBER.match(e) else e)
    return out


def decode_labels(png: Any) -> np.ndarray:
    """A Broden segmentation PNG (path or PIL image) as label numbers ``R + 256 * G`` (int32, ``sh x sw``)."""
    from PIL import Image

    im = png if isinstance(png, Image.Image) else Image.open(png)
    arr = np.asarray(im.convert("RGB"), dtype=np.int32)
    return arr[..., 0] + 256 * arr[..., 1]


def nearest_rows(n_out: int, n_in: int) -> np.ndarray:
    """For each of ``n_out`` output pixels, the input pixel whose area holds its centre."""
    return np.minimum((np.arange(n_out) * 2 + 1) * n_in // (2 * n_out), n_in - 1)


def _image_masks(images_dir: str, ih: int, iw: int, sh: int, sw: int, entries: list[int | str]
                 ) -> tuple[str, list[tuple[int, str]]]:
    """(status, [(label number, RLE counts)]) of one image, in a worker process: per label, the union
    over the entries (PNGs at ``sh x sw``, numbers = whole image), at the image's ``ih x iw``."""
    from PIL import Image

    masks: dict[int, np.ndarray] = {}
    whole: set[int] = set()
    rows, cols = nearest_rows(ih, sh), nearest_rows(iw, sw)
    for e in entries:
        if isinstance(e, int):
            whole.add(e)
            continue
        try:
            with Image.open(Path(images_dir) / e) as im:
                seg = decode_labels(im)
        except FileNotFoundError:
            return "missing segmentation", []
        except Exception:
            return "corrupt segmentation", []
        if seg.shape != (sh, sw):
            return "segmentation of another size than sh x sw", []
        seg = seg[rows][:, cols]
        for lab in np.unique(seg).tolist():
            if lab == 0:
                continue
            m = seg == lab
            masks[lab] = m if lab not in masks else (masks[lab] | m)
    for lab in whole:
        masks[lab] = np.ones((ih, iw), dtype=bool)
    out = []
    for lab in sorted(masks):
        rle = mask_utils.encode(np.asfortranarray(masks[lab].astype(np.uint8)))
        out.append((lab, rle["counts"].decode()))
    return "ok", out


def build_broden(settings: dict[str, Any], options: dict[str, Any], workers: int, progress: Any) -> Built:
    root = Path(settings["root"])
    index_csv, label_csv, images_dir = root / "index.csv", root / "label.csv", root / "images"
    present = [c for c in index_columns(index_csv) if c not in META_COLUMNS]
    wanted = list(options.get("categories") or present)
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise DataError(f"--categories: {', '.join(unknown)} not in this Broden folder (its categories: "
                        f"{', '.join(present)})")
    labels = read_labels(label_csv)
    dropped: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    rows: dict[str, list[tuple[int, str, int, int, int, int, list[int | str]]]] = {s: [] for s in SPLITS}
    other_splits: Counter[str] = Counter()
    for line, row in enumerate(_reader(index_csv), start=2):
        split = (row.get("split") or "").strip()
        if split not in rows:
            other_splits[split or "(none)"] += 1
            continue
        try:
            ih, iw, sh, sw = (int(row[k]) for k in ("ih", "iw", "sh", "sw"))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{index_csv}, line {line}: ih, iw, sh and sw must be whole numbers") from None
        entries = [e for c in wanted for e in _entries(row.get(c))]
        if not entries:
            dropped[split][f"images with no label in {', '.join(wanted)}"] += 1
            continue
        rows[split].append((line - 1, row["image"], ih, iw, sh, sw, entries))
    splits: dict[str, dict[str, Any]] = {}
    used: set[int] = set()
    for split in SPLITS:
        if not rows[split]:
            continue
        jobs = [(str(images_dir), ih, iw, sh, sw, entries) for _, _, ih, iw, sh, sw, entries in rows[split]]
        masks = pool_map(_image_masks, jobs, workers, progress, f"reading Broden {split} segmentations")
        gone: list[tuple[str, str]] = []
        candidates = [Candidate(str(images_dir / f), (ih, iw), problem=None if status == "ok" else status)
                      for (_, f, ih, iw, _, _, _), (status, _) in zip(rows[split], masks)]
        sizes = accept_images(candidates, workers, progress, f"checking Broden {split} images", dropped[split], gone)
        sp: dict[str, Any] = {"images": [], "pair_image": [], "pair_cat": [], "rle": [], "dropped_images": gone}
        for (iid, f, ih, iw, _, _, _), (_, lab_rles), size in zip(rows[split], masks, sizes):
            if size is None:
                continue
            known = [(lab, r) for lab, r in lab_rles if lab in labels]
            dropped[split]["labels not in label.csv"] += len(lab_rles) - len(known)
            if not known:
                dropped[split]["images with no known label"] += 1
                continue
            add_image(sp, {"id": iid, "file": f, "height": ih, "width": iw}, known)
            used.update(lab for lab, _r in known)
        sp["dropped"] = {k: v for k, v in dropped[split].items() if v}
        splits[split] = sp
    if not splits:
        raise DataError(f"{index_csv} has no train or val image with a label in {', '.join(wanted)}")
    if other_splits:
        first = next(iter(splits.values()))
        first["dropped"].update({f"images of split {s!r} (only train and val are read)": n
                                 for s, n in other_splits.items()})
    # Concepts: the labels listed in a chosen category (label.csv), and any label that occurred there.
    chosen = set(wanted)
    names = {n: concept_name(name) for n, (name, cats) in labels.items() if cats & chosen or n in used}
    images = str(images_dir)
    return Built(splits, names, image_dirs={s: images for s in splits},
                 info={"broden_categories": wanted})
