"""`lavise preprocess` (src/lavise_cli/data/index.py) and the embeddings it maps concepts with.

On the real data: pair counts and masks checked against pycocotools itself, and the panoptic
PNGs decoded independently.  On generated data: masks not transposed, every bad-data case
counted and left out, unmapped concepts, the seeded seen/unseen split.  And the 100k-word GloVe
file: parsed once, then served memory-mapped from the store.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lavise_cli.data.index import seen_split, load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import clean_label, load_embedding, register_embedding
from lavise_cli.store import Store


# pycocotools 2.0.11 under numpy 2 warns on every decode; the warning is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@functools.lru_cache(maxsize=None)
def _coco(ann_file: Path) -> Any:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


@functools.lru_cache(maxsize=None)
def _pycocotools_pairs(coco: Any) -> dict[tuple[int, int], np.ndarray]:
    """(image_id, category_id) -> union of ``annToMask`` over that category's annotations,
    for the pairs whose union is non-empty (what pycocotools itself says the data holds)."""
    unions: dict[tuple[int, int], np.ndarray] = {}
    for ann in coco.anns.values():
        key = (ann["image_id"], ann["category_id"])
        m = coco.annToMask(ann)
        unions[key] = m if key not in unions else np.maximum(unions[key], m)
    return {k: v for k, v in unions.items() if v.any()}


def _assert_binary(mask: Any) -> None:
    arr = np.asarray(mask)
    assert arr.dtype == np.uint8, arr.dtype
    values = set(np.unique(arr).tolist())
    assert values <= {0, 1} and 1 in values, values


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------


def test_cli_preprocess_real_coco_tiny_and_panoptic(cli: Any, shared_data: Path, small_glove: Path) -> None:
    """The issue's sequence, through the command line, in a fresh store."""
    cli.json("download", "coco", "--from", str(shared_data / "coco_tiny"), "--name", "coco-tiny")
    cli.json("download", "coco-panoptic", "--from", str(shared_data / "coco128_panoptic"))
    cli.json("download", "glove", "--from", str(small_glove), "--name", "small")

    doc = cli.json("preprocess", "coco-tiny")
    assert set(doc["splits"]) == {"train", "val"}
    for split in ("train", "val"):
        coco = _coco(shared_data / "coco_tiny" / "annotations" / f"instances_{split}2017.json")
        s = doc["splits"][split]
        assert s["images"] == len(coco.imgs) == 80
        assert s["pairs"] == len(_pycocotools_pairs(coco))
        assert s["dropped"] == {}
    assert doc["concepts"] == 80 and isinstance(doc["unmapped"], list)
    # The small vocabulary knows a few COCO words only: the rest are reported, not dropped silently.
    assert "dog" not in doc["unmapped"] and "traffic light" not in doc["unmapped"]
    assert "giraffe" in doc["unmapped"] and len(doc["unmapped"]) == 80 - doc["mapped"]

    pan = cli.json("preprocess", "coco-panoptic")
    assert pan["concepts"] == 133 and {"train", "val"} <= set(pan["splits"])
    assert pan["splits"]["val"]["images"] == 100 and pan["splits"]["val"]["pairs"] > 0


def test_real_preprocess_pairs_equal_pycocotools(real_store: Store, real_store_info: Any, shared_data: Path) -> None:
    summary = real_store_info.summaries["coco-tiny"]
    ix = load_index(real_store, "coco-tiny")
    assert len(ix.concepts) == summary["concepts"] == 80
    for split in ("train", "val"):
        coco = _coco(shared_data / "coco_tiny" / "annotations" / f"instances_{split}2017.json")
        expected = _pycocotools_pairs(coco)
        assert summary["splits"][split]["pairs"] == len(expected)
        sp = ix.splits[split]
        got = {(sp.images[i]["id"], ix.concepts[c]) for i, c in zip(sp.pair_image.tolist(), sp.pair_concept.tolist())}
        assert len(got) == len(sp.rles)  # no duplicate pair
        assert got == {(iid, clean_label(coco.cats[cid]["name"])) for iid, cid in expected}


def test_real_masks_equal_union_of_ann_to_mask(real_store: Store, shared_data: Path) -> None:
    ix = load_index(real_store, "coco-tiny")
    n_crowd = 0
    for split in ("train", "val"):
        coco = _coco(shared_data / "coco_tiny" / "annotations" / f"instances_{split}2017.json")
        expected = _pycocotools_pairs(coco)
        sp = ix.splits[split]
        crowd_imgs = {a["image_id"] for a in coco.anns.values() if a["iscrowd"]}
        assert crowd_imgs, "coco_tiny is documented to hold crowd RLE annotations"
        chosen = [i for i, im in enumerate(sp.images) if im["id"] in crowd_imgs] + list(range(6))
        for i in chosen:
            im = sp.images[i]
            concepts, masks = sp.masks(i)
            assert masks.shape[1:] == (im["height"], im["width"])
            assert (im["height"], im["width"]) == (coco.imgs[im["id"]]["height"], coco.imgs[im["id"]]["width"])
            by_label = {clean_label(coco.cats[cid]["name"]): m for (iid, cid), m in expected.items() if iid == im["id"]}
            assert sorted(ix.concepts[c] for c in concepts.tolist()) == sorted(by_label)
            for c, m in zip(concepts.tolist(), masks):
                _assert_binary(m.numpy())
                np.testing.assert_array_equal(m.numpy(), by_label[ix.concepts[c]])
            n_crowd += im["id"] in crowd_imgs
    assert n_crowd >= 10  # 6 train + 11 val crowd annotations in coco_tiny


def test_real_panoptic_masks_equal_png_segments(real_store: Store, real_store_info: Any, shared_data: Path) -> None:
    root = shared_data / "coco128_panoptic"
    ix = load_index(real_store, "coco-panoptic")
    summary = real_store_info.summaries["coco-panoptic"]
    for split in ("train", "val"):
        d = json.loads((root / "annotations" / f"panoptic_{split}2017.json").read_text())
        assert len(d["categories"]) == 133
        cat_label = {c["id"]: clean_label(c["name"]) for c in d["categories"]}
        assert set(cat_label.values()) <= set(ix.concepts)
        anns = {a["image_id"]: a for a in d["annotations"]}
        sp = ix.splits[split]
        assert summary["splits"][split]["images"] == len(sp.images) == len(d["images"]) == 100
        # The grayscale image of each split is converted and kept (and counted).
        assert summary["splits"][split]["dropped"] == {"images converted from L (kept)": 1}
        for i in range(0, 100, 12):
            im = sp.images[i]
            ann = anns[im["id"]]
            rgb = np.asarray(Image.open(root / "annotations" / f"panoptic_{split}2017" / ann["file_name"])
                             .convert("RGB"), dtype=np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            segs: dict[str, list[int]] = defaultdict(list)
            for s in ann["segments_info"]:
                segs[cat_label[s["category_id"]]].append(s["id"])
            expected = {lab: np.isin(ids, seg).astype(np.uint8) for lab, seg in segs.items()}
            expected = {lab: m for lab, m in expected.items() if m.any()}
            concepts, masks = sp.masks(i)
            assert masks.shape[1:] == ids.shape == (im["height"], im["width"])
            assert sorted(ix.concepts[c] for c in concepts.tolist()) == sorted(expected)
            for c, m in zip(concepts.tolist(), masks):
                _assert_binary(m.numpy())
                np.testing.assert_array_equal(m.numpy(), expected[ix.concepts[c]])
    # Things and stuff: 133 categories, stuff labels cleaned ("sky-other-merged" -> "sky").
    assert len(ix.concepts) == summary["concepts"] == 133
    assert {"sky", "grass", "wall", "person", "dog"} <= set(ix.concepts)


def test_real_cli_preprocess_is_cached(cli: Any, real_store: Store, real_store_info: Any) -> None:
    doc = cli.json("preprocess", "coco-tiny", home=real_store.root)
    assert doc["cached"] is True
    assert doc["splits"] == real_store_info.summaries["coco-tiny"]["splits"]
    for key in ("concepts", "unmapped", "mapped", "seen", "unseen"):
        assert doc[key] == real_store_info.summaries["coco-tiny"][key]
    table = cli("preprocess", "coco-tiny", home=real_store.root)
    assert table.exit_code == 0 and "is current" in table.stderr
    assert "(image, concept) pairs" in table.stdout and "val" in table.stdout


def test_real_seen_split(real_store: Store, real_store_info: Any) -> None:
    for name in ("coco-tiny", "coco-panoptic"):
        s = real_store_info.summaries[name]
        ix = load_index(real_store, name)
        assert sum(ix.seen) == s["seen"] == round(0.7 * sum(ix.mapped))
        assert not any(seen and not mapped for seen, mapped in zip(ix.seen, ix.mapped))
        assert s["unseen"] == sum(ix.mapped) - sum(ix.seen)
    assert real_store_info.summaries["coco-tiny"]["seen"] == 56


# ----------------------------------------------------------------------------------------------
# Generated data: geometry
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_store(store: Store, small_glove: Path) -> Store:
    register_embedding(store, small_glove, name="small")
    return store


def test_masks_not_transposed_on_non_square_image(small_store: Store, make_coco: Any) -> None:
    register_coco(small_store, make_coco(), "gen")  # default split: image 1 is 40 wide x 24 high
    s = preprocess(small_store, "gen", workers=1)
    assert s["splits"]["val"] == {"images": 3, "pairs": 6, "concepts": 5, "pairs_unmapped": 0, "dropped": {}}
    ix = load_index(small_store, "gen")
    sp = ix.splits["val"]
    assert sp.images[0] == {"id": 1, "file": "val_000001.jpg", "height": 24, "width": 40}
    concepts, masks = sp.masks(0)
    assert [ix.concepts[c] for c in concepts.tolist()] == ["person", "car"]
    assert masks.shape == (2, 24, 40)
    person = masks[0].numpy()
    _assert_binary(person)
    # The L: a vertical bar x 2..8, y 2..18 and a foot x 2..20, y 12..18 (top-left of the image).
    assert person[5, 4] == 1 and person[15, 15] == 1 and person[15, 4] == 1
    assert person[4, 15] == 0 and person[20, 4] == 0 and person[5, 30] == 0
    inner = np.zeros((24, 40), bool)
    inner[3:17, 3:7] = True
    inner[13:17, 3:19] = True
    near = np.zeros((24, 40), bool)
    near[1:19, 1:9] = True
    near[11:19, 1:21] = True
    assert person[inner].all() and not person[~near].any()
    assert 0.9 * 156 <= person.sum() <= 1.1 * 156  # 6*16 + 12*6 - overlap = exact area of the L
    car = masks[1].numpy()  # x 25..38, y 5..20: right half
    assert car[12, 30] == 1 and car[6, 4] == 0 and car[:, :20].sum() == 0

    # The crowd RLE (column-major counts) of the 48 x 30 image decodes to exactly its mask.
    concepts, masks = sp.masks(2)
    crowd = np.zeros((30, 48), np.uint8)
    crowd[4:20, 25:45] = 1
    by = {ix.concepts[c]: m.numpy() for c, m in zip(concepts.tolist(), masks)}
    assert set(by) == {"person", "cat"}
    np.testing.assert_array_equal(by["person"], crowd)

    # Two dog instances in image 2: one mask, their union.
    concepts, masks = sp.masks(1)
    by = {ix.concepts[c]: m.numpy() for c, m in zip(concepts.tolist(), masks)}
    assert by["dog"][6, 6] == 1 and by["dog"][24, 24] == 1 and by["dog"][6, 24] == 0


# ----------------------------------------------------------------------------------------------
# Generated data: bad data never crashes a run
# ----------------------------------------------------------------------------------------------

SQUARE = [2, 2, 12, 2, 12, 12, 2, 12]
OK_IMAGE = {"id": 1, "file_name": "ok.jpg", "width": 40, "height": 24}
BAD_CASES = ["missing image file", "truncated jpeg", "not an image", "grayscale", "cmyk", "rgba png",
             "size differs", "unknown image id", "zero-area polygon", "rle of zeros", "unknown category id"]


def _bad_case(case: str, mk: Any) -> tuple[Any, list[dict[str, Any]], dict[str, int], list[int], int]:
    """(second image or None, extra annotations, expected dropped, image ids kept, pairs)."""

    def img(kind: str, name: str = "bad.jpg", **kw: Any) -> dict[str, Any]:
        return {"id": 2, "file_name": name, "width": 40, "height": 24, "kind": kind, **kw}

    cat_on_2 = [mk.polygon(2, 2, 17, SQUARE)]
    zero = np.zeros((24, 40), np.uint8)
    return {
        "missing image file": (img("missing"), cat_on_2, {"images missing": 1}, [1], 1),
        "truncated jpeg": (img("truncated"), cat_on_2, {"images corrupt": 1}, [1], 1),
        "not an image": (img("garbage"), cat_on_2, {"images corrupt": 1}, [1], 1),
        "grayscale": (img("gray"), cat_on_2, {"images converted from L (kept)": 1}, [1, 2], 2),
        "cmyk": (img("cmyk"), cat_on_2, {"images converted from CMYK (kept)": 1}, [1, 2], 2),
        "rgba png": (img("rgba", "bad.png"), cat_on_2, {"images converted from RGBA (kept)": 1}, [1, 2], 2),
        "size differs": (img("rgb", file_size=(40, 30)), cat_on_2,
                         {"images whose size differs from the annotation": 1}, [1], 1),
        "unknown image id": (None, [mk.polygon(2, 999, 17, SQUARE)], {"annotations with unknown image": 1}, [1], 1),
        "zero-area polygon": (None, [mk.polygon(2, 1, 17, [10, 10, 20, 10, 30, 10])], {"empty masks": 1}, [1], 1),
        "rle of zeros": (None, [mk.crowd(2, 1, 17, zero)], {"empty masks": 1}, [1], 1),
        "unknown category id": (None, [mk.polygon(2, 1, 77, SQUARE)], {"annotations with unknown category": 1},
                                [1], 1),
    }[case]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_counted_and_left_out(small_store: Store, make_coco: Any, case: str) -> None:
    image, anns, dropped, kept, pairs = _bad_case(case, make_coco)
    images = [OK_IMAGE] + ([image] if image else [])
    root = make_coco(images=images, annotations=[make_coco.polygon(1, 1, 18, SQUARE)] + anns)
    register_coco(small_store, root, "bad")
    s = preprocess(small_store, "bad", workers=1)
    assert s["splits"]["val"]["dropped"] == dropped
    assert s["splits"]["val"]["pairs"] == pairs
    sp = load_index(small_store, "bad").splits["val"]
    assert [im["id"] for im in sp.images] == kept
    assert s["splits"]["val"]["images"] == len(kept)
    for i in range(len(sp.images)):
        _, masks = sp.masks(i)
        assert len(masks) and all(m.any() for m in masks)  # no empty mask stored


def test_cli_all_bad_data_at_once(cli: Any, small_glove: Path, make_coco: Any) -> None:
    kinds = ["missing", "truncated", "garbage", "gray", "cmyk", "rgba"]
    images = [OK_IMAGE] + [{"id": 10 + k, "file_name": f"{kind}.{'png' if kind == 'rgba' else 'jpg'}",
                            "width": 40, "height": 24, "kind": kind} for k, kind in enumerate(kinds)]
    poly = make_coco.polygon
    anns = [poly(1, 1, 18, SQUARE)] + [poly(10 + k, 10 + k, 18, SQUARE) for k in range(len(kinds))]
    anns += [poly(50, 999, 18, SQUARE), poly(51, 1, 77, SQUARE), poly(52, 1, 17, [10, 10, 20, 10, 30, 10]),
             make_coco.crowd(53, 1, 3, np.zeros((24, 40), np.uint8)), poly(54, 1, 90, SQUARE)]
    cats = make_coco.default_categories + [{"id": 90, "name": "zzqx blorf", "supercategory": "none"}]
    root = make_coco(images=images, annotations=anns, categories=cats)
    cli.json("download", "coco", "--from", str(root), "--name", "bad")
    cli.json("download", "glove", "--from", str(small_glove))
    doc = cli.json("preprocess", "bad")
    val = doc["splits"]["val"]
    assert val["dropped"] == {
        "images missing": 1,
        "images corrupt": 2,
        "images converted from L (kept)": 1,
        "images converted from CMYK (kept)": 1,
        "images converted from RGBA (kept)": 1,
        "annotations with unknown image": 1,
        "annotations with unknown category": 1,
        "empty masks": 2,
    }
    assert val["images"] == 4  # ok, gray, cmyk, rgba
    assert val["pairs"] == 5  # dog in each of the 4 kept images + zzqx blorf in image 1
    assert val["pairs_unmapped"] == 1
    assert doc["unmapped"] == ["zzqx blorf"] and doc["concepts"] == 6 and doc["mapped"] == 5
    # The table shows every reason and the unmapped concept.
    table = cli("preprocess", "bad", "--force")
    assert table.exit_code == 0, table.output
    flat = " ".join(table.stdout.split())
    for reason in val["dropped"]:
        assert reason in flat, reason
    assert "unmapped" in flat and "zzqx blorf" in flat


def test_dropped_images_are_named_in_dropped_txt(cli: Any, small_glove: Path, make_coco: Any) -> None:
    kinds = ["missing", "truncated", "garbage", "gray"]
    images = [OK_IMAGE] + [{"id": 10 + k, "file_name": f"{kind}.jpg", "width": 40, "height": 24, "kind": kind}
                           for k, kind in enumerate(kinds)]
    images.append({"id": 20, "file_name": "wrong-size.jpg", "width": 40, "height": 24, "file_size": (40, 30)})
    anns = [make_coco.polygon(1 + k, im["id"], 18, SQUARE) for k, im in enumerate(images)]
    root = make_coco(images=images, annotations=anns)
    cli.json("download", "coco", "--from", str(root), "--name", "bad")
    cli.json("download", "glove", "--from", str(small_glove))
    doc = cli.json("preprocess", "bad")
    listed = Path(doc["dropped_list"])
    assert listed == Path(cli.json("store", "--kind", "indexes")["entries"][0]["path"]) / "dropped.txt"
    rows = [ln.split("\t") for ln in listed.read_text().splitlines() if not ln.startswith("#")]
    img_dir = root / "val2017"
    assert sorted(rows) == sorted([
        ["val", str(img_dir / "missing.jpg"), "image missing"],
        ["val", str(img_dir / "truncated.jpg"), "image corrupt"],
        ["val", str(img_dir / "garbage.jpg"), "image corrupt"],
        ["val", str(img_dir / "wrong-size.jpg"), "image is 40x30, the annotation says 40x24"],
    ])  # the grayscale image is converted and kept: not listed
    assert doc["dropped_images"] == 4
    # The table run says where, in one line.
    table = cli("preprocess", "bad", "--force")
    assert table.exit_code == 0, table.output
    (line,) = [ln for ln in table.stdout.splitlines() if "dropped.txt" in ln]
    assert "4 image(s) left out" in line and str(listed) in line
    # A clean dataset has no list.
    clean = make_coco(root.parent / "clean")
    cli.json("download", "coco", "--from", str(clean), "--name", "clean")
    doc = cli.json("preprocess", "clean")
    assert "dropped_list" not in doc
    assert not (Path(cli.json("store", "--kind", "indexes")["entries"][1]["path"]) / "dropped.txt").exists()


def test_concept_missing_from_vocabulary_is_unmapped(small_store: Store, make_coco: Any) -> None:
    cats = make_coco.default_categories + [{"id": 90, "name": "zzqx blorf"}, {"id": 91, "name": "zzqx dog"}]
    poly = make_coco.polygon
    root = make_coco(annotations=[poly(1, 1, 90, SQUARE), poly(2, 1, 91, SQUARE), poly(3, 2, 18, SQUARE)],
                     categories=cats)
    register_coco(small_store, root, "gen")
    s = preprocess(small_store, "gen", workers=1)
    assert s["unmapped"] == ["zzqx blorf"]  # "zzqx dog" maps through its known token
    ix = load_index(small_store, "gen")
    k = ix.concepts.index("zzqx blorf")
    assert ix.mapped[k] is False and ix.seen[k] is False and ix.unmapped == ["zzqx blorf"]
    assert ix.mapped[ix.concepts.index("zzqx dog")] is True
    assert s["splits"]["val"]["pairs_unmapped"] == 1 and s["mapped"] == 6


def test_cli_preprocess_any_instances_file_by_path(cli: Any, small_glove: Path, make_coco: Any) -> None:
    root = make_coco()
    cli.json("download", "glove", "--from", str(small_glove))
    ann = root / "annotations" / "instances_val2017.json"
    doc = cli.json("preprocess", str(ann), "--images", str(root / "val2017"), "--name", "custom")
    assert doc["dataset"] == "custom" and set(doc["splits"]) == {"val"}
    assert doc["splits"]["val"]["images"] == 3 and doc["splits"]["val"]["pairs"] == 6
    assert "custom" in {e["name"] for e in cli.json("store", "--kind", "datasets")["entries"]}
    result = cli("preprocess", str(ann))  # no --images: one clear line
    assert result.exit_code != 0 and "--images" in result.stderr and "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# The seen / unseen split
# ----------------------------------------------------------------------------------------------


def test_seen_split_is_seeded_without_replacement(small_store: Store, make_coco: Any) -> None:
    words = ["horse", "sheep", "cow", "bird", "bus", "truck", "bicycle", "boat", "chair", "pizza"]
    cats = make_coco.default_categories + [{"id": 100 + k, "name": w} for k, w in enumerate(words)]
    cats.append({"id": 200, "name": "zzqx blorf"})
    register_coco(small_store, make_coco(categories=cats), "gen")
    n_mapped = 15

    def seen(seed: int, fraction: float = 0.7) -> list[bool]:
        s = preprocess(small_store, "gen", seed=seed, seen_fraction=fraction, workers=1, force=True)
        ix = load_index(small_store, "gen")
        assert s["mapped"] == sum(ix.mapped) == n_mapped
        assert s["seen"] == sum(ix.seen) and s["unseen"] == n_mapped - sum(ix.seen)
        assert not ix.seen[ix.concepts.index("zzqx blorf")]
        return ix.seen

    a, b, c = seen(0), seen(0), seen(1)
    assert a == b
    assert a != c
    assert sum(a) == sum(c) == round(0.7 * n_mapped) == 10
    assert sum(seen(3, 0.5)) == round(0.5 * n_mapped)
    assert sum(seen(3, 1.0)) == n_mapped
    # Many seeds and sizes: always exactly round(f * n) distinct seen concepts among the mapped ones.
    seeds_differ = False
    for n in range(1, 40):
        mapped = [k % 5 != 4 for k in range(n)]
        for seed in range(5):
            split = seen_split(mapped, 0.7, seed)
            assert sum(split) == round(0.7 * sum(mapped))
            assert all(m for s_, m in zip(split, mapped) if s_)
            seeds_differ |= split != seen_split(mapped, 0.7, seed + 1)
            assert split == seen_split(mapped, 0.7, seed)
    assert seeds_differ


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_multi_word_concept_is_normalised_mean_of_tokens(store: Store, small_glove: Path) -> None:
    raw = {ln.split()[0]: np.asarray(ln.split()[1:], dtype=np.float64) for ln in small_glove.read_text().splitlines()}
    register_embedding(store, small_glove, name="small")
    emb = load_embedding(store)
    assert emb.name == "small" and emb.dim == 16 and len(emb.words) == len(raw)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb.vectors), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb.phrase_vector("dog"), _unit(raw["dog"]), atol=1e-5)
    for phrase, toks in [("traffic light", ["traffic", "light"]), ("stop sign", ["stop", "sign"]),
                         ("fire hydrant", ["fire", "hydrant"]), ("Hot-Dog", ["hot", "dog"])]:
        expected = _unit(np.mean([_unit(raw[t]) for t in toks], axis=0))
        got = emb.phrase_vector(phrase)
        assert got is not None
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got), 1.0, atol=1e-6)
    assert emb.phrase_vector("zzqx blorf") is None
    vecs, ok = emb.phrase_vectors(["dog", "zzqx blorf", "traffic light"])
    assert ok == [0, 2] and vecs.shape == (2, 16)


def test_embedding_is_read_without_gensim_exactly_as_gensim_reads_it(store: Store, small_glove: Path) -> None:
    """load_embedding reads the store's KeyedVectors file itself (no gensim import): the same words,
    index and memory-mapped vectors as gensim's own load; a file it does not know goes to gensim."""
    import subprocess
    import sys

    from gensim.models import KeyedVectors

    from lavise_cli.embeddings import KV_FILE, _read_keyed_vectors

    entry = register_embedding(store, small_glove, name="small")
    emb = load_embedding(store, "small")
    kv = KeyedVectors.load(str(entry.path / KV_FILE), mmap="r")
    assert emb.words == list(kv.index_to_key) and emb.index == dict(kv.key_to_index)
    assert isinstance(emb.vectors, np.memmap) and np.array_equal(emb.vectors, kv.vectors)
    code = ("import sys; from lavise_cli.store import Store; from lavise_cli.embeddings import load_embedding; "
            f"e = load_embedding(Store({str(store.root)!r}), 'small'); print(len(e.words), 'gensim' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(kv.index_to_key)), "False"]
    # A KeyedVectors saved with its vectors inside the pickle: not ours to read, gensim loads it.
    other = store.root / "inline.kv"
    kv2 = KeyedVectors(vector_size=16)
    kv2.add_vectors(["dog", "cat"], np.eye(2, 16, dtype=np.float32))
    kv2.save(str(other), sep_limit=10 ** 9)
    assert _read_keyed_vectors(other) is None


def test_real_glove_parsed_once_then_memory_mapped(real_store: Store, real_store_info: Any,
                                                   glove_file: Path) -> None:
    first_s = real_store_info.timings["glove_register"]
    entry = real_store.get("embeddings", "glove50")
    assert entry.manifest["words"] == 100_000 and entry.manifest["dim"] == 50

    t0 = time.perf_counter()
    again = register_embedding(real_store, glove_file, name="glove50")
    second_s = time.perf_counter() - t0
    assert again.created == entry.created and again.manifest == entry.manifest  # served, not rebuilt

    t0 = time.perf_counter()
    emb = load_embedding(real_store, "glove50")
    load_s = time.perf_counter() - t0
    print(f"\nGloVe 6B 50d top-100k: first registration (parse) {first_s:.2f} s, "
          f"second registration (from the store) {second_s * 1000:.1f} ms, load_embedding {load_s * 1000:.1f} ms")
    assert second_s < first_s / 5
    v = emb.vectors
    assert isinstance(v, np.memmap) or isinstance(getattr(v, "base", None), (np.memmap, __import__("mmap").mmap))
    assert v.shape == (100_000, 50)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=1), 1.0, atol=1e-4)
    assert emb.words[:3] == ["the", ",", "."]  # frequency order kept

    # The stored vectors are the file's, normalised; phrases are normalised means.
    wanted = {"the", "dog", "traffic", "light", "hot"}
    raw: dict[str, np.ndarray] = {}
    with gzip.open(glove_file, "rt", encoding="utf-8") as fh:
        for line in fh:
            w, _, rest = line.partition(" ")
            if w in wanted:
                raw[w] = np.asarray(rest.split(), dtype=np.float64)
                if len(raw) == len(wanted):
                    break
    for w in ("the", "dog"):
        np.testing.assert_allclose(emb.phrase_vector(w), _unit(raw[w]), atol=1e-5)
    np.testing.assert_allclose(emb.phrase_vector("traffic light"),
                               _unit(_unit(raw["traffic"]) + _unit(raw["light"])), atol=1e-5)
    np.testing.assert_allclose(emb.phrase_vector("hot dog"), _unit(_unit(raw["hot"]) + _unit(raw["dog"])), atol=1e-5)
