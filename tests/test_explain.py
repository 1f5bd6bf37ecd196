"""Explaining filters (src/lavise_cli/explain.py, pipeline.py, cli/explain_cmd.py).

The batched computations are checked against per-filter loop references written here from
method.md: top-p images with their tie-breaks, filter attention, activation masking (ties
count), regions (bilinear upsampling, ``>= T_u``), word ranking; ``explain_filters`` end to end
on a real small target cache and a real (trained) explainer.  Then the command line: its clear
one-line errors and its ``--json`` / ``--csv`` outputs.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import assert_clear_error, write_glove
from lavise_cli.data.index import preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.errors import LaviseError
from lavise_cli.explain import (
    DEFAULT_RANK,
    DEFAULT_RETRIEVAL,
    EPS,
    activation_mask_inputs,
    attention_inputs,
    diversity,
    explain_filters,
    nearest_words,
    retrieval_scores,
    retrieval_stats,
    original_inputs,
    parse_filters,
    rank_words,
    regions,
    top_images,
)
from lavise_cli.pipeline import evaluate_methods, open_session, run_explain, vocabulary_for
from lavise_cli.models import one_thread
from lavise_cli.store import Store
from lavise_cli.target import TargetCache
from lavise_cli.testing import colour_model_factory
from lavise_cli.train import TrainSettings, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ----------------------------------------------------------------------------------------------
# Loop references (method.md), one filter and one image at a time
# ----------------------------------------------------------------------------------------------


def ref_attention(maps: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """``z_k = cos(F_u, F_k) * mean_hw(F_k)`` with the cosine over the flattened h*w map."""
    B, d = maps.shape[:2]
    out = torch.zeros(B, d, dtype=torch.float64)
    for b in range(B):
        fu = maps[b, int(filt[b])].flatten().double()
        for k in range(d):
            fk = maps[b, k].flatten().double()
            cos = float(fk @ fu) / (float(fk.norm()) * float(fu.norm()) + EPS)
            out[b, k] = cos * float(fk.mean())
    return out


def ref_activation_mask(maps: torch.Tensor, filt: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``z_k = mean_hw(F_k * [F_u >= T_u])`` (ties count)."""
    B, d, h, w = maps.shape
    out = torch.zeros(B, d, dtype=torch.float64)
    for b in range(B):
        u = int(filt[b])
        for k in range(d):
            total = 0.0
            for y in range(h):
                for x in range(w):
                    if float(maps[b, u, y, x]) >= float(thr[u]):
                        total += float(maps[b, k, y, x])
            out[b, k] = total / (h * w)
    return out


def ref_top_images(img_max: torch.Tensor, img_mean: torch.Tensor, u: int, p: int) -> list[int]:
    n = img_max.shape[0]
    return sorted(range(n), key=lambda r: (-float(img_max[r, u]), -float(img_mean[r, u]), r))[:p]


def _cache(img_max: torch.Tensor, img_mean: torch.Tensor, tmp: Path) -> TargetCache:
    n, d = img_max.shape
    return TargetCache(root=tmp, layer="x", threshold=torch.zeros(d), img_max=img_max, img_mean=img_mean,
                       rows=torch.arange(n), shape=(d, 2, 2), hit=False)


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_top_images_streamed_over_shards_equal_the_whole_sort(seed: int, tmp_path: Path, monkeypatch) -> None:
    """The per-image statistics stream shard by shard (on disk) or block by block (in memory),
    keeping p candidates per filter: with shards smaller and larger than p and heavy ties, the
    rows equal one sort of the whole matrices, and ``max_at`` reads back the same maxima."""
    from safetensors.torch import save_file

    import lavise_cli.passes.target as target_mod

    g = torch.Generator().manual_seed(seed)
    n, d, p = 300, 7, 20
    img_max = torch.randint(0, 4, (n, d), generator=g).float()
    img_mean = torch.randint(0, 3, (n, d), generator=g).float() / 4
    sizes = [5, 40, 1, 90, 64, 100]  # the shards of a pass split in pieces: any sizes
    assert sum(sizes) == n
    a = 0
    for k, b in enumerate(sizes):
        save_file({"rows": torch.arange(a, a + b), "max": img_max[a:a + b].contiguous(),
                   "mean": img_mean[a:a + b].contiguous()}, str(tmp_path / f"images-{k:05d}.safetensors"))
        save_file({"maps": torch.zeros(b, d, 2, 2).half()}, str(tmp_path / f"maps-{k:05d}.safetensors"))
        a += b
    on_disk = TargetCache(root=tmp_path, layer="x", threshold=torch.zeros(d), shape=(d, 2, 2), hit=True)
    monkeypatch.setattr(target_mod, "IMAGE_BLOCK", 33)  # the in-memory cache in blocks of 33 rows
    in_memory = _cache(img_max, img_mean, tmp_path)
    for cache in (on_disk, in_memory):
        top = top_images(cache, p)
        assert top.shape == (d, p)
        for u in range(d):
            assert top[u].tolist() == ref_top_images(img_max, img_mean, u, p), u
    assert torch.equal(on_disk.rows, torch.arange(n))
    assert torch.equal(on_disk.img_max, img_max) and torch.equal(on_disk.img_mean, img_mean)
    rows, filt = torch.randint(0, n, (50,), generator=g), torch.randint(0, d, (50,), generator=g)
    fresh = TargetCache(root=tmp_path, layer="x", threshold=torch.zeros(d), shape=(d, 2, 2), hit=True)
    assert torch.equal(fresh.max_at(rows, filt), img_max[rows, filt])
    assert fresh._max is None  # read by shard spans, the whole matrix never loaded


def test_parse_filters() -> None:
    assert parse_filters("150,2", 512) == [2, 150]
    assert parse_filters("0-3,7, 2", 10) == [0, 1, 2, 3, 7]
    assert parse_filters(None, 4, all_filters=False) == [0, 1, 2, 3]
    assert parse_filters("5", 8, all_filters=True) == list(range(8))
    for bad in ("8", "0-8", "abc", "3-1", "1,x", "-1"):
        with pytest.raises(LaviseError):
            parse_filters(bad, 8)


def test_top_images_ordering_with_planted_ties(tmp_path: Path) -> None:
    # Filter 0: rows 1, 3 and 4 tie on the maximum (6.0, a ReLU6 cap); 3 and 4 also tie on the mean.
    # Filter 1: every maximum ties; the means decide, then image order.
    img_max = torch.tensor([[1.0, 2.0], [6.0, 2.0], [0.5, 2.0], [6.0, 2.0], [6.0, 2.0], [5.9, 2.0]])
    img_mean = torch.tensor([[0.9, 0.1], [0.2, 0.5], [0.4, 0.1], [0.3, 0.5], [0.3, 0.7], [5.0, 0.5]])
    cache = _cache(img_max, img_mean, tmp_path)
    top = top_images(cache, 4)
    assert top.shape == (2, 4)
    assert top[0].tolist() == [3, 4, 1, 5]
    assert top[1].tolist() == [4, 1, 3, 5]
    # p larger than the set: every image, in order.
    assert top_images(cache, 50)[1].tolist() == [4, 1, 3, 5, 0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_images_matches_reference_on_random_ties(seed: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(seed)
    n, d, p = 60, 9, 25
    img_max = torch.randint(0, 5, (n, d), generator=g).float()  # heavy ties
    img_mean = torch.randint(0, 3, (n, d), generator=g).float() / 4  # ties on the mean too
    top = top_images(_cache(img_max, img_mean, tmp_path), p)
    for u in range(d):
        assert top[u].tolist() == ref_top_images(img_max, img_mean, u, p), u


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attention_inputs_equal_loop_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, d, h, w = 11, 7, 3, 5
    maps = torch.relu(torch.randn(B, d, h, w, generator=g))
    maps[0, 3] = 0.0  # a dead channel (zero norm): the epsilon keeps it finite
    filt = torch.randint(0, d, (B,), generator=g)
    filt[0] = 3  # a row whose own filter is dead
    got = attention_inputs(maps, filt)
    ref = ref_attention(maps, filt)
    assert got.shape == (B, d)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), ref, atol=1e-6, rtol=1e-5)
    # The filter's own channel gets weight 1: z_u = mean_hw(F_u) (when alive).
    alive = torch.arange(1, B)
    assert torch.allclose(got[alive, filt[alive]], maps[alive, filt[alive]].flatten(1).mean(1), atol=1e-6)
    # Signed maps too (the formula does not assume ReLU).
    signed = torch.randn(B, d, h, w, generator=g)
    assert torch.allclose(attention_inputs(signed, filt).double(), ref_attention(signed, filt), atol=1e-6, rtol=1e-5)


def test_attention_inputs_of_one_image_broadcast_equal_the_copied_maps() -> None:
    """The explain loop passes one image's maps expanded over its rows (batch stride 0): that path
    (norms and means once, one matrix product) gives the per-row formula's values."""
    g = torch.Generator().manual_seed(5)
    d, h, w, B = 40, 7, 7, 90
    one = torch.relu(torch.randn(1, d, h, w, generator=g))
    one[0, 7] = 0.0  # a dead channel
    filt = torch.randint(0, d, (B,), generator=g)
    filt[0] = 7
    view = one.expand(B, -1, -1, -1)
    assert view.stride(0) == 0
    got = attention_inputs(view, filt)
    assert torch.allclose(got.double(), ref_attention(view.contiguous(), filt), atol=1e-6, rtol=1e-5)
    assert torch.allclose(got, attention_inputs(view.contiguous(), filt), atol=1e-6, rtol=1e-5)


def test_attention_orthogonal_channels_are_suppressed() -> None:
    """A channel active exactly where the filter is not gets weight 0; original keeps it."""
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    maps[0, 1] = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    maps[0, 2] = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    z = attention_inputs(maps, torch.tensor([0]))
    assert torch.allclose(z, torch.tensor([[0.25, 0.0, 0.75]]), atol=1e-6)
    assert torch.allclose(original_inputs(maps, torch.tensor([0])), torch.tensor([[0.25, 1.5, 0.75]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_activation_mask_inputs_equal_loop_reference_ties_count(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, d, h, w = 9, 6, 4, 4
    maps = (torch.relu(torch.randn(B, d, h, w, generator=g)) * 2).round() / 2  # many exact ties
    thr = torch.tensor([1.0, 0.5, 1.5, 6.0, 0.0, 1.0])
    maps[:, 3] = maps[:, 3].clamp(max=6.0)
    maps[0:3, 3, 0, :] = 6.0  # saturated at the threshold: these positions must count
    filt = torch.randint(0, d, (B,), generator=g)
    filt[0:3] = 3
    got = activation_mask_inputs(maps, filt, thr)
    ref = ref_activation_mask(maps, filt, thr)
    assert torch.allclose(got.double(), ref, atol=1e-6)
    # The saturated rows keep their top row of pixels (with ">" they would be all zero).
    assert (got[0:3].abs().sum(1) > 0).all()
    assert torch.allclose(got[0:3, 3], torch.full((3,), 6.0 * 4 / 16))


@pytest.mark.parametrize("size", [16, 32, 37])
def test_regions_equal_upsample_then_threshold(size: int) -> None:
    g = torch.Generator().manual_seed(size)
    B, d, h, w = 5, 4, 4, 4
    maps = torch.relu(torch.randn(B, d, h, w, generator=g))
    thr = torch.tensor([0.5, 1.0, 6.0, 0.2])
    maps[:, 2] = 0.0
    maps[:, 2, 1:3, 1:3] = 6.0  # a saturated plateau exactly at T
    filt = torch.tensor([0, 1, 2, 3, 2])
    got = regions(maps, filt, thr, size, cells=False)  # the plain bilinear region (before issue 15)
    assert got.dtype == torch.bool and got.shape == (B, size, size)
    for b in range(B):
        u = int(filt[b])
        up = F.interpolate(maps[b:b + 1, u:u + 1], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        assert torch.equal(got[b], up >= thr[u]), b
    # The plateau at the cap yields a non-empty region (ties count).
    assert got[2].any() and got[4].any()
    # The default region adds the nearest-neighbour footprint of the cells that reach T.
    full = regions(maps, filt, thr, size)
    for b in range(B):
        u = int(filt[b])
        hot = (maps[b:b + 1, u:u + 1] >= thr[u]).float()
        foot = F.interpolate(hot, size=(size, size), mode="nearest-exact")[0, 0] > 0.5
        assert torch.equal(full[b], got[b] | foot), b


@pytest.mark.parametrize("size,cell", [(224, (3, 5)), (37, (2, 4)), (28, (0, 6)), (37, (6, 0))])
def test_single_peak_cell_at_threshold_gives_its_footprint(size: int, cell: tuple[int, int]) -> None:
    # A saturated filter: one cell exactly at T (ReLU6's cap), its neighbours well below.  Bilinear
    # upsampling never reaches T between pixel centres, so the plain region is empty; the default
    # region is exactly that cell's footprint (the pixels whose centres fall in the cell).
    h = w = 7
    maps = torch.zeros(1, 2, h, w)
    maps[0, 0] = 1.0
    maps[0, 0, cell[0], cell[1]] = 6.0
    thr = torch.tensor([6.0, 1.0])
    filt = torch.tensor([0])
    interior = 0 < cell[0] < h - 1 and 0 < cell[1] < w - 1
    if interior:  # (at the border, bilinear upsampling clamps and keeps a few pixels at T)
        assert not regions(maps, filt, thr, size, cells=False).any()
    got = regions(maps, filt, thr, size)[0]
    centre = (torch.arange(size) + 0.5) * h / size  # pixel centres in cell units
    rows = (centre >= cell[0]) & (centre < cell[0] + 1)
    cols = (centre >= cell[1]) & (centre < cell[1] + 1)
    want = rows[:, None] & cols[None, :]
    assert want.any()
    assert torch.equal(got, want)
    if size == 224:  # 32 x 32 pixels per cell
        assert int(got.sum()) == 32 * 32 and got[96:128, 160:192].all()


def test_rank_words_by_count_then_summed_similarity() -> None:
    words = ["sky", "grass", "apple", "road", "tree", "car"]
    # One filter, 4 images, 3 words each.
    idx = torch.tensor([[[2, 1, 0], [2, 0, 3], [1, 2, 4], [0, 1, 5]]])
    sim = torch.tensor([[[0.9, 0.5, 0.4], [0.8, 0.3, 0.2], [0.7, 0.6, 0.1], [0.9, 0.2, 0.05]]])
    # counts: apple 3 (0.9+0.8+0.6=2.3), sky 3 (0.4+0.3+0.9=1.6), grass 3 (0.5+0.7+0.2=1.4), road 1 (0.2), tree 1 (0.1), car 1
    out = rank_words(idx, sim, len(words), 5, words)
    assert [w for w, _, _ in out[0]] == ["apple", "sky", "grass", "road", "tree"]
    assert [c for _, c, _ in out[0]] == [3, 3, 3, 1, 1]
    assert out[0][0][2] == pytest.approx(2.3)
    assert out[0][1][2] == pytest.approx(1.6)
    # A word named by more images beats one with a larger summed similarity; unnamed words never appear.
    idx2 = torch.tensor([[[0], [0], [1]], [[3], [3], [3]]])
    sim2 = torch.tensor([[[0.1], [0.1], [0.99]], [[0.5], [0.5], [0.5]]])
    out2 = rank_words(idx2, sim2, len(words), 4, words)
    assert out2[0] == [("sky", 2, pytest.approx(0.2)), ("grass", 1, pytest.approx(0.99))]
    assert out2[1] == [("road", 3, pytest.approx(1.5))]


def test_specific_rank_puts_a_word_every_filter_names_below_one_unique_to_the_filter() -> None:
    words = ["person", "giraffe", "grass", "sky"]
    # 3 filters x 4 images x 2 words: "person" is named by every image of every filter;
    # "giraffe" only by 2 images of filter 0; filters 1 and 2 name grass / sky.
    idx = torch.tensor([
        [[0, 1], [0, 1], [0, 2], [0, 2]],
        [[0, 2], [0, 2], [0, 2], [0, 3]],
        [[0, 3], [0, 3], [0, 3], [0, 2]],
    ])
    sim = torch.full(idx.shape, 0.5)
    sim[..., 0] = 0.9  # the hub is also the nearest word
    by_count = rank_words(idx, sim, len(words), 3, words, rank="count")
    assert by_count[0][0][0] == "person"  # counts: person 4, giraffe 2, grass 2
    spec, extra, conf = rank_words(idx, sim, len(words), 3, words, rank="specific", details=True)
    names0 = [w for w, _, _ in spec[0]]
    assert names0.index("giraffe") < names0.index("person")
    assert names0[0] == "giraffe"
    # The raw count stays with each word; the hub word's specificity is 0 (as common everywhere).
    assert dict((w, c) for w, c, _ in spec[0]) == {"giraffe": 2, "grass": 2, "person": 4}
    sp0 = dict(zip(names0, (e[0] for e in extra[0])))
    assert sp0["person"] == pytest.approx(0.0) and sp0["grass"] == pytest.approx(0.0)  # grass: 2 here, 2 on average
    assert sp0["giraffe"] > 0
    assert names0 == ["giraffe", "person", "grass"]  # equal specificity: by count
    # Each filter's top word is no longer the hub.
    assert all(ws[0][0] != "person" for ws in spec)
    # Confidence: agreement 2/4 on "giraffe" x specificity 1 - (2/3)/2.
    assert conf[0]["agreement"] == pytest.approx(0.5)
    assert conf[0]["specificity"] == pytest.approx(1 - (2 / 3) / 2, abs=1e-4)
    assert conf[0]["confidence"] == pytest.approx(0.5 * (1 - (2 / 3) / 2), abs=1e-4)
    # With an explicit layer background in which giraffe is as common as here, it ranks by count.
    bg = torch.tensor([4.0, 2.0, 0.0, 0.0])
    spec_bg = rank_words(idx[:1], sim[:1], len(words), 3, words, rank="specific", background=bg)
    assert spec_bg[0][0][0] == "grass"
    with pytest.raises(LaviseError, match="unknown rank"):
        rank_words(idx, sim, len(words), 3, words, rank="tfidf")


def test_csls_equals_a_hand_computed_case() -> None:
    # Two predicted vectors and three words in 2-d, with CSLS_K = 10 > both counts (so r_w and r_x
    # are means over all background vectors / all words).
    s2 = 2 ** -0.5
    vv = torch.tensor([[1.0, 0.0], [0.0, 1.0], [s2, s2]])  # words a, b, c
    bg = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # the layer's predicted vectors
    st = retrieval_stats(bg, vv, "csls")
    # r_w: mean cosine of each word to (all, here) its nearest background vectors.
    r_a, r_b, r_c = (1.0 + 0.6) / 2, (0.0 + 0.8) / 2, (s2 + 1.4 * s2) / 2
    assert st.r_word.tolist() == pytest.approx([r_a, r_b, r_c])
    x = torch.tensor([[0.6, 0.8]])
    cos = [0.6, 0.8, 1.4 * s2]
    r_x = sum(cos) / 3
    want = [2 * cos[0] - r_a - r_x, 2 * cos[1] - r_b - r_x, 2 * cos[2] - r_c - r_x]
    got = retrieval_scores(x, vv, "csls", st)
    assert got[0].tolist() == pytest.approx(want)
    # Cosine picks the hub word c first; CSLS prefers b, which is near this vector but not to every vector.
    idx, sim = nearest_words(x, vv, 1, "cosine", retrieval_stats(bg, vv, "cosine"))
    assert idx.tolist() == [[2]]
    idx, sim = nearest_words(x, vv, 1, "csls", st)
    assert idx.tolist() == [[1]] and sim.tolist() == [[pytest.approx(0.8)]]  # the cosine is reported
    # Centred: the mean vector (0.8, 0.4) is removed before the cosine.
    stc = retrieval_stats(bg, vv, "centred")
    assert stc.mean.tolist() == pytest.approx([0.8, 0.4])
    c = torch.tensor([-0.2, 0.4]) / (0.2 ** 2 + 0.4 ** 2) ** 0.5
    assert retrieval_scores(x, vv, "centred", stc)[0].tolist() == pytest.approx((vv @ c).tolist(), abs=1e-6)
    with pytest.raises(LaviseError, match="unknown retrieval"):
        retrieval_stats(bg, vv, "hubless")


def test_diversity_figures_on_a_constructed_case() -> None:
    words = [["person", "dog"], ["person", "sky"], ["cat", "person"], ["person"], ["x"], []]
    d = diversity(words, inactive=[False, False, False, False, True, False])
    # active filters with words: 0-3; top-1: person x3, cat x1; top-5 words: person 4, dog 1, sky 1, cat 1.
    assert d["distinct_top1"] == 2
    assert d["top1_share"] == pytest.approx(0.75)
    assert d["filters_per_word"] == pytest.approx(7 / 4)
    assert d["filters"] == 4 and d["most_common"] == "person"
    assert diversity([])["distinct_top1"] == 0


# ----------------------------------------------------------------------------------------------
# A small trained explainer (generated COCO data, a factory model, a generated GloVe file)
# ----------------------------------------------------------------------------------------------

FACTORY = colour_model_factory(
    [[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0], [0.3, 0.3, 0.3], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]],
    [0.0, 0.0, 0.0, 0.05, -0.5, 1.0], activation="ReLU6")

GLOVE_WORDS = ("the of and dog cat car sky grass tree road water house window door table chair "
               "ball box cup bottle apple banana flower bird horse wall red blue green").split()
CATEGORIES = [{"id": 1, "name": "dog", "supercategory": "a"}, {"id": 2, "name": "cat", "supercategory": "a"},
              {"id": 3, "name": "car", "supercategory": "v"}]
COLOURS = {1: (230, 20, 20), 2: (20, 220, 30), 3: (30, 30, 230)}



def write_coco(root: Path, split: str, n: int, seed: int) -> None:
    """``n`` 32x32 images, each with one or two coloured rectangles annotated as polygons."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        im = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(90, 160, 3)))
        dr = ImageDraw.Draw(im)
        cats = rng.choice([1, 2, 3], size=int(rng.integers(1, 3)), replace=False)
        for j, c in enumerate(cats):
            x0, y0 = (2, 2) if j == 0 else (17, 17)
            x0 += int(rng.integers(0, 4))
            y0 += int(rng.integers(0, 4))
            x1, y1 = x0 + 10, y0 + 10
            dr.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLOURS[int(c)])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c), "iscrowd": 0,
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "area": 100.0,
                         "bbox": [x0, y0, 10, 10]})
        fn = f"{split}_{i:05d}.png"
        im.save(root / f"{split}2017" / fn)
        images.append({"id": i + 1, "file_name": fn, "width": 32, "height": 32})
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with one_thread():
        yield _build_trained(tmp_path_factory)


def _build_trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("explain")
    factory = base / "colours.py"
    factory.write_text(FACTORY)
    store = Store(base / "home")
    write_coco(base / "coco", "train", 24, seed=1)
    write_coco(base / "coco", "val", 16, seed=2)
    register_coco(store, base / "coco", "toy")
    register_embedding(store, write_glove(base / "glove.24d.txt", GLOVE_WORDS, dim=24), name="g24")
    preprocess(store, "toy", embedding="g24", workers=1)
    res = train(store, f"{factory}:build", ["toy"], layers=["feat"], weights="none", name="colours",
                settings=TrainSettings(epochs=8, patience=8, seed=0), device="cpu", workers=0)
    imgs = base / "plain"
    imgs.mkdir()
    for i in range(5):
        Image.new("RGB", (20, 24), (40 * i, 200 - 30 * i, 90)).save(imgs / f"p{i}.jpg")
    return {"store": store, "home": base / "home", "factory": factory, "explainer": res[0].name,
            "images": imgs, "base": base}


def run_cli(home: Path, *args: Any) -> Any:
    from typer.testing import CliRunner

    from lavise_cli.cli import app

    return CliRunner().invoke(app, ["--home", str(home), *[str(a) for a in args]])


def test_explain_filters_equal_loop_reference(trained: dict[str, Any]) -> None:
    ses = open_session(trained["store"], device="cpu", workers=0)
    vocab = vocabulary_for(ses, "default")
    assert {"dog", "cat", "car"} <= set(vocab.words) and len(vocab.words) > 3
    cache = ses.cache
    filters = [5, 0, 2]
    p, s, k = 6, 3, 4
    g = ses.explainer.module.eval()
    vv = torch.as_tensor(vocab.vectors, dtype=torch.float32)
    for method in ("attention", "original", "activation-masking"):
        # Plain cosine search, words by count (the settings before issue 15; the others are tested apart).
        ex = run_explain(ses, filters, method, vocab, p=p, s=s, k=k, retrieval="cosine", rank="count")
        assert ex.filters == filters
        assert ex.image_words.shape == (3, p, s)
        for j, u in enumerate(filters):
            rows = ref_top_images(cache.img_max, cache.img_mean, u, p)
            assert ex.top_rows[j].tolist() == rows
            maps = cache.maps(rows)
            fu = torch.full((p,), u)
            if method == "attention":
                z = ref_attention(maps, fu)
            elif method == "original":
                z = maps.flatten(2).mean(2).double()
            else:
                z = ref_activation_mask(maps, fu, cache.threshold)
            with torch.no_grad():
                sims = g(z.float()) @ vv.T
            val, idx = sims.topk(s, dim=1)
            assert torch.equal(ex.image_words[j], idx), (method, u)
            assert torch.allclose(ex.image_scores[j], val, atol=1e-5)
            counts = Counter(int(i) for i in idx.flatten())
            sums: dict[int, float] = {}
            for i, v in zip(idx.flatten().tolist(), val.flatten().tolist()):
                sums[i] = sums.get(i, 0.0) + v
            ranked = sorted(counts, key=lambda i: (-counts[i], -sums[i]))[:k]
            assert [w for w, _, _ in ex.words[j]] == [vocab.words[i] for i in ranked]
            assert [c for _, c, _ in ex.words[j]] == [counts[i] for i in ranked]
        assert ex.inactive == [bool(cache.threshold[u] <= 0) for u in filters]


def test_image_masking_equals_loop_reference(trained: dict[str, Any]) -> None:
    """``image-masking``: pixels outside the filter's region set to the dataset mean (0 after
    normalisation), the backbone run again on each (filter, top image), ``z = mean_hw(F)``."""
    from lavise_cli.data.images import View, apply_view_image, normalize, read_rgb

    ses = open_session(trained["store"], device="cpu", workers=0)
    vocab = vocabulary_for(ses, "default")
    cache, net, pre = ses.cache, ses.model.module, ses.model.preprocess
    filters, p, s = [0, 2, 4], 4, 3
    ex = run_explain(ses, filters, "image-masking", vocab, p=p, s=s, k=3, retrieval="cosine", rank="count")
    vv = torch.as_tensor(vocab.vectors, dtype=torch.float32)
    g = ses.explainer.module.eval()
    for j, u in enumerate(filters):
        rows = ref_top_images(cache.img_max, cache.img_mean, u, p)
        assert ex.top_rows[j].tolist() == rows
        zs = []
        for r in rows:
            img = normalize(apply_view_image(read_rgb(ses.target.paths[int(cache.rows[r])]), View(), pre.input_size),
                            pre.mean, pre.std)
            fu = cache.maps([r])[:, u:u + 1]
            keep = F.interpolate(fu, size=(pre.input_size,) * 2, mode="bilinear", align_corners=False)[0, 0] \
                >= cache.threshold[u]
            # ... with the footprint of the cells at T (the region's definition since issue 15)
            keep |= F.interpolate((fu >= cache.threshold[u]).float(), size=(pre.input_size,) * 2,
                                  mode="nearest-exact")[0, 0] > 0.5
            with torch.no_grad():
                fmap = net.feat(net.pool(net.act(net.conv((img * keep)[None]))))
            zs.append(fmap.flatten(2).mean(2)[0])
        with torch.no_grad():
            sims = g(torch.stack(zs)) @ vv.T
        val, idx = sims.topk(s + 1, dim=1)
        assert torch.allclose(ex.image_scores[j], val[:, :s], atol=5e-3), (u, ex.image_scores[j], val)
        for q in range(p):  # the same words, wherever the reference's ranking is not a near-tie
            for t in range(s):
                gap = min(float(val[q, t] - val[q, t + 1]), float(val[q, t - 1] - val[q, t]) if t else 1.0)
                if gap > 1e-2:
                    assert int(ex.image_words[j, q, t]) == int(idx[q, t]), (u, q, t)



def test_image_masking_runs_an_empty_region_once_as_the_all_mean_image(trained: dict[str, Any]) -> None:
    """Pairs whose region is empty mask the whole image: their ``z`` is that of an all-mean (zero)
    input, computed once; the other pairs are unaffected (checked above against a loop)."""
    from lavise_cli.explain import regions
    from lavise_cli.pipeline import image_masking_inputs

    ses = open_session(trained["store"], device="cpu", workers=0)
    cache, net, size = ses.cache, ses.model.module, ses.model.preprocess.input_size
    d, p = cache.shape[0], cache.n  # every image is a "top image": most hold no region
    filters = list(range(d))
    lookup = image_masking_inputs(ses, filters, p)
    top = top_images(cache, p)
    rows, filt = top.reshape(-1), torch.arange(d).repeat_interleave(p)
    empty = ~regions(cache.maps(rows), filt, cache.threshold, size).flatten(1).any(1)
    assert 0 < int(empty.sum()) < len(empty), "the data must give both empty and non-empty regions"
    with torch.no_grad():
        zero = net.feat(net.pool(net.act(net.conv(torch.zeros(1, 3, size, size))))).flatten(2).mean(2)[0]
    z = lookup(rows, filt)
    torch.testing.assert_close(z[empty], zero.expand(int(empty.sum()), -1), rtol=2e-3, atol=2e-3)
    assert not torch.allclose(z[~empty], zero.expand(int((~empty).sum()), -1), rtol=2e-3, atol=2e-3)


def test_explain_filters_all_filters_in_one_call(trained: dict[str, Any]) -> None:
    ses = open_session(trained["store"], device="cpu", workers=0)
    vocab = vocabulary_for(ses, "concepts")
    d = ses.cache.shape[0]
    every = explain_filters(ses.explainer, ses.cache, vocab, range(d), method="attention", p=4, s=2, k=2)
    some = explain_filters(ses.explainer, ses.cache, vocab, [4, 1], method="attention", p=4, s=2, k=2)
    assert torch.equal(every.image_words[[4, 1]], some.image_words)
    assert every.words[4] == some.words[0] and every.words[1] == some.words[1]
    with pytest.raises(LaviseError):
        explain_filters(None, ses.cache, vocab, [0], method="attention")
    with pytest.raises(LaviseError):
        explain_filters(ses.explainer, ses.cache, vocab, [0], method="telepathy")


def test_evaluate_needs_a_labelled_target(trained: dict[str, Any]) -> None:
    ses = open_session(trained["store"], images=trained["images"], device="cpu", workers=0)
    assert not ses.target.labelled
    vocab = vocabulary_for(ses, "concepts")
    with pytest.raises(LaviseError, match="label"):
        evaluate_methods(ses, ["attention", "original"], vocab, cuts=(1,), p=3)
    # Explaining an unlabelled folder works.
    ex = run_explain(ses, [0, 1], "attention", vocab, p=3, s=2, k=2)
    assert ex.top_rows.shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------



def test_cli_filter_errors(trained: dict[str, Any]) -> None:
    home = trained["home"]
    line = assert_clear_error(run_cli(home, "-q", "explain", "--filters", "99999"), "99999")
    assert "6 filters" in line
    assert_clear_error(run_cli(home, "-q", "explain", "--filters", "abc"), "abc")
    assert_clear_error(run_cli(home, "-q", "explain", "--filters", "3-1"))
    assert_clear_error(run_cli(home, "-q", "explain"), "--filters")
    assert_clear_error(run_cli(home, "-q", "evaluate", "--filters", "6", "--recall", "1"), "6")
    # With progress bars on (no -q), the error is still one clear line at the end.
    res = run_cli(home, "explain", "-f", "99999")
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert [ln for ln in res.stderr.splitlines() if ln.strip()][-1].startswith("error:")
    assert sum(ln.startswith("error:") for ln in res.stderr.splitlines()) == 1


def test_cli_explainer_for_another_model_or_layer(trained: dict[str, Any]) -> None:
    home = trained["home"]
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--model", "resnet18"), "resnet18")
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--layer", "pool"), "pool", "feat")
    assert_clear_error(run_cli(home, "-q", "evaluate", "--layer", "conv"), "conv")
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--explainer", "nope"), "nope")


def _twice_factory(original: str) -> str:
    """The same factory and parameters (same weights digest), but layer ``feat`` now has 12 channels."""
    twice = "class Twice(nn.Module):\n    def forward(self, x):\n        return torch.cat([x, x], 1)\n\n\nclass Colours"
    return original.replace("self.feat = nn.Identity()", "self.feat = Twice()").replace("class Colours", twice)


def test_cli_model_changed_since_training(trained: dict[str, Any], tmp_path: Path) -> None:
    """The factory edited after training: other weights, or the same weights but another layer width."""
    factory: Path = trained["factory"]
    original = factory.read_text()
    fresh = tmp_path / "fresh"  # a target set never passed before: no cached maps to reuse
    fresh.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 30 * i, 10)).save(fresh / f"f{i}.png")
    try:
        factory.write_text(original.replace("[0.3, 0.3, 0.3]", "[0.3, 0.3, 0.4]"))
        assert_clear_error(run_cli(trained["home"], "-q", "explain", "-f", "0"), "train")
        factory.write_text(_twice_factory(original))
        line = assert_clear_error(run_cli(trained["home"], "-q", "explain", "-f", "0", "--image-dir", fresh))
        assert "12" in line and "6" in line
    finally:
        factory.write_text(original)
    assert run_cli(trained["home"], "-q", "explain", "-f", "0", "--json").exit_code == 0


def test_cli_model_code_changed_is_not_served_from_stale_cache(trained: dict[str, Any]) -> None:
    factory: Path = trained["factory"]
    original = factory.read_text()
    assert run_cli(trained["home"], "-q", "explain", "-f", "0", "--json").exit_code == 0  # target pass cached
    try:
        factory.write_text(_twice_factory(original))
        res = run_cli(trained["home"], "-q", "explain", "-f", "0", "--json")
    finally:
        factory.write_text(original)
    line = assert_clear_error(res)
    assert "12" in line and "6" in line


def test_cli_unlabelled_target_errors(trained: dict[str, Any]) -> None:
    home = trained["home"]
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--method", "netdissect", "--image-dir",
                               trained["images"]), "netdissect")
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--image-dir", trained["base"] / "missing"),
                       "missing")
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--method", "telepathy"), "telepathy")
    assert_clear_error(run_cli(home, "-q", "evaluate", "--methods", "attention,telepathy"), "telepathy")
    assert_clear_error(run_cli(home, "-q", "evaluate", "--recall", "a,b"), "--recall")


def test_cli_no_explainer_yet(cli: Any) -> None:
    """An empty store (the conftest ``cli`` fixture's fresh home)."""
    assert_clear_error(cli("-q", "explain", "-f", "0"), "train")
    assert_clear_error(cli("-q", "evaluate"), "train")
    assert_clear_error(cli("-q", "explain", "--all", "--image-dir", "."), "train")


def test_cli_explain_csv_matches_its_help_and_names_the_sum(trained: dict[str, Any]) -> None:
    from lavise_cli.cli.explain_cmd import CSV_COLUMNS

    home = trained["home"]
    res = run_cli(home, "-q", "explain", "-f", "0,1", "-p", "6", "--csv")
    assert res.exit_code == 0, res.output
    header = next(csv.reader(io.StringIO(res.stdout)))
    assert tuple(header) == CSV_COLUMNS
    helptext = " ".join(run_cli(home, "explain", "--help").stdout.replace("│", " ").split())
    assert ", ".join(header) in helptext, helptext  # --help lists exactly the columns printed
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    doc = json.loads(run_cli(home, "-q", "explain", "-f", "0,1", "-p", "6", "--json").stdout)
    words = [w for f in doc["filters"] for w in f["words"]]
    assert [float(r["similarity_sum"]) for r in rows] == [w["similarity_sum"] for w in words]
    for w in words:
        assert w["similarity"] == w["similarity_sum"]  # the old key, kept for compatibility
        assert w["similarity_sum"] <= w["images"] + 1e-6  # a sum of cosines, one per image naming it
    assert any(w["similarity_sum"] > 1 for w in words)  # why it is not called a similarity


def test_cli_explain_json_csv_and_saved(trained: dict[str, Any]) -> None:
    home, store = trained["home"], trained["store"]
    res = run_cli(home, "-q", "explain", "-f", "0,3-4", "-p", "5", "-s", "3", "-k", "2", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [f["filter"] for f in doc["filters"]] == [0, 3, 4]
    assert doc["method"] == "attention" and doc["layer"] == "feat" and doc["explainer"] == trained["explainer"]
    assert {k: doc["settings"][k] for k in ("p", "s", "k")} == {"p": 5, "s": 3, "k": 2}
    assert (doc["settings"]["retrieval"], doc["settings"]["rank"]) == (DEFAULT_RETRIEVAL, DEFAULT_RANK)
    assert doc["vocabulary"]["source"] == "default"
    for f in doc["filters"]:
        assert len(f["top_images"]) == 5
        assert all(len(t["words"]) == 3 for t in f["top_images"])
        assert 1 <= len(f["words"]) <= 2
        for w in f["words"]:
            assert w["novel"] == (w["word"] not in {"dog", "cat", "car"})
            assert 1 <= w["images"] <= 5
    saved = Path(doc["saved"])
    assert saved.is_file()
    assert saved.parent == store.path("explainers", trained["explainer"]) / "results"
    on_disk = json.loads(saved.read_text())
    assert [f["filter"] for f in on_disk["filters"]] == [0, 3, 4]
    assert on_disk["filters"][0]["words"] == doc["filters"][0]["words"]

    res = run_cli(home, "-q", "explain", "-f", "5,1", "--method", "original", "-k", "3", "--vocab", "concepts", "--csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert rows, res.stdout
    assert set(rows[0]) >= {"filter", "rank", "word", "images", "novel"}
    assert {int(r["filter"]) for r in rows} == {1, 5}
    assert all(r["word"] in {"dog", "cat", "car"} and r["novel"] == "0" for r in rows)
    for u in ("1", "5"):
        ranks = [int(r["rank"]) for r in rows if r["filter"] == u]
        assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= 3
    results = list((store.path("explainers", trained["explainer"]) / "results").glob("explain-original-*.json"))
    assert results

    # netdissect on the labelled default target: concept words only, the same for every image.
    doc = run_cli(home, "-q", "explain", "-f", "1", "--method", "netdissect", "-s", "2", "-p", "3", "--json")
    assert doc.exit_code == 0, doc.output
    nd = json.loads(doc.stdout)["filters"][0]
    assert len({tuple(t["words"]) for t in nd["top_images"]}) == 1

    # The table: every filter asked for, on stdout.
    res = run_cli(home, "-q", "explain", "-f", "2,4")
    assert res.exit_code == 0, res.output
    assert "2" in res.stdout and "4" in res.stdout

    # Filter 5 (darkness) never fires on these bright images: T_5 <= 0, reported inactive.
    doc = json.loads(run_cli(home, "-q", "explain", "-f", "4,5", "--json").stdout)
    assert [f["inactive"] for f in doc["filters"]] == [False, True]
    assert doc["filters"][1]["threshold"] <= 0
    res = run_cli(home, "-q", "explain", "-f", "5")
    assert res.exit_code == 0 and "inactive" in res.stdout


def test_cli_explain_retrieval_rank_and_confidence(trained: dict[str, Any]) -> None:
    home = trained["home"]
    docs = {}
    for retrieval in ("cosine", "csls", "centred", "inverted-softmax"):
        for rank in ("count", "specific"):
            res = run_cli(home, "-q", "explain", "-f", "0,2", "-p", "5", "-s", "3", "-k", "3", "--retrieval", retrieval,
                          "--rank", rank, "--json")
            assert res.exit_code == 0, res.output
            doc = json.loads(res.stdout)
            assert (doc["settings"]["retrieval"], doc["settings"]["rank"]) == (retrieval, rank)
            # The background is the whole layer (6 filters, 5 active), even for 2 filters asked.
            assert doc["background_filters"] == 5
            for f in doc["filters"]:
                assert 0.0 <= f["confidence"] <= 1.0
                assert f["confidence"] == pytest.approx(f["agreement"] * f["top_word_specificity"], abs=1e-3)
                assert f["agreement"] == pytest.approx(f["words"][0]["images"] / 5)
                for w in f["words"]:
                    assert 1 <= w["images"] <= 5 and w["layer_mean"] >= 0 and "specificity" in w
                if rank == "specific":
                    sp = [w["specificity"] for w in f["words"]]
                    assert sp == sorted(sp, reverse=True)
                else:
                    cnt = [w["images"] for w in f["words"]]
                    assert cnt == sorted(cnt, reverse=True)
            docs[retrieval, rank] = doc
    # The rank reorders a filter's words but never changes what each image named.
    for retrieval in ("cosine", "csls"):
        a, b = docs[retrieval, "count"], docs[retrieval, "specific"]
        assert [[t["words"] for t in f["top_images"]] for f in a["filters"]] == \
            [[t["words"] for t in f["top_images"]] for f in b["filters"]]
    res = run_cli(home, "-q", "explain", "-f", "0", "--retrieval", "csls", "--rank", "specific", "--csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert rows and {"specificity", "layer_mean", "confidence", "images"} <= set(rows[0])
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--retrieval", "hubless"), "hubless", "csls")
    assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--rank", "tfidf"), "tfidf", "specific")
    assert_clear_error(run_cli(home, "-q", "evaluate", "--retrieval", "hubless"), "hubless")


def test_cli_evaluate_json(trained: dict[str, Any]) -> None:
    res = run_cli(trained["home"], "-q", "evaluate", "--recall", "1,3", "--methods", "all", "-p", "4", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc["methods"]) == {"attention", "activation-masking", "image-masking", "original", "netdissect",
                                   "frequency"}
    for m, r in doc["methods"].items():
        for key in ("recall@1", "recall@3"):
            assert set(r[key]) == {"pair_mean", "filter_mean"}
        assert r["pairs"] + r["skipped"] == 6 * 4
        assert r["filters"] <= 6
        # recall@s never falls as s grows.
        if r["pairs"]:
            assert r["recall@3"]["pair_mean"] >= r["recall@1"]["pair_mean"]
        # Diversity of the filters' words over the 5 active filters.
        dv = r["diversity"]
        assert set(dv) == {"distinct_top1", "top1_share", "filters_per_word"}
        assert 1 <= dv["distinct_top1"] <= 5 and 1 / 5 <= dv["top1_share"] <= 1.0
        assert 1.0 <= dv["filters_per_word"] <= 5.0
    # The frequency baseline names the same words for every filter.
    assert doc["methods"]["frequency"]["diversity"] == {"distinct_top1": 1, "top1_share": 1.0, "filters_per_word": 5.0}
    assert (doc["retrieval"], doc["rank"]) == (DEFAULT_RETRIEVAL, DEFAULT_RANK)
    assert Path(doc["per_filter_saved"]).is_file()
    res = run_cli(trained["home"], "-q", "evaluate", "--recall", "1,3", "-p", "4")
    assert res.exit_code == 0, res.output
    assert "distinct top-1" in res.stdout


def test_netdissect_with_more_words_than_concepts(trained: dict[str, Any]) -> None:
    home = trained["home"]
    res = run_cli(home, "-q", "explain", "-f", "1", "--method", "netdissect", "-s", "5", "-p", "3", "--json")
    assert res.exit_code == 0, (res.output, repr(res.exception))
    nd = json.loads(res.stdout)["filters"][0]
    assert all(sorted(t["words"]) == ["car", "cat", "dog"] for t in nd["top_images"])
    res = run_cli(home, "-q", "evaluate", "--methods", "netdissect", "--recall", "1,5", "-p", "3", "--json")
    assert res.exit_code == 0, (res.output, repr(res.exception))


RANDOM_HEAD_FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 2))
        return net, {"input_size": 32}
    """
)


def test_factory_with_random_init_loads_repeatably(tmp_path: Path) -> None:
    from lavise_cli.models import load_model

    f = tmp_path / "random_head.py"
    f.write_text(RANDOM_HEAD_FACTORY)
    a = load_model(f"{f}:build", "none")
    b = load_model(f"{f}:build", "DEFAULT")  # what pipeline.model_for asks for a factory explainer
    assert a.weights_digest == b.weights_digest
