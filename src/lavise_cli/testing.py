"""Synthetic data for lavise's tests and benchmarks (and for yours): small COCO layouts, GloVe
text files, images of every troublesome kind, and tiny model factories.

Nothing here is used by lavise itself; it ships so that ``tests/conftest.py`` and
``benchmarks/`` (and a user checking a setup) make their data with one set of functions:

- :func:`write_glove` / :func:`read_glove`: seeded random vectors in GloVe text format;
- :class:`CocoFactory`: one split of a small COCO instances layout (JSON + images) from given
  images/annotations (helpers :func:`polygon_ann`, :func:`crowd_ann`, :func:`rle_counts`), or a
  default split with polygons, a multi-instance union and a crowd RLE;
- :func:`write_image`: a seeded image of a given kind (RGB, grey, CMYK, RGBA, truncated, garbage,
  missing);
- :func:`write_coco_split`: a larger COCO-like split of random shapes in their own colours over
  photo-like backgrounds (the benchmarks' data), with :func:`concept_names` and
  :func:`embedding_words` to name its categories and cover them with word vectors;
- :func:`colour_model_factory`: the source of a ``FILE.py:build`` model factory whose filters are
  1x1 convolutions of the RGB channels (tests know exactly what each filter sees).

Only numpy and PIL are imported here (pycocotools and lavise's vocabulary where they are used).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# GloVe text files
# ----------------------------------------------------------------------------------------------

SMALL_GLOVE_WORDS = (
    "the of and person man woman dog cat horse sheep cow bird car bus truck bicycle boat "
    "traffic light stop sign fire hydrant hot sky grass tree wall table pizza chair couch bed road "
    "water house window door red blue green small big"
).split()
SMALL_GLOVE_DIM = 16


def write_glove(path: Path, words: Sequence[str], dim: int = SMALL_GLOVE_DIM, seed: int = 0) -> Path:
    """Write seeded random (not normalised) vectors in GloVe text format: ``word v1 ... vd``."""
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(words), dim)) * rng.uniform(0.5, 3.0, size=(len(words), 1))
    with open(path, "w", encoding="utf-8") as fh:
        for w, v in zip(words, vecs):
            fh.write(w + " " + " ".join(f"{x:.6f}" for x in v) + "\n")
    return path


def read_glove(path: Path) -> dict[str, np.ndarray]:
    """The raw vectors of a GloVe text file (plain or gzip), as float64."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    out: dict[str, np.ndarray] = {}
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for line in fh:
            parts = line.rstrip("\n").split(" ")
            out[parts[0]] = np.asarray(parts[1:], dtype=np.float64)
    return out


# ----------------------------------------------------------------------------------------------
# Images and a small COCO instances layout
# ----------------------------------------------------------------------------------------------


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a binary ``(H, W)`` mask (column-major, starting with 0s)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    if flat.size == 0:
        return [0]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] == 1 else runs


def polygon_ann(ann_id: int, image_id: int, category_id: int, *polygons: Sequence[float]) -> dict[str, Any]:
    """A polygon annotation (``polygons``: flat ``x1, y1, x2, y2, ...`` lists, at least 3 points)."""
    xs = [p[i] for p in polygons for i in range(0, len(p), 2)]
    ys = [p[i] for p in polygons for i in range(1, len(p), 2)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": [list(map(float, p)) for p in polygons],
        "area": 0.0,
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
    }


def crowd_ann(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    """A crowd annotation whose segmentation is the uncompressed RLE of ``mask`` ``(H, W)``."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] \
        if len(xs) else [0.0, 0.0, 0.0, 0.0]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 1,
        "segmentation": {"counts": rle_counts(mask), "size": [h, w]},
        "area": float(mask.sum()),
        "bbox": bbox,
    }


IMAGE_KINDS = ("rgb", "gray", "cmyk", "rgba", "truncated", "garbage", "missing")


def write_image(path: Path, width: int, height: int, kind: str = "rgb", seed: int = 0) -> None:
    """A seeded noise image of ``kind``: ``rgb`` (JPEG), ``gray`` (L JPEG), ``cmyk`` (CMYK JPEG),
    ``rgba`` (PNG with alpha, whatever the file name says), ``truncated`` (a JPEG cut in half),
    ``garbage`` (bytes that are no image), ``missing`` (nothing written)."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; one of {IMAGE_KINDS}")
    if kind == "missing":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"this is not an image at all\n" * 20)
        return
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
    if kind == "rgb":
        rgb.save(path, format="JPEG", quality=90)
    elif kind == "gray":
        rgb.convert("L").save(path, format="JPEG", quality=90)
    elif kind == "cmyk":
        rgb.convert("CMYK").save(path, format="JPEG", quality=90)
    elif kind == "rgba":
        im = rgb.convert("RGBA")
        im.putalpha(128)
        im.save(path, format="PNG")
    elif kind == "truncated":
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
        path.write_bytes(data[: len(data) // 2])


DEFAULT_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 10, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def default_split(split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Three images (non-square ones included) with polygons, a multi-instance union and a crowd RLE."""
    images = [
        {"id": 1, "file_name": f"{split}_000001.jpg", "width": 40, "height": 24},
        {"id": 2, "file_name": f"{split}_000002.jpg", "width": 32, "height": 32},
        {"id": 3, "file_name": f"{split}_000003.jpg", "width": 48, "height": 30},
    ]
    crowd = np.zeros((30, 48), np.uint8)
    crowd[4:20, 25:45] = 1
    anns = [
        polygon_ann(1, 1, 1, [2, 2, 8, 2, 8, 12, 20, 12, 20, 18, 2, 18]),  # an L-shape, top-left
        polygon_ann(2, 1, 3, [25, 5, 38, 5, 38, 20, 25, 20]),
        polygon_ann(3, 2, 18, [2, 2, 12, 2, 12, 12, 2, 12]),  # two dogs: one mask, their union
        polygon_ann(4, 2, 18, [18, 18, 30, 18, 30, 30, 18, 30]),
        polygon_ann(5, 2, 10, [20, 2, 28, 2, 28, 10]),
        crowd_ann(6, 3, 1, crowd),
        polygon_ann(7, 3, 17, [2, 20, 20, 20, 20, 28, 2, 28]),
    ]
    return images, anns


class CocoFactory:
    """``make_coco(...)`` writes one split of a COCO instances layout and returns its root.

    ``root`` defaults to ``base / "coco"``; call again with another ``split`` for a second
    split in the same root.  ``images``: dicts with ``id``, ``file_name``, ``width``, ``height``
    and optionally ``kind`` (see :func:`write_image`; default ``rgb``) and ``file_size``
    (``(width, height)`` of the file written, when it should differ from the JSON's) -- these
    two keys are not written to the JSON.  ``annotations`` / ``categories``: COCO dicts (use
    ``make_coco.polygon(...)`` and ``make_coco.crowd(...)``).  Left out, a default split is
    written: 3 images (40x24, 32x32, 48x30) with an L-shaped person polygon, a car, two dog
    instances, a traffic light triangle, a crowd-RLE person and a cat.
    """

    polygon = staticmethod(polygon_ann)
    crowd = staticmethod(crowd_ann)
    rle_counts = staticmethod(rle_counts)
    write_image = staticmethod(write_image)
    default_categories = DEFAULT_CATEGORIES
    LOCAL_KEYS = ("kind", "file_size")

    def __init__(self, base: Path):
        self.tmp_path = Path(base)

    def __call__(
        self,
        root: Path | None = None,
        *,
        split: str = "val",
        images: list[dict[str, Any]] | None = None,
        annotations: list[dict[str, Any]] | None = None,
        categories: list[dict[str, Any]] | None = None,
    ) -> Path:
        root = Path(root) if root is not None else self.tmp_path / "coco"
        d_images, d_anns = default_split(split)
        images = d_images if images is None else images
        annotations = d_anns if annotations is None else annotations
        categories = DEFAULT_CATEGORIES if categories is None else categories
        img_dir = root / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(images):
            w, h = im.get("file_size", (im["width"], im["height"]))
            write_image(img_dir / im["file_name"], int(w), int(h), im.get("kind", "rgb"), seed=k)
        write_instances(root, split, [{key: v for key, v in im.items() if key not in self.LOCAL_KEYS} for im in images],
                        annotations, categories)
        return root


def write_instances(root: Path, split: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
                    categories: list[dict[str, Any]]) -> Path:
    """``root/annotations/instances_{split}2017.json`` holding these images, annotations and categories."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    doc = {"info": {"description": "generated by lavise_cli.testing"}, "licenses": [],
           "images": images, "annotations": annotations, "categories": categories}
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------------------------------
# A larger COCO-like split of random shapes (the benchmarks' data)
# ----------------------------------------------------------------------------------------------


def concept_names(n: int) -> list[str]:
    """``n`` single-word concept names: the most frequent of lavise's visual nouns."""
    from .embeddings import visual_nouns

    words = [w for w in visual_nouns() if w.isalpha()]
    if n > len(words):
        raise ValueError(f"at most {len(words)} concept names available")
    return words[:n]


def embedding_words(categories: Sequence[str]) -> list[str]:
    """The categories, then every token of lavise's visual nouns: the default vocabulary maps fully."""
    from .embeddings import visual_nouns

    out: list[str] = []
    seen: set[str] = set()
    for w in list(categories) + [t for line in visual_nouns() for t in line.split()]:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour field plus mild noise: JPEG sizes close to real photos."""
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _random_shape(rng: np.random.Generator, width: int, height: int) -> tuple[str, list]:
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
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": c, "supercategory": "thing"} for i, c in enumerate(categories)]
    colours = rng.integers(0, 256, size=(len(categories), 3))
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for k in range(n_images):
        iid = id_offset + k + 1
        fname = f"{iid:012d}.jpg"
        canvas = Image.fromarray(_background(rng, width, height))
        draw = ImageDraw.Draw(canvas)
        n_obj = int(np.clip(masks_per_image + rng.integers(-1, 2), 1, len(categories)))
        for c in rng.choice(len(categories), size=n_obj, replace=False):
            kind, geom = _random_shape(rng, width, height)
            m = Image.new("L", (width, height), 0)
            getattr(ImageDraw.Draw(m), kind)(geom, fill=1)
            getattr(draw, kind)(geom, fill=tuple(int(v) for v in colours[c]))
            rle = mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))
            area = float(mask_utils.area(rle))
            if area == 0:
                continue
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": int(c) + 1,
                         "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                         "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
        canvas.save(img_dir / fname, quality=90)
        images.append({"id": iid, "file_name": fname, "height": height, "width": width})
    write_instances(root, split, images, anns, cats)
    return {"images": len(images), "annotations": len(anns)}


# ----------------------------------------------------------------------------------------------
# Tiny model factories
# ----------------------------------------------------------------------------------------------


def colour_model_factory(weights: Sequence[Sequence[float]], bias: Sequence[float] | None = None, *,
                         activation: str = "ReLU", input_size: int = 32, cell: int = 8) -> str:
    """The source of a model factory file (``lavise ... --model FILE.py:build``) whose layer ``feat``
    has one filter per row of ``weights``: a 1x1 convolution of the RGB channels (``bias`` added;
    zero when None), then ``nn.{activation}``, averaged over ``cell`` x ``cell`` input pixels.
    The model's output is ``feat`` averaged over the image; inputs are in [0, 1] (mean 0, std 1)."""
    rows = ",\n".join(f"                {[float(x) for x in row]}" for row in weights)
    n = len(weights)
    init_bias = ("self.conv.bias.zero_()" if bias is None
                 else f"self.conv.bias.copy_(torch.tensor({[float(b) for b in bias]}))")
    return f'''
import torch
from torch import nn


class Colours(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, {n}, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([
{rows},
            ]).view({n}, 3, 1, 1))
            {init_bias}
        self.act = nn.{activation}()
        self.pool = nn.AvgPool2d({cell})
        self.feat = nn.Identity()

    def forward(self, x):
        return self.feat(self.pool(self.act(self.conv(x)))).mean((2, 3))


def build():
    return Colours(), {{"input_size": {input_size}, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}}
'''
