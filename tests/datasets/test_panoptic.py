"""COCO panoptic, streamed (src/lavise_cli/data/formats/panoptic.py): the annotation file read
element by element and the images read in chunks through the worker pool give, image for image,
the masks the PNGs hold (segment id = R + 256 G + 256^2 B), with every bad case counted."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_glove
from lavise_cli.data.index import load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import clean_label, register_embedding
from lavise_cli.store import Store

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CATEGORIES = {1: "person", 2: "dog", 3: "sky-other-merged", 7: "tree"}


def test_panoptic_streamed_in_chunks_equals_the_pngs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lavise_cli.data.formats import panoptic

    rng = random.Random(3)
    root = tmp_path / "pan"
    images_dir, png_dir = root / "val2017", root / "annotations" / "panoptic_val2017"
    images_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    sizes = [(20, 14), (14, 20)]
    for w, h in sizes:
        Image.new("RGB", (w, h), (w * 9, h * 9, 40)).save(root / f"{w}x{h}.jpg")
    images, anns, pngs = [], [], {}
    ids = rng.sample(range(1, 2000), 170)
    for n, iid in enumerate(ids):
        w, h = rng.choice(sizes)
        name = f"{iid:012d}.jpg"
        if n != 5:  # one image missing
            (images_dir / name).symlink_to(root / f"{w}x{h}.jpg")
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
        seg = np.zeros((h, w), np.int64)
        segments = []
        for k, sid in enumerate(rng.sample(range(1, 70000), rng.randint(0, 5))):
            if rng.random() < 0.9:  # else the segment is not in the PNG: an empty mask
                y, x = rng.randrange(h), rng.randrange(w)
                seg[y:y + rng.randint(1, h), x:x + rng.randint(1, w)] = sid
            segments.append({"id": sid, "category_id": rng.choice([1, 2, 3, 7, 7, 9])})  # 9: unknown
        png = f"{iid:012d}.png"
        if n != 9:  # one PNG missing
            rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(png_dir / png)
        pngs[iid] = seg
        anns.append({"image_id": iid, "file_name": png, "segments_info": segments})
    anns.append({"image_id": 5000, "file_name": "none.png", "segments_info": []})  # an unknown image
    rng.shuffle(anns)
    cats = [{"id": c, "name": nm} for c, nm in CATEGORIES.items()]
    doc = {"info": {}, "annotations": anns, "images": images, "categories": cats}  # categories last
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    store = Store(tmp_path / "home")
    register_embedding(store, write_glove(tmp_path / "g.txt", ["person", "dog", "sky", "tree"]), name="g")
    register_coco(store, root, "pan", panoptic=True)
    monkeypatch.setattr(panoptic, "CHUNK", 70)  # >= 64 jobs a chunk: the pool's workers read them
    s = preprocess(store, "pan", workers=2)

    # The same, directly from the PNGs.
    expected: dict[int, dict[str, np.ndarray]] = {}
    empty = unknown_cat = 0
    for n, iid in enumerate(ids):
        ann = next(a for a in anns if a["image_id"] == iid)
        by_label: dict[str, list[int]] = defaultdict(list)
        for sg in ann["segments_info"]:
            if sg["category_id"] in CATEGORIES:
                by_label[clean_label(CATEGORIES[sg["category_id"]])].append(sg["id"])
            else:
                unknown_cat += 1  # counted whether or not the image is kept
        if n in (5, 9):  # the image missing, the PNG missing
            continue
        masks = {lab: np.isin(pngs[iid], segs).astype(np.uint8) for lab, segs in by_label.items()}
        empty += sum(1 for m in masks.values() if not m.any())
        expected[iid] = {lab: m for lab, m in masks.items() if m.any()}

    ix = load_index(store, "pan")
    sp = ix.splits["val"]
    assert [im["id"] for im in sp.images] == sorted(expected)  # by image id, across chunks
    assert s["splits"]["val"]["pairs"] == sum(len(m) for m in expected.values())
    dropped = s["splits"]["val"]["dropped"]
    assert dropped == {"annotations with unknown image": 1, "segments with unknown category": unknown_cat,
                       "images missing": 1, "images with a missing mask": 1, "empty masks": empty}
    assert unknown_cat > 0 and empty > 0
    for k, im in enumerate(sp.images):
        concepts, masks = sp.masks(k)
        got = {ix.concepts[c]: m.numpy() for c, m in zip(concepts.tolist(), masks)}
        assert got.keys() == expected[im["id"]].keys()
        for lab, m in got.items():
            assert np.array_equal(m, expected[im["id"]][lab]), (im["id"], lab)
    assert "sky" in ix.concepts
