"""The paper's experiments as commands: several layers from one pass and one evaluate table
(Table 3), one explainer per seen fraction from one pass and the unseen recall per fraction
(annotation rate, Fig. 7); and an index written by the previous index version is rebuilt, never read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import Cli, assert_clear_error
from lavise_cli.data.index import INDEX_VERSION, load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.errors import LaviseError
from lavise_cli.store import Store
from lavise_cli.testing import colour_model_factory

FACTORY = colour_model_factory([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0], [0.3, 0.3, 0.3]])
CATS = [{"id": 1, "name": "dog", "supercategory": "a"}, {"id": 2, "name": "cat", "supercategory": "a"},
        {"id": 3, "name": "car", "supercategory": "v"}]
FILL = {1: (230, 20, 20), 2: (20, 220, 30), 3: (30, 30, 230)}
WORDS = "the of dog cat car sky grass tree".split()


def _write_split(root: Path, split: str, n: int, seed: int) -> None:
    """A COCO split of 32x32 images, each with 1-3 coloured rectangles of the three categories."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        im = Image.new("RGB", (32, 32), (120, 120, 120))
        dr = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(1, 4))
            x0, y0 = (int(v) for v in rng.integers(0, 20, 2))
            w, h = (int(v) for v in rng.integers(6, 13, 2))
            dr.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=FILL[c])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "iscrowd": 0,
                         "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]], "area": float(w * h),
                         "bbox": [x0, y0, w, h]})
        im.save(root / f"{split}2017" / f"{i:05d}.png")
        images.append({"id": i + 1, "file_name": f"{i:05d}.png", "width": 32, "height": 32})
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS}))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("experiments")
    store = Store(base / "home")
    _write_split(base / "coco", "train", 16, seed=1)
    _write_split(base / "coco", "val", 10, seed=2)
    register_coco(store, base / "coco", "toy")
    rng = np.random.default_rng(0)
    glove = base / "g.txt"
    glove.write_text("".join(w + " " + " ".join(f"{x:.5f}" for x in rng.normal(size=8)) + "\n" for w in WORDS))
    register_embedding(store, glove, name="g8")
    preprocess(store, "toy", embedding="g8", workers=1)
    (base / "colours.py").write_text(FACTORY)
    return {"store": store, "cli": Cli(base / "home"), "model": f"{base / 'colours.py'}:build"}


def _count_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the feature passes over the reference images (calls of the runner from passes/features.py)."""
    from lavise_cli.passes import features

    calls: list[int] = []
    real = features.run_pass

    def counted(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(features, "run_pass", counted)
    return calls


def test_layers_share_one_pass_and_evaluate_compares_explainers(toy: dict[str, Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cli, model = toy["cli"], toy["model"]
    passes = _count_passes(monkeypatch)
    doc = cli.json("train", model, "toy", "--weights", "none", "--layer", "act", "--layer", "feat", "--epochs", "3",
                   "--name", "t3")
    assert [e["explainer"] for e in doc["explainers"]] == ["t3-act", "t3-feat"]
    assert len(passes) == 1  # both layers' features from one pass over the reference images
    ev = cli.json("evaluate", "-e", "t3-act", "-e", "t3-feat", "--methods", "attention,original",
                  "--vocab", "concepts", "--recall", "1,2")
    assert [e["explainer"] for e in ev["explainers"]] == ["t3-act", "t3-feat"]
    assert [e["layer"] for e in ev["explainers"]] == ["act", "feat"]
    assert all(set(e["methods"]) == {"attention", "original"} for e in ev["explainers"])
    single = cli.json("evaluate", "-e", "t3-feat", "--methods", "attention,original", "--vocab", "concepts",
                      "--recall", "1,2")
    assert single["methods"] == ev["explainers"][1]["methods"]  # an entry is that explainer's own evaluation
    r = cli("evaluate", "-e", "t3-act", "-e", "t3-feat", "--methods", "attention,original", "--vocab", "concepts",
            "--recall", "1,2")
    assert r.exit_code == 0, r.output
    recall_table = r.stdout.split("diversity")[0]
    rows = [ln.split("│")[1:3] for ln in recall_table.splitlines() if "attention" in ln or "original" in ln]
    # one row per explainer x method, in one table, the explainers numbered as the legend says
    assert [[c.strip() for c in row] for row in rows] == [["1", "attention"], ["1", "original"], ["2", "attention"],
                                                          ["2", "original"]]
    assert "…" not in recall_table and "#1 t3-act (" in r.stdout and "#2 t3-feat (" in r.stdout
    assert_clear_error(cli("evaluate", "-e", "t3-act", "-e", "nope"), "nope")


def test_seen_fractions_train_from_one_pass_and_report_unseen_recall(toy: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cli, model, store = toy["cli"], toy["model"], toy["store"]
    passes = _count_passes(monkeypatch)
    doc = cli.json("train", model, "toy", "--weights", "none", "--layer", "feat", "--epochs", "3",
                   "--seen-fraction", "0.3,0.7", "--name", "rate")
    names = [e["explainer"] for e in doc["explainers"]]
    assert names == ["rate-seen0.3", "rate-seen0.7"]
    assert len(passes) <= 1  # one pass (none when the features are cached already)
    from lavise_cli.explainer import load_explainer

    metas = [load_explainer(Path(e["path"])).meta for e in doc["explainers"]]
    trained = [set(m["trained_concepts"]) for m in metas]
    assert [len(t) for t in trained] == [round(0.3 * 3), round(0.7 * 3)] and trained[0] < trained[1]
    assert [m["settings"]["seen_fraction"] for m in metas] == [0.3, 0.7]
    split = load_index(store, "toy").splits["train"]
    concepts = load_index(store, "toy").concepts
    for e, t in zip(doc["explainers"], trained):
        assert e["pairs"]["train_and_val"] == sum(concepts[c] in t for c in split.pair_concept.tolist())
    from lavise_cli import methods

    gt_calls: list[int] = []
    real_gt = methods.ground_truth
    monkeypatch.setattr(methods, "ground_truth", lambda *a, **kw: gt_calls.append(1) or real_gt(*a, **kw))
    ev = cli.json("evaluate", "-e", "rate-seen0.3", "-e", "rate-seen0.7", "--vocab", "concepts", "--recall", "1,2")
    assert len(gt_calls) == 1  # one layer, one target pass: its ground truth computed once for both
    rate = ev["annotation_rate"]
    assert [(r["seen_fraction"], r["explainer"]) for r in rate] == [(0.3, "rate-seen0.3"), (0.7, "rate-seen0.7")]
    for r, e in zip(rate, ev["explainers"]):
        assert e["novel_concepts"] and r["recall@1"] == e["methods"]["attention"]["unseen"]["recall@1"]
    out = cli("evaluate", "-e", "rate-seen0.3", "-e", "rate-seen0.7", "--vocab", "concepts", "--recall", "1,2")
    assert out.exit_code == 0 and "annotation rate" in out.stdout
    assert_clear_error(cli("train", model, "toy", "--seen-fraction", "0.3,1.5"), "--seen-fraction")
    assert_clear_error(cli("train", model, "toy", "--seen-fraction", "0.3,x"), "--seen-fraction")


def _write_previous_version_index(store: Store, dataset: str) -> None:
    """The index as the previous index version wrote it: one JSON document per split
    (``images``, ``pair_image``, ``pair_concept``, ``rle``), ``concepts.json`` without the later
    keys, inputs with ``version`` one below today's.  Its content is deliberately not today's
    (every pair says concept 0, one image only), so reading it would show."""
    entry = store.get("indexes", dataset)
    inputs = {**entry.manifest["inputs"], "version": INDEX_VERSION - 1}
    concepts = json.loads((entry.path / "concepts.json").read_text())["concepts"]
    with store.writing("indexes", dataset, inputs=inputs, settings=entry.manifest.get("settings")) as tmp:
        for split in ("train", "val"):
            (tmp / f"{split}.json").write_text(json.dumps({
                "images": [{"id": 1, "file": "00000.png", "height": 32, "width": 32}],
                "pair_image": [0], "pair_concept": [0], "rle": ["0 1024"], "dropped": {}}))
        (tmp / "concepts.json").write_text(json.dumps({"concepts": concepts, "seen_fraction": 0.7, "seed": 0}))
        (tmp / "summary.json").write_text(json.dumps({"dataset": dataset, "splits": {}}))


def test_an_index_of_the_previous_version_is_rebuilt_never_read(toy: dict[str, Any]) -> None:
    store, cli = toy["store"], toy["cli"]
    fresh = load_index(store, "toy")
    want = {s: (len(sp.images), sp.pair_concept.tolist()) for s, sp in fresh.splits.items()}
    _write_previous_version_index(store, "toy")
    with pytest.raises(LaviseError, match="another version of lavise .* run `lavise preprocess toy`"):
        load_index(store, "toy")
    assert_clear_error(cli("train", toy["model"], "toy", "--weights", "none"), "lavise preprocess toy")
    summary = preprocess(store, "toy", embedding="g8", workers=1)  # no --force: the old version is not current
    assert not summary["cached"]
    again = load_index(store, "toy")
    assert {s: (len(sp.images), sp.pair_concept.tolist()) for s, sp in again.splits.items()} == want
    assert store.manifest("indexes", "toy")["inputs"]["version"] == INDEX_VERSION
