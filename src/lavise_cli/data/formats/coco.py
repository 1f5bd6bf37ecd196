"""COCO instances (any COCO-format instances file: COCO, LVIS, custom sets) as a format plug-in.

For every image and category, the union of that category's instance masks (polygons and crowd
RLEs alike) becomes one pair.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from . import Built, Candidate


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


CHUNK = 256  # images per chunk: drawn in the worker pool, then written to the index


def ann_to_rle(segm: Any, h: int, w: int) -> dict[str, Any]:
    """One annotation's segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE
    (what pycocotools' ``COCO.annToRLE`` does)."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)
    if isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        c = segm["counts"]
        return {"size": list(segm["size"]), "counts": c.encode() if isinstance(c, str) else c}
    raise ValueError("not a segmentation")


def image_masks(path: str, h: int, w: int, cats: list[tuple[int, list[str]]]
                ) -> tuple[tuple[str, str | None, int, int], list[tuple[int, bytes]], int, int]:
    """In a worker process: probe image ``path``; when it is readable and ``h`` x ``w``, each
    category's union mask of its segmentations (JSON text) as RLE counts.  Returns
    ``(probe, [(category, counts)], malformed segmentations, empty masks)``."""
    from ..pool import probe

    probed = probe(path)
    if probed[0] != "ok" or (probed[2], probed[3]) != (h, w):
        return probed, [], 0, 0
    out, bad, empty = [], 0, 0
    for cat, segms in cats:
        parts = []
        for text in segms:
            try:
                r = ann_to_rle(json.loads(text), h, w)
                # an RLE of another size than its image, or counts that do not decode, is malformed
                if list(r.get("size", [])) != [h, w]:
                    raise ValueError("RLE size differs from the image")
                mask_utils.area(r)
                parts.append(r)
            except Exception:
                bad += 1
        if not parts:
            continue
        try:
            rle = mask_utils.merge(parts, intersect=False) if len(parts) > 1 else parts[0]
            area = int(mask_utils.area(rle))
        except Exception:
            bad += len(parts)
            continue
        if area == 0:
            empty += 1
            continue
        out.append((cat, rle["counts"]))
    return probed, out, bad, empty


def build_instances_split(
    ann_file: Path, image_dir: Path, workers: int, progress: Any
) -> tuple[dict[str, Any], dict[int, str]]:
    """One split of a COCO instances file -> (streamed split, category names).

    The file is read element by element (:func:`..validate.stream_coco`): images and categories
    are kept as small columns, each annotation's segmentation is spilled to a temporary file and
    only its (image, category, place) kept; then chunks of :data:`CHUNK` images have their masks
    drawn in the worker pool and are written to the index as they come.
    """
    from array import array

    import numpy as np

    from ..pool import WorkerPool
    from ..validate import stream_coco
    from . import judge_image
    from .streamed import CocoImages, Spill, int64

    spill = Spill("lavise-segm-")  # file names and segmentations
    imgs = CocoImages(spill)
    a_img, a_cat, a_seg = array("q"), array("q"), array("q")

    def on_annotation(ann: dict[str, Any]) -> None:
        a_seg.append(spill.add(json.dumps(ann.get("segmentation"), separators=(",", ":")).encode()))
        a_img.append(ann["image_id"])
        a_cat.append(ann["category_id"])

    try:
        stream_coco(ann_file, imgs.on_category, imgs.on_image, on_annotation)
    except BaseException:
        spill.close()
        raise
    cats = imgs.cats
    dropped: Counter[str] = Counter()
    gone: list[tuple[str, str]] = []  # (image file, reason) of every dropped image, for dropped.txt
    ann_img, ann_cat = int64(a_img), int64(a_cat)
    order, sorted_ids, where, known_img = imgs.locate(ann_img)
    known_cat = np.isin(ann_cat, imgs.known_categories())
    if (~known_img).any():
        dropped["annotations with unknown image"] += int((~known_img).sum())
    if (known_img & ~known_cat).any():
        dropped["annotations with unknown category"] += int((known_img & ~known_cat).sum())
    keep = np.flatnonzero(known_img & known_cat)
    keep = keep[np.lexsort((ann_cat[keep], where[keep]))]  # by image, then category (stable)
    ann_rank = where[keep]  # each kept annotation's image, as its rank among the sorted ids
    n = len(sorted_ids)

    def chunks() -> Any:
        task = progress.add_task(f"indexing {ann_file.stem} images", total=n, unit="img") \
            if progress is not None else None
        try:
            with WorkerPool(workers) as pool:
                for start in range(0, n, CHUNK):
                    stop = min(n, start + CHUNK)
                    lo, hi = np.searchsorted(ann_rank, [start, stop])
                    jobs, cands, records = [], [], []
                    for rank in range(start, stop):
                        j = int(order[rank])
                        a, b = np.searchsorted(ann_rank[lo:hi], [rank, rank + 1]) + lo
                        per: dict[int, list[str]] = {}
                        for k in keep[a:b].tolist():
                            per.setdefault(int(ann_cat[k]), []).append(spill.get(int(a_seg[k])).decode())
                        h, w, name = int(imgs.heights[j]), int(imgs.widths[j]), imgs.file(j)
                        path = str(image_dir / name)
                        jobs.append((path, h, w, sorted(per.items())))
                        cands.append(Candidate(path, (h, w)))
                        records.append({"id": int(imgs.ids[j]), "file": name, "height": h, "width": w})
                    results = pool.map(image_masks, jobs, progress, task)
                    images, pi, pc, rles = [], [], [], []
                    for record, c, (probed, masks, bad, empty) in zip(records, cands, results):
                        if judge_image(c, probed, dropped, gone) is None:
                            continue
                        if bad:
                            dropped["annotations with a malformed segmentation"] += bad
                        if empty:
                            dropped["empty masks"] += empty
                        k = len(images)
                        images.append(record)
                        for cat, counts in masks:
                            pi.append(k)
                            pc.append(cat)
                            rles.append(counts)
                    yield {"images": images, "pair_image": pi, "pair_cat": pc, "rle": rles}
        finally:
            spill.close()

    return {"chunks": chunks(), "dropped": dropped, "dropped_images": gone}, cats
