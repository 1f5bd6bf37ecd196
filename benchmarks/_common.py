"""Helpers shared by the benchmark scripts: a synthetic COCO-like dataset in a temporary store,
pre-decoded input batches, timing and plain-text tables.

Nothing here is timed itself.  Everything goes through lavise's public functions
(``register_coco``, ``register_embedding``, ``preprocess``, ``load_index``), so the benchmarks
exercise the same code paths as ``lavise download coco --from DIR`` + ``lavise preprocess``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from lavise_cli.data.images import View, apply_view_image, normalize, read_rgb
from lavise_cli.data.index import DatasetIndex, load_index, preprocess
from lavise_cli.data.register import register_coco
from lavise_cli.embeddings import register_embedding, visual_nouns
from lavise_cli.store import Store

EMBEDDING_DIM = 300


# -- the temporary store ----------------------------------------------------------------------


@contextlib.contextmanager
def temp_store(keep: bool = False) -> Iterator[tuple[Path, Store]]:
    """A fresh store (data and cache) under a temporary folder, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="lavise-bench-"))
    try:
        yield tmp, Store(root=tmp / "store")
    finally:
        if keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- a synthetic COCO-like dataset --------------------------------------------------------------


def concept_names(n: int) -> list[str]:
    """``n`` single-word concept names: the most frequent of lavise's visual nouns."""
    words = [w for w in visual_nouns() if w.isalpha()]
    if n > len(words):
        raise ValueError(f"at most {len(words)} concept names available")
    return words[:n]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour field plus mild noise: JPEG sizes close to real photos."""
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _draw_shape(rng: np.random.Generator, width: int, height: int) -> tuple[str, list]:
    kind = str(rng.choice(["ellipse", "rectangle", "polygon"]))
    if kind == "polygon":
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        r = rng.uniform(0.08, 0.3) * min(width, height)
        k = int(rng.integers(3, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = r * rng.uniform(0.5, 1.0, k)
        return kind, [(float(cx + a * np.cos(t)), float(cy + a * np.sin(t))) for a, t in zip(rad, ang)]
    w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return kind, [float(x0), float(y0), float(x0 + w), float(y0 + h)]


def write_coco_split(root: Path, split: str, n_images: int, width: int, height: int, categories: Sequence[str],
                     masks_per_image: int = 3, seed: int = 0, id_offset: int = 0) -> dict[str, int]:
    """``root/{split}2017/*.jpg`` and ``root/annotations/instances_{split}2017.json``.

    Each image holds ``masks_per_image`` +- 1 random shapes (ellipses, rectangles, polygons) of
    distinct categories, painted in their own colour; each shape's mask is a compressed COCO RLE.
    """
    rng = np.random.default_rng(seed)
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": c, "supercategory": "thing"} for i, c in enumerate(categories)]
    colours = rng.integers(0, 256, size=(len(categories), 3))
    images, anns = [], []
    for k in range(n_images):
        iid = id_offset + k + 1
        fname = f"{iid:012d}.jpg"
        canvas = Image.fromarray(_background(rng, width, height))
        draw = ImageDraw.Draw(canvas)
        n_obj = int(np.clip(masks_per_image + rng.integers(-1, 2), 1, len(categories)))
        for c in rng.choice(len(categories), size=n_obj, replace=False):
            kind, geom = _draw_shape(rng, width, height)
            m = Image.new("L", (width, height), 0)
            mdraw = ImageDraw.Draw(m)
            getattr(mdraw, kind)(geom, fill=1)
            getattr(draw, kind)(geom, fill=tuple(int(v) for v in colours[c]))
            arr = np.asfortranarray(np.asarray(m, dtype=np.uint8))
            rle = mask_utils.encode(arr)
            area = float(mask_utils.area(rle))
            if area == 0:
                continue
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": int(c) + 1,
                         "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                         "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
        canvas.save(img_dir / fname, quality=90)
        images.append({"id": iid, "file_name": fname, "height": height, "width": width})
    doc = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return {"images": len(images), "annotations": len(anns)}


def write_glove(path: Path, words: Sequence[str], dim: int = EMBEDDING_DIM, seed: int = 0) -> Path:
    """A GloVe-format text file of random vectors for ``words`` (in that frequency order)."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((len(words), dim)).astype(np.float32)
    with open(path, "w", encoding="utf-8") as fh:
        for w, v in zip(words, vecs):
            fh.write(w + " " + " ".join(f"{x:.4f}" for x in v) + "\n")
    return path


def embedding_words(categories: Sequence[str]) -> list[str]:
    """The categories, then every token of lavise's visual nouns: the default vocabulary maps fully."""
    out: list[str] = []
    seen: set[str] = set()
    for w in list(categories) + [t for line in visual_nouns() for t in line.split()]:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@dataclass
class BenchData:
    root: Path  # the COCO-like folder
    store: Store
    name: str
    index: DatasetIndex
    categories: list[str]
    seconds: float  # generation + registration + preprocess

    def describe(self) -> str:
        parts = []
        for split, sp in self.index.splits.items():
            parts.append(f"{split}: {len(sp.images)} images, {len(sp.pair_image)} pairs")
        return f"{self.name} ({'; '.join(parts)}; {len(self.categories)} concepts)"


def synthetic_dataset(tmp: Path, store: Store, *, splits: dict[str, int], width: int, height: int,
                      n_concepts: int = 20, masks_per_image: int = 3, name: str = "synthetic",
                      seed: int = 0) -> BenchData:
    """Generate, register (``register_coco``), embed (``register_embedding``) and ``preprocess``."""
    t0 = time.perf_counter()
    cats = concept_names(n_concepts)
    root = tmp / name
    offset = 0
    for k, (split, n) in enumerate(splits.items()):
        write_coco_split(root, split, n, width, height, cats, masks_per_image, seed=seed + 1000 * k, id_offset=offset)
        offset += n
    if not store.exists("embeddings", "bench-glove"):
        glove = write_glove(tmp / "bench-glove.txt", embedding_words(cats), seed=seed)
        register_embedding(store, glove, name="bench-glove")
    register_coco(store, root, name, splits=list(splits))
    preprocess(store, name, embedding="bench-glove", seed=seed)
    ix = load_index(store, name)
    return BenchData(root=root, store=store, name=name, index=ix, categories=cats, seconds=time.perf_counter() - t0)


# -- inputs, timing, output ----------------------------------------------------------------------


def decode(path: Path, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One image exactly as lavise feeds it to the model (same decode, resize, normalisation)."""
    return normalize(apply_view_image(read_rgb(path), View(), size), tuple(mean), tuple(std))


def decoded_batches(paths: Sequence[Path], size: int, mean: Sequence[float], std: Sequence[float],
                    batch_size: int) -> list[torch.Tensor]:
    xs = [decode(p, size, mean, std) for p in paths]
    return [torch.stack(xs[s:s + batch_size]) for s in range(0, len(xs), batch_size)]


@torch.inference_mode()
def bare_forward(net: torch.nn.Module, batches: Sequence[torch.Tensor], channels_last: bool = False,
                 bf16: bool = False) -> "Timer":
    """Time ``net(x)`` over ``batches`` (inputs already in memory); channels_last converts them first;
    ``bf16`` runs the forward under CPU bf16 autocast."""
    if channels_last:
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    with Timer() as t, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in batches:
            net(x)
    return t


class Timer:
    """Wall seconds (``seconds``) and this process's CPU seconds (``cpu``, all threads) of a block.

    On a busy machine wall time exceeds CPU time / threads: compare them before trusting a figure.
    """

    def __enter__(self) -> "Timer":
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def load() -> str:
    """The machine's load average: other processes on a small machine skew every timing."""
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
            f"cpu cores {os.cpu_count()} ({cpu}), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table that survives copy-paste into notes and issues."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 100000:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)
