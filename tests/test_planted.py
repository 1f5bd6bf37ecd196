"""A planted concept: filter attention names what a filter fires on; ``original`` does not.

A factory model whose layer ``feat`` has six colour channels on a 7x7 grid; filter 2 fires exactly
on red pixels (saturating at 1.0, so its threshold is a tie: regions need ``>= T_u``).  Generated
images: sky above a random horizon, grass below, a red object ("apple") at a random place in
most images and sometimes a yellow one ("banana"), all annotated as COCO polygons.  An explainer is trained (reference = train split) and filters are
explained and evaluated on the val split:

- filter attention names "apple" first for filter 2, in most of its top images;
- ``original`` (the whole image's pooled features, the same for every filter) names the large
  backgrounds instead, so it ranks "apple" lower or in fewer images;
- recall@1 and recall@2 of attention beat ``original``, for filter 2 and over all filters.

Everything is seeded: the test is deterministic, and it fails when the method is broken (e.g.
attention weights not applied, regions or thresholds wrong, the explainer not trained).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_glove
from lavise_cli.data.index import preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.pipeline import evaluate_methods, open_session, run_explain, vocabulary_for
from lavise_cli.models import one_thread
from lavise_cli.store import Store
from lavise_cli.testing import rle_counts
from lavise_cli.train import TrainSettings, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIZE = 56  # input size; feat is 7x7 (AvgPool 8)
RED = 2  # the planted filter

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class ColourNet(nn.Module):
        # Channels: 0 green, 1 blue, 2 red, 4 yellow -- each capped at 1.0 (saturates on its colour) --
        # 3 brightness (everywhere) and 5 darkness (uncapped; dead on these images).  Inputs in [0, 1].
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([
                    [-4.0, 4.0, -4.0],
                    [-4.0, -4.0, 4.0],
                    [4.0, -4.0, -4.0],
                    [0.1, 0.1, 0.1],
                    [4.0, 4.0, -8.0],
                    [-1.0, -1.0, -1.0],
                ]).view(6, 3, 1, 1))
                self.conv.bias.copy_(torch.tensor([0.0, 0.8, -0.8, 0.0, -4.0, 1.0]))
            self.pool = nn.AvgPool2d(8)
            self.feat = nn.Identity()

        def forward(self, x):
            cap = torch.tensor([1.0, 1.0, 1.0, float("inf"), 1.0, float("inf")]).view(1, 6, 1, 1)
            y = torch.minimum(torch.relu(self.conv(x)), cap)
            return self.feat(self.pool(y)).mean((2, 3))


    def build():
        return ColourNet(), {"input_size": 56, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    """
)

CATEGORIES = [
    {"id": 1, "name": "apple", "supercategory": "food"},
    {"id": 2, "name": "banana", "supercategory": "food"},
    {"id": 3, "name": "grass", "supercategory": "plant"},
    {"id": 4, "name": "sky", "supercategory": "sky"},
]
SKY, GRASS = (70, 120, 230), (40, 170, 50)
APPLE, BANANA = (220, 30, 30), (240, 200, 30)
# Concepts, then distractors (all in the shipped visual-noun list): the default vocabulary.
WORDS = ("the of and apple banana grass sky sand wall road tree water car dog ball cup flower house "
         "window table chair bird horse box bottle").split()


def _poly(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def write_split(root: Path, split: str, n: int, seed: int) -> None:
    """Objects as polygons; sky and grass as exact masks (RLE) of their visible pixels."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []

    def add(image_id: int, cat: int, segmentation: Any, box: tuple[int, int, int, int], area: float) -> None:
        x0, y0, x1, y1 = box
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                     "segmentation": segmentation, "area": area, "bbox": [x0, y0, x1 - x0, y1 - y0]})

    for i in range(n):
        iid = i + 1
        split_y = int(rng.integers(12, 45))  # the horizon: sky above, grass below
        arr = np.zeros((SIZE, SIZE, 3), np.float64)
        arr[:split_y] = SKY
        arr[split_y:] = GRASS
        free = np.ones((SIZE, SIZE), bool)
        objects = []
        if rng.random() < 0.85:
            objects.append((1, APPLE, rng.integers(22, 29, 2)))
        if rng.random() < 0.4:
            objects.append((2, BANANA, rng.integers(12, 21, 2)))
        for cat, colour, (w, h) in objects:
            for _ in range(100):  # objects do not overlap
                x0, y0 = int(rng.integers(0, SIZE - w + 1)), int(rng.integers(0, SIZE - h + 1))
                if free[y0:y0 + h, x0:x0 + w].all():
                    break
            free[y0:y0 + h, x0:x0 + w] = False
            arr[y0:y0 + h, x0:x0 + w] = colour
            add(iid, cat, [_poly(x0, y0, x0 + int(w), y0 + int(h))], (x0, y0, x0 + int(w), y0 + int(h)), float(w * h))
        for cat, rows in ((4, slice(0, split_y)), (3, slice(split_y, SIZE))):
            m = np.zeros((SIZE, SIZE), bool)
            m[rows] = True
            m &= free
            if m.any():
                ys, xs = np.nonzero(m)
                add(iid, cat, {"counts": rle_counts(m), "size": [SIZE, SIZE]},
                    (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), float(m.sum()))
        arr += rng.normal(0, 6, arr.shape)  # texture, so that no two images are alike
        fn = f"{split}_{i:05d}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"{split}2017" / fn)
        images.append({"id": iid, "file_name": fn, "width": SIZE, "height": SIZE})
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))



@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with one_thread():
        yield _build(tmp_path_factory)


def _build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("planted")
    store = Store(base / "home")
    write_split(base / "coco", "train", 60, seed=10)
    write_split(base / "coco", "val", 40, seed=11)
    register_coco(store, base / "coco", "planted")
    register_embedding(store, write_glove(base / "glove.50d.txt", WORDS, dim=50), name="g50")
    preprocess(store, "planted", embedding="g50", workers=1)
    factory = base / "colournet.py"
    factory.write_text(FACTORY)
    train(store, f"{factory}:build", ["planted"], layers=["feat"], weights="none", name="colournet",
          settings=TrainSettings(epochs=60, patience=15, batch_size=32, lr=3e-3, seed=0), device="cpu", workers=0)
    session = open_session(store, device="cpu", workers=0)
    return {"store": store, "session": session}


def _rank(words: list[tuple[str, int, float]], word: str) -> tuple[int, int]:
    """(rank from 0, images naming it); (a large rank, 0) when absent."""
    for i, (w, c, _) in enumerate(words):
        if w == word:
            return i, c
    return 10**6, 0


def test_attention_names_the_planted_concept(planted: dict[str, Any]) -> None:
    ses = planted["session"]
    assert ses.cache.shape == (6, 7, 7)
    vocab = vocabulary_for(ses, "default")
    assert {"apple", "grass", "sky", "road", "car"} <= set(vocab.words)
    p, s, k = 15, 3, 5
    att = run_explain(ses, [RED], "attention", vocab, p=p, s=s, k=k)
    orig = run_explain(ses, [RED], "original", vocab, p=p, s=s, k=k)
    assert not att.inactive[0]
    # Filter 2 saturates on the apples: its threshold is the cap itself, a tie (regions need >=).
    assert float(ses.cache.threshold[RED]) == 1.0
    a_rank, a_count = _rank(att.words[0], "apple")
    o_rank, o_count = _rank(orig.words[0], "apple")
    # Attention: "apple" is the filter's first word, named by most of its top images.
    assert a_rank == 0, att.words[0]
    assert a_count >= 0.8 * p, att.words[0]
    # Each top image's first word is "apple" for most images with attention.
    apple = vocab.index["apple"]
    first_att = (att.image_words[0, :, 0] == apple).float().mean().item()
    first_orig = (orig.image_words[0, :, 0] == apple).float().mean().item()
    assert first_att >= 0.8, first_att
    # Original ranks it lower, or names it in fewer images.
    assert (a_rank, -a_count) < (o_rank, -o_count), (att.words[0], orig.words[0])
    assert first_att > first_orig + 0.3, (first_att, first_orig)
    # The same top images for both methods (they differ only in the explainer's input).
    assert torch.equal(att.top_rows, orig.top_rows)


def test_attention_beats_original_on_recall(planted: dict[str, Any]) -> None:
    ses = planted["session"]
    vocab = vocabulary_for(ses, "default")
    res = evaluate_methods(ses, ["attention", "original"], vocab, cuts=(1, 2), p=15)
    att, orig = res["methods"]["attention"], res["methods"]["original"]
    assert att["pairs"] == orig["pairs"] > 0
    for cut in ("recall@1", "recall@2"):
        assert att[cut]["pair_mean"] > orig[cut]["pair_mean"] + 0.1, (cut, att, orig)
        assert att[cut]["filter_mean"] > orig[cut]["filter_mean"], (cut, att, orig)
    # Filter 2 alone: its ground truth is "apple" and attention names it.
    per = res["per_filter"]
    filters = per["attention"]["filters"]
    j = filters.index(RED)
    assert per["attention"]["recall@1"][j] >= 0.8, per["attention"]["recall@1"][j]
    assert per["attention"]["recall@1"][j] > per["original"]["recall@1"][j] + 0.3
