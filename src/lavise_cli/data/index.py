"""The mask index of a reference dataset: per split, every (image, concept) pair with its mask.

``lavise preprocess`` builds it (:func:`preprocess`), everything downstream reads it
(:func:`load_index`).  For every image and concept, the union of that concept's instance masks
(crowd RLE included; for panoptic PNGs, the union of the concept's segments) is stored as one
COCO RLE string, with the image's size, so a split of COCO train fits in a few hundred MB.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..embeddings import Embedding, clean_label, load_embedding
from ..errors import DataError, LaviseError
from ..store import Entry, FileDigests, Store, stable_digest
from .formats import get_format
from .validate import check_coco

INDEX_VERSION = 2
HELD_OUT_FRACTION = 0.2  # share of a dataset's images held out as target when it has no train split
REFERENCE, HELD_OUT = "reference", "held-out"  # the two parts of a dataset divided that way


# -- reading ------------------------------------------------------------------------------


@dataclass
class SplitIndex:
    """One split: images, and pairs sorted by image."""

    dataset: str
    split: str
    image_dir: Path
    images: list[dict[str, Any]]  # {"id", "file", "height", "width"}
    pair_image: np.ndarray  # (P,) int64 index into images, non-decreasing
    pair_concept: np.ndarray  # (P,) int64 index into the dataset's concepts
    rles: list[str]
    dropped: dict[str, int] = field(default_factory=dict)

    @cached_property
    def offsets(self) -> np.ndarray:
        """``pairs of image i`` = ``offsets[i]:offsets[i+1]``."""
        return np.searchsorted(self.pair_image, np.arange(len(self.images) + 1)).astype(np.int64)

    def subset(self, name: str, images: np.ndarray) -> "SplitIndex":
        """The split restricted to ``images`` (sorted indices), named ``name``; pairs follow their images."""
        images = np.asarray(images, dtype=np.int64)
        new = np.full(len(self.images), -1, dtype=np.int64)
        new[images] = np.arange(len(images))
        keep = np.flatnonzero(new[self.pair_image] >= 0)
        return SplitIndex(dataset=self.dataset, split=name, image_dir=self.image_dir,
                          images=[self.images[i] for i in images.tolist()], pair_image=new[self.pair_image[keep]],
                          pair_concept=self.pair_concept[keep], rles=[self.rles[k] for k in keep.tolist()])

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.images[i]["file"]

    def image_pairs(self, i: int) -> range:
        return range(int(self.offsets[i]), int(self.offsets[i + 1]))

    def masks(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        """(concept indices ``(K,)``, binary masks ``uint8 (K, H, W)``) of image ``i``."""
        sl = self.image_pairs(i)
        h, w = self.images[i]["height"], self.images[i]["width"]
        if len(sl) == 0:
            return np.zeros(0, np.int64), torch.zeros(0, h, w, dtype=torch.uint8)
        rles = [{"size": [h, w], "counts": self.rles[p].encode()} for p in sl]
        dense = mask_utils.decode(rles)  # (H, W, K) uint8 in {0, 1}, Fortran order
        return self.pair_concept[sl.start : sl.stop], torch.from_numpy(np.ascontiguousarray(dense.transpose(2, 0, 1)))


@dataclass
class DatasetIndex:
    name: str
    concepts: list[str]  # concept labels (cleaned names)
    mapped: list[bool]
    seen: list[bool]
    splits: dict[str, SplitIndex]
    digest: str
    manifest: dict[str, Any]
    # Set when the dataset has no train split and its images were divided into a reference part
    # (split "reference") and a held-out target part (split "held-out"):
    # {"source", "fraction", "seed", "reference", "held_out"} (the last two are image counts).
    held_out: dict[str, Any] | None = None

    @property
    def training_split(self) -> str | None:
        """The split an explainer trains on: ``train``, else the reference part of a divided dataset."""
        return "train" if "train" in self.splits else (REFERENCE if REFERENCE in self.splits else None)

    @property
    def target_split(self) -> str:
        """The split explain/evaluate use by default: ``val``, or the held-out part of a divided dataset."""
        return HELD_OUT if HELD_OUT in self.splits else "val"

    @property
    def unmapped(self) -> list[str]:
        return [c for c, m in zip(self.concepts, self.mapped) if not m]


def load_index(store: Store, dataset: str) -> DatasetIndex:
    """The preprocessed index of ``dataset``; a clear error when preprocess has not run or is stale."""
    if not store.exists("datasets", dataset):
        known = ", ".join(e.name for e in store.list("datasets")) or "none"
        raise LaviseError(
            f"no dataset named {dataset!r} in the store (registered: {known}); "
            f"register it with `lavise download coco --from DIR --name {dataset}`"
        )
    entry = store.manifest("indexes", dataset)
    if entry is None:
        raise LaviseError(f"dataset {dataset!r} is not preprocessed yet: run `lavise preprocess {dataset}`")
    ds = store.get("datasets", dataset).manifest
    version = (entry.get("inputs") or {}).get("version")
    if version != INDEX_VERSION:
        # Another layout: read as this version's it would be misread, so it is never read.
        raise LaviseError(f"the index of {dataset!r} was built by another version of lavise (index version "
                          f"{version}, this one reads {INDEX_VERSION}): run `lavise preprocess {dataset}` to rebuild it")
    if entry["inputs"].get("dataset") != dataset_inputs(store, ds):
        raise LaviseError(f"the index of {dataset!r} is stale (its data changed): run `lavise preprocess {dataset}`")
    root = store.path("indexes", dataset)
    meta = json.loads((root / "concepts.json").read_text())
    # A format may decide its own splits and image folders (VG splits its one set of images).
    image_dirs = meta.get("image_dirs") or {s: info["images"] for s, info in ds["settings"]["splits"].items()}
    splits = {}
    for split, image_dir in image_dirs.items():
        p = root / f"{split}.json"
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        splits[split] = SplitIndex(
            dataset=dataset,
            split=split,
            image_dir=Path(image_dir),
            images=d["images"],
            pair_image=np.asarray(d["pair_image"], dtype=np.int64),
            pair_concept=np.asarray(d["pair_concept"], dtype=np.int64),
            rles=d["rle"],
            dropped=d.get("dropped", {}),
        )
    held_out = meta.get("held_out")
    if held_out and held_out["source"] in splits:
        src = splits[held_out["source"]]
        out = np.zeros(len(src.images), dtype=bool)
        out[np.asarray(held_out["images"], dtype=np.int64)] = True
        splits[REFERENCE] = src.subset(REFERENCE, np.flatnonzero(~out))
        splits[HELD_OUT] = src.subset(HELD_OUT, np.flatnonzero(out))
        held_out = {k: v for k, v in held_out.items() if k != "images"}
    c = meta["concepts"]
    return DatasetIndex(
        name=dataset,
        concepts=[x["name"] for x in c],
        mapped=[bool(x["mapped"]) for x in c],
        seen=[bool(x["seen"]) for x in c],
        splits=splits,
        digest=stable_digest(entry["inputs"]) + ":" + entry["created"],
        manifest=entry,
        held_out=held_out,
    )


def dataset_inputs(store: Store, manifest: dict[str, Any]) -> dict[str, Any]:
    """Digests of a dataset's annotation files as they are now (so an edit in place is noticed)."""
    digest = FileDigests(store)
    out = {}
    for split, info in manifest["settings"]["splits"].items():
        ann = info.get("annotations")
        if ann and Path(ann).is_file():
            out[f"{split}.annotations"] = digest(ann)
        else:
            out[f"{split}.annotations"] = None
        labels = info.get("labels")  # a label file beside the annotations (Broden's label.csv)
        if labels:
            out[f"{split}.labels"] = digest(labels) if Path(labels).is_file() else None
    return out


# -- building -----------------------------------------------------------------------------


def held_out_images(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded choice (without replacement) of ``round(fraction * n)`` of ``n`` images, sorted;
    at least one image is held out and one kept whenever there are two or more."""
    n_out = int(round(fraction * n))
    if n >= 2:
        n_out = min(max(n_out, 1), n - 1)
    return sorted(np.random.default_rng(seed).permutation(n)[:n_out].tolist())


DROPPED_FILE = "dropped.txt"  # in the index entry: every image preprocess left out, with the reason


def seen_split(mapped: Sequence[bool], fraction: float, seed: int) -> list[bool]:
    """A seeded split of the mapped concepts, without replacement: ``round(fraction * n)`` seen."""
    idx = np.flatnonzero(np.asarray(mapped, dtype=bool))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(idx)
    n_seen = int(round(fraction * len(idx)))
    seen = np.zeros(len(mapped), dtype=bool)
    seen[perm[:n_seen]] = True
    return seen.tolist()


def preprocess(
    store: Store,
    dataset: str,
    *,
    embedding: str | None = None,
    seen_fraction: float = 0.7,
    seed: int = 0,
    held_out_fraction: float = HELD_OUT_FRACTION,
    min_images: int | None = None,
    val_fraction: float | None = None,
    categories: Sequence[str] | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Build (or reuse, when its inputs are unchanged) the mask index of a registered dataset.

    A dataset without a train split (e.g. COCO val alone) has its images divided, seeded, into a
    reference part (split ``reference``, what ``train`` uses) and a held-out part of
    ``held_out_fraction`` of the images (split ``held-out``, what ``explain``/``evaluate`` use by
    default), so that explanations are never scored on the images the explainer learned from.
    The source split stays whole as well.

    Returns the summary: per split ``images``, ``pairs``, ``dropped``; ``concepts``, ``mapped``,
    ``unmapped``, ``seen``, ``unseen``; ``held_out`` (the division, or None); and ``cached``
    (True when nothing had to be rebuilt).
    """
    if not 0.0 < seen_fraction <= 1.0:
        raise LaviseError("--seen-fraction must be in (0, 1]")
    if not 0.0 < held_out_fraction < 1.0:
        raise LaviseError("--held-out-fraction must be between 0 and 1 (exclusive), e.g. 0.2")
    # Options of formats that split or filter by themselves (Visual Genome); part of the index's inputs.
    options: dict[str, Any] = {}
    if min_images is not None:
        if min_images < 1:
            raise LaviseError("--min-images must be at least 1")
        options["min_images"] = int(min_images)
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise LaviseError("--val-fraction must be between 0 and 1 (exclusive), e.g. 0.1")
        options["val_fraction"] = float(val_fraction)
    if categories:  # Broden: the categories read (object, part, material, scene, texture, color)
        options["categories"] = sorted({c.strip() for c in categories if c.strip()})
    ds = store.get("datasets", dataset)
    if "categories" in options and ds.manifest["settings"].get("format") != "broden":
        raise LaviseError(f"--categories selects Broden categories; {dataset!r} is a "
                          f"{ds.manifest['settings'].get('format')} dataset")
    embedding, _ = choose_embedding(store, dataset, embedding)
    emb: Embedding = load_embedding(store, embedding)
    emb_manifest = store.get("embeddings", emb.name).manifest
    inputs = {
        "dataset": dataset_inputs(store, ds.manifest),
        "embedding": {"name": emb.name, **emb_manifest["inputs"]},
        "seen_fraction": seen_fraction,
        "seed": seed,
        "held_out_fraction": held_out_fraction,
        "format_options": options,
        "version": INDEX_VERSION,
    }
    if not force and store.is_current("indexes", dataset, inputs):
        summary = json.loads((store.path("indexes", dataset) / "summary.json").read_text())
        return {**summary, "cached": True}
    fmt = ds.manifest["settings"].get("format")
    workers = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
    built_all = get_format(fmt)(ds.manifest["settings"], {**options, "seed": seed}, workers, progress)
    built, names = built_all.splits, built_all.categories
    held_out = None
    if "train" not in built and built:
        source = "val" if "val" in built else next(iter(built))
        n = len(built[source]["images"])
        held = held_out_images(n, held_out_fraction, seed)
        held_out = {"source": source, "fraction": held_out_fraction, "seed": seed,
                    "reference": n - len(held), "held_out": len(held)}
    # Concepts: categories merged by cleaned label (e.g. panoptic "wall-other-merged" -> "wall"),
    # in the order of their first category id.
    label_of = (lambda n: n) if built_all.labels_final else clean_label
    first: dict[str, int] = {}
    for cid, n in sorted(names.items()):
        first.setdefault(label_of(n), cid)
    labels = sorted(first, key=first.__getitem__)
    label_idx = {lab: i for i, lab in enumerate(labels)}
    cat_to_concept = {cid: label_idx[label_of(n)] for cid, n in names.items()}
    mapped = [emb.phrase_vector(lab) is not None for lab in labels]
    if labels and not any(mapped):
        others = [e.name for e in store.list("embeddings") if e.name != emb.name]
        hint = f" (registered: {', '.join(others)})" if others else ""
        raise LaviseError(
            f"none of the {len(labels)} concepts of {dataset} has a word vector in the embedding {emb.name!r} "
            f"(e.g. {labels[0]!r}): choose word vectors that cover them with --embedding NAME{hint}"
        )
    seen = seen_split(mapped, seen_fraction, seed)
    summary: dict[str, Any] = {"dataset": dataset, "embedding": emb.name, "splits": {}, "held_out": held_out,
                               **built_all.info}
    with store.writing("indexes", dataset, inputs=inputs, settings={"format": fmt, "seen_fraction": seen_fraction,
                                                                       "seed": seed}) as tmp:
        for split, b in built.items():
            concept = [cat_to_concept[c] for c in b["pair_cat"]]
            # Merge categories that share a label within an image (union of their RLEs).
            merged: dict[tuple[int, int], list[str]] = defaultdict(list)
            for im, cc, r in zip(b["pair_image"], concept, b["rle"]):
                merged[(im, cc)].append(r)
            keys = sorted(merged)
            rles = []
            for im, cc in keys:
                parts = merged[(im, cc)]
                if len(parts) == 1:
                    rles.append(parts[0])
                else:
                    h, w = b["images"][im]["height"], b["images"][im]["width"]
                    r = mask_utils.merge([{"size": [h, w], "counts": p.encode()} for p in parts], intersect=False)
                    rles.append(r["counts"].decode())
            doc = {
                "images": b["images"],
                "pair_image": [k[0] for k in keys],
                "pair_concept": [k[1] for k in keys],
                "rle": rles,
                "dropped": b["dropped"],
            }
            (tmp / f"{split}.json").write_text(json.dumps(doc))
            used = Counter(k[1] for k in keys)
            summary["splits"][split] = {
                "images": len(b["images"]),
                "pairs": len(keys),
                "concepts": len(used),
                "pairs_unmapped": sum(v for c, v in used.items() if not mapped[c]),
                "dropped": b["dropped"],
            }
        concepts_doc = {
            "concepts": [
                {"name": lab, "categories": sorted(c for c, i in cat_to_concept.items() if i == k),
                 "mapped": mapped[k], "seen": seen[k]}
                for k, lab in enumerate(labels)
            ],
            "seen_fraction": seen_fraction,
            "seed": seed,
            "held_out": {**held_out, "images": held} if held_out else None,
            "image_dirs": built_all.image_dirs,
        }
        (tmp / "concepts.json").write_text(json.dumps(concepts_doc, indent=1))
        gone = [(sp, f, why) for sp, b in built.items() for f, why in b.get("dropped_images", [])]
        if gone:  # name every dropped image, with why: one line each, tab-separated
            (tmp / DROPPED_FILE).write_text("# split\timage\treason\n"
                                            + "".join(f"{sp}\t{f}\t{why}\n" for sp, f, why in gone))
            summary["dropped_images"] = len(gone)
            summary["dropped_list"] = str(store.path("indexes", dataset) / DROPPED_FILE)
        summary.update(
            concepts=len(labels),
            mapped=sum(mapped),
            unmapped=[lab for lab, m in zip(labels, mapped) if not m],
            seen=sum(seen),
            unseen=sum(mapped) - sum(seen),
        )
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "cached": False}


def choose_embedding(store: Store, dataset: str, embedding: str | None) -> tuple[str | None, str]:
    """The embedding ``preprocess`` uses, and why: the one asked for; else the one the dataset's
    existing index was built with (when it is still registered); else the latest registered.

    Returns ``(name, reason)``; ``name`` is ``None`` only when the store has no embedding (the
    loader then says what to do).
    """
    if embedding is not None:
        return embedding, "asked for with --embedding"
    old = store.manifest("indexes", dataset)
    prev = ((old or {}).get("inputs") or {}).get("embedding") or {}
    name = prev.get("name") if isinstance(prev, dict) else None
    if name and store.exists("embeddings", name):
        return name, "the one the existing index was built with"
    latest = store.latest("embeddings")
    return (latest.name, "the latest registered") if latest is not None else (None, "")


def register_instances_file(
    store: Store, ann_file: Path, images: Path, name: str | None = None, split: str | None = None
) -> Entry:
    """Register any COCO-format instances file (LVIS, custom sets) as a one-split dataset."""
    ann_file, images = Path(ann_file).expanduser().resolve(), Path(images).expanduser().resolve()
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist")
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist; give it with --images DIR")
    stem = ann_file.stem
    split = split or ("val" if "val" in stem else "train")
    name = name or stem
    try:
        with open(ann_file) as fh:
            d = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{ann_file} is not a readable COCO-format JSON file ({e})") from None
    if not isinstance(d, dict) or not all(k in d for k in ("images", "annotations", "categories")):
        raise DataError(f"{ann_file} lacks one of the COCO keys images/annotations/categories")
    check_coco(d, ann_file)
    with store.writing(
        "datasets",
        name,
        inputs={f"{split}.annotations": FileDigests(store)(ann_file)},
        settings={"format": "coco", "root": str(images.parent),
                  "splits": {split: {"annotations": str(ann_file), "images": str(images),
                                     "num_images": len(d["images"])}}},
    ):
        pass
    return store.get("datasets", name)
