"""COCO panoptic as a format plug-in: per image, each category's segments (from the panoptic
PNG, segment id = R + 256 G + 256^2 B) united into one mask."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..pool import pool_map
from . import Built, Candidate, accept_images
from .coco import merge_split_categories, read_annotations


def build_panoptic(settings: dict[str, Any], options: dict[str, Any], workers: int, progress: Any) -> Built:
    return merge_split_categories(settings, lambda info: build_panoptic_split(
        Path(info["annotations"]), Path(info["images"]), Path(info["masks"]), workers, progress))


def panoptic_masks(png: str, segments: list[tuple[int, int]]) -> tuple[str, list[tuple[int, str]], int, int]:
    """(status, [(cat_id, RLE counts or "" when empty)], h, w) of one panoptic PNG, in a worker process."""
    from PIL import Image

    try:
        with Image.open(png) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint32)
    except FileNotFoundError:
        return "missing mask", [], 0, 0
    except Exception:
        return "corrupt mask", [], 0, 0
    ids = arr[..., 0] + 256 * arr[..., 1] + 65536 * arr[..., 2]
    h, w = ids.shape
    by_cat: dict[int, list[int]] = defaultdict(list)
    for seg_id, cat in segments:
        by_cat[cat].append(seg_id)
    out = []
    for cat, segs in sorted(by_cat.items()):
        m = np.isin(ids, segs)
        if not m.any():
            out.append((cat, ""))
            continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        out.append((cat, rle["counts"].decode()))
    return "ok", out, h, w


def build_panoptic_split(
    ann_file: Path, image_dir: Path, mask_dir: Path, workers: int, progress: Any
) -> tuple[dict[str, Any], dict[int, str]]:
    """One split of a COCO panoptic file -> (split dict keyed by category id, category names)."""
    d = read_annotations(ann_file, "panoptic annotations", panoptic=True)
    cats = {int(c["id"]): str(c["name"]) for c in d.get("categories", [])}
    imgs = {int(i["id"]): i for i in d.get("images", [])}
    dropped: Counter[str] = Counter()
    jobs, order = [], []
    for ann in sorted(d.get("annotations", []), key=lambda a: a.get("image_id", -1)):
        iid = ann.get("image_id")
        if iid not in imgs:
            dropped["annotations with unknown image"] += 1
            continue
        segs = []
        for s in ann.get("segments_info", []):
            if s.get("category_id") not in cats:
                dropped["segments with unknown category"] += 1
                continue
            segs.append((int(s["id"]), int(s["category_id"])))
        jobs.append((str(mask_dir / ann["file_name"]), segs))
        order.append(iid)
    masks = pool_map(panoptic_masks, jobs, workers, progress, f"reading {ann_file.stem} masks")
    gone: list[tuple[str, str]] = []  # (image file, reason) of every dropped image, for dropped.txt
    candidates = [Candidate(str(image_dir / imgs[iid]["file_name"]), (imgs[iid]["height"], imgs[iid]["width"]),
                            problem=None if mstatus == "ok" else mstatus, mask_size=(mh, mw))
                  for iid, (mstatus, _, mh, mw) in zip(order, masks)]
    sizes = accept_images(candidates, workers, progress, f"checking {ann_file.stem} images", dropped, gone)
    images, pi, pc, rles = [], [], [], []
    for iid, (_, cat_rles, _, _), size in zip(order, masks, sizes):
        if size is None:
            continue
        h, w = size
        k = len(images)
        images.append({"id": iid, "file": imgs[iid]["file_name"], "height": h, "width": w})
        for cat, counts in cat_rles:
            if not counts:
                dropped["empty masks"] += 1
                continue
            pi.append(k)
            pc.append(cat)
            rles.append(counts)
    return {"images": images, "pair_image": pi, "pair_cat": pc, "rle": rles, "dropped": dict(dropped),
            "dropped_images": gone}, cats
