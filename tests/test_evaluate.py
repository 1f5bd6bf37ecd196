"""Objective evaluation (src/lavise_cli/evaluate.py): IoU, recall@s, ground truth, NetDissect.

``iou_matrix`` and ``recall_at`` against hand-computed cases (empty ground truth skipped and
counted, pair mean vs filter mean, words that are no evaluation concept); ``ground_truth`` and
``netdissect_iou`` against references computed here in numpy, on a generated labelled target set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lavise_cli.data.index import load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.errors import LaviseError
from lavise_cli.evaluate import (
    IOU_THRESHOLD,
    ConceptSpace,
    ground_truth,
    iou_matrix,
    netdissect_iou,
    recall_at,
)
from lavise_cli.explain import top_images
from lavise_cli.models import load_model
from lavise_cli.store import Store
from lavise_cli.target import folder_target, labelled_target, target_pass
from lavise_cli.testing import colour_model_factory

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _mask(*cells: tuple[int, int], size: int = 4) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    for y, x in cells:
        m[y, x] = True
    return m


def test_iou_matrix_hand_case() -> None:
    r0 = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # top-left 2x2
    r1 = _mask()  # empty region
    r2 = _mask((0, 0), (0, 1), (0, 2), (0, 3))  # the first row
    m0 = _mask((0, 0), (0, 1), (1, 0), (1, 1))
    m1 = _mask((0, 0), (0, 1), (0, 2))
    m2 = _mask()  # empty mask
    m3 = _mask((3, 3))
    got = iou_matrix(torch.stack([r0, r1, r2]), torch.stack([m0, m1, m2, m3]))
    want = torch.tensor([
        [1.0, 2 / 5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],  # empty region: 0, never NaN
        [2 / 6, 3 / 4, 0.0, 0.0],
    ])
    assert got.shape == (3, 4)
    assert torch.allclose(got, want, atol=1e-7), got


def test_iou_matrix_random_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    r = rng.random((5, 9, 7)) > 0.6
    m = rng.random((4, 9, 7)) > 0.5
    m[2] = False
    got = iou_matrix(torch.from_numpy(r), torch.from_numpy(m)).numpy()
    for i in range(5):
        for k in range(4):
            inter = np.logical_and(r[i], m[k]).sum()
            union = np.logical_or(r[i], m[k]).sum()
            assert got[i, k] == pytest.approx(inter / union if union else 0.0, abs=1e-7)


def _recall_case() -> tuple[torch.Tensor, torch.Tensor]:
    """3 filters x 2 images, 3 concepts; words best first (-1: a word that is no evaluation concept)."""
    gt = torch.zeros(3, 2, 3, dtype=torch.bool)
    gt[0, 0, [0, 1]] = True  # f0 i0: G = {0, 1}
    # f0 i1: G empty -> skipped
    gt[1, 0, 2] = True  # f1 i0: G = {2}
    gt[1, 1, :] = True  # f1 i1: G = {0, 1, 2}
    # f2: G empty on both images -> skipped, and the filter is not counted
    words = torch.tensor([
        [[0, -1, 2], [1, 0, 2]],
        [[-1, 2, 0], [1, 0, -1]],
        [[0, 1, 2], [0, 1, 2]],
    ])
    return words, gt


def test_recall_at_hand_case() -> None:
    words, gt = _recall_case()
    r = recall_at(words, gt, [1, 2, 3])
    # recall per counted pair:     @1    @2    @3
    #   f0 i0 (G={0,1})            1/2   1/2   1/2   (word -1 is no concept; 2 is not in G)
    #   f1 i0 (G={2})              0     1     1
    #   f1 i1 (G={0,1,2})          1/3   2/3   2/3
    assert r["pairs"] == 3
    assert r["skipped"] == 3
    assert r["filters"] == 2
    exp = {
        1: ((1 / 2 + 0 + 1 / 3) / 3, (1 / 2 + (0 + 1 / 3) / 2) / 2),
        2: ((1 / 2 + 1 + 2 / 3) / 3, (1 / 2 + (1 + 2 / 3) / 2) / 2),
        3: ((1 / 2 + 1 + 2 / 3) / 3, (1 / 2 + (1 + 2 / 3) / 2) / 2),
    }
    for s, (pair_mean, filter_mean) in exp.items():
        assert r[f"recall@{s}"]["pair_mean"] == pytest.approx(pair_mean, abs=1e-6), s
        assert r[f"recall@{s}"]["filter_mean"] == pytest.approx(filter_mean, abs=1e-6), s
    # The two means differ: pairs weigh filters by their counted images.
    assert r["recall@1"]["pair_mean"] != pytest.approx(r["recall@1"]["filter_mean"])
    per_filter = r["_per_filter"]["recall@2"]
    assert per_filter[0] == pytest.approx(0.5) and per_filter[1] == pytest.approx(5 / 6)
    assert math.isnan(per_filter[2])


def test_recall_at_subset_of_concepts() -> None:
    words, gt = _recall_case()
    only0 = torch.tensor([True, False, False])
    r = recall_at(words, gt, [1, 2], subset=only0)
    # G restricted to {0}: f0 i0 -> {0} (named first: 1, 1); f1 i0 -> {} skipped; f1 i1 -> {0} (second: 0, 1)
    assert (r["pairs"], r["skipped"], r["filters"]) == (2, 4, 2)
    assert r["recall@1"]["pair_mean"] == pytest.approx(0.5)
    assert r["recall@2"]["pair_mean"] == pytest.approx(1.0)
    assert r["recall@1"]["filter_mean"] == pytest.approx(0.5)


def test_recall_at_no_counted_pair_is_nan_not_zero() -> None:
    r = recall_at(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.bool), [1, 2])
    assert r["pairs"] == 0 and r["skipped"] == 6 and r["filters"] == 0
    assert math.isnan(r["recall@1"]["pair_mean"]) and math.isnan(r["recall@2"]["filter_mean"])


def test_recall_at_words_that_are_no_concept_never_count() -> None:
    gt = torch.ones(1, 1, 2, dtype=torch.bool)
    r = recall_at(torch.tensor([[[-1, -1, 1]]]), gt, [2, 3])
    assert r["recall@2"]["pair_mean"] == 0.0
    assert r["recall@3"]["pair_mean"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# ground_truth and netdissect_iou on a generated labelled target set
# ----------------------------------------------------------------------------------------------

FACTORY = colour_model_factory(
    [[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0], [0.3, 0.3, 0.3]], activation="ReLU")

WORDS = "the of dog cat car sky grass tree".split()
CATS = [{"id": 1, "name": "dog", "supercategory": "a"}, {"id": 2, "name": "cat", "supercategory": "a"},
        {"id": 3, "name": "car", "supercategory": "v"}]
FILL = {1: (230, 20, 20), 2: (20, 220, 30), 3: (30, 30, 230)}


def _write_split(root: Path, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        im = Image.new("RGB", (32, 32), (120, 120, 120))
        dr = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):  # several instances, a category may repeat (merged)
            c = int(rng.integers(1, 4))
            x0, y0 = (int(v) for v in rng.integers(0, 24, 2))
            w, h = (int(v) for v in rng.integers(4, 14, 2))
            x1, y1 = min(32, x0 + w), min(32, y0 + h)
            dr.rectangle([x0, y0, x1 - 1, y1 - 1], fill=FILL[c])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "iscrowd": 0,
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "area": float(w * h),
                         "bbox": [x0, y0, x1 - x0, y1 - y0]})
        fn = f"{i:05d}.png"
        im.save(root / f"{split}2017" / fn)
        images.append({"id": i + 1, "file_name": fn, "width": 32, "height": 32})
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS}))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("evaluate")
    store = Store(base / "home")
    _write_split(base / "coco", "val", 14, seed=3)
    register_coco(store, base / "coco", "toy")
    glove = base / "g.txt"
    rng = np.random.default_rng(0)
    glove.write_text("".join(w + " " + " ".join(f"{x:.5f}" for x in rng.normal(size=8)) + "\n" for w in WORDS))
    register_embedding(store, glove, name="g8")
    preprocess(store, "toy", embedding="g8", workers=1)
    factory = base / "colours.py"
    factory.write_text(FACTORY)
    model = load_model(f"{factory}:build", "none")
    target = labelled_target([load_index(store, "toy")], "val")
    cache = target_pass(store, model, "feat", target, batch_size=4, workers=0)
    return {"store": store, "target": target, "cache": cache, "model": model, "base": base}


def _ref_region(cache, row: int, u: int, size: int) -> np.ndarray:
    fu = cache.maps([row])[:, u:u + 1]
    up = F.interpolate(fu, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    # ... with the nearest-neighbour footprint of the cells at T (issue 15)
    foot = F.interpolate((fu >= cache.threshold[u]).float(), size=(size, size), mode="nearest-exact")[0, 0] > 0.5
    return ((up >= cache.threshold[u]) | foot).numpy()


def _ref_masks(target, row_image: int, space: ConceptSpace) -> dict[int, np.ndarray]:
    """concept id -> mask at 32x32 (the images are 32x32 = the input size: no resize)."""
    src, i = target.items[row_image]
    concepts, masks = target.sources[src].masks(i)
    names = target.source_concepts[src]
    out = {}
    for c, m in zip(concepts.tolist(), masks):
        out[space.index[names[c]]] = np.asarray(m, dtype=bool)
    return out


def test_ground_truth_equals_numpy_reference(labelled: dict[str, Any]) -> None:
    target, cache = labelled["target"], labelled["cache"]
    space = ConceptSpace.of(target)
    assert sorted(space.labels) == ["car", "cat", "dog"]
    d = cache.shape[0]
    filters = [3, 0, 2]
    p = 6
    top = top_images(cache, p)[torch.tensor(filters)]
    gt = ground_truth(target, cache, filters, top, 32, space)
    assert gt.shape == (3, p, 3) and gt.dtype == torch.bool
    nonempty = 0
    for j, u in enumerate(filters):
        for q in range(p):
            r = int(top[j, q])
            reg = _ref_region(cache, r, u, 32)
            masks = _ref_masks(target, int(cache.rows[r]), space)
            want = np.zeros(3, dtype=bool)
            for cid, m in masks.items():
                inter = np.logical_and(reg, m).sum()
                union = np.logical_or(reg, m).sum()
                want[cid] = union > 0 and inter / union > IOU_THRESHOLD
            assert gt[j, q].numpy().tolist() == want.tolist(), (u, r)
            nonempty += int(want.any())
    assert nonempty > 0  # the case is not vacuous
    assert IOU_THRESHOLD == 0.04
    assert d == 4


def test_ground_truth_refuses_unlabelled_target(labelled: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    target = folder_target(folder)
    cache = target_pass(labelled["store"], labelled["model"], "feat", target, workers=0)
    with pytest.raises(LaviseError, match="label"):
        ground_truth(target, cache, [0], torch.zeros(1, 1, dtype=torch.long), 32, ConceptSpace([], {}))


def test_netdissect_iou_equals_numpy_reference(labelled: dict[str, Any]) -> None:
    target, cache = labelled["target"], labelled["cache"]
    space = ConceptSpace.of(target)
    d = cache.shape[0]
    got = netdissect_iou(target, cache, 32, space)
    assert got.shape == (d, 3)
    inter = np.zeros((d, 3))
    area_r = np.zeros(d)
    area_m = np.zeros(3)
    for r in range(cache.n):
        masks = _ref_masks(target, int(cache.rows[r]), space)
        for cid, m in masks.items():
            area_m[cid] += m.sum()
        for u in range(d):
            reg = _ref_region(cache, r, u, 32)
            area_r[u] += reg.sum()
            for cid, m in masks.items():
                inter[u, cid] += np.logical_and(reg, m).sum()
    union = area_r[:, None] + area_m[None, :] - inter
    want = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    assert np.allclose(got.numpy(), want, atol=1e-6)
    # The colour filters find their own concept: red -> dog, green -> cat, blue -> car.
    for u, name in ((0, "dog"), (1, "cat"), (2, "car")):
        assert int(got[u].argmax()) == space.index[name], (u, got[u])
