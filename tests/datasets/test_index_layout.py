"""The index's layout (src/lavise_cli/data/columnar.py, index.py) and the streamed JSON reader.

An index written by the previous version (one JSON per split, ``tests/data/index_v2/``, written
by index version 2 for ``make_coco``'s default split) is refused with what to run and rebuilt by
``preprocess`` into the same images, pairs and masks; columns written in chunks read back exactly;
a damaged column is refused; the streamed reader gives what ``json.load`` gives.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lavise_cli.data import jsonstream
from lavise_cli.data.columnar import SplitColumns, SplitWriter
from lavise_cli.data.index import INDEX_VERSION, load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.errors import DataError, LaviseError
from lavise_cli.store import Store

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

V2 = Path(__file__).parents[1] / "data" / "index_v2"


@pytest.fixture
def gen(store: Store, small_glove: Path, make_coco: Any) -> Store:
    register_embedding(store, small_glove, name="small")
    register_coco(store, make_coco(), "gen")
    return store


def test_index_of_the_previous_version_is_rebuilt_not_misread(gen: Store) -> None:
    preprocess(gen, "gen", workers=1)
    inputs = gen.manifest("indexes", "gen")["inputs"]
    assert inputs["version"] == INDEX_VERSION == 3
    # Put the version-2 index in its place, as the previous lavise left it (same inputs but the version).
    with gen.writing("indexes", "gen", inputs={**inputs, "version": 2},
                     settings={"format": "coco", "seen_fraction": 0.7, "seed": 0}) as tmp:
        for f in V2.iterdir():
            shutil.copy(f, tmp / f.name)
    with pytest.raises(LaviseError, match=r"index version 2.*run `lavise preprocess gen`"):
        load_index(gen, "gen")
    assert not gen.is_current("indexes", "gen", inputs)  # what this version asks for is not what is there
    s = preprocess(gen, "gen", workers=1)
    assert s["cached"] is False  # the old index is not taken as current
    assert not (gen.path("indexes", "gen") / "val.json").exists()
    sp = load_index(gen, "gen").splits["val"]
    old = json.loads((V2 / "val.json").read_text())
    # The rebuilt index holds exactly what version 2 held: images, pairs and every mask's RLE.
    assert list(sp.images) == old["images"]
    assert sp.pair_image.tolist() == old["pair_image"]
    assert sp.pair_concept.tolist() == old["pair_concept"]
    assert list(sp.rles) == old["rle"]


def test_columns_written_in_chunks_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = SplitWriter(tmp_path / "s")
    want = []
    for i in range(300):
        k = int(rng.integers(0, 4))
        concepts = sorted(rng.choice(50, size=k, replace=False).tolist())
        rles = [bytes(rng.integers(48, 111, size=int(rng.integers(1, 30))).astype(np.uint8)) for _ in concepts]
        name = f"d/{i}_é.jpg"
        w.add_image(1000 + i, name, 10 + i, 20 + i, concepts, rles)
        want.append((name, concepts, rles))
    w.close({"empty masks": 2})
    cols = SplitColumns(tmp_path / "s")
    assert (cols.n_images, cols.dropped) == (300, {"empty masks": 2})
    assert cols.n_pairs == sum(len(c) for _, c, _ in want)
    for i, (name, concepts, rles) in enumerate(want):
        assert cols.image(i) == {"id": 1000 + i, "file": name, "height": 10 + i, "width": 20 + i}
        a, b = int(cols["pair_offsets"][i]), int(cols["pair_offsets"][i + 1])
        assert cols["pair_concept"][a:b].tolist() == concepts
        assert [cols.rle(k) for k in range(a, b)] == rles
    # The byte columns are read by positional reads, not through a mapping: what a pass over every
    # image reads stays in the page cache instead of piling up in this process's resident set.
    maps = Path("/proc/self/maps")
    if maps.exists():
        mapped = maps.read_text()
        assert str(tmp_path / "s" / "rle.npy") not in mapped and str(tmp_path / "s" / "file.npy") not in mapped
        assert str(tmp_path / "s" / "rle_offsets.npy") in mapped  # the numeric columns are mapped
    # A forked process (a decoding worker) opens the files itself and reads the same bytes.
    if hasattr(os, "fork"):
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.map(_rles_of, [(cols, i) for i in (0, 150, 299)])
        assert got == [[bytes(r) for r in want[i][2]] for i in (0, 150, 299)]


def _rles_of(job: tuple[SplitColumns, int]) -> list[bytes]:
    cols, i = job
    a, b = int(cols["pair_offsets"][i]), int(cols["pair_offsets"][i + 1])
    return [cols.rle(k) for k in range(a, b)]


def test_damaged_index_is_refused_with_what_to_do(gen: Store) -> None:
    preprocess(gen, "gen", workers=1)
    f = gen.path("indexes", "gen") / "val" / "rle_offsets.npy"
    f.write_bytes(f.read_bytes()[:-8])  # one row short
    with pytest.raises(LaviseError, match=r"damaged.*lavise preprocess gen --force"):
        load_index(gen, "gen")


def test_held_out_part_reads_its_own_pairs(gen: Store) -> None:
    preprocess(gen, "gen", workers=1)
    ix = load_index(gen, "gen")
    whole, ref, out = ix.splits["val"], ix.splits["reference"], ix.splits["held-out"]
    by_id = {im["id"]: i for i, im in enumerate(whole.images)}
    for part in (ref, out):
        for i, im in enumerate(part.images):
            j = by_id[im["id"]]
            c1, m1 = part.masks(i)
            c2, m2 = whole.masks(j)
            assert c1.tolist() == c2.tolist() and bool((m1 == m2).all())
            assert [part.rles[k] for k in part.image_pairs(i)] == [whole.rles[k] for k in whole.image_pairs(j)]
            assert part.pair_concept[part.offsets[i]:part.offsets[i + 1]].tolist() == c2.tolist()


def test_streamed_json_equals_json_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"info": {"year": 2017}, "images": [{"id": i, "v": 12345678901234 + i} for i in range(50)],
           "skip": [[1, 2], {"a": "]}"}], "annotations": [], "n": 1234567, "categories": [{"x": "ü\"["}]}
    p = tmp_path / "d.json"
    p.write_text(json.dumps(doc, indent=2))
    monkeypatch.setattr(jsonstream, "READ", 7)  # elements and numbers cut across reads
    got: dict[str, list[Any]] = {"images": [], "annotations": [], "categories": []}
    top = jsonstream.stream_arrays(p, {k: v.append for k, v in got.items()})
    assert got == {k: doc[k] for k in got}
    assert top["info"] == doc["info"] and top["n"] == 1234567 and top["skip"] == 2
    p.write_text(json.dumps(doc)[:-20])
    with pytest.raises(DataError, match="not valid JSON"):
        jsonstream.stream_arrays(p, {})


def test_streamed_json_list_equals_json_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A top-level array (Visual Genome's files), one element at a time, cut across reads."""
    doc = [{"image_id": i, "objects": [{"x": i, "names": ["a],\"b"]}] * (i % 4)} for i in range(40)]
    doc += [12345678901234, [1, [2, {}]], "ü\"[", None, -0.5]
    p = tmp_path / "l.json"
    p.write_text(json.dumps(doc, indent=1))
    monkeypatch.setattr(jsonstream, "READ", 7)
    got: list[Any] = []
    assert jsonstream.stream_list(p, got.append) == len(doc) and got == doc
    assert jsonstream.stream_list(p) == len(doc)  # only counted
    p.write_text(" [ ] ")
    assert jsonstream.stream_list(p, got.append) == 0
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(jsonstream.NotAList):
        jsonstream.stream_list(p)
    for damaged in (json.dumps(doc)[:-9], json.dumps(doc) + " []", "[1 2]", "", "\xff"):
        p.write_text(damaged, encoding="latin-1")
        with pytest.raises(DataError, match="not valid JSON.*damaged") as e:
            jsonstream.stream_list(p)
        assert not isinstance(e.value, jsonstream.NotAList)
