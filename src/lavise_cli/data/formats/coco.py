"""COCO instances (any COCO-format instances file: COCO, LVIS, custom sets) as a format plug-in.

For every image and category, the union of that category's instance masks (polygons and crowd
RLEs alike) becomes one pair.
"""

from __future__ import annotations

import json
import os
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
    import tempfile
    from array import array

    import numpy as np

    from ..pool import WorkerPool
    from ..validate import stream_coco
    from . import judge_image

    cats: dict[int, str] = {}
    ids, heights, widths = array("q"), array("q"), array("q")
    files: list[str] = []
    a_img, a_cat, a_off, a_len = array("q"), array("q"), array("q"), array("q")
    spill = tempfile.TemporaryFile(prefix="lavise-segm-")
    pos = [0]

    def on_category(c: dict[str, Any]) -> None:
        cats[int(c["id"])] = str(c["name"])

    def on_image(im: dict[str, Any]) -> None:
        ids.append(im["id"])
        heights.append(im["height"])
        widths.append(im["width"])
        files.append(im["file_name"])

    def on_annotation(ann: dict[str, Any]) -> None:
        data = json.dumps(ann.get("segmentation"), separators=(",", ":")).encode()
        spill.write(data)
        a_img.append(ann["image_id"])
        a_cat.append(ann["category_id"])
        a_off.append(pos[0])
        a_len.append(len(data))
        pos[0] += len(data)

    try:
        stream_coco(ann_file, on_category, on_image, on_annotation)
        spill.flush()
    except BaseException:
        spill.close()
        raise
    dropped: Counter[str] = Counter()
    gone: list[tuple[str, str]] = []  # (image file, reason) of every dropped image, for dropped.txt
    id_arr = np.frombuffer(ids, dtype=np.int64) if len(ids) else np.zeros(0, np.int64)
    order = np.argsort(id_arr, kind="stable")
    sorted_ids = id_arr[order]
    # a repeated image id: the last entry wins (as in pycocotools' index)
    last = np.ones(len(sorted_ids), dtype=bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    order, sorted_ids = order[last], sorted_ids[last]
    ann_img = np.frombuffer(a_img, dtype=np.int64) if len(a_img) else np.zeros(0, np.int64)
    ann_cat = np.frombuffer(a_cat, dtype=np.int64) if len(a_cat) else np.zeros(0, np.int64)
    where = np.clip(np.searchsorted(sorted_ids, ann_img), 0, max(len(sorted_ids) - 1, 0))
    known_img = (sorted_ids[where] == ann_img) if len(sorted_ids) else np.zeros(len(ann_img), bool)
    known_cat = np.isin(ann_cat, np.fromiter(cats, dtype=np.int64, count=len(cats)))
    if (~known_img).any():
        dropped["annotations with unknown image"] += int((~known_img).sum())
    if (known_img & ~known_cat).any():
        dropped["annotations with unknown category"] += int((known_img & ~known_cat).sum())
    keep = np.flatnonzero(known_img & known_cat)
    keep = keep[np.lexsort((ann_cat[keep], where[keep]))]  # by image, then category (stable)
    ann_rank = where[keep]  # each kept annotation's image, as its rank among the sorted ids
    offs = np.frombuffer(a_off, dtype=np.int64) if len(a_off) else np.zeros(0, np.int64)
    lens = np.frombuffer(a_len, dtype=np.int64) if len(a_len) else np.zeros(0, np.int64)
    n = len(sorted_ids)

    def chunks() -> Any:
        task = progress.add_task(f"indexing {ann_file.stem} images", total=n, unit="img") \
            if progress is not None else None
        fd = spill.fileno()
        try:
            with WorkerPool(workers) as pool:
                for start in range(0, n, CHUNK):
                    stop = min(n, start + CHUNK)
                    lo, hi = np.searchsorted(ann_rank, [start, stop])
                    jobs, cands = [], []
                    for rank in range(start, stop):
                        j = int(order[rank])
                        a, b = np.searchsorted(ann_rank[lo:hi], [rank, rank + 1]) + lo
                        per: dict[int, list[str]] = {}
                        for k in keep[a:b].tolist():
                            per.setdefault(int(ann_cat[k]), []).append(
                                os.pread(fd, int(lens[k]), int(offs[k])).decode())
                        h, w = int(heights[j]), int(widths[j])
                        path = str(image_dir / files[j])
                        jobs.append((path, h, w, sorted(per.items())))
                        cands.append(Candidate(path, (h, w)))
                    results = pool.map(image_masks, jobs, progress, task)
                    images, pi, pc, rles = [], [], [], []
                    for rank, c, (probed, masks, bad, empty) in zip(range(start, stop), cands, results):
                        if judge_image(c, probed, dropped, gone) is None:
                            continue
                        if bad:
                            dropped["annotations with a malformed segmentation"] += bad
                        if empty:
                            dropped["empty masks"] += empty
                        j = int(order[rank])
                        k = len(images)
                        images.append({"id": int(ids[j]), "file": files[j], "height": int(heights[j]),
                                       "width": int(widths[j])})
                        for cat, counts in masks:
                            pi.append(k)
                            pc.append(cat)
                            rles.append(counts)
                    yield {"images": images, "pair_image": pi, "pair_cat": pc, "rle": rles}
        finally:
            spill.close()

    return {"chunks": chunks(), "dropped": dropped, "dropped_images": gone}, cats
