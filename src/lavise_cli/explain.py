"""Explaining filters: top images, filter attention and the paper's baselines, word selection.

All filters of a layer are explained in one batched computation: the work is split into chunks
of filters only to bound memory; there is no Python loop over single filters, images or words.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .embeddings import Vocabulary
from .errors import LaviseError
from .explainer import LoadedExplainer
from .passes.target import TargetCache

# Defined there so that the CLI reads them without torch.
from .defaults import DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_RETRIEVAL, METHODS, RANKS, RETRIEVALS  # noqa: E402,F401
EPS = 1e-8
# Nearest-word search (see docs/method.md, "Words that tell filters apart"):
#   cosine            cos(v, w)
#   csls              2 cos(v, w) - r_w - r_v, r_w the mean cosine of word w to its CSLS_K nearest
#                     predicted vectors of the layer, r_v that of v to its CSLS_K nearest words
#   centred           cos(v - mu, w), mu the mean predicted vector of the layer
#   inverted-softmax  cos(v, w) - log(mean_x exp(beta cos(x, w))) / beta over the layer's vectors
# Per-filter word ranking (RANKS): by count (images naming the word), or by specificity against the layer.
CSLS_K = 10
SOFTMAX_BETA = 30.0
SPECIFICITY_PRIOR = 0.05  # chosen by measurement (docs/method.md)


def parse_filters(spec: str | None, d: int, all_filters: bool = False) -> list[int]:
    """``150,275``, ranges ``0-63``, or all; a clear error for an index outside ``0..d-1``."""
    if all_filters or spec is None or spec.strip().lower() in {"all", ""}:
        return list(range(d))
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise LaviseError(f"cannot read filter {part!r}: use numbers and ranges, e.g. --filters 0,5,10-20") from None
        if hi < lo:
            raise LaviseError(f"filter range {part!r} runs backwards; write it as {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    bad = [u for u in out if u < 0 or u >= d]
    if bad:
        raise LaviseError(f"filter {bad[0]} is out of range: this layer has {d} filters (0-{d - 1})")
    return sorted(set(out))


def top_images(cache: TargetCache, p: int) -> torch.Tensor:
    """``(d, p)`` rows of the images with the largest maximum activation per filter.

    Ties (common under saturation) are broken by the image's mean activation, then image order;
    streamed over the cached per-image statistics (:meth:`LayerMaps.top_rows`).
    """
    return cache.top_rows(p)


def attention_inputs(maps: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Filter attention: ``a_k = cos(F_u, F_k)``; input ``a * mean_hw(F)``.

    ``maps`` (B, d, h, w) and ``filt`` (B,) the filter ``u`` of each row -> (B, d).  When every
    row is one image's maps (``maps`` an expanded view, batch stride 0), the image's norms and
    means are computed once and the dot products are one ``(B, hw) @ (hw, d)`` product.
    """
    if len(filt) > 1 and maps.stride(0) == 0:
        one = maps[0].flatten(1)  # (d, hw): every row's maps
        norms = one.norm(dim=1)  # (d,)
        dots = one[filt] @ one.T  # (B, d)
        return dots / (norms[None, :] * norms[filt][:, None] + EPS) * one.mean(1)[None, :]
    flat = maps.flatten(2)  # (B, d, hw)
    fu = flat[torch.arange(len(filt)), filt]  # (B, hw)
    dots = torch.einsum("bdn,bn->bd", flat, fu)
    cos = dots / (flat.norm(dim=2) * fu.norm(dim=1, keepdim=True) + EPS)
    return cos * flat.mean(2)


def original_inputs(maps: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    return maps.flatten(2).mean(2)


def activation_mask_inputs(maps: torch.Tensor, filt: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``mean_hw(F * [F_u >= T_u])`` (ties count, as for regions)."""
    flat = maps.flatten(2)
    fu = flat[torch.arange(len(filt)), filt]
    mask = (fu >= thresholds[filt][:, None]).to(flat.dtype)
    return (flat * mask[:, None, :]).mean(2)


def regions(maps: torch.Tensor, filt: torch.Tensor, thresholds: torch.Tensor, size: int, cells: bool = True
            ) -> torch.Tensor:
    """The filter's region per row -> bool (B, size, size).

    ``F_u`` bilinearly upsampled to ``size``, ``>= T_u``; with ``cells`` (the default) united with
    the nearest-neighbour footprint of the cells that reach ``T_u`` themselves.  Without the
    footprint, a single peak cell at ``T_u`` (a saturated filter: ReLU6 caps at ``T_u``) is never
    reached between pixel centres and the image has an empty region.
    """
    return filter_regions(maps[torch.arange(len(filt)), filt], thresholds[filt], size, cells)


def filter_regions(fmaps: torch.Tensor, thresholds: torch.Tensor, size: int, cells: bool = True) -> torch.Tensor:
    """:func:`regions` from each row's own filter map: ``fmaps`` (B, h, w), ``thresholds`` (B,)."""
    fu = fmaps[:, None]  # (B, 1, h, w)
    thr = thresholds[:, None, None]
    up = F.interpolate(fu, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    reg = up >= thr
    if cells:
        # The cells' nearest-neighbour footprint, by indexing: the source cell of each pixel row
        # and column is the one F.interpolate(mode="nearest-exact") picks.
        h, w = fmaps.shape[1:]
        iy, ix = _nearest_exact_index(h, size), _nearest_exact_index(w, size)
        hot = fmaps >= thr  # (B, h, w)
        reg |= hot[:, iy[:, None], ix[None, :]]
    return reg


@functools.lru_cache(maxsize=64)
def _nearest_exact_index(n: int, size: int) -> torch.Tensor:
    """The source index of each of ``size`` pixels upsampled from ``n`` cells by ``nearest-exact``."""
    src = torch.arange(n, dtype=torch.float32).view(1, 1, n)
    return F.interpolate(src, size=size, mode="nearest-exact")[0, 0].round().long()


@dataclass
class Explanation:
    """Words for a set of filters; everything indexed like ``filters``."""

    method: str
    filters: list[int]
    top_rows: torch.Tensor  # (F, p) target-cache rows of each filter's top images
    image_words: torch.Tensor  # (F, p, s) vocabulary indices, best first
    image_scores: torch.Tensor  # (F, p, s) cosine similarities
    words: list[list[tuple[str, int, float]]]  # per filter: (word, images naming it, summed similarity)
    inactive: list[bool]
    vocabulary: Vocabulary
    settings: dict[str, Any] = field(default_factory=dict)
    # Per filter, beside ``words``: (specificity score, the word's mean count over the layer's filters).
    word_scores: list[list[tuple[float, float]]] = field(default_factory=list)
    # Per filter: {"confidence", "agreement", "specificity"} (see :func:`filter_confidence`).
    confidence: list[dict[str, float]] = field(default_factory=list)
    # The background the specificity and the retrieval correction came from: active filters counted.
    background_filters: int = 0


@dataclass
class RetrievalStats:
    """What a retrieval correction needs from the layer's predicted vectors (the background)."""

    mean: torch.Tensor | None = None  # (e,) centred
    r_word: torch.Tensor | None = None  # (V,) csls
    log_norm: torch.Tensor | None = None  # (V,) inverted-softmax


def retrieval_stats(background: torch.Tensor, vv: torch.Tensor, retrieval: str, chunk: int = 1024) -> RetrievalStats:
    """Statistics of the background vectors ``(N, e)`` against the vocabulary ``(V, e)`` (unit rows)."""
    if retrieval not in RETRIEVALS:
        raise LaviseError(f"unknown retrieval {retrieval!r}; choose from {', '.join(RETRIEVALS)}")
    st = RetrievalStats()
    if retrieval == "centred":
        st.mean = background.mean(0) if len(background) else torch.zeros(vv.shape[1])
    elif retrieval in ("csls", "inverted-softmax"):
        out = torch.zeros(len(vv))
        n = len(background)
        for c0 in range(0, len(vv), chunk):
            sims = vv[c0:c0 + chunk] @ background.T  # (c, N)
            if n == 0:
                continue
            if retrieval == "csls":
                out[c0:c0 + chunk] = sims.topk(min(CSLS_K, n), dim=1).values.mean(1)
            else:
                out[c0:c0 + chunk] = (torch.logsumexp(SOFTMAX_BETA * sims, dim=1) - math.log(n)) / SOFTMAX_BETA
        if retrieval == "csls":
            st.r_word = out
        else:
            st.log_norm = out
    return st


def retrieval_scores(v: torch.Tensor, vv: torch.Tensor, retrieval: str, stats: RetrievalStats) -> torch.Tensor:
    """Scores ``(B, V)`` of predicted unit vectors ``v`` against the vocabulary under ``retrieval``."""
    if retrieval == "centred":
        assert stats.mean is not None
        c = v - stats.mean
        return (c / (c.norm(dim=1, keepdim=True) + EPS)) @ vv.T
    cos = v @ vv.T
    if retrieval == "csls":
        assert stats.r_word is not None
        r_v = cos.topk(min(CSLS_K, cos.shape[1]), dim=1).values.mean(1, keepdim=True)
        return 2 * cos - stats.r_word[None, :] - r_v
    if retrieval == "inverted-softmax":
        assert stats.log_norm is not None
        return cos - stats.log_norm[None, :]
    return cos


def nearest_words(v: torch.Tensor, vv: torch.Tensor, s: int, retrieval: str, stats: RetrievalStats,
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``s`` best words per row of ``v`` under ``retrieval`` -> (indices, cosine similarities), best first."""
    idx = torch.zeros(len(v), s, dtype=torch.long)
    sim = torch.zeros(len(v), s)
    for c0 in range(0, len(v), chunk):
        vc = v[c0:c0 + chunk]
        i = retrieval_scores(vc, vv, retrieval, stats).topk(s, dim=1).indices
        idx[c0:c0 + chunk] = i
        sim[c0:c0 + chunk] = (vc[:, None, :] * vv[i]).sum(2)
    return idx, sim


def _chunk_size(p: int, d: int, hw: int, budget: int = 1 << 28) -> int:
    """Filters per chunk so that the gathered maps stay under ~``budget`` bytes (float32)."""
    return max(1, budget // max(1, p * d * hw * 4))



def _predicted_vectors(g: Any, cache: TargetCache, filt: torch.Tensor, top: torch.Tensor, method: Any,
                       masked_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                       progress: Any = None, budget: int = 1 << 28) -> torch.Tensor:
    """The explainer's unit vectors ``(F, p, e)`` for every (filter, top image) pair of ``filt``.

    ``method`` (a :class:`lavise_cli.methods.Method`) makes the inputs from the cached maps, else
    ``masked_inputs(rows, filters)`` does.
    """
    d, h, w = cache.shape
    nf, p = top.shape
    uniq, inv = torch.unique(top, return_inverse=True)
    from_maps = method.map_inputs is not None
    chunk = _chunk_size(p, d, h * w)
    out: torch.Tensor | None = None
    task = progress.add_task(f"explaining ({method.name})", total=nf, unit="filter") if progress is not None else None
    if from_maps:
        # The maps are streamed: blocks of distinct top images (sorted, so shards are read in
        # order), at most ``budget`` bytes of float32 maps at a time, whatever d x p is (32,000
        # rows of 1280 x 7 x 7 would be 7.8 GB at once).  Rows of one image share its map as a
        # broadcast view, so a map is never copied once per (filter, image) row.
        pos = inv.reshape(-1)
        fr_all = filt.repeat_interleave(p)
        order = torch.argsort(pos, stable=True)
        counts = torch.bincount(pos, minlength=len(uniq))
        starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).tolist()
        per_block = max(1, budget // max(1, d * h * w * 4))
        z_all: torch.Tensor | None = None
        for b0 in range(0, len(uniq), per_block):
            maps = cache.maps(uniq[b0:b0 + per_block])
            for j in range(b0, min(len(uniq), b0 + per_block)):
                n = starts[j + 1] - starts[j]
                if n == 0:
                    continue
                sel = order[starts[j]:starts[j + 1]]
                z = method.map_inputs(maps[j - b0:j - b0 + 1].expand(n, -1, -1, -1), fr_all[sel], cache.threshold)
                if z_all is None:
                    z_all = torch.empty(len(pos), z.shape[1], dtype=z.dtype)
                z_all[sel] = z
            del maps
        assert z_all is not None
        for c0 in range(0, len(pos), 8192):
            v = g(z_all[c0:c0 + 8192])
            if out is None:
                out = torch.zeros(nf * p, v.shape[1])
            out[c0:c0 + len(v)] = v
        if task is not None:
            progress.advance(task, nf)
        assert out is not None
        return out.view(nf, p, -1)
    for c0 in range(0, nf, chunk):
        fc = filt[c0:c0 + chunk]
        rows = inv[c0:c0 + chunk].reshape(-1)  # (c*p,) positions in uniq
        fr = fc.repeat_interleave(p)  # the filter of each (filter, image) row
        assert masked_inputs is not None
        z = masked_inputs(uniq[rows], fr)
        v = g(z)  # (c*p, e) unit vectors
        if out is None:
            out = torch.zeros(nf, p, v.shape[1])
        out[c0:c0 + len(fc)] = v.view(len(fc), p, -1)
        if task is not None:
            progress.advance(task, len(fc))
    assert out is not None
    return out


@torch.no_grad()
def explain_filters(
    explainer: LoadedExplainer | None,
    cache: TargetCache,
    vocab: Vocabulary,
    filters: Sequence[int],
    *,
    method: str = DEFAULT_METHOD,
    p: int = 25,
    s: int = 5,
    k: int = 5,
    retrieval: str = DEFAULT_RETRIEVAL,
    rank: str = DEFAULT_RANK,
    rank_s: int | None = None,
    masked_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    fixed_words: torch.Tensor | None = None,
    progress: Any = None,
) -> Explanation:
    """Explain ``filters`` over the cached target set.

    ``retrieval`` picks each image's nearest words (:data:`RETRIEVALS`), ``rank`` orders a filter's
    words (:data:`RANKS`).  Both corrections need the whole layer as background: the predicted
    vectors of every active filter's top images, and each word's mean count over those filters.
    They come from the same batched pass, over all filters of the layer even when only a few are
    asked, except for ``image-masking`` (which re-runs the backbone per pair: its background is
    the filters asked) and ``netdissect`` (fixed words: the filters asked).

    ``rank_s``: the per-filter words gather only each image's first ``rank_s`` words (default ``s``;
    ``evaluate`` retrieves 20 words per image for recall@20 but ranks filters' words as ``explain`` does).

    ``masked_inputs(rows, filters) -> z`` serves ``image-masking`` (it re-runs the backbone);
    ``fixed_words`` ``(F, s)`` serves methods that name the same words for every image of a filter
    (``netdissect``: concepts ranked by IoU).
    """
    from .methods import get_method  # the registry (it builds on this module)

    meth = get_method(method, explain=True)
    if retrieval not in RETRIEVALS:
        raise LaviseError(f"unknown retrieval {retrieval!r}; choose from {', '.join(RETRIEVALS)}")
    if rank not in RANKS:
        raise LaviseError(f"unknown rank {rank!r}; choose from {', '.join(RANKS)}")
    d, h, w = cache.shape
    filt = torch.as_tensor(list(filters), dtype=torch.long)
    top_all = top_images(cache, p)  # (d, p)
    top = top_all[filt]  # (F, p)
    p = top.shape[1]
    nf = len(filt)
    active = cache.threshold > 0  # (d,)
    V = len(vocab.words)
    s_eff = min(s, V if fixed_words is None else fixed_words.shape[1])
    if fixed_words is not None:
        words_idx = fixed_words[:, None, :s_eff].expand(nf, p, s_eff).clone()
        words_sim = torch.ones(nf, p, s_eff)
        bg_idx = words_idx[active[filt]]
    else:
        if explainer is None:
            raise LaviseError(f"method {meth.name} needs an explainer")
        if meth.map_inputs is None and masked_inputs is None:
            raise LaviseError(f"method {meth.name} makes its inputs with the session: run it through run_explain")
        g = explainer.module.eval()
        vv = torch.as_tensor(vocab.vectors, dtype=torch.float32)
        layer_wide = meth.layer_wide
        comp = torch.arange(d) if layer_wide else filt
        vecs = _predicted_vectors(g, cache, comp, top_all[comp], meth, masked_inputs, progress)
        e = vecs.shape[2]
        bg_mask = active[comp]
        stats = retrieval_stats(vecs[bg_mask].reshape(-1, e), vv, retrieval)
        idx_c, sim_c = nearest_words(vecs.reshape(-1, e), vv, s_eff, retrieval, stats)
        idx_c, sim_c = idx_c.view(len(comp), p, s_eff), sim_c.view(len(comp), p, s_eff)
        pos = filt if layer_wide else torch.arange(nf)
        words_idx, words_sim = idx_c[pos], sim_c[pos]
        bg_idx = idx_c[bg_mask]
    rs = s_eff if rank_s is None else max(1, min(rank_s, s_eff))
    n_bg = int(bg_idx.shape[0])
    background = torch.bincount(bg_idx[..., :rs].reshape(-1), minlength=V).float() / max(1, n_bg)  # mean count
    words, scores, conf = rank_words(words_idx[..., :rs], words_sim[..., :rs], V, k, vocab.words, rank=rank,
                                     background=background, details=True)
    inactive = (~active[filt]).tolist()
    return Explanation(method=meth.name, filters=filt.tolist(), top_rows=top, image_words=words_idx,
                       image_scores=words_sim, words=words, inactive=inactive, vocabulary=vocab,
                       settings={"p": p, "s": s_eff, "k": k, "retrieval": retrieval, "rank": rank,
                                 **({"rank_s": rs} if rs != s_eff else {})},
                       word_scores=scores, confidence=conf, background_filters=n_bg)


def specificity(counts: torch.Tensor, background: torch.Tensor, prior: float | None = None) -> torch.Tensor:
    """How specific a word's count is to a filter: ``c · log((c + a) / (m + a))`` (TF-IDF-like).

    ``counts`` ``(F, V)``: images of each filter naming each word; ``background`` ``(V,)``: the word's
    mean count over the layer's filters.  A word every filter names as often as this one scores
    about 0; a word named only here scores ``c · log((c + a) / a)``; zero counts score 0.
    """
    m = background[None, :].to(counts.dtype)
    prior = SPECIFICITY_PRIOR if prior is None else prior
    return counts * torch.log((counts + prior) / (m + prior))


def rank_words(idx: torch.Tensor, sim: torch.Tensor, V: int, k: int, vocab_words: Sequence[str], *,
               rank: str = "count", background: torch.Tensor | None = None, details: bool = False) -> Any:
    """Per filter, the top ``k`` words with (word, images naming it, summed similarity).

    ``rank="count"``: by how many of its images named them, ties by summed similarity.
    ``rank="specific"``: by :func:`specificity` against ``background`` (each word's mean count over
    the layer's filters; default: over the filters given), ties by count then summed similarity.
    Only words some image named are listed.  With ``details``, also returns per filter the
    (specificity, background) of each listed word and the filter's confidence.
    """
    if rank not in RANKS:
        raise LaviseError(f"unknown rank {rank!r}; choose from {', '.join(RANKS)}")
    nf, p, s = idx.shape
    counts = torch.zeros(nf, V)
    sums = torch.zeros(nf, V)
    flat = idx.reshape(nf, -1)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    sums.scatter_add_(1, flat, sim.reshape(nf, -1).float())
    if background is None:
        background = counts.mean(0)
    spec = specificity(counts, background)
    tie = sums / (p * s + 1.0)  # < 1: breaks ties only
    if rank == "count":
        score = counts + tie
    else:
        # Specificity first; equal scores (same count and background) by summed similarity.
        score = spec.double() + 1e-7 * (counts.double() + tie.double())
    score = torch.where(counts > 0, score, torch.full_like(score, float("-inf")))
    kk = min(k, V)
    top = score.topk(kk, dim=1).indices
    cnt = counts.gather(1, top)
    sm = sums.gather(1, top)
    sp = spec.gather(1, top)
    bg = background[top]
    out, extra, conf = [], [], []
    for row_i, row_c, row_s, row_sp, row_bg in zip(top.tolist(), cnt.tolist(), sm.tolist(), sp.tolist(), bg.tolist()):
        keep = [j for j, c in enumerate(row_c) if c > 0]
        out.append([(vocab_words[row_i[j]], int(row_c[j]), float(row_s[j])) for j in keep])
        extra.append([(float(row_sp[j]), float(row_bg[j])) for j in keep])
        conf.append(filter_confidence(row_c[0] if keep else 0.0, row_bg[0] if keep else 0.0, p))
    return (out, extra, conf) if details else out


def filter_confidence(count: float, background: float, p: int) -> dict[str, float]:
    """A filter's confidence in its top word, in [0, 1]: ``agreement × specificity``.

    agreement: the share of its ``p`` top images that name the top word; specificity: the share of
    that count above the word's mean count over the layer's filters, ``max(0, 1 − m / c)``.  A hub
    word (named as often everywhere) gets about 0 whatever the agreement.
    """
    agree = float(count) / p if p else 0.0
    spec = max(0.0, 1.0 - float(background) / float(count)) if count > 0 else 0.0
    return {"confidence": round(agree * spec, 4), "agreement": round(agree, 4), "specificity": round(spec, 4)}


def diversity(words: Sequence[Sequence[Any]], inactive: Sequence[bool] | None = None, k: int = 5) -> dict[str, Any]:
    """How different the filters' explanations are, over active filters with words.

    ``distinct_top1``: distinct top-1 words; ``top1_share``: share of filters whose top-1 word is the
    most common one; ``filters_per_word``: mean number of filters per word of the top-``k`` lists.
    ``words`` holds per filter its ranked words (strings, or tuples whose first item is the word).
    """
    lists = []
    for j, ws in enumerate(words):
        if inactive is not None and inactive[j]:
            continue
        names = [w if isinstance(w, str) else w[0] for w in ws][:k]
        if names:
            lists.append(names)
    if not lists:
        return {"distinct_top1": 0, "top1_share": None, "filters_per_word": None, "filters": 0, "most_common": None}
    top1: dict[str, int] = {}
    for names in lists:
        top1[names[0]] = top1.get(names[0], 0) + 1
    per_word: dict[str, int] = {}
    for names in lists:
        for n in set(names):
            per_word[n] = per_word.get(n, 0) + 1
    common = max(top1.items(), key=lambda kv: (kv[1], kv[0]))
    return {"distinct_top1": len(top1), "top1_share": round(common[1] / len(lists), 4),
            "filters_per_word": round(sum(per_word.values()) / len(per_word), 3), "filters": len(lists),
            "most_common": common[0]}
