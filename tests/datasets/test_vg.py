"""Visual Genome as reference data: box masks, synset concepts, the seeded split, --min-images."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import write_glove
from lavise_cli.data.formats.vg import box_mask, concept_labels, synset_label
from lavise_cli.data.index import held_out_images, load_index, preprocess
from lavise_cli.download import register_vg
from lavise_cli.embeddings import register_embedding
from lavise_cli.store import Store

WORDS = "the tree sidewalk building street man shirt light car sign bank river window".split()


def test_synset_labels_are_first_lemmas_and_collisions_stay_apart() -> None:
    assert synset_label("tree.n.01") == "tree"
    assert synset_label("traffic_light.n.01") == "traffic light"
    labels = concept_labels(["bank.n.01", "bank.n.09", "tree.n.01", "traffic_light.n.01"])
    assert labels == {"bank.n.01": "bank (bank.n.01)", "bank.n.09": "bank (bank.n.09)", "tree.n.01": "tree",
                      "traffic_light.n.01": "traffic light"}


def test_box_mask_uses_x_as_column_and_clips() -> None:
    m = box_mask(24, 40, [(30, 2, 8, 20)])  # 40 wide, 24 high; a tall box near the right edge
    assert m.shape == (24, 40)
    expected = np.zeros((24, 40), np.uint8)
    expected[2:22, 30:38] = 1
    assert np.array_equal(m, expected)
    clipped = box_mask(24, 40, [(35, 20, 20, 20), (-5, -5, 7, 6)])
    assert clipped[20:24, 35:40].all() and clipped[0:1, 0:2].all()
    assert int(clipped.sum()) == 4 * 5 + 1 * 2


def _vg_folder(root: Path, objects: list[dict[str, Any]], sizes: dict[int, tuple[int, int]],
               synsets: dict[str, str] | None = None, aliases: str = "") -> Path:
    """A VG 1.4 folder: objects.json, image_data.json, images of the given (width, height) in VG_100K/."""
    (root / "VG_100K").mkdir(parents=True)
    meta = []
    for iid, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (iid * 37 % 255, 90, 140)).save(root / "VG_100K" / f"{iid}.jpg", quality=70)
        meta.append({"image_id": iid, "width": w, "height": h, "url": f"https://x/VG_100K/{iid}.jpg"})
    (root / "objects.json").write_text(json.dumps(objects))
    (root / "image_data.json").write_text(json.dumps(meta))
    (root / "object_synsets.json").write_text(json.dumps(synsets or {}))
    (root / "object_alias.txt").write_text(aliases)
    return root


def _obj(x: int, y: int, w: int, h: int, synsets: list[str], names: list[str] | None = None) -> dict[str, Any]:
    return {"x": x, "y": y, "w": w, "h": h, "synsets": synsets, "names": names or [synsets[0].split(".")[0]] if synsets
            else names, "object_id": 0, "merged_object_ids": []}


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "home")
    register_embedding(store, write_glove(tmp_path / "g.txt", WORDS), name="g")
    return store


def test_vg_box_masks_are_not_transposed_and_synsets_merge(tmp_path: Path) -> None:
    objects = [
        {"image_id": 1, "objects": [_obj(30, 2, 8, 20, ["tree.n.01"]), _obj(0, 0, 4, 4, ["tree.n.01"]),
                                    _obj(10, 10, 5, 5, ["man.n.01"]),
                                    _obj(1, 1, 2, 2, [], ["street lamp"]),   # alias -> name -> synset
                                    _obj(5, 5, 2, 2, [], ["blob"])]},       # no synset at all
        {"image_id": 2, "objects": [_obj(1, 1, 10, 10, ["tree.n.01"])]},
        {"image_id": 3, "objects": [_obj(1, 1, 10, 10, ["tree.n.01"])]},
    ]
    root = _vg_folder(tmp_path / "vg", objects, {1: (40, 24), 2: (32, 32), 3: (32, 32)},
                      synsets={"light": "light.n.02"}, aliases="light,street lamp,lamp\n")
    store = _store(tmp_path)
    register_vg(store, root, "vg")
    summary = preprocess(store, "vg", workers=1, min_images=1, val_fraction=0.34)
    assert summary["splits"]["train"]["dropped"]["objects without a synset"] == 1
    ix = load_index(store, "vg")
    val_ids = {im["id"] for im in ix.splits["val"].images}
    assert len(val_ids) == 1 and val_ids == {[1, 2, 3][i] for i in held_out_images(3, 0.34, 0)}
    split = "val" if 1 in val_ids else "train"
    sp = ix.splits[split]
    k = [im["id"] for im in sp.images].index(1)
    concepts, masks = sp.masks(k)
    names = [ix.concepts[c] for c in concepts]
    tree = masks[names.index("tree")].numpy()
    expected = np.zeros((24, 40), np.uint8)
    expected[2:22, 30:38] = 1
    expected[0:4, 0:4] = 1  # both trees of the image: one mask, their union
    assert tree.shape == (24, 40) and np.array_equal(tree, expected)
    assert masks[names.index("light")].numpy()[1:3, 1:3].all()
    assert sp.image_path(k) == root / "VG_100K" / "1.jpg"


def test_vg_min_images_drops_rare_concepts_and_emptied_images(tmp_path: Path) -> None:
    # Trees in images 1-5, a bank only in image 6: with --min-images 3 the bank goes, and image 6 with it.
    objects = [{"image_id": i, "objects": [_obj(1, 1, 5, 5, ["tree.n.01"])] if i <= 5 else
                [_obj(1, 1, 5, 5, ["bank.n.01"])]} for i in range(1, 7)]
    root = _vg_folder(tmp_path / "vg", objects, {i: (16, 16) for i in range(1, 7)})
    store = _store(tmp_path)
    register_vg(store, root, "vg")
    s = preprocess(store, "vg", workers=1, min_images=3, val_fraction=0.2)
    ix = load_index(store, "vg")
    assert ix.concepts == ["tree"] and s["concepts_below_min_images"] == 1
    kept = {im["id"] for sp in ix.splits.values() for im in sp.images}
    assert kept == {1, 2, 3, 4, 5}
    dropped = sum(sp["dropped"].get("images with no remaining object", 0) for sp in s["splits"].values())
    assert dropped == 1
    # With --min-images 1 the bank is a concept again when its image is a training image.
    s1 = preprocess(store, "vg", workers=1, min_images=1, val_fraction=0.2)
    bank_in_train = 5 not in held_out_images(6, 0.2, 0)
    assert ("bank" in load_index(store, "vg").concepts) == bank_in_train and not s1["cached"]


@pytest.mark.slow
def test_vg_sample_counts_equal_an_independent_count(shared_data: Path, tmp_path: Path, cli: Any) -> None:
    """The real annotations of VG's first 100 images, with images made at the listed sizes."""
    src = shared_data / "vg_sample"
    root = tmp_path / "vg"
    meta = json.loads((src / "image_data.json").read_text())
    for m in meta:
        folder = root / m["url"].split("/")[-2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (m["width"], m["height"]), (120, 120, 120)).save(folder / f"{m['image_id']}.jpg", quality=50)
    for f in ("objects.json", "image_data.json", "object_synsets.json", "object_alias.txt"):
        shutil.copy(src / f, root / f)
    write_glove(tmp_path / "g.txt", WORDS)
    assert cli("download", "glove", "--from", tmp_path / "g.txt").exit_code == 0
    assert cli("download", "vg", "--from", root).exit_code == 0
    r = cli("preprocess", "vg", "--min-images", "1", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)

    # The independent count: synsets as VG lists them, else the name's synset (through an alias).
    by_name = json.loads((src / "object_synsets.json").read_text())
    alias = {}
    for line in (src / "object_alias.txt").read_text().splitlines():
        parts = [p.strip().lower() for p in line.split(",") if p.strip()]
        for a in parts[1:]:
            alias.setdefault(a, parts[0])
    pairs: dict[int, set[str]] = defaultdict(set)
    for entry in json.loads((src / "objects.json").read_text()):
        for o in entry["objects"]:
            syns = list(o["synsets"])
            if not syns:
                for n in o["names"]:
                    n = n.strip().lower()
                    hit = by_name.get(n) or by_name.get(alias.get(n, ""))
                    if hit:
                        syns = [hit]
                        break
            pairs[entry["image_id"]].update(syns)
    ids = sorted(i for i in pairs if pairs[i])  # images with at least one synset
    val_ids = {ids[i] for i in held_out_images(len(ids), 0.1, 0)}
    train_concepts = set().union(*(pairs[i] for i in ids if i not in val_ids))
    expected_pairs = sum(len(pairs[i] & train_concepts) for i in ids)
    assert summary["concepts"] == len(train_concepts)
    assert sum(s["pairs"] for s in summary["splits"].values()) == expected_pairs
    assert summary["image_split"]["val"] == len(val_ids)
    ix = load_index(Store(cli.home), "vg")
    assert {im["id"] for im in ix.splits["val"].images} == {i for i in val_ids if pairs[i] & train_concepts}
    # Collisions stay apart: light.n.01 and light.n.02 are both concepts of the sample.
    assert "light (light.n.02)" in ix.concepts and "light (light.n.01)" in ix.concepts


def test_vg_streamed_build_in_chunks_equals_an_independent_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several hundred images, in chunks of 80 through the worker pool: images, concepts, split,
    every mask and the dropped counts equal what the annotations say, worked out here directly."""
    import random

    from lavise_cli.data.formats import vg

    rng = random.Random(5)
    sizes = [(20, 12), (12, 20), (16, 16)]
    syns = ["tree.n.01", "man.n.01", "car.n.01", "sign.n.02", "window.n.01", "light.n.01", "light.n.02",
            "river.n.01", "bank.n.01"]
    root = tmp_path / "vg"
    (root / "VG_100K").mkdir(parents=True)
    for w, h in sizes:  # a few images; every VG image is a link to the one of its size
        Image.new("RGB", (w, h), (w * 9, h * 9, 60)).save(root / f"{w}x{h}.jpg", quality=80)
    ids = rng.sample(range(1, 5000), 330)  # in no order
    objects, meta, size_of = [], [], {}
    for iid in ids:
        w, h = size_of[iid] = rng.choice(sizes)
        (root / "VG_100K" / f"{iid}.jpg").symlink_to(root / f"{w}x{h}.jpg")
        meta.append({"image_id": iid, "width": w, "height": h, "url": f"https://x/VG_100K/{iid}.jpg"})
        objs = []
        for _ in range(rng.randint(0, 6)):
            # boxes partly or wholly outside the image too (an empty mask when wholly)
            objs.append(_obj(rng.randint(-6, w + 2), rng.randint(-6, h + 2), rng.randint(0, w), rng.randint(0, h),
                             [rng.choice(syns[:-1])]))
        if iid in ids[:3]:  # a rare synset, the only object of one image: both left out
            objs = objs[:2 if iid != ids[2] else 0] + [_obj(1, 1, 4, 4, [syns[-1]])]
        objects.append({"image_id": iid, "objects": objs})
    (root / "objects.json").write_text(json.dumps(objects))
    (root / "image_data.json").write_text(json.dumps(meta))
    store = _store(tmp_path)
    register_vg(store, root, "vg")
    monkeypatch.setattr(vg, "CHUNK", 80)  # >= 64 jobs a chunk: the pool's workers draw them
    s = preprocess(store, "vg", workers=2, min_images=4, val_fraction=0.25, seed=2)

    # The same, directly: per image and synset the union of its boxes clipped to the image.
    boxes: dict[int, dict[str, list[tuple[int, ...]]]] = {}
    for e in objects:
        for o in e["objects"]:
            boxes.setdefault(e["image_id"], defaultdict(list))[o["synsets"][0]].append((o["x"], o["y"], o["w"], o["h"]))
    with_objects = sorted(i for i in boxes if boxes[i])
    val_ids = {with_objects[k] for k in held_out_images(len(with_objects), 0.25, 2)}
    in_train = defaultdict(int)
    for i in with_objects:
        if i not in val_ids:
            for syn in boxes[i]:
                in_train[syn] += 1
    kept_syns = sorted(syn for syn, n in in_train.items() if n >= 4)
    labels = concept_labels(kept_syns)
    expected: dict[str, dict[int, dict[str, np.ndarray]]] = {"train": {}, "val": {}}
    empty = {"train": 0, "val": 0}
    gone = 0
    for i in with_objects:
        w, h = size_of[i]
        masks = {}
        for syn in kept_syns:
            if syn in boxes[i]:
                m = np.zeros((h, w), np.uint8)
                for x, y, bw, bh in boxes[i][syn]:
                    m[max(0, y):max(0, y + bh), max(0, x):max(0, x + bw)] = 1
                if m.any():
                    masks[labels[syn]] = m
                else:
                    empty["val" if i in val_ids else "train"] += 1
        if masks:
            expected["val" if i in val_ids else "train"][i] = masks

    ix = load_index(store, "vg")
    assert sorted(ix.concepts) == sorted(labels.values()) and s["concepts_below_min_images"] == len(in_train) - len(kept_syns)
    assert len(kept_syns) == 8 and s["concepts_below_min_images"] == 1  # the rare synset is left out
    for split in ("train", "val"):
        sp = ix.splits[split]
        assert [im["id"] for im in sp.images] == sorted(expected[split])  # by image id, across chunks
        assert s["image_split"][split] == s["splits"][split]["images"] == len(expected[split])
        assert s["splits"][split]["pairs"] == sum(len(m) for m in expected[split].values())
        dropped = s["splits"][split]["dropped"]
        assert dropped.get("empty masks", 0) == empty[split] and empty["train"] > 0
        n_with = sum(1 for i in with_objects if (i in val_ids) == (split == "val"))
        assert dropped.get("images with no remaining object", 0) == n_with - len(expected[split])
        gone += n_with - len(expected[split])
        for k, im in enumerate(sp.images):
            concepts, masks = sp.masks(k)
            assert sp.image_path(k) == root / "VG_100K" / f"{im['id']}.jpg"
            got = {ix.concepts[c]: m.numpy() for c, m in zip(concepts.tolist(), masks)}
            assert got.keys() == expected[split][im["id"]].keys()
            for lab, m in got.items():
                assert np.array_equal(m, expected[split][im["id"]][lab]), (im["id"], lab)
    assert gone >= 1  # the image with only the rare synset, at least
    assert s["splits"]["train"]["dropped"]["images with no object that has a synset"] == len(ids) - len(with_objects)
