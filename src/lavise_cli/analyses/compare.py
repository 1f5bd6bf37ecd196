"""Comparisons built on explanations (paper §4.6 and §4.5.5).

- :func:`compare_groups`: which filters fire on one group of images more often than on another.
  One target pass over the union of the groups' images (an :class:`~lavise_cli.passes.target.ImageSet`
  cached like any target set); per filter ``u`` the threshold ``T_u`` is the 0.995 quantile over
  the union (the pass's own threshold); an image is *qualified* for ``u`` when its maximum
  activation reaches ``T_u`` (ties count, as for regions); per group the share of qualified
  images; per pair of groups the difference of shares, a two-sided test of equal proportions
  and Benjamini-Hochberg q-values over every test; each listed filter's words come from filter
  attention over its qualified images in the group it favours.
- :func:`compare_models`: what two explainers' models learned on the same target set with the
  same vocabulary: learned concepts (distinct top-1 words over active filters), shared and
  own concepts, and for two models of one architecture, filters matched by the correlation of
  their per-image maximum activations (Hungarian matching, ``scipy.optimize.linear_sum_assignment``).

A difference of shares is an association in the data, not a cause (docs/compare.md).
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..defaults import DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_RETRIEVAL  # DEFAULT_METHOD: filter attention
from ..embeddings import Vocabulary, build_vocabulary, load_embedding
from ..errors import LaviseError
from ..explain import (_predicted_vectors, attention_inputs, nearest_words, rank_words, retrieval_stats,
                       top_images)
from ..methods import check_word_settings, get_method, run_explain
from ..passes.target import IMAGE_EXTS, ImageSet, labelled_target
from ..session import Session, open_explainer, open_session, vocabulary_for
from ..store import Store, stable_digest
from .stats import benjamini_hochberg, proportion_test

# -------------------------------------------------------------------------------------------------
# Groups of images
# -------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """A named group of images and where they came from."""

    name: str
    source: str
    paths: list[Path]


def _listed_paths(listing: Path) -> list[Path]:
    """The image paths of a text file, one per line (blank lines and ``#`` comments skipped);
    relative paths are relative to the file's folder."""
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LaviseError(f"cannot read the image list {listing}: {e}") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        out.append(p if p.is_absolute() else listing.parent / p)
    return out


def group_paths(store: Store | None, name: str, source: str) -> list[Path]:
    """The images of one group: SOURCE an image folder, a text file of image paths, or a registered
    dataset ``name`` / ``name:split`` (its target split by default)."""
    p = Path(source).expanduser()
    if p.is_dir():
        paths = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS and q.is_file())
        if not paths:
            raise LaviseError(f"group {name!r}: no images ({', '.join(sorted(IMAGE_EXTS))}) under {p}")
        return paths
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTS:
            raise LaviseError(f"group {name!r}: {p} is one image; give a folder or a text file listing the images")
        return _listed_paths(p)
    dataset, _, split = source.rpartition(":") if ":" in source else (source, "", "")
    if store is not None and dataset and store.exists("datasets", dataset):
        from ..data.index import load_index

        return list(labelled_target([load_index(store, dataset)], split or None).paths)
    known = ", ".join(e.name for e in store.list("datasets")) if store is not None else ""
    raise LaviseError(f"group {name!r}: {source!r} is neither an image folder, a text file of image paths, nor a "
                      f"registered dataset (registered: {known or 'none'})")


def parse_group_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=SOURCE`` strings -> (name, source), checked."""
    out = []
    for spec in specs:
        name, eq, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not eq or not name or not source:
            raise LaviseError(f"cannot read --group {spec!r}: write NAME=SOURCE, e.g. --group men=men.txt")
        out.append((name, source))
    return out


def read_groups_file(path: Path) -> list[tuple[str, list[Path]]]:
    """A CSV of ``image,group`` rows (a header row ``image,group`` is optional) -> groups in order of
    first appearance; relative image paths are relative to the CSV's folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LaviseError(f"groups file {path} does not exist")
    groups: dict[str, list[Path]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.reader(fh), 1):
                cells = [c.strip() for c in row]
                if not cells or not any(cells) or cells[0].startswith("#"):
                    continue
                if i == 1 and [c.lower() for c in cells[:2]] == ["image", "group"]:
                    continue
                if len(cells) != 2 or not cells[0] or not cells[1]:
                    raise LaviseError(f"groups file {path}, line {i}: expected two columns image,group, got {row!r}")
                img = Path(cells[0]).expanduser()
                groups.setdefault(cells[1], []).append(img if img.is_absolute() else path.parent / img)
    except (OSError, UnicodeDecodeError) as e:
        raise LaviseError(f"cannot read groups file {path}: {e}") from None
    return list(groups.items())


def make_groups(store: Store | None, specs: Sequence[tuple[str, str]] = (),
                listed: Sequence[tuple[str, Sequence[Path]]] = ()) -> list[Group]:
    """Groups from ``(name, source)`` specs and/or ``(name, paths)`` lists, checked: at least two,
    distinct names, each with images that exist, and no image in two groups.

    An image in two groups is refused: the test of equal proportions assumes independent samples
    (the same image counted on both sides would pull the shares together).  An image listed twice
    in one group counts once.
    """
    groups: list[Group] = []
    for name, source in specs:
        groups.append(Group(name, source, group_paths(store, name, source)))
    for name, paths in listed:
        groups.append(Group(name, "groups file", [Path(p) for p in paths]))
    if len(groups) < 2:
        raise LaviseError("compare needs at least two groups: --group A=SOURCE --group B=SOURCE (or --groups-file)")
    seen_names: set[str] = set()
    owner: dict[Path, str] = {}
    for g in groups:
        if g.name in seen_names:
            raise LaviseError(f"group name {g.name!r} is used twice: give each group its own name")
        seen_names.add(g.name)
        uniq: list[Path] = []
        mine: set[Path] = set()
        missing = []
        for p in g.paths:
            r = p.expanduser().resolve()
            if not r.is_file():
                missing.append(p)
                continue
            if r in mine:
                continue
            other = owner.get(r)
            if other is not None:
                raise LaviseError(f"image {p} is in both groups {other!r} and {g.name!r}: groups must not share "
                                  "images (the test compares independent samples); remove it from one of them")
            mine.add(r)
            owner[r] = g.name
            uniq.append(r)
        if missing:
            raise LaviseError(f"group {g.name!r}: {len(missing)} of its {len(g.paths)} images do not exist "
                              f"(first: {missing[0]}); fix the list or the paths")
        if not uniq:
            raise LaviseError(f"group {g.name!r} has no image")
        g.paths = uniq
    return groups


def union_set(groups: Sequence[Group]) -> tuple[ImageSet, np.ndarray]:
    """The union of the groups' images as one image set (sorted, so the same images in any group
    order are the same cached pass) and each image's group number."""
    of: dict[Path, int] = {}
    for k, g in enumerate(groups):
        for p in g.paths:
            of[p] = k
    paths = sorted(of, key=str)
    listing = []
    for p in paths:
        st = p.stat()
        listing.append((str(p), st.st_size, st.st_mtime_ns))
    desc = " + ".join(f"{g.name} ({len(g.paths)})" for g in groups)
    target = ImageSet(description=f"groups {desc}", paths=paths, key={"images": stable_digest(listing)})
    return target, np.asarray([of[p] for p in paths], dtype=np.int64)


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


# -------------------------------------------------------------------------------------------------
# compare models
# -------------------------------------------------------------------------------------------------


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


__all__ = ["Group", "group_paths", "parse_group_specs", "read_groups_file", "make_groups", "union_set", "RowWords",
           "group_statistics", "compare_groups", "learned_concepts", "activation_correlation", "match_filters",
           "compare_models"]
