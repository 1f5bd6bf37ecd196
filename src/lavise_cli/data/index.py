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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..embeddings import Embedding, clean_label, load_embedding
from ..errors import DataError, LaviseError
from ..store import Entry, FileDigests, Store, stable_digest
from .columnar import ImageTable, RleTable, SplitColumns, SplitWriter
from .formats import get_format

INDEX_VERSION = 3  # 3: columnar .npy files per split (columnar.py); 2: one JSON per split
HELD_OUT_FRACTION = 0.2  # share of a dataset's images held out as target when it has no train split
REFERENCE, HELD_OUT = "reference", "held-out"  # the two parts of a dataset divided that way


# -- reading ------------------------------------------------------------------------------


class SplitIndex:
    """One split: images, and pairs sorted by image, read from the index's memory-mapped columns
    (:mod:`.columnar`); ``rows`` picks this split's images among the columns' (a part of a divided
    split), None for all of them."""

    def __init__(self, dataset: str, split: str, image_dir: Path, cols: SplitColumns,
                 rows: np.ndarray | None = None, dropped: dict[str, int] | None = None) -> None:
        self.dataset, self.split, self.image_dir, self.cols = dataset, split, Path(image_dir), cols
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.dropped = dict(cols.dropped if dropped is None else dropped)

    @cached_property
    def images(self) -> ImageTable:
        """``{"id", "file", "height", "width"}`` per image, read when asked for."""
        return ImageTable(self.cols, self.rows)

    @cached_property
    def _base(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) of each image's pairs among the columns' pairs."""
        o = self.cols["pair_offsets"]
        if self.rows is None:
            return o[:-1], o[1:]
        return np.asarray(o[self.rows], dtype=np.int64), np.asarray(o[self.rows + 1], dtype=np.int64)

    @cached_property
    def offsets(self) -> np.ndarray:
        """``pairs of image i`` = ``offsets[i]:offsets[i+1]``."""
        if self.rows is None:
            return self.cols["pair_offsets"]
        start, stop = self._base
        return np.concatenate([[0], np.cumsum(stop - start)]).astype(np.int64)

    @cached_property
    def _pairs(self) -> np.ndarray | None:
        """This split's pairs among the columns' (None: all of them)."""
        if self.rows is None:
            return None
        start, stop = self._base
        n = stop - start
        return (np.repeat(start - self.offsets[:-1], n) + np.arange(int(n.sum()), dtype=np.int64)).astype(np.int64)

    @cached_property
    def pair_image(self) -> np.ndarray:
        """(P,) int64 index into images, non-decreasing."""
        return np.repeat(np.arange(len(self.images), dtype=np.int64), np.diff(self.offsets))

    @property
    def pair_concept(self) -> np.ndarray:
        """(P,) int64 index into the dataset's concepts."""
        c = self.cols["pair_concept"]
        return c if self._pairs is None else np.asarray(c[self._pairs])

    @cached_property
    def rles(self) -> RleTable:
        """Each pair's COCO RLE counts, read by offset when asked for."""
        return RleTable(self.cols, self._pairs)

    def subset(self, name: str, images: np.ndarray) -> "SplitIndex":
        """The split restricted to ``images`` (sorted indices), named ``name``; pairs follow their images."""
        images = np.asarray(images, dtype=np.int64)
        rows = images if self.rows is None else self.rows[images]
        return SplitIndex(self.dataset, name, self.image_dir, self.cols, rows=rows, dropped={})

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.images[i]["file"]

    def image_pairs(self, i: int) -> range:
        return range(int(self.offsets[i]), int(self.offsets[i + 1]))

    def masks(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        """(concept indices ``(K,)``, binary masks ``uint8 (K, H, W)``) of image ``i``, decoded
        from the RLEs read by offset."""
        row = i if self.rows is None else int(self.rows[i])
        cols = self.cols
        h, w = int(cols["height"][row]), int(cols["width"][row])
        o = cols["pair_offsets"]
        a, b = int(o[row]), int(o[row + 1])
        if a == b:
            return np.zeros(0, np.int64), torch.zeros(0, h, w, dtype=torch.uint8)
        ends = np.array(cols["rle_offsets"][a:b + 1], dtype=np.int64)  # a copy: shifted below
        blob = cols.span("rle", int(ends[0]), int(ends[-1]))  # the image's masks: one read
        ends -= ends[0]
        rles = [{"size": [h, w], "counts": blob[int(ends[j]):int(ends[j + 1])]} for j in range(b - a)]
        dense = mask_utils.decode(rles)  # (H, W, K) uint8 in {0, 1}, Fortran order
        concepts = np.array(cols["pair_concept"][a:b], dtype=np.int64)
        return concepts, torch.from_numpy(np.ascontiguousarray(dense.transpose(2, 0, 1)))


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
    if entry["inputs"].get("version") != INDEX_VERSION:
        # An index of another layout (version 2 kept one JSON per split) is rebuilt, never misread.
        raise LaviseError(f"the index of {dataset!r} was built by another version of lavise (index version "
                          f"{entry['inputs'].get('version')}, this one reads {INDEX_VERSION}): "
                          f"run `lavise preprocess {dataset}` to rebuild it")
    root = store.path("indexes", dataset)
    meta = json.loads((root / "concepts.json").read_text())
    # A format may decide its own splits and image folders (VG splits its one set of images).
    image_dirs = meta.get("image_dirs") or {s: info["images"] for s, info in ds["settings"]["splits"].items()}
    splits = {}
    for split, image_dir in image_dirs.items():
        folder = root / split
        if not (folder / "split.json").exists():
            continue
        try:
            cols = SplitColumns(folder)
        except (OSError, ValueError) as e:
            raise LaviseError(f"the index of {dataset!r} is damaged ({e}): run `lavise preprocess {dataset} --force`") from None
        splits[split] = SplitIndex(dataset, split, Path(image_dir), cols)
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
    summary: dict[str, Any] = {"dataset": dataset, "embedding": emb.name, "splits": {}, "held_out": None,
                               **built_all.info}
    held_out, held = None, []
    with store.writing("indexes", dataset, inputs=inputs, settings={"format": fmt, "seen_fraction": seen_fraction,
                                                                       "seed": seed}) as tmp:
        gone: list[tuple[str, str, str]] = []
        for split, b in built.items():
            used, n_images, n_pairs, dropped = write_split(tmp / split, b, cat_to_concept)
            gone += [(split, f, why) for f, why in b.get("dropped_images", [])]
            summary["splits"][split] = {
                "images": n_images,
                "pairs": n_pairs,
                "concepts": len(used),
                "pairs_unmapped": sum(v for c, v in used.items() if not mapped[c]),
                "dropped": dropped,
            }
        summary.update(built_all.info)  # a streamed format may complete it as its chunks are written
        if "train" not in built and built:
            source = "val" if "val" in built else next(iter(built))
            n = summary["splits"][source]["images"]
            held = held_out_images(n, held_out_fraction, seed)
            held_out = {"source": source, "fraction": held_out_fraction, "seed": seed,
                        "reference": n - len(held), "held_out": len(held)}
            summary["held_out"] = held_out
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


def write_split(folder: Path, b: dict[str, Any], cat_to_concept: dict[int, int]) -> tuple[Counter[int], int, int, dict[str, int]]:
    """Write one split a format built (whole, or streamed in chunks: see :class:`.formats.Built`)
    as the index's columns, a chunk at a time; categories that share a concept within an image are
    united.  Returns (pairs per concept, images, pairs, dropped counts)."""
    writer = SplitWriter(folder)
    used: Counter[int] = Counter()
    chunks = b["chunks"] if "chunks" in b else [b]
    for ch in chunks:
        images, pair_image, pair_cat, rle = ch["images"], ch["pair_image"], ch["pair_cat"], ch["rle"]
        per_image: list[dict[int, list[Any]]] = [defaultdict(list) for _ in images]
        for im, cat, r in zip(pair_image, pair_cat, rle):
            per_image[im][cat_to_concept[cat]].append(r)
        for info, pairs in zip(images, per_image):
            h, w = int(info["height"]), int(info["width"])
            concepts = sorted(pairs)
            rles = []
            for c in concepts:
                parts = [p.encode() if isinstance(p, str) else p for p in pairs[c]]
                if len(parts) > 1:  # several categories with one label: the union of their masks
                    parts = [mask_utils.merge([{"size": [h, w], "counts": p} for p in parts], intersect=False)["counts"]]
                rles.append(parts[0])
            used.update(concepts)
            writer.add_image(int(info["id"]), str(info["file"]), h, w, concepts, rles)
        del per_image
    dropped = dict(b.get("dropped") or {})
    writer.close(dropped)
    return used, writer.images, writer.pairs, dropped


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
    from .register import _check_coco_json

    num_images = _check_coco_json(ann_file, ("images", "annotations", "categories"))  # streamed, never whole
    with store.writing(
        "datasets",
        name,
        inputs={f"{split}.annotations": FileDigests(store)(ann_file)},
        settings={"format": "coco", "root": str(images.parent),
                  "splits": {split: {"annotations": str(ann_file), "images": str(images),
                                     "num_images": num_images}}},
    ):
        pass
    return store.get("datasets", name)
