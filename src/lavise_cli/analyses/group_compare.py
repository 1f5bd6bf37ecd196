"""Which filters fire on one group of images more often than on another (paper §4.6).

:func:`compare_groups`: one target pass over the union of the groups' images (an
:class:`~lavise_cli.passes.target.ImageSet` cached like any target set); per filter ``u`` the
threshold ``T_u`` is the 0.995 quantile over the union (the pass's own threshold); an image is
*qualified* for ``u`` when its maximum activation reaches ``T_u`` (ties count, as for regions);
per group the share of qualified images; per pair of groups the difference of shares, a
two-sided test of equal proportions and Benjamini-Hochberg q-values over every test; each listed
filter's words come from filter attention over its qualified images in the group it favours
(:class:`RowWords`).  The groups themselves are made in :mod:`.image_groups`.

A difference of shares is an association in the data, not a cause (docs/compare.md).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch

from ..defaults import DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_RETRIEVAL  # DEFAULT_METHOD: filter attention
from ..embeddings import Vocabulary
from ..errors import LaviseError
from ..explain import (_predicted_vectors, attention_inputs, nearest_words, rank_words, retrieval_stats,
                       top_images)
from ..methods import check_word_settings, get_method
from ..session import Session, open_session, vocabulary_for
from ..store import Store
from .image_groups import Group, union_set
from .stats import benjamini_hochberg, proportion_test

# -------------------------------------------------------------------------------------------------
# Words over chosen images
# -------------------------------------------------------------------------------------------------


class RowWords:
    """Filter-attention words of a filter over chosen images of the session's target set.

    Each image's nearest words are found as ``explain`` finds them (``retrieval``, with the
    layer's predicted vectors over its top ``p`` images as background), and a filter's words are
    ranked as ``explain`` ranks them (``rank``; for ``specific``, against each word's mean count
    over the layer's filters, scaled to the number of images given).
    """

    @torch.no_grad()
    def __init__(self, session: Session, vocab: Vocabulary, *, p: int = 25, s: int = 5,
                 retrieval: str = DEFAULT_RETRIEVAL, rank: str = DEFAULT_RANK, progress: Any = None):
        check_word_settings(retrieval, rank)
        self.session, self.vocab, self.retrieval, self.rank = session, vocab, retrieval, rank
        cache = session.cache
        d = cache.shape[0]
        self.g = session.explainer.module.eval()
        self.vv = torch.as_tensor(vocab.vectors, dtype=torch.float32)
        V = len(vocab.words)
        self.s = min(s, V)
        top = top_images(cache, p)
        self.p_bg = int(top.shape[1])
        vecs = _predicted_vectors(self.g, cache, torch.arange(d), top, get_method(DEFAULT_METHOD), None, progress)
        active = cache.threshold > 0
        e = vecs.shape[2]
        self.stats = retrieval_stats(vecs[active].reshape(-1, e), self.vv, retrieval)
        idx, _ = nearest_words(vecs[active].reshape(-1, e), self.vv, self.s, retrieval, self.stats)
        n_bg = int(active.sum())
        self.background = torch.bincount(idx.reshape(-1), minlength=V).float() / max(1, n_bg)  # per p images
        self.concepts = set(session.meta["concepts"])

    @torch.no_grad()
    def words(self, u: int, rows: Sequence[int], k: int = 5) -> list[dict[str, Any]]:
        """The top ``k`` words of filter ``u`` over target-cache ``rows``: word, images naming it, novel."""
        if not len(rows):
            return []
        maps = self.session.cache.maps(list(rows))
        z = attention_inputs(maps, torch.full((len(rows),), int(u), dtype=torch.long))
        v = self.g(z)
        idx, sim = nearest_words(v, self.vv, self.s, self.retrieval, self.stats)
        bg = self.background * (len(rows) / max(1, self.p_bg))
        ranked = rank_words(idx[None], sim[None], len(self.vocab.words), k, self.vocab.words, rank=self.rank,
                            background=bg)[0]
        return [{"word": w, "images": c, "novel": w not in self.concepts} for w, c, _ in ranked]


def _ranked_rows(cache: Any, rows: np.ndarray, u: int) -> list[int]:
    """``rows`` ordered by the filter's maximum activation, then mean activation, then row (descending)."""
    if not len(rows):
        return []
    r = torch.as_tensor(rows, dtype=torch.long)
    mx, mean = cache.img_max[r, u].double(), cache.img_mean[r, u].double()
    order = sorted(range(len(rows)), key=lambda i: (-float(mx[i]), -float(mean[i]), int(rows[i])))
    return [int(rows[i]) for i in order]


# -------------------------------------------------------------------------------------------------
# compare groups
# -------------------------------------------------------------------------------------------------


def group_statistics(qualified: np.ndarray, group_of_row: np.ndarray, n_groups: int, active: np.ndarray
                     ) -> list[dict[str, Any]]:
    """Every (pair of groups, active filter) test: shares, difference, p-value, test; q-values by
    Benjamini-Hochberg over all of them.

    ``qualified`` ``(N, d)`` bool per image row; ``group_of_row`` ``(N,)`` group numbers; ``active`` ``(d,)``.
    """
    n = np.bincount(group_of_row, minlength=n_groups)
    counts = np.stack([qualified[group_of_row == g].sum(0) for g in range(n_groups)])  # (G, d)
    tests: list[dict[str, Any]] = []
    memo: dict[tuple[int, int, int, int], tuple[float, str]] = {}
    for a, b in itertools.combinations(range(n_groups), 2):
        for u in np.flatnonzero(active).tolist():
            key = (int(counts[a, u]), int(n[a]), int(counts[b, u]), int(n[b]))
            if key not in memo:
                memo[key] = proportion_test(*key)
            pval, test = memo[key]
            tests.append({"pair": (a, b), "filter": u, "counts": (key[0], key[2]), "n": (key[1], key[3]),
                          "shares": (key[0] / key[1], key[2] / key[3]), "difference": key[0] / key[1] - key[2] / key[3],
                          "p_value": pval, "test": test})
    q = benjamini_hochberg([t["p_value"] for t in tests])
    for t, qv in zip(tests, q.tolist()):
        t["q_value"] = qv
    return tests


def compare_groups(
    store: Store,
    groups: Sequence[Group],
    explainer: str | None = None,
    *,
    top: int = 10,
    p: int = 25,
    s: int = 5,
    k: int = 5,
    images: int = 5,
    vocab: str = "default",
    vocab_size: int | None = None,
    retrieval: str = DEFAULT_RETRIEVAL,
    rank: str = DEFAULT_RANK,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    progress: Any = None,
) -> tuple[dict[str, Any], Session]:
    """Compare the groups (see the module's doc); returns the result document and the session.

    The document: ``groups`` (images read per group, and their sources), ``filters`` (per pair of
    groups, the ``top`` filters favouring each side, ranked by absolute difference: shares,
    difference, p and q values, the group favoured, its words, and the top ``images`` qualified
    images of each group), ``pass`` (whether the target pass came from the cache).
    """
    if top < 1 or p < 1 or s < 1 or k < 1 or images < 0:
        raise LaviseError("--top, -p, -s and -k must be at least 1 (--images at least 0)")
    check_word_settings(retrieval, rank)
    target, group_of_image = union_set(groups)
    ses = open_session(store, explainer, target=target, device=device, batch_size=batch_size, workers=workers,
                       precision=precision, progress=progress)
    cache = ses.cache
    rows_img = cache.rows.numpy()
    group_of_row = group_of_image[rows_img]
    G = len(groups)
    n = np.bincount(group_of_row, minlength=G)
    read_per_group = {g.name: int(n[i]) for i, g in enumerate(groups)}
    empty = [g for i, g in enumerate(groups) if n[i] == 0]
    if empty:
        raise LaviseError(f"group {empty[0].name!r} has no readable image (none of its {len(empty[0].paths)} files "
                          "could be decoded): check its images")
    thr = cache.threshold
    active = (thr > 0).numpy()
    qualified = (cache.img_max >= thr[None, :]).numpy()
    tests = group_statistics(qualified, group_of_row, G, active)
    voc = vocabulary_for(ses, vocab, vocab_size)
    words = RowWords(ses, voc, p=p, s=s, retrieval=retrieval, rank=rank, progress=progress)
    listed: list[dict[str, Any]] = []
    for a, b in itertools.combinations(range(G), 2):
        pair = [t for t in tests if t["pair"] == (a, b)]
        for sign in (1, -1):
            side = [t for t in pair if sign * t["difference"] > 0]
            side.sort(key=lambda t: (-abs(t["difference"]), t["p_value"], t["filter"]))
            listed.extend(side[:top])
    listed.sort(key=lambda t: (-abs(t["difference"]), t["p_value"], t["pair"], t["filter"]))
    out_filters = []
    for t in listed:
        a, b = t["pair"]
        u = t["filter"]
        fav = a if t["difference"] > 0 else b
        qual_rows = {g: _ranked_rows(cache, np.flatnonzero((group_of_row == g) & qualified[:, u]), u) for g in (a, b)}
        out_filters.append({
            "filter": u,
            "pair": [groups[a].name, groups[b].name],
            "shares": {groups[a].name: t["shares"][0], groups[b].name: t["shares"][1]},
            "qualified": {groups[a].name: t["counts"][0], groups[b].name: t["counts"][1]},
            "difference": t["difference"],
            "p_value": t["p_value"],
            "q_value": t["q_value"],
            "test": t["test"],
            "favours": groups[fav].name,
            "threshold": float(thr[u]),
            "words": words.words(u, qual_rows[fav][:p], k),
            "images": {groups[g].name: [{"row": r, "path": str(target.paths[int(cache.rows[r])]),
                                         "max_activation": float(cache.img_max[r, u])}
                                        for r in qual_rows[g][:images]] for g in (a, b)},
        })
    doc = {
        "explainer": ses.entry.name,
        "model": ses.meta["model"],
        "layer": ses.meta["layer"],
        "precision": ses.precision,
        "groups": {g.name: {"images": read_per_group[g.name], "listed": len(g.paths), "source": g.source}
                   for g in groups},
        "images_trained_on": ses.overlap,
        "threshold": "0.995 quantile of each filter's activations over the union of the groups",
        "qualified": "image maximum activation >= threshold",
        "vocabulary": voc.describe(),
        "settings": {"top": top, "p": p, "s": words.s, "k": k, "retrieval": retrieval, "rank": rank},
        "tests": len(tests),
        "active_filters": int(active.sum()),
        "filters_total": int(len(active)),
        "significant": sum(1 for t in tests if t["q_value"] < 0.05),
        "pass": {"cached": bool(cache.hit), "seconds": round(cache.seconds, 2), "images": len(target.paths),
                 "read": cache.n, "folder": str(cache.root)},
        "filters": out_filters,
    }
    return doc, ses


__all__ = ["RowWords", "group_statistics", "compare_groups"]
