"""`lavise compare groups` / `compare models`: the statistics against scipy and worked examples,
a planted group difference, model matching on one model, and bad inputs.

The planted setup is test_planted.py's ColourNet (filter 2 saturates on red, filter 0 on green,
filter 1 on blue, filter 3 is brightness): group ``red`` holds sky/grass images with a red square,
group ``plain`` the same kind of images without one.  Filter 2 must rank first with q < 0.05;
filters that both groups share (grass, sky, brightness) must not be significant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import APPLE, FACTORY, GRASS, RED, SIZE, SKY, WORDS, Cli, assert_clear_error, write_glove, write_split
from lavise_cli.analyses import (activation_correlation, benjamini_hochberg, group_paths, group_statistics,
                                 match_filters, proportion_test, z_test)
from lavise_cli.analyses.stats import fisher
from lavise_cli.data.index import preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.models import one_thread
from lavise_cli.store import Store
from lavise_cli.train import TrainSettings, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def _fisher_by_hand(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher: the hypergeometric probabilities of all tables with the same margins
    that are no more likely than the observed one, summed."""
    k, n = k1 + k2, n1 + n2

    def prob(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, k - x) / math.comb(n, k)

    obs = prob(k1)
    return sum(prob(x) for x in range(max(0, k - n2), min(k, n1) + 1) if prob(x) <= obs * (1 + 1e-7))


def test_fisher_equals_scipy_and_the_hand_computed_sum() -> None:
    from scipy.stats import fisher_exact

    # 7 of 16 vs 0 of 15: small counts, so Fisher's test is used.
    p, test = proportion_test(7, 16, 0, 15)
    assert test == "fisher"
    assert p == pytest.approx(fisher_exact([[7, 9], [0, 15]]).pvalue, rel=1e-12)
    assert p == pytest.approx(_fisher_by_hand(7, 16, 0, 15), rel=1e-9)
    assert p == pytest.approx(0.0067977, abs=1e-6)
    for case in [(0, 5, 5, 5), (3, 10, 4, 12), (1, 1, 0, 1), (2, 30, 9, 25)]:
        assert fisher(*case) == pytest.approx(_fisher_by_hand(*case), rel=1e-9), case


def test_z_test_equals_the_worked_example() -> None:
    # 40/100 vs 25/100: pooled 0.325, se = sqrt(0.325 * 0.675 * 0.02) = 0.0662382, z = 2.26456.
    p, test = proportion_test(40, 100, 25, 100)
    assert test == "z"
    z = 0.15 / math.sqrt(0.325 * 0.675 * (1 / 100 + 1 / 100))
    assert z == pytest.approx(2.26456, abs=1e-5)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-12)
    assert p == pytest.approx(0.023540, abs=1e-6)
    assert z_test(10, 10, 20, 20) == 1.0  # no variation at all: nothing to test


def test_benjamini_hochberg_equals_scipy_and_a_worked_example() -> None:
    from scipy.stats import false_discovery_control

    # Sorted 0.005, 0.01, 0.03, 0.04 -> 4p/rank 0.02, 0.02, 0.04, 0.04 (already monotone).
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # A later smaller ratio pulls earlier q-values down: 0.02*2/1 = 0.04 > 0.03*2/2 = 0.03.
    assert benjamini_hochberg([0.02, 0.03]).tolist() == pytest.approx([0.03, 0.03])
    rng = np.random.default_rng(0)
    for m in (1, 7, 200):
        p = np.concatenate([rng.uniform(size=m), rng.uniform(0, 1e-3, size=m // 3)])
        assert np.allclose(benjamini_hochberg(p), false_discovery_control(p, method="bh"), rtol=1e-12, atol=0)


def test_group_statistics_counts_shares_and_q() -> None:
    # 3 filters, groups of 4 and 5 images.
    qualified = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0],
                          [0, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], bool)
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    tests = group_statistics(qualified, group, 2, np.array([True, True, False]))
    assert [t["filter"] for t in tests] == [0, 1]  # the inactive filter is not tested
    t0, t1 = tests
    assert t0["counts"] == (4, 0) and t0["shares"] == (1.0, 0.0) and t0["difference"] == 1.0
    assert t0["p_value"] == pytest.approx(_fisher_by_hand(4, 4, 0, 5))
    assert t1["shares"] == (0.25, 0.2)
    q = benjamini_hochberg([t0["p_value"], t1["p_value"]])
    assert [t0["q_value"], t1["q_value"]] == pytest.approx(q.tolist())


def test_matching_recovers_a_permutation() -> None:
    rng = np.random.default_rng(1)
    import torch

    a = torch.as_tensor(rng.normal(size=(50, 6)))
    perm = [3, 0, 5, 1, 4, 2]
    b = a[:, perm] * 2 + 1 + torch.as_tensor(rng.normal(scale=0.05, size=(50, 6)))
    corr = activation_correlation(a, b)
    assert corr[perm[0], 0] == pytest.approx(np.corrcoef(a[:, perm[0]], b[:, 0])[0, 1])
    matched = {i: j for i, j, _ in match_filters(corr)}
    assert all(matched[perm[j]] == j for j in range(6))


# ------------------------------------------------------------------------------------------------
# A planted difference (ColourNet of test_planted.py)
# ------------------------------------------------------------------------------------------------


def _scene(path: Path, rng: np.random.Generator, red: bool) -> None:
    split_y = int(rng.integers(14, 42))
    arr = np.zeros((SIZE, SIZE, 3), np.float64)
    arr[:split_y] = SKY
    arr[split_y:] = GRASS
    if red:
        w, h = rng.integers(22, 29, 2)
        x0, y0 = int(rng.integers(0, SIZE - w + 1)), int(rng.integers(0, SIZE - h + 1))
        arr[y0:y0 + h, x0:x0 + w] = APPLE
    arr += rng.normal(0, 6, arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def colour(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two explainers of ColourNet (seeds 0 and 1) on a small planted reference set, and two
    groups of generated images (12 with a red square, 12 without)."""
    base = tmp_path_factory.mktemp("compare")
    store = Store(base / "home")
    with one_thread():
        write_split(base / "coco", "train", 30, seed=10)
        write_split(base / "coco", "val", 12, seed=11)
        register_coco(store, base / "coco", "planted")
        register_embedding(store, write_glove(base / "glove.50d.txt", WORDS, dim=50), name="g50")
        preprocess(store, "planted", embedding="g50", workers=1)
        factory = base / "colournet.py"
        factory.write_text(FACTORY)
        for name, seed in (("colournet", 0), ("colournet-b", 1)):
            train(store, f"{factory}:build", ["planted"], layers=["feat"], weights="none", name=name,
                  settings=TrainSettings(epochs=30, patience=10, batch_size=32, lr=3e-3, seed=seed), device="cpu",
                  workers=0)
    rng = np.random.default_rng(5)
    for i in range(12):
        _scene(base / "red" / f"r{i:02d}.png", rng, red=True)
        _scene(base / "plain" / f"p{i:02d}.png", rng, red=False)
    return {"store": store, "base": base, "cli": Cli(store.root)}


@pytest.mark.slow  # the module's fixture trains two small explainers (~5-15 s)
def test_planted_filter_ranks_first(colour: dict[str, Any]) -> None:
    base, cli = colour["base"], colour["cli"]
    args = ["compare", "groups", "-e", "colournet", "--group", f"red={base / 'red'}", "--group",
            f"plain={base / 'plain'}", "--top", "3", "--device", "cpu"]
    with one_thread():
        doc = cli.json(*args, "--out", str(base / "page"))
    assert doc["groups"] == {"red": {"images": 12, "listed": 12, "source": str(base / "red")},
                             "plain": {"images": 12, "listed": 12, "source": str(base / "plain")}}
    assert doc["pass"]["cached"] is False and doc["pass"]["images"] == 24
    first = doc["filters"][0]
    assert first["filter"] == RED and first["favours"] == "red"
    assert first["shares"] == {"red": 1.0, "plain": 0.0} and first["difference"] == 1.0
    # Expected counts 6 in every cell: the z-test, z = 1 / sqrt(0.25 * (1/12 + 1/12)).
    assert first["test"] == "z" and first["q_value"] < 0.05
    z = 1 / math.sqrt(0.25 * (2 / 12))
    assert first["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)
    assert "apple" in [w["word"] for w in first["words"]], first["words"]
    assert len(first["images"]["red"]) == 5 and first["images"]["plain"] == []
    # Keys of the JSON shape.
    assert {"filter", "shares", "difference", "p_value", "q_value", "favours", "words"} <= set(first)
    # Only the red filter differs: grass (0), sky (1) and brightness (3) are no significant difference.
    others = {f["filter"]: f for f in doc["filters"][1:]}
    for f in others.values():
        assert f["q_value"] >= 0.05, f
    assert doc["significant"] == 1
    # Ranked by absolute difference.
    diffs = [abs(f["difference"]) for f in doc["filters"]]
    assert diffs == sorted(diffs, reverse=True)
    # The page: the filter's card with its words and highlighted images.
    page = Path(doc["page"])
    html = page.read_text()
    assert "filter 2" in html and "apple" in html and "More often active on red than on plain" in html
    files = list((page.parent / "compare-groups_files").glob("*.jpg"))
    assert len(files) >= 5
    # The same images again, groups in the other order: served from the cache.
    with one_thread():
        again = cli.json("compare", "groups", "-e", "colournet", "--group", f"plain={base / 'plain'}", "--group",
                         f"red={base / 'red'}", "--top", "3", "--device", "cpu")
    assert again["pass"]["cached"] is True
    assert again["pass"]["folder"] == doc["pass"]["folder"]
    assert again["filters"][0]["filter"] == RED and again["filters"][0]["difference"] == -1.0
    # The table names the cache too.
    with one_thread():
        res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "served from the cache" in res.stderr and "more often active on red than on plain" in res.stdout


@pytest.mark.slow  # the module's fixture trains two small explainers (~5-15 s)
def test_groups_file_and_dataset_sources(colour: dict[str, Any]) -> None:
    base, cli, store = colour["base"], colour["cli"], colour["store"]
    assert len(group_paths(store, "v", "planted:val")) == 12
    assert len(group_paths(store, "v", "planted")) == 12  # the target split: val
    csv = base / "groups.csv"
    csv.write_text("image,group\n" + "".join(f"red/r{i:02d}.png,red\n" for i in range(12))
                   + "".join(f"plain/p{i:02d}.png,plain\n" for i in range(12)))
    with one_thread():
        doc = cli.json("compare", "groups", "-e", "colournet", "--groups-file", str(csv), "--top", "1",
                       "--device", "cpu")
    assert doc["pass"]["cached"] is True  # the same 24 images as the test above (or the first pass of this one)
    assert doc["filters"][0]["filter"] == RED


@pytest.mark.slow  # the module's fixture trains two small explainers (~5-15 s)
def test_bad_group_inputs(colour: dict[str, Any]) -> None:
    base, cli = colour["base"], colour["cli"]
    red, plain = base / "red", base / "plain"
    run = lambda *a: cli("compare", "groups", "-e", "colournet", "--device", "cpu", *a)  # noqa: E731
    assert_clear_error(run("--group", f"red={red}"), "at least two groups")
    assert_clear_error(run("--group", f"a={red}", "--group", f"a={plain}"), "'a' is used twice")
    assert_clear_error(run("--group", f"a={red}", "--group", f"b={red}"), "in both groups", "'a'", "'b'")
    assert_clear_error(run("--group", f"a={red}", "--group", "b"), "NAME=SOURCE")
    assert_clear_error(run("--group", f"a={red}", "--group", "b=nowhere"), "neither an image folder")
    listing = base / "missing.txt"
    listing.write_text("red/r00.png\nred/none.png\n")
    assert_clear_error(run("--group", f"a={plain}", "--group", f"b={listing}"), "1 of its 2 images do not exist")
    bad = base / "bad"
    for i in range(2):
        (bad / f"x{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (bad / f"x{i}.jpg").write_bytes(b"not an image")
    with one_thread():  # found after the pass (-q: no progress lines)
        res = cli("-q", "compare", "groups", "-e", "colournet", "--device", "cpu", "--group", f"a={plain}", "--group",
                  f"b={bad}")
        assert_clear_error(res, "'b' has no readable image")


@pytest.mark.slow  # the module's fixture trains two small explainers (~5-15 s)
def test_compare_models_matches_one_model_to_itself(colour: dict[str, Any]) -> None:
    cli = colour["cli"]
    with one_thread():
        doc = cli.json("compare", "models", "colournet", "colournet-b", "--device", "cpu",
                       "--out", str(colour["base"] / "models"))
    a, b = doc["models"]["colournet"], doc["models"]["colournet-b"]
    assert doc["target"] == "planted/val" and doc["target_images"] == 12
    for m in (a, b):
        assert m["concepts"] == len(m["words"]) >= 1
        assert m["concepts_2plus"] == sum(1 for c in m["words"].values() if c >= 2)
        assert sum(m["words"].values()) == m["active_filters"]
    assert set(doc["shared"]) == set(a["words"]) & set(b["words"])
    assert set(doc["only"]["colournet"]) == set(a["words"]) - set(b["words"])
    # One model under two explainers: each filter whose maximum varies over the images matches
    # itself with correlation 1 (a constant one, e.g. the sky channel saturating everywhere,
    # correlates 0 with everything).
    matched = {m["a"]: m for m in doc["matches"]}
    assert len(matched) == 6 and sorted(m["b"] for m in doc["matches"]) == list(range(6))
    varying = [u for u, m in matched.items() if m["correlation"] != 0]
    assert {RED, 3} <= set(varying), matched
    for u in varying:
        assert matched[u]["b"] == u and matched[u]["correlation"] == pytest.approx(1.0), matched[u]
    assert doc["matching"]["mean_correlation"] == pytest.approx(len(varying) / 6, abs=1e-3)
    page = Path(doc["page"]).read_text()
    assert "Filters matched across the models" in page and "shared concepts" in page
    res = cli("compare", "models", "colournet", "colournet", "--device", "cpu")
    assert_clear_error(res, "two different explainers")
    json.dumps(doc)
