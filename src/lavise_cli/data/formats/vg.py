"""Visual Genome 1.4 as a format plug-in: object boxes -> one box mask per (image, synset).

Concepts are WordNet synsets (``objects[].synsets``; an object without one falls back to
``object_synsets.json`` for its name, through ``object_alias.txt``), labelled by their first
lemma (``traffic_light.n.01`` -> ``traffic light``); synsets that share a label stay apart
(``light (light.n.01)``, ``light (light.n.02)``).  VG has no official split: the images are split
seeded (``val_fraction``), and concepts seen in fewer than ``min_images`` training images are
left out, with the images that are left with none.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ...errors import DataError
from ..pool import pool_map
from . import Built, Candidate, accept_images, add_image

MIN_IMAGES = 100  # the paper's threshold on concept frequency
VAL_FRACTION = 0.1


def synset_label(synset: str) -> str:
    """``traffic_light.n.01`` -> ``traffic light`` (the synset's first lemma, as words)."""
    return synset.split(".")[0].replace("_", " ").strip()


def concept_labels(synsets: list[str]) -> dict[str, str]:
    """Each synset's label; synsets sharing a label get their name added: ``bank (bank.n.01)``."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for s in synsets:
        by_label[synset_label(s)].append(s)
    out = {}
    for label, group in by_label.items():
        for s in group:
            out[s] = label if len(group) == 1 else f"{label} ({s})"
    return out


def box_mask(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """The union of ``(x, y, w, h)`` boxes (VG's convention: x is the column) clipped to the image."""
    m = np.zeros((height, width), dtype=np.uint8)
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
        if x1 > x0 and y1 > y0:
            m[y0:y1, x0:x1] = 1
    return m


def _box_masks(height: int, width: int, concepts: list[tuple[int, list[tuple[int, int, int, int]]]]
               ) -> list[tuple[int, str]]:
    """(category, RLE counts or "" when empty) for one image, in a worker process."""
    out = []
    for cat, boxes in concepts:
        m = box_mask(height, width, boxes)
        if not m.any():
            out.append((cat, ""))
            continue
        out.append((cat, mask_utils.encode(np.asfortranarray(m))["counts"].decode()))
    return out


def _load_json(path: str | Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read Visual Genome file {path}: {e}") from None


def _aliases(path: Path) -> dict[str, str]:
    """``object_alias.txt``: each line ``canonical,alias,alias...`` -> {alias: canonical}."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        names = [n.strip().lower() for n in line.split(",") if n.strip()]
        for alias in names[1:]:
            out.setdefault(alias, names[0])
    return out


def _object_synsets(obj: dict[str, Any], by_name: dict[str, str], aliases: dict[str, str]) -> list[str]:
    syns = [s for s in obj.get("synsets") or [] if isinstance(s, str) and s]
    if syns:
        return syns
    for name in obj.get("names") or []:
        if not isinstance(name, str):
            continue
        key = name.strip().lower()
        for k in (key, aliases.get(key)):
            if k and isinstance(by_name.get(k), str):
                return [by_name[k]]
    return []


def _box(obj: dict[str, Any]) -> tuple[int, int, int, int] | None:
    try:
        box = tuple(int(round(float(obj[k]))) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return box  # type: ignore[return-value]


def _image_file(root: Path, dirs: list[Path], iid: int, meta: dict[str, Any] | None) -> str:
    """The image's path relative to ``root``: the folder its URL names when present, else the first
    image folder that has ``{id}.jpg``."""
    url = (meta or {}).get("url") or ""
    parts = url.rstrip("/").split("/")[-2:]
    if len(parts) == 2 and (root / parts[0]).is_dir():
        return f"{parts[0]}/{parts[1]}"
    for d in dirs:
        if (d / f"{iid}.jpg").exists():
            return str((d / f"{iid}.jpg").relative_to(root))
    return str((dirs[0] / f"{iid}.jpg").relative_to(root))


def build_vg(settings: dict[str, Any], options: dict[str, Any], workers: int, progress: Any) -> Built:
    from ..index import held_out_images

    min_images = int(options.get("min_images", MIN_IMAGES))
    val_fraction = float(options.get("val_fraction", VAL_FRACTION))
    seed = int(options.get("seed", 0))
    root = Path(settings["root"])
    block = settings["splits"]["train"]
    dirs = [Path(d) for d in block.get("image_dirs", [block["images"]])]
    objects = _load_json(block["annotations"])
    if not isinstance(objects, list):
        raise DataError(f"{block['annotations']} is not a Visual Genome objects file (expected a JSON list)")
    image_meta: dict[int, dict[str, Any]] = {}
    if block.get("image_data"):
        data = _load_json(block["image_data"])
        if isinstance(data, list):
            image_meta = {int(d["image_id"]): d for d in data if isinstance(d, dict) and "image_id" in d}
    by_name = _load_json(block["synsets"]) if block.get("synsets") else {}
    by_name = by_name if isinstance(by_name, dict) else {}
    aliases = _aliases(root / "object_alias.txt")
    dropped: Counter[str] = Counter()

    boxes_of: dict[int, dict[str, list[tuple[int, int, int, int]]]] = {}
    for entry in objects:
        iid = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        if not isinstance(iid, int):
            dropped["entries without an image id"] += 1
            continue
        per = boxes_of.setdefault(iid, defaultdict(list))
        for obj in entry.get("objects") or []:
            if not isinstance(obj, dict):
                dropped["malformed objects"] += 1
                continue
            box = _box(obj)
            if box is None:
                dropped["objects with a malformed box"] += 1
                continue
            syns = _object_synsets(obj, by_name, aliases)
            if not syns:
                dropped["objects without a synset"] += 1
                continue
            for s in dict.fromkeys(syns):
                per[s].append(box)
    ids = sorted(iid for iid, per in boxes_of.items() if per)
    dropped["images with no object that has a synset"] += len(boxes_of) - len(ids)
    files = [_image_file(root, dirs, iid, image_meta.get(iid)) for iid in ids]
    gone: list[tuple[str, str]] = []  # (image file, reason) of every dropped image, for dropped.txt
    candidates = []
    for iid, f in zip(ids, files):
        meta = image_meta.get(iid)
        candidates.append(Candidate(str(root / f), None if meta is None else (meta.get("height"), meta.get("width"))))
    sizes = accept_images(candidates, workers, progress, "checking Visual Genome images", dropped, gone)
    kept = [(iid, f, *size) for iid, f, size in zip(ids, files, sizes) if size is not None]

    # A seeded image split, then concepts seen in too few training images are left out.
    val = np.zeros(len(kept), dtype=bool)
    val[held_out_images(len(kept), val_fraction, seed)] = True
    train_images: Counter[str] = Counter()
    for (iid, *_), is_val in zip(kept, val):
        if not is_val:
            train_images.update(boxes_of[iid].keys())
    synsets = sorted(s for s, n in train_images.items() if n >= max(1, min_images))
    dropped_concepts = len(train_images) - len(synsets)
    cat_of = {s: k for k, s in enumerate(synsets)}
    labels = concept_labels(synsets)

    jobs, owners = [], []
    for k, (iid, _f, h, w) in enumerate(kept):
        concepts = [(cat_of[s], b) for s, b in sorted(boxes_of[iid].items()) if s in cat_of]
        jobs.append((h, w, concepts))
        owners.append(k)
    masks = pool_map(_box_masks, jobs, workers, progress, "drawing Visual Genome box masks")
    splits = {name: {"images": [], "pair_image": [], "pair_cat": [], "rle": [], "dropped": Counter()}
              for name in ("train", "val")}
    for k, cat_rles in zip(owners, masks):
        iid, f, h, w = kept[k]
        sp = splits["val" if val[k] else "train"]
        pairs = [(c, r) for c, r in cat_rles if r]
        sp["dropped"]["empty masks"] += len(cat_rles) - len(pairs)
        if not pairs:
            sp["dropped"]["images with no remaining object"] += 1
            continue
        add_image(sp, {"id": iid, "file": f, "height": h, "width": w}, pairs)
    splits["train"]["dropped"].update(dropped)
    splits["train"]["dropped_images"] = gone  # counted with train's, as the reasons above
    for sp in splits.values():
        sp["dropped"] = {k: v for k, v in sp["dropped"].items() if v}
    info = {"image_split": {"val_fraction": val_fraction, "seed": seed,
                            "train": len(splits["train"]["images"]), "val": len(splits["val"]["images"])},
            "min_images": min_images, "concepts_below_min_images": dropped_concepts}
    return Built(splits, {cat_of[s]: labels[s] for s in synsets}, image_dirs={"train": str(root), "val": str(root)},
                 labels_final=True, info=info)
