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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ...errors import DataError
from . import Built, Candidate, add_image, judge_image

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


def _draw_masks(height: int, width: int, rows: np.ndarray) -> list[tuple[int, str]]:
    """In a worker process: ``rows`` ``(B, 5)`` int32 ``[category, x0, y0, x1, y1]`` (see
    :func:`_corners`), sorted by category -> per category (ascending) the union of its boxes as
    RLE counts, or "" when that mask is empty."""
    out: list[tuple[int, str]] = []
    if not len(rows):
        return out
    cats = rows[:, 0]
    starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]])
    for a, b in zip(starts.tolist(), np.r_[starts[1:], len(rows)].tolist()):
        m = box_mask(height, width, [(x0, y0, x1 - x0, y1 - y0) for _c, x0, y0, x1, y1 in rows[a:b].tolist()])
        out.append((int(cats[a]), mask_utils.encode(np.asfortranarray(m))["counts"].decode() if m.any() else ""))
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


_BIG = 2**31 - 1  # beyond any image side: a box corner past it draws what it would at the side
_ROW = 5 * 4  # bytes of one spilled box: int32 [synset, x0, y0, x1, y1]


def _corners(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` as int32 corners ``(x0, y0, x1, y1)`` that :func:`box_mask` draws exactly as
    it draws the box in any image (of sides below 2**31): ``x0 = max(0, x)``, ``x1 = x + w``, both
    kept within ``[0, 2**31 - 1]``."""
    x, y, w, h = box
    return (min(max(0, x), _BIG), min(max(0, y), _BIG), min(max(0, x + w), _BIG), min(max(0, y + h), _BIG))


def _image_file(root: Path, dirs: list[Path], iid: int, url_tail: tuple[str, str] | None,
                is_dir: Callable[[str], bool]) -> str:
    """The image's path relative to ``root``: ``folder/name``, the last two parts of its URL in
    image_data.json, when that folder is there; else the first image folder that has ``{id}.jpg``."""
    if url_tail is not None and is_dir(url_tail[0]):
        return f"{url_tail[0]}/{url_tail[1]}"
    for d in dirs:
        if (d / f"{iid}.jpg").exists():
            return str((d / f"{iid}.jpg").relative_to(root))
    return str((dirs[0] / f"{iid}.jpg").relative_to(root))


CHUNK = 256  # images per chunk: probed, or drawn in the worker pool and written to the index


def _plain(v: Any) -> bool:
    return type(v) is int and -(2**62) < v < 2**62


class _Objects:
    """What the streamed pass over ``objects.json`` keeps: per entry (one image's objects) its image
    id, the offset and number of its boxes in a temporary file (int32 rows ``[synset, x0, y0, x1,
    y1]``, :func:`_corners`) and its distinct synsets (CSR); the synsets' names by number."""

    def __init__(self, path: Path, by_name: dict[str, Any], aliases: dict[str, str], dropped: Counter[str]) -> None:
        from array import array

        from ..jsonstream import NotAList, stream_list

        from .streamed import Spill

        self.spill = Spill("lavise-vg-boxes-")  # entry k's boxes are string k
        syn_of: dict[str, int] = {}
        e_img, e_syn, e_nsyn = array("q"), array("i"), array("q")

        def on_entry(entry: Any) -> None:
            iid = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
            if not isinstance(iid, int) or not -(2**63) <= iid < 2**63:
                dropped["entries without an image id"] += 1
                return
            rows, here = array("i"), {}
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
                corners = _corners(box)
                for s in dict.fromkeys(syns):
                    k = syn_of.setdefault(s, len(syn_of))
                    rows.append(k)
                    rows.extend(corners)
                    here[k] = None
            self.spill.add(rows.tobytes())
            e_img.append(iid)
            e_syn.extend(here)
            e_nsyn.append(len(here))

        try:
            stream_list(path, on_entry)
        except NotAList:
            self.spill.close()
            raise DataError(f"{path} is not a Visual Genome objects file (expected a JSON list)") from None
        except BaseException:
            self.spill.close()
            raise
        self.synsets = list(syn_of)  # by number
        self.image = np.array(e_img, dtype=np.int64)
        self.rows = np.diff(np.frombuffer(self.spill.offsets, dtype=np.int64)) // _ROW  # boxes per entry
        self.syn = np.array(e_syn, dtype=np.int32)
        self.nsyn = np.array(e_nsyn, dtype=np.int64)

    def boxes(self, entries: np.ndarray) -> np.ndarray:
        """The ``(B, 5)`` int32 rows of ``entries``, in their order."""
        parts = [np.frombuffer(self.spill.get(e), dtype=np.int32) for e in entries.tolist()]
        return (np.concatenate(parts) if parts else np.zeros(0, np.int32)).reshape(-1, 5)


class _ImageData:
    """What ``image_data.json`` (streamed) says of the images ``ids`` (sorted): the size it gives
    (int64 columns; other values kept as given for the few images that have them) and the folder
    of its URL (a number into ``folders`` when the URL ends in ``{id}.jpg``)."""

    def __init__(self, path: str | None, ids: np.ndarray) -> None:
        from ..jsonstream import NotAList, stream_list

        n = len(ids)
        self.has = np.zeros(n, dtype=bool)
        self.height = np.zeros(n, dtype=np.int64)
        self.width = np.zeros(n, dtype=np.int64)
        self.folder = np.full(n, -1, dtype=np.int32)
        self.odd_size: dict[int, tuple[Any, Any]] = {}
        self.odd_tail: dict[int, tuple[str, str]] = {}
        folder_of: dict[str, int] = {}

        def on_image(d: Any) -> None:
            if not isinstance(d, dict) or "image_id" not in d:
                return
            try:
                iid = int(d["image_id"])
            except (TypeError, ValueError, OverflowError):
                return
            if not -(2**63) <= iid < 2**63:
                return
            r = int(np.searchsorted(ids, iid))
            if r >= n or int(ids[r]) != iid:
                return  # an image without objects: not needed
            self.has[r] = True  # a repeated id: the last entry wins
            h, w = d.get("height"), d.get("width")
            if _plain(h) and _plain(w):
                self.height[r], self.width[r] = h, w
                self.odd_size.pop(r, None)
            else:
                self.odd_size[r] = (h, w)
            url = d.get("url") or ""
            parts = url.rstrip("/").split("/")[-2:] if isinstance(url, str) else []
            self.folder[r] = -1
            self.odd_tail.pop(r, None)
            if len(parts) == 2:
                if parts[1] == f"{iid}.jpg":
                    self.folder[r] = folder_of.setdefault(parts[0], len(folder_of))
                else:
                    self.odd_tail[r] = (parts[0], parts[1])

        if path:
            try:
                stream_list(path, on_image)
            except NotAList:
                pass  # not VG's list: no sizes or folders from it (as before)
        self.folders = list(folder_of)

    def size(self, r: int) -> tuple[Any, Any] | None:
        if not self.has[r]:
            return None
        return self.odd_size.get(r, (int(self.height[r]), int(self.width[r])))

    def url_tail(self, r: int, iid: int) -> tuple[str, str] | None:
        if r in self.odd_tail:
            return self.odd_tail[r]
        f = int(self.folder[r])
        return None if f < 0 else (self.folders[f], f"{iid}.jpg")


def _train_images(entry_rank: np.ndarray, has_boxes: np.ndarray, nsyn: np.ndarray, syn: np.ndarray,
                  train_rank: np.ndarray, n: int, n_syn: int) -> np.ndarray:
    """Per synset, the number of training images that have it.  An entry's synsets are distinct;
    only an image listed by several entries (rare) needs its (image, synset) pairs made unique."""
    rank = np.repeat(entry_rank.astype(np.int32 if n < 2**31 else np.int64), nsyn)  # each entry synset's image
    several = np.bincount(entry_rank[has_boxes], minlength=n) > 1
    train, shared = train_rank[rank], several[rank]
    counts = np.bincount(syn[train & ~shared], minlength=n_syn)
    if (train & shared).any():
        pairs = np.unique(rank[train & shared].astype(np.int64) * max(n_syn, 1) + syn[train & shared])
        counts += np.bincount(pairs % max(n_syn, 1), minlength=n_syn)
    return counts


def build_vg(settings: dict[str, Any], options: dict[str, Any], workers: int, progress: Any) -> Built:
    """Visual Genome, streamed: ``objects.json`` and ``image_data.json`` are read element by element
    (:func:`..jsonstream.stream_list`), each object's box spilled to a temporary file, so what is
    kept per image is a few numbers (ids, sizes, synset numbers); the images are probed in chunks,
    split, and their masks drawn in chunks of :data:`CHUNK` in the worker pool and written to the
    index as they come (one streamed split each for train and val)."""
    from ..index import held_out_images
    from ..pool import WorkerPool, probe

    min_images = int(options.get("min_images", MIN_IMAGES))
    val_fraction = float(options.get("val_fraction", VAL_FRACTION))
    seed = int(options.get("seed", 0))
    root = Path(settings["root"])
    block = settings["splits"]["train"]
    dirs = [Path(d) for d in block.get("image_dirs", [block["images"]])]
    by_name = _load_json(block["synsets"]) if block.get("synsets") else {}  # name -> synset: small
    by_name = by_name if isinstance(by_name, dict) else {}
    aliases = _aliases(root / "object_alias.txt")
    dropped: Counter[str] = Counter()

    objs = _Objects(Path(block["annotations"]), by_name, aliases, dropped)
    try:
        ids = np.unique(objs.image[objs.rows > 0])  # images with an object that has a synset, sorted
        dropped["images with no object that has a synset"] += len(np.unique(objs.image)) - len(ids)
        meta = _ImageData(block.get("image_data"), ids)
        n = len(ids)

        is_dir_cache: dict[str, bool] = {}

        def is_dir(folder: str) -> bool:
            if folder not in is_dir_cache:
                is_dir_cache[folder] = (root / folder).is_dir()
            return is_dir_cache[folder]

        def file_of(r: int) -> str:
            iid = int(ids[r])
            return _image_file(root, dirs, iid, meta.url_tail(r, iid), is_dir)

        # Probe every image (in chunks through the pool); keep the sizes of the kept ones.
        gone: list[tuple[str, str]] = []  # (image file, reason) of every dropped image, for dropped.txt
        kept = np.zeros(n, dtype=bool)
        height = np.zeros(n, dtype=np.int32)
        width = np.zeros(n, dtype=np.int32)
        task = progress.add_task("checking Visual Genome images", total=n, unit="img") if progress is not None else None
        with WorkerPool(workers) as pool:
            for start in range(0, n, CHUNK):
                rs = range(start, min(n, start + CHUNK))
                cands = [Candidate(str(root / file_of(r)), meta.size(r)) for r in rs]
                probes = pool.map(probe, [(c.path,) for c in cands], progress, task)
                for r, c, p in zip(rs, cands, probes):
                    size = judge_image(c, p, dropped, gone)
                    if size is not None:
                        kept[r] = True
                        height[r], width[r] = size
        kept_r = np.flatnonzero(kept)

        # A seeded image split, then concepts seen in too few training images are left out.
        val = np.zeros(len(kept_r), dtype=bool)
        val[held_out_images(len(kept_r), val_fraction, seed)] = True
        train_rank = np.zeros(n, dtype=bool)
        train_rank[kept_r[~val]] = True
        n_syn = len(objs.synsets)
        entry_rank = np.searchsorted(ids, objs.image)  # right for every entry that has a box
        has_boxes = np.flatnonzero(objs.rows > 0)
        train_images = _train_images(entry_rank, has_boxes, objs.nsyn, objs.syn, train_rank, n, n_syn)
        synsets = sorted(s for k, s in enumerate(objs.synsets) if train_images[k] >= max(1, min_images))
        dropped_concepts = int((train_images > 0).sum()) - len(synsets)
        cat_of = {s: k for k, s in enumerate(synsets)}
        labels = concept_labels(synsets)
        cat_of_syn = np.full(max(n_syn, 1), -1, dtype=np.int32)
        syn_num = {s: k for k, s in enumerate(objs.synsets)}
        for s, k in cat_of.items():
            cat_of_syn[syn_num[s]] = k
        del syn_num
        by_image = has_boxes[np.argsort(entry_rank[has_boxes], kind="stable")]  # entries, by image then file order
        by_image_rank = entry_rank[by_image]
    except BaseException:
        objs.spill.close()
        raise

    info = {"image_split": {"val_fraction": val_fraction, "seed": seed,
                            "train": int((~val).sum()), "val": int(val.sum())},
            "min_images": min_images, "concepts_below_min_images": dropped_concepts}
    open_splits = [2]
    draw_task: list[Any] = []

    def chunks(name: str, ranks: np.ndarray, sp_dropped: Counter[str]) -> Any:
        """One split's images in chunks: their box masks drawn in the pool, as index chunks."""
        if progress is not None and not draw_task:
            draw_task.append(progress.add_task("drawing Visual Genome box masks", total=len(kept_r), unit="img"))
        task = draw_task[0] if draw_task else None
        n_images = 0
        try:
            with WorkerPool(workers) as pool:
                for start in range(0, len(ranks), CHUNK):
                    part = ranks[start:start + CHUNK].tolist()
                    jobs = []
                    for r in part:
                        a, b = np.searchsorted(by_image_rank, [r, r + 1])
                        rows = objs.boxes(by_image[a:b])
                        cats = cat_of_syn[rows[:, 0]]
                        rows = rows[cats >= 0]
                        rows[:, 0] = cats[cats >= 0]
                        jobs.append((int(height[r]), int(width[r]), rows[np.argsort(rows[:, 0], kind="stable")]))
                    results = pool.map(_draw_masks, jobs, progress, task)
                    chunk: dict[str, Any] = {"images": [], "pair_image": [], "pair_cat": [], "rle": []}
                    for r, cat_rles in zip(part, results):
                        pairs = [(c, x) for c, x in cat_rles if x]
                        sp_dropped["empty masks"] += len(cat_rles) - len(pairs)
                        if not pairs:
                            sp_dropped["images with no remaining object"] += 1
                            continue
                        add_image(chunk, {"id": int(ids[r]), "file": file_of(r), "height": int(height[r]),
                                          "width": int(width[r])}, pairs)
                        n_images += 1
                    yield chunk
        finally:
            open_splits[0] -= 1
            if open_splits[0] == 0:
                objs.spill.close()
        if name == "train":
            sp_dropped.update(dropped)  # counted with train's, as the reasons above
        for k in [k for k, v in sp_dropped.items() if not v]:
            del sp_dropped[k]
        info["image_split"][name] = n_images  # the images the split kept (read after it is written)

    splits: dict[str, dict[str, Any]] = {}
    for name, in_split in (("train", ~val), ("val", val)):
        sp_dropped: Counter[str] = Counter()
        splits[name] = {"chunks": chunks(name, kept_r[in_split], sp_dropped), "dropped": sp_dropped}
    splits["train"]["dropped_images"] = gone
    return Built(splits, {cat_of[s]: labels[s] for s in synsets}, image_dirs={"train": str(root), "val": str(root)},
                 labels_final=True, info=info)
