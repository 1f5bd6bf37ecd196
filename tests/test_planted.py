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

from typing import Any

import pytest
import torch

from conftest import FACTORY, RED, WORDS, write_glove, write_split
from lavise_cli.data.index import preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.pipeline import evaluate_methods, open_session, run_explain, vocabulary_for
from lavise_cli.models import one_thread
from lavise_cli.store import Store
from lavise_cli.train import TrainSettings, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


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
