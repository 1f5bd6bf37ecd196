"""What two explainers' models learned on the same target set (paper §4.5.5).

:func:`compare_models`: both explained with filter attention with the same vocabulary: learned
concepts (distinct top-1 words over active filters), shared and own concepts, and for two models
of one architecture, filters matched by the correlation of their per-image maximum activations
(Hungarian matching, ``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..defaults import DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_RETRIEVAL  # DEFAULT_METHOD: filter attention
from ..embeddings import build_vocabulary, load_embedding
from ..errors import LaviseError
from ..methods import check_word_settings, run_explain
from ..session import Session, open_explainer, open_session
from ..store import Store


def learned_concepts(words: Sequence[Sequence[Any]], inactive: Sequence[bool]) -> dict[str, int]:
    """Per top-1 word, the number of active filters naming it first (most filters first)."""
    counts: dict[str, int] = {}
    for ws, off in zip(words, inactive):
        if off or not ws:
            continue
        w = ws[0] if isinstance(ws[0], str) else ws[0][0]
        counts[w] = counts.get(w, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _architecture(session: Session) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(t.shape)) for n, t in session.model.module.state_dict().items()]


def activation_correlation(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Pearson correlation ``(d_a, d_b)`` between the columns of ``a`` ``(N, d_a)`` and ``b`` ``(N, d_b)``;
    a constant column correlates 0 with everything."""
    x = a.double().numpy()
    y = b.double().numpy()
    x = x - x.mean(0)
    y = y - y.mean(0)
    nx = np.linalg.norm(x, axis=0)
    ny = np.linalg.norm(y, axis=0)
    nx[nx == 0] = np.inf
    ny[ny == 0] = np.inf
    return (x.T @ y) / np.outer(nx, ny)


def match_filters(corr: np.ndarray) -> list[tuple[int, int, float]]:
    """Filters of A matched one-to-one to filters of B maximising the summed correlation
    (``scipy.optimize.linear_sum_assignment``): (a, b, correlation), highest first."""
    from scipy.optimize import linear_sum_assignment

    ra, rb = linear_sum_assignment(corr, maximize=True)
    out = [(int(i), int(j), float(corr[i, j])) for i, j in zip(ra, rb)]
    out.sort(key=lambda t: (-t[2], t[0]))
    return out


def compare_models(
    store: Store,
    explainer_a: str,
    explainer_b: str,
    *,
    datasets: Sequence[str] = (),
    split: str | None = None,
    vocab: str = "default",
    vocab_size: int | None = None,
    p: int = 25,
    s: int = 5,
    k: int = 5,
    retrieval: str = DEFAULT_RETRIEVAL,
    rank: str = DEFAULT_RANK,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    progress: Any = None,
) -> tuple[dict[str, Any], Session, Session]:
    """Compare what two explainers' models learned (see the module's doc).

    Both are explained with filter attention on the same target set (``datasets``' ``split``;
    default: the first explainer's datasets, their val split) with the same vocabulary (built
    from the shared word embedding and the union of both explainers' concepts).
    """
    if min(p, s, k) < 1:
        raise LaviseError("-p, -s and -k must be at least 1")
    check_word_settings(retrieval, rank)
    entry_a, ex_a = open_explainer(store, explainer_a)
    entry_b, ex_b = open_explainer(store, explainer_b)
    if entry_a.name == entry_b.name:
        raise LaviseError(f"both explainers are {entry_a.name!r}: compare two different explainers")
    if ex_a.meta["embedding"] != ex_b.meta["embedding"] or ex_a.meta["embedding_dim"] != ex_b.meta["embedding_dim"]:
        raise LaviseError(f"the explainers use different word embeddings ({ex_a.meta['embedding']} vs "
                          f"{ex_b.meta['embedding']}): one vocabulary needs one embedding; train both with the same")
    names = list(datasets) or list(ex_a.meta["datasets"])
    kw = dict(datasets=names, split=split, device=device, batch_size=batch_size, workers=workers,
              precision=precision, progress=progress)
    ses_a = open_session(store, entry_a.name, **kw)
    ses_b = open_session(store, entry_b.name, **kw)
    emb = load_embedding(store, ex_a.meta["embedding"])
    concepts = list(dict.fromkeys(list(ex_a.meta["concepts"]) + list(ex_b.meta["concepts"])))
    voc = build_vocabulary(emb, concepts, vocab, vocab_size)
    models: dict[str, Any] = {}
    explained = {}
    for name, ses in ((entry_a.name, ses_a), (entry_b.name, ses_b)):
        d = ses.cache.shape[0]
        ex = run_explain(ses, list(range(d)), DEFAULT_METHOD, voc, p=p, s=s, k=k, progress=progress,
                         retrieval=retrieval, rank=rank)
        explained[name] = ex
        lc = learned_concepts(ex.words, ex.inactive)
        own = set(ses.meta["concepts"])
        models[name] = {"model": ses.meta["model"], "weights": ses.meta["weights"], "layer": ses.meta["layer"],
                        "filters": d, "active_filters": int(sum(not x for x in ex.inactive)),
                        "pass_cached": bool(ses.cache.hit),
                        "concepts": len(lc), "concepts_2plus": sum(1 for c in lc.values() if c >= 2),
                        "novel": sorted(w for w in lc if w not in own), "words": lc}
    a, b = entry_a.name, entry_b.name
    wa, wb = set(models[a]["words"]), set(models[b]["words"])
    order = lambda ws: sorted(ws, key=lambda w: (-(models[a]["words"].get(w, 0) + models[b]["words"].get(w, 0)), w))  # noqa: E731
    doc: dict[str, Any] = {
        "target": ses_a.target.description,
        "target_images": ses_a.cache.n,
        "vocabulary": voc.describe(),
        "settings": {"p": p, "s": s, "k": k, "retrieval": retrieval, "rank": rank, "method": DEFAULT_METHOD},
        "models": models,
        "shared": order(wa & wb),
        "only": {a: order(wa - wb), b: order(wb - wa)},
        "shared_2plus": order({w for w in wa & wb if models[a]["words"][w] >= 2 and models[b]["words"][w] >= 2}),
    }
    same = (ses_a.meta["layer"] == ses_b.meta["layer"] and ses_a.cache.shape == ses_b.cache.shape
            and _architecture(ses_a) == _architecture(ses_b))
    if not same:
        doc["matches"] = []
        doc["matching"] = "not done: the models differ in architecture or layer width"
        return doc, ses_a, ses_b
    # Per-image maximum activations on the same images (rows of images both passes could read).
    ra, rb = ses_a.cache.rows.tolist(), ses_b.cache.rows.tolist()
    pos_b = {img: r for r, img in enumerate(rb)}
    common = [(r, pos_b[img]) for r, img in enumerate(ra) if img in pos_b]
    ia = torch.as_tensor([c[0] for c in common], dtype=torch.long)
    ib = torch.as_tensor([c[1] for c in common], dtype=torch.long)
    corr = activation_correlation(ses_a.cache.img_max[ia], ses_b.cache.img_max[ib])
    matches = match_filters(corr)
    ea, eb = explained[a], explained[b]

    def top_words(ex: Any, u: int) -> list[str]:
        return [] if ex.inactive[u] else [w for w, _, _ in ex.words[u][:3]]

    doc["matches"] = [{"a": i, "b": j, "correlation": round(r, 4), "words_a": top_words(ea, i),
                       "words_b": top_words(eb, j),
                       "same_top1": bool(top_words(ea, i)[:1] and top_words(ea, i)[:1] == top_words(eb, j)[:1])}
                      for i, j, r in matches]
    rs = np.asarray([m[2] for m in matches])
    doc["matching"] = {"images": len(common), "pairs": len(matches), "mean_correlation": round(float(rs.mean()), 4),
                       "pairs_over_0.5": int((rs > 0.5).sum()),
                       "same_top1_word": sum(1 for m in doc["matches"] if m["same_top1"])}
    return doc, ses_a, ses_b


__all__ = ["learned_concepts", "activation_correlation", "match_filters", "compare_models"]
