"""A dataset without a train split (COCO val alone, the README's quick start) is divided into a
reference part that `train` uses and a held-out part that `explain`/`evaluate` use by default; a
target set that shares images with the explainer's training images is warned about."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import write_glove
from lavise_cli.data.images import count_shared, image_identities
from lavise_cli.data.index import HELD_OUT, REFERENCE, held_out_images, load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.store import Store

WORDS = "the person dog cat car traffic light red blue green".split()


@pytest.mark.parametrize("n", [2, 3, 10, 81, 5000])
def test_held_out_images_are_a_seeded_share_without_replacement(n: int) -> None:
    held = held_out_images(n, 0.2, seed=0)
    assert held == sorted(set(held)), "sorted, no image twice"
    assert all(0 <= i < n for i in held)
    assert len(held) == min(max(round(0.2 * n), 1), n - 1)
    assert held == held_out_images(n, 0.2, seed=0)
    if n >= 81:
        assert held != held_out_images(n, 0.2, seed=1)


def _val_only(make_coco: Any, tmp_path: Path, n: int = 10) -> Store:
    images = [{"id": i + 1, "file_name": f"v{i}.jpg", "width": 30 + i, "height": 20 + 2 * i} for i in range(n)]
    anns = []
    for i in range(n):
        x = 1 + i % 5
        anns.append(make_coco.polygon(2 * i + 1, i + 1, 1, [x, 2, x + 8, 2, x + 8, 12, x, 12]))
        if i % 2:
            anns.append(make_coco.polygon(2 * i + 2, i + 1, 18, [15, 5, 25, 5, 25, 15]))
    root = make_coco(images=images, annotations=anns, split="val")
    store = Store(tmp_path / "home")
    register_coco(store, root, "valonly")
    register_embedding(store, write_glove(tmp_path / "g.txt", WORDS), name="g")
    return store


def test_val_only_dataset_is_divided_and_masks_follow_their_images(make_coco: Any, tmp_path: Path) -> None:
    store = _val_only(make_coco, tmp_path)
    summary = preprocess(store, "valonly", workers=1)
    assert summary["held_out"] == {"source": "val", "fraction": 0.2, "seed": 0, "reference": 8, "held_out": 2}
    ix = load_index(store, "valonly")
    assert ix.training_split == REFERENCE and ix.target_split == HELD_OUT
    val, ref, out = ix.splits["val"], ix.splits[REFERENCE], ix.splits[HELD_OUT]
    assert len(val.images) == 10 and len(ref.images) == 8 and len(out.images) == 2
    ids = lambda sp: [im["id"] for im in sp.images]  # noqa: E731
    assert not set(ids(ref)) & set(ids(out)) and sorted(ids(ref) + ids(out)) == sorted(ids(val))
    assert [ids(val).index(i) for i in ids(out)] == held_out_images(10, 0.2, 0)
    assert len(ref.rles) + len(out.rles) == len(val.rles)
    by_id = {im["id"]: k for k, im in enumerate(val.images)}
    for part in (ref, out):
        for k, im in enumerate(part.images):
            c_part, m_part = part.masks(k)
            c_val, m_val = val.masks(by_id[im["id"]])
            assert np.array_equal(c_part, c_val) and torch.equal(m_part, m_val), im
            assert part.image_path(k) == val.image_path(by_id[im["id"]])
    # Another seed divides differently; the index is rebuilt for it.
    again = preprocess(store, "valonly", workers=1, seed=3)
    assert not again["cached"]
    assert [load_index(store, "valonly").splits["val"].images[i]["id"] for i in held_out_images(10, 0.2, 3)] == \
        ids(load_index(store, "valonly").splits[HELD_OUT])


def test_dataset_with_a_train_split_is_not_divided(make_coco: Any, tmp_path: Path) -> None:
    root = make_coco(split="train")
    make_coco(root, split="val")
    store = Store(tmp_path / "home")
    register_coco(store, root, "both")
    register_embedding(store, write_glove(tmp_path / "g.txt", WORDS), name="g")
    assert preprocess(store, "both", workers=1)["held_out"] is None
    ix = load_index(store, "both")
    assert set(ix.splits) == {"train", "val"} and ix.training_split == "train" and ix.target_split == "val"


def test_image_identities_follow_the_resolved_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"x")
    b.write_bytes(b"x")  # same bytes, another image
    (tmp_path / "link").symlink_to(tmp_path)
    known = image_identities([a])
    assert count_shared([tmp_path / "link" / "a.jpg", tmp_path / "." / "a.jpg"], known) == 2
    assert count_shared([b], known) == 0


def _make_val_only_copy(shared_data: Path, tmp_path: Path) -> Path:
    """A COCO-format folder holding only coco_tiny's val split (annotations + images)."""
    root = tmp_path / "coco-val-only"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(shared_data / "coco_tiny" / "annotations" / "instances_val2017.json", root / "annotations")
    (root / "val2017").symlink_to(shared_data / "coco_tiny" / "val2017")
    return root


@pytest.mark.slow
def test_quick_start_chain_on_a_val_only_coco_folder(shared_data: Path, glove_file: Path, tmp_path: Path,
                                                     cli: Any) -> None:
    """The issue's chain, as typed (plus registering GloVe), on real COCO val images."""
    root = _make_val_only_copy(shared_data, tmp_path)
    assert cli("download", "glove", "--from", glove_file).exit_code == 0
    r = cli("download", "coco", "--from", root, "--name", "coco")
    assert r.exit_code == 0, r.output
    r = cli("preprocess", "coco")
    assert r.exit_code == 0, r.output
    assert "coco has no train split: its 80 val images are divided (seed 0) into a reference part of 64" in r.stderr
    r = cli("train", "resnet18", "coco", "--weights", "none", "--epochs", "3")
    assert r.exit_code == 0, r.output
    r = cli("explain", "--filters", "1,2")
    assert r.exit_code == 0, r.output
    assert "coco/held-out (16 images)" in r.stdout and "warning" not in r.stderr
    r = cli("evaluate", "--recall", "5,10,20")
    assert r.exit_code == 0, r.output
    assert "coco/held-out (16 images)" in r.stdout and "warning" not in r.stderr

    doc = cli.json("explain", "--filters", "1")
    assert doc["target"] == "coco/held-out" and doc["target_images"] == 16
    assert doc["target_images_trained_on"] == 0
    held = {Path(im["path"]).name for f in doc["filters"] for im in f["top_images"]}
    ix = load_index(Store(cli.home), "coco")
    assert held <= {im["file"] for im in ix.splits[HELD_OUT].images}
    ev = cli.json("evaluate", "--recall", "5")
    assert ev["target"] == "coco/held-out" and ev["target_images_trained_on"] == 0

    # Scoring on images the explainer learned from is allowed, but never silently.
    r = cli("explain", "--filters", "1", "--split", "val", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["target_images_trained_on"] == 64
    assert "warning: 64 of the 80 target images were used to train explainer resnet18-layer4-coco" in r.stderr
    r = cli("explain", "--filters", "1", "--image-dir", root / "val2017")
    assert r.exit_code == 0, r.output
    assert "warning: 64 of the 80 target images" in r.stderr
