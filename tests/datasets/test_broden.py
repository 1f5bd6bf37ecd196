"""Broden (NetDissect's format) as reference data: R + 256 G labels, whole-image scene/texture
labels, --categories, and the chain download --from -> preprocess -> train.

The folder is built exactly as NetDissect's joinseg.py documents and writes it (the README it puts
in every Broden folder): index.csv ``image,split,ih,iw,sh,sw,<categories>`` with ``;``-separated
PNG paths (relative to images/) or whole-image label numbers, label.csv
``number,name,category,frequency,coverage,syns``, category.csv and c_<category>.csv; a PNG's pixel
label is ``R + 256 * G`` (0: unlabelled), at the segmentation size ``sh x sw``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clear_error, write_glove
from lavise_cli.data.formats.broden import concept_name, decode_labels, nearest_rows
from lavise_cli.data.index import load_index, preprocess
from lavise_cli.download import register_broden
from lavise_cli.embeddings import register_embedding
from lavise_cli.store import Store
from lavise_cli.testing import colour_model_factory

CATEGORIES = ["color", "object", "material", "part", "scene", "texture"]  # joinseg's order: by first label
# number, name (as NetDissect names it), category; 300 > 255 needs the green channel.
LABELS = [(1, "wall", "object"), (2, "sky", "object"), (3, "red-c", "color"), (4, "wood", "material"),
          (5, "head", "part"), (6, "street-s", "scene"), (7, "striped", "texture"), (300, "dog", "object"),
          (8, "kitchen-s", "scene")]
WORDS = "the of wall sky red wood head street striped dog kitchen".split()
IH, IW, SH, SW = 12, 16, 6, 8  # the image is non-square; the segmentation is half its size


def _png(path: Path, labels: np.ndarray) -> None:
    """A Broden segmentation PNG: label = R + 256 * G."""
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb).save(path)


def _seg(rng: np.random.Generator, labels: list[int]) -> np.ndarray:
    """A segmentation of SH x SW: each label a random rectangle (later ones on top), the rest 0."""
    seg = np.zeros((SH, SW), np.int64)
    for lab in labels:
        y, x = int(rng.integers(0, SH - 2)), int(rng.integers(0, SW - 2))
        seg[y:y + int(rng.integers(2, 4)), x:x + int(rng.integers(2, 5))] = lab
    return seg


def make_broden(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> dict[str, Any]:
    """A Broden folder; returns what was written per image: {"file", "split", "segs": {cat: [array]},
    "numbers": {cat: [label]}} (for the tests' own expectations)."""
    rng = np.random.default_rng(seed)
    (root / "images" / "ade20k").mkdir(parents=True)
    rows, written = [], []
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        stem = f"ADE_{i:04d}"
        colour = (200, 30, 30) if i % 2 else (40, 160, 60)
        Image.new("RGB", (IW, IH), colour).save(root / "images" / "ade20k" / f"{stem}.jpg", quality=90)
        segs = {"object": [_seg(rng, [1, 2, 300] if i % 3 else [1, 300])], "part": [_seg(rng, [5])],
                "color": [_seg(rng, [3])], "material": [_seg(rng, [4])]}
        if i == 0:  # a second object layer (dominant first), its pixels united with the first's
            segs["object"].append(_seg(rng, [2]))
        numbers = {"scene": [6] if i % 2 else [8], "texture": [7] if i % 4 == 1 else []}
        row = {"image": f"ade20k/{stem}.jpg", "split": split, "ih": IH, "iw": IW, "sh": SH, "sw": SW}
        for cat, layers in segs.items():
            names = []
            for k, seg in enumerate(layers):
                fn = f"ade20k/{stem}_{cat}.png" if len(layers) == 1 else f"ade20k/{stem}_{cat}_{k + 1}.png"
                _png(root / "images" / fn, seg)
                names.append(fn)
            row[cat] = ";".join(names)
        for cat, nums in numbers.items():
            row[cat] = ";".join(str(n) for n in nums)
        rows.append(row)
        written.append({"file": row["image"], "split": split, "segs": segs, "numbers": numbers})
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "split", "ih", "iw", "sh", "sw"] + CATEGORIES)
        w.writeheader()
        w.writerows(rows)
    with open(root / "label.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for num, name, cat in LABELS:
            w.writerow([num, name, f"{cat}({len(rows)})", len(rows), "1.000000", ""])
    with open(root / "category.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for cat in CATEGORIES:
            nums = [n for n, _, c in LABELS if c == cat]
            w.writerow([cat, min(nums), max(nums), len(nums), len(rows)])
    for cat in CATEGORIES:
        with open(root / f"c_{cat}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            for code, (num, name, _) in enumerate([x for x in LABELS if x[2] == cat], start=1):
                w.writerow([code, num, name, len(rows), 1.0])
    return {"root": root, "images": written}


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "home")
    register_embedding(store, write_glove(tmp_path / "g.txt", WORDS), name="g")
    return store


def _upsampled(mask: np.ndarray) -> np.ndarray:
    """The test's own nearest-neighbour map of an SH x SW mask to IH x IW (exactly 2x here)."""
    return np.repeat(np.repeat(mask, IH // SH, axis=0), IW // SW, axis=1)


def test_label_is_red_plus_256_green_and_names_lose_their_suffix(tmp_path: Path) -> None:
    seg = np.array([[0, 1, 255], [256, 300, 1000]])
    _png(tmp_path / "s.png", seg)
    assert decode_labels(tmp_path / "s.png").tolist() == seg.tolist()
    assert concept_name("street-s") == "street" and concept_name("red-c") == "red"
    assert concept_name("t-shirt") == "t-shirt" and concept_name("wall") == "wall"
    assert nearest_rows(12, 6).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert nearest_rows(5, 2).tolist() == [0, 0, 1, 1, 1]  # centres 0.5..4.5 of 5 fall in 2 cells


def test_broden_masks_scene_texture_and_splits(tmp_path: Path) -> None:
    made = make_broden(tmp_path / "broden")
    store = _store(tmp_path)
    entry = register_broden(store, made["root"], "broden")
    assert entry.manifest["settings"]["categories"] == CATEGORIES
    summary = preprocess(store, "broden", workers=1)
    ix = load_index(store, "broden")
    assert sorted(ix.concepts) == sorted(["wall", "sky", "red", "wood", "head", "street", "striped", "dog", "kitchen"])
    assert summary["splits"]["train"]["images"] == 8 and summary["splits"]["val"]["images"] == 4
    checked_dog = 0
    for sp in ix.splits.values():
        for k, im in enumerate(sp.images):
            w = made["images"][im["id"] - 1]
            assert sp.image_path(k) == made["root"] / "images" / w["file"] and w["split"] == sp.split
            concepts, masks = sp.masks(k)
            got = {ix.concepts[c]: m.numpy().astype(bool) for c, m in zip(concepts.tolist(), masks)}
            assert all(m.shape == (IH, IW) for m in got.values())
            # Segmented labels: the union over the category's PNGs, at the image's size.
            for name, num, cat in (("dog", 300, "object"), ("wall", 1, "object"), ("sky", 2, "object"),
                                   ("head", 5, "part")):
                want = _upsampled(np.any([s == num for s in w["segs"][cat]], axis=0))
                if want.any():
                    assert np.array_equal(got[name], want), (name, im)
                    checked_dog += name == "dog"
                else:
                    assert name not in got
            # Scene and texture: whole-image labels.
            scene = "street" if 6 in w["numbers"]["scene"] else "kitchen"
            assert got[scene].all() and ("striped" in got) == (7 in w["numbers"]["texture"])
            if "striped" in got:
                assert got["striped"].all()
    assert checked_dog == 12  # label 300 (green channel 1) decoded in every image


def test_broden_category_selection(tmp_path: Path, cli: Any) -> None:
    made = make_broden(tmp_path / "broden", n_train=4, n_val=2)
    write_glove(tmp_path / "g.txt", WORDS)
    assert cli("download", "glove", "--from", tmp_path / "g.txt").exit_code == 0
    r = cli("download", "broden", "--from", made["root"], "--json")
    assert r.exit_code == 0, r.output
    r = cli("preprocess", "broden", "--categories", "object,color", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["broden_categories"] == ["color", "object"]
    ix = load_index(Store(cli.home), "broden")
    assert sorted(ix.concepts) == ["dog", "red", "sky", "wall"]
    # Scene only: the scene concepts, every mask the whole image.
    r = cli("preprocess", "broden", "--categories", "scene", "--json")
    assert r.exit_code == 0, r.output
    ix = load_index(Store(cli.home), "broden")
    assert sorted(ix.concepts) == ["kitchen", "street"]
    assert all(m.all() for sp in ix.splits.values() for k in range(len(sp.images)) for m in sp.masks(k)[1])
    _last_line_error(cli("preprocess", "broden", "--categories", "object,wheel"),
                     "error: --categories: wheel not in this Broden folder")
    assert_clear_error(cli("download", "broden"), "dlbroden.sh", "--from")
    _last_line_error(cli("download", "broden", "--from", tmp_path), "error: no Broden index.csv in")


def _last_line_error(result: Any, start: str) -> None:
    """A user mistake after an announcement: non-zero exit, no traceback, the last line the error."""
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr


FACTORY = colour_model_factory([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0], [0.3, 0.3, 0.3]])


def test_broden_preprocess_then_train(tmp_path: Path, cli: Any) -> None:
    made = make_broden(tmp_path / "broden")
    write_glove(tmp_path / "g.txt", WORDS)
    (tmp_path / "colours.py").write_text(FACTORY)
    assert cli("download", "glove", "--from", tmp_path / "g.txt").exit_code == 0
    assert cli("download", "broden", "--from", made["root"]).exit_code == 0
    r = cli("preprocess", "broden", "--categories", "object,part,material,color")
    assert r.exit_code == 0, r.output
    doc = cli.json("train", f"{tmp_path / 'colours.py'}:build", "broden", "--layer", "feat", "--weights", "none",
                   "--epochs", "3", "--name", "bro")
    assert doc["explainer"] == "bro" and doc["pairs"]["train"] > 0 and doc["epochs"] >= 1
    meta = json.loads((Path(doc["path"]).parent / "manifest.json").read_text())
    assert meta["settings"]["datasets"] == ["broden"]
    from lavise_cli.explainer import load_explainer

    ex = load_explainer(Path(doc["path"]))
    assert sorted(ex.meta["concepts"]) == ["dog", "head", "red", "sky", "wall", "wood"]
