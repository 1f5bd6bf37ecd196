"""COCO instances (any COCO-format instances file: COCO, LVIS, custom sets) as a format plug-in.

For every image and category, the union of that category's instance masks (polygons and crowd
RLEs alike) becomes one pair.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from ...errors import DataError
from ..validate import check_coco
from . import Built, Candidate, accept_images


def read_annotations(ann_file: Path, what: str = "annotations", panoptic: bool = False) -> dict[str, Any]:
    """The checked JSON document of a COCO-format annotation file; a clear error when unreadable."""
    try:
        doc = json.loads(ann_file.read_text())
    except (OSError, UnicodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {what} {ann_file}: {e}") from None
    check_coco(doc, ann_file, panoptic=panoptic)
    return doc


def merge_split_categories(settings: dict[str, Any], build_split: Any) -> Built:
    """``build_split(info) -> (split dict, category names)`` over the dataset's splits, as one ``Built``
    (a category's name is the one its first split gives it)."""
    splits, names = {}, {}
    for split, info in settings["splits"].items():
        splits[split], cats = build_split(info)
        for cid, n in cats.items():
            names.setdefault(cid, n)
    return Built(splits, names)


def build_instances(settings: dict[str, Any], options: dict[str, Any], workers: int, progress: Any) -> Built:
    return merge_split_categories(settings, lambda info: build_instances_split(
        Path(info["annotations"]), Path(info["images"]), workers, progress))


def build_instances_split(
    ann_file: Path, image_dir: Path, workers: int, progress: Any
) -> tuple[dict[str, Any], dict[int, str]]:
    """One split of a COCO instances file -> (split dict keyed by category id, category names)."""
    from pycocotools.coco import COCO

    doc = read_annotations(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = doc
        coco.createIndex()
    cats = {int(c["id"]): str(c["name"]) for c in coco.dataset.get("categories", [])}
    dropped: Counter[str] = Counter()
    img_ids = sorted(coco.imgs)
    known = set(img_ids)
    per_img: dict[int, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for ann in coco.dataset.get("annotations", []):
        if ann.get("image_id") not in known:
            dropped["annotations with unknown image"] += 1
            continue
        if ann.get("category_id") not in cats:
            dropped["annotations with unknown category"] += 1
            continue
        per_img[ann["image_id"]][ann["category_id"]].append(ann)
    gone: list[tuple[str, str]] = []  # (image file, reason) of every dropped image, for dropped.txt
    sizes = accept_images([Candidate(str(image_dir / coco.imgs[i]["file_name"]),
                                     (coco.imgs[i]["height"], coco.imgs[i]["width"])) for i in img_ids],
                          workers, progress, f"checking {ann_file.stem} images", dropped, gone)
    images, pi, pc, rles = [], [], [], []
    for iid, size in zip(img_ids, sizes):
        if size is None:
            continue
        h, w = size
        k = len(images)
        images.append({"id": iid, "file": coco.imgs[iid]["file_name"], "height": h, "width": w})
        for cat in sorted(per_img.get(iid, {})):
            parts = []
            for ann in per_img[iid][cat]:
                try:
                    r = coco.annToRLE(ann)
                    # an RLE of another size than its image, or counts that do not decode, is malformed
                    if list(r.get("size", [])) != [h, w]:
                        raise ValueError("RLE size differs from the image")
                    mask_utils.area(r)
                    parts.append(r)
                except Exception:
                    dropped["annotations with a malformed segmentation"] += 1
            if not parts:
                continue
            try:
                rle = mask_utils.merge(parts, intersect=False) if len(parts) > 1 else parts[0]
                area = int(mask_utils.area(rle))
            except Exception:
                dropped["annotations with a malformed segmentation"] += len(parts)
                continue
            if area == 0:
                dropped["empty masks"] += 1
                continue
            counts = rle["counts"]
            pi.append(k)
            pc.append(cat)
            rles.append(counts.decode() if isinstance(counts, bytes) else counts)
    return {"images": images, "pair_image": pi, "pair_cat": pc, "rle": rles, "dropped": dict(dropped),
            "dropped_images": gone}, cats
