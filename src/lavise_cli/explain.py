"""Explaining filters: top images, filter attention and the paper's baselines, word selection.

All filters of a layer are explained in one batched computation: the work is split into chunks
of filters only to bound memory; there is no Python loop over single filters, images or words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .embeddings import Vocabulary
from .errors import LaviseError
from .explainer import LoadedExplainer
from .target import TargetCache

from .defaults import METHODS  # noqa: E402  (defined there so that the CLI reads it without torch)
EPS = 1e-8


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

    Ties (common under saturation) are broken by the image's mean activation, then image order.
    """
    mx, mean = cache.img_max, cache.img_mean  # (N, d)
    p = min(p, mx.shape[0])
    s1 = torch.argsort(-mean, dim=0, stable=True)
    s2 = torch.argsort(-mx.gather(0, s1), dim=0, stable=True)
    order = s1.gather(0, s2)
    return order[:p].T.contiguous()


def attention_inputs(maps: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Filter attention: ``a_k = cos(F_u, F_k)``; input ``a * mean_hw(F)``.

    ``maps`` (B, d, h, w) and ``filt`` (B,) the filter ``u`` of each row -> (B, d).
    """
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


def regions(maps: torch.Tensor, filt: torch.Tensor, thresholds: torch.Tensor, size: int) -> torch.Tensor:
    """The filter's region per row: ``F_u`` bilinearly upsampled to ``size``, ``>= T_u`` -> bool (B, size, size)."""
    fu = maps[torch.arange(len(filt)), filt][:, None]  # (B, 1, h, w)
    up = F.interpolate(fu, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return up >= thresholds[filt][:, None, None]


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


def _chunk_size(p: int, d: int, hw: int, budget: int = 1 << 28) -> int:
    """Filters per chunk so that the gathered maps stay under ~``budget`` bytes (float32)."""
    return max(1, budget // max(1, p * d * hw * 4))


@torch.no_grad()
def explain_filters(
    explainer: LoadedExplainer | None,
    cache: TargetCache,
    vocab: Vocabulary,
    filters: Sequence[int],
    *,
    method: str = "attention",
    p: int = 25,
    s: int = 5,
    k: int = 5,
    masked_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    fixed_words: torch.Tensor | None = None,
    progress: Any = None,
) -> Explanation:
    """Explain ``filters`` over the cached target set.

    ``masked_inputs(rows, filters) -> z`` serves ``image-masking`` (it re-runs the backbone);
    ``fixed_words`` ``(F, s)`` serves methods that name the same words for every image of a filter
    (``netdissect``: concepts ranked by IoU).
    """
    if method not in METHODS:
        raise LaviseError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    d, h, w = cache.shape
    filt = torch.as_tensor(list(filters), dtype=torch.long)
    top = top_images(cache, p)[filt]  # (F, p)
    p = top.shape[1]
    nf = len(filt)
    s_eff = min(s, len(vocab.words) if fixed_words is None else fixed_words.shape[1])
    words_idx = torch.zeros(nf, p, s_eff, dtype=torch.long)
    words_sim = torch.zeros(nf, p, s_eff)
    if fixed_words is not None:
        words_idx = fixed_words[:, None, :s_eff].expand(nf, p, s_eff).clone()
        words_sim = torch.ones(nf, p, s_eff)
    else:
        if explainer is None:
            raise LaviseError(f"method {method} needs an explainer")
        g = explainer.module.eval()
        vv = torch.as_tensor(vocab.vectors, dtype=torch.float32)
        # Rows of the target cache needed by any filter, loaded once.
        uniq, inv = torch.unique(top, return_inverse=True)
        maps = cache.maps(uniq) if method != "image-masking" else None
        chunk = _chunk_size(p, d, h * w)
        task = progress.add_task(f"explaining ({method})", total=nf, unit="filter") if progress is not None else None
        for c0 in range(0, nf, chunk):
            fc = filt[c0:c0 + chunk]
            rows = inv[c0:c0 + chunk].reshape(-1)  # (c*p,) positions in uniq
            fr = fc.repeat_interleave(p)  # the filter of each (filter, image) row
            if method == "image-masking":
                assert masked_inputs is not None
                z = masked_inputs(uniq[rows], fr)
            else:
                m = maps[rows]  # type: ignore[index]
                if method == "attention":
                    z = attention_inputs(m, fr)
                elif method == "original":
                    z = original_inputs(m, fr)
                else:
                    z = activation_mask_inputs(m, fr, cache.threshold)
            v = g(z)  # (c*p, e) unit vectors
            sims = v @ vv.T
            val, idx = sims.topk(s_eff, dim=1)
            words_idx[c0:c0 + len(fc)] = idx.view(len(fc), p, s_eff)
            words_sim[c0:c0 + len(fc)] = val.view(len(fc), p, s_eff)
            if task is not None:
                progress.advance(task, len(fc))
    words = rank_words(words_idx, words_sim, len(vocab.words), k, vocab.words)
    inactive = (cache.threshold[filt] <= 0).tolist()
    return Explanation(method=method, filters=filt.tolist(), top_rows=top, image_words=words_idx,
                       image_scores=words_sim, words=words, inactive=inactive, vocabulary=vocab,
                       settings={"p": p, "s": s_eff, "k": k})


def rank_words(idx: torch.Tensor, sim: torch.Tensor, V: int, k: int, vocab_words: Sequence[str]
               ) -> list[list[tuple[str, int, float]]]:
    """Per filter, words ranked by how many of its images named them, ties by summed similarity."""
    nf, p, s = idx.shape
    counts = torch.zeros(nf, V)
    sums = torch.zeros(nf, V)
    flat = idx.reshape(nf, -1)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    sums.scatter_add_(1, flat, sim.reshape(nf, -1).float())
    score = counts + sums / (p * s + 1.0) * (counts > 0)
    kk = min(k, V)
    top = score.topk(kk, dim=1).indices
    cnt = counts.gather(1, top)
    sm = sums.gather(1, top)
    out = []
    for row_i, row_c, row_s in zip(top.tolist(), cnt.tolist(), sm.tolist()):
        out.append([(vocab_words[i], int(c), float(v)) for i, c, v in zip(row_i, row_c, row_s) if c > 0])
    return out
