"""COCO panoptic as a format plug-in: per image, each category's segments (from the panoptic
PNG, segment id = R + 256 G + 256^2 B) united into one mask."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ...errors import DataError
from . import Built, Candidate, add_image, judge_image
from .coco import merge_split_categories


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


def panoptic_image(png: str, segments: list[tuple[int, int]], image: str
                   ) -> tuple[tuple[str, list[tuple[int, str]], int, int], tuple[str, str | None, int, int]]:
    """In a worker process: :func:`panoptic_masks` of the PNG, and the probe of the image."""
    from ..pool import probe

    return panoptic_masks(png, segments), probe(image)


CHUNK = 256  # annotations (one image each) per chunk: read in the worker pool, then written to the index


def build_panoptic_split(
    ann_file: Path, image_dir: Path, mask_dir: Path, workers: int, progress: Any
) -> tuple[dict[str, Any], dict[int, str]]:
    """One split of a COCO panoptic file -> (streamed split, category names).

    The file is read element by element (:func:`..validate.stream_coco`): categories are kept,
    images and annotations as columns of numbers (file names in a temporary file, each
    annotation's segments as (id, category) columns); then the annotations, by image id, go in
    chunks of :data:`CHUNK` through the worker pool (PNG read, image probed) and are written to
    the index as they come.
    """
    from array import array

    from ..pool import WorkerPool
    from ..validate import stream_coco
    from .streamed import CocoImages, Spill, int64

    names = Spill("lavise-panoptic-")  # the images' and the PNGs' file names
    imgs = CocoImages(names)
    a_img, a_name, a_nseg, s_id, s_cat = array("q"), array("q"), array("q"), array("q"), array("q")

    def on_annotation(ann: dict[str, Any]) -> None:
        a_img.append(ann["image_id"])
        segs = ann["segments_info"]
        for seg in segs:
            s_id.append(seg["id"])
            s_cat.append(seg["category_id"])
        a_nseg.append(len(segs))
        a_name.append(names.add_text(ann["file_name"]))

    try:
        stream_coco(ann_file, imgs.on_category, imgs.on_image, on_annotation, panoptic=True)
    except OverflowError:
        names.close()
        raise DataError(f"{ann_file} is not a well-formed COCO panoptic file: an id or a size does not fit "
                        f"in 64 bits; fix the file") from None
    except BaseException:
        names.close()
        raise

    cats = imgs.cats
    ann_img = int64(a_img)
    img_order, _sorted_ids, rank, known = imgs.locate(ann_img)
    ann_order = np.argsort(ann_img, kind="stable")  # by image id, then file order
    nseg = int64(a_nseg)
    seg_start = np.concatenate([[0], np.cumsum(nseg)]).astype(np.int64)
    seg_id, seg_cat = int64(s_id), int64(s_cat)
    seg_known = np.isin(seg_cat, imgs.known_categories())
    unknown_segs = np.bincount(np.repeat(np.arange(len(nseg)), nseg)[~seg_known], minlength=len(nseg))
    # The counts before any image is read, in the order the annotations first give them.
    first: list[tuple[int, str, int]] = []
    k_sorted = known[ann_order]
    if (~k_sorted).any():
        first.append((int(np.argmax(~k_sorted)), "annotations with unknown image", int((~k_sorted).sum())))
    bad = k_sorted & (unknown_segs[ann_order] > 0)
    if bad.any():
        first.append((int(np.argmax(bad)), "segments with unknown category", int(unknown_segs[ann_order][k_sorted].sum())))
    jobs_order = ann_order[k_sorted]  # the annotations read, in order: one image record each

    dropped: Counter[str] = Counter()
    gone: list[tuple[str, str]] = []  # (image file, reason) of every dropped image, for dropped.txt

    def chunks() -> Any:
        image_dropped: Counter[str] = Counter()
        empty = 0
        task = progress.add_task(f"reading {ann_file.stem} masks and images", total=len(jobs_order), unit="img") \
            if progress is not None else None
        try:
            with WorkerPool(workers) as pool:
                for start in range(0, len(jobs_order), CHUNK):
                    part = jobs_order[start:start + CHUNK].tolist()
                    jobs, recs = [], []
                    for k in part:
                        j = int(img_order[rank[k]])
                        a, b = int(seg_start[k]), int(seg_start[k + 1])
                        keep = seg_known[a:b]
                        segs = list(zip(seg_id[a:b][keep].tolist(), seg_cat[a:b][keep].tolist()))
                        image_file = imgs.file(j)
                        jobs.append((str(mask_dir / names.text(int(a_name[k]))), segs, str(image_dir / image_file)))
                        recs.append((int(ann_img[k]), image_file, int(imgs.heights[j]), int(imgs.widths[j])))
                    results = pool.map(panoptic_image, jobs, progress, task)
                    chunk: dict[str, Any] = {"images": [], "pair_image": [], "pair_cat": [], "rle": []}
                    for (iid, image_file, h, w), job, ((mstatus, cat_rles, mh, mw), probed) in zip(recs, jobs, results):
                        c = Candidate(job[2], (h, w), problem=None if mstatus == "ok" else mstatus, mask_size=(mh, mw))
                        size = judge_image(c, probed, image_dropped, gone)
                        if size is None:
                            continue
                        pairs = [(cat, counts) for cat, counts in cat_rles if counts]
                        empty += len(cat_rles) - len(pairs)
                        add_image(chunk, {"id": iid, "file": image_file, "height": size[0], "width": size[1]}, pairs)
                    yield chunk
        finally:
            names.close()
        # the counts in the order the whole-file reading gave them
        for _, key, v in sorted(first):
            dropped[key] = v
        dropped.update(image_dropped)
        if empty:
            dropped["empty masks"] = empty

    return {"chunks": chunks(), "dropped": dropped, "dropped_images": gone}, cats
