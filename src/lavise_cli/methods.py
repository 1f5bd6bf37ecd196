"""The explanation methods, by name: what each needs and how it makes its explainer inputs or words.

Every caller (``explain``, ``evaluate``, ``heatmap``, ``report``, :func:`explain.explain_filters`)
looks a method up here; no other module branches on a method's name.  The names and their order
are those of :mod:`lavise_cli.defaults` (``METHODS``: offered by ``explain``; ``ALL_METHODS``: scored
by ``evaluate``), which the command line reads without importing torch.

A method makes its per-(filter, image) explainer inputs ``z`` from the cached maps
(``map_inputs``), or prepares them with the session (``prepare``: image masking re-runs the
backbone; NetDissect fixes each filter's words by IoU instead), or, evaluate-only, names concept
words without the explainer (``evaluate_words``: the frequency prior).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .defaults import ALL_METHODS, DEFAULT_RANK, DEFAULT_RETRIEVAL, METHODS, RANKS, RETRIEVALS
from .embeddings import Vocabulary
from .errors import LaviseError
from .evaluate import ConceptSpace, ground_truth, netdissect_iou, recall_at, vocab_to_concepts
from .explain import (Explanation, activation_mask_inputs, attention_inputs, diversity, explain_filters,
                      original_inputs, top_images)
from .results import nan_to_none
from .session import Session, has_ground_truth
from .passes.target import TargetSet

# Words per image behind the diversity figures of `evaluate`: explain's default -s.
DIVERSITY_S = 5

MapInputs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One explanation method and what it needs."""

    name: str
    description: str
    needs_explainer: bool = True  # words from the explainer's predicted vectors
    needs_labels: bool = False  # a labelled target set (not a plain image folder)
    explain: bool = True  # offered by `explain`, `heatmap` and `report` (else evaluate-only)
    # The background of the word corrections: every filter of the layer, or only the filters asked
    # (a method too costly to run over the whole layer).
    layer_wide: bool = True
    # (maps (B, d, h, w), filter of each row (B,), thresholds (d,)) -> explainer inputs z (B, d)
    map_inputs: MapInputs | None = None
    # (session, filters, vocab, p, s, progress) -> keyword arguments of explain_filters
    prepare: Callable[..., dict[str, Any]] | None = None
    # evaluate-only: (session, filters, space, top_rows, s) -> (concept ids (F, p, s), diversity)
    evaluate_words: Callable[..., tuple[torch.Tensor, dict[str, Any]]] | None = None

    def check_target(self, target: TargetSet) -> None:
        if self.needs_labels and not target.labelled:
            raise LaviseError(f"{self.name} needs a labelled target set (a preprocessed dataset), not --image-dir")


def netdissect_words(session: Session, filters: Sequence[int], vocab: Vocabulary, s: int, progress: Any = None
                     ) -> tuple[torch.Tensor, Vocabulary]:
    """Per filter, the reference concepts ranked by dataset-wide IoU (as indices into a concept vocabulary)."""
    space = ConceptSpace.of(session.target, usable=set(vocab.words))
    iou = netdissect_iou(session.target, session.cache, session.size, space, progress)
    idx = torch.as_tensor(list(filters), dtype=torch.long)
    ranked = iou[idx].argsort(dim=1, descending=True, stable=True)[:, :s]
    pos = torch.tensor([vocab.index[c] for c in space.labels], dtype=torch.long)
    return pos[ranked], vocab


def _netdissect(session: Session, filters: Sequence[int], vocab: Vocabulary, p: int, s: int, progress: Any
                ) -> dict[str, Any]:
    return {"fixed_words": netdissect_words(session, filters, vocab, s, progress)[0]}


def _image_masking(session: Session, filters: Sequence[int], vocab: Vocabulary, p: int, s: int, progress: Any
                   ) -> dict[str, Any]:
    from .pipeline import image_masking_inputs  # the pass that re-runs the backbone per pair

    return {"masked_inputs": image_masking_inputs(session, filters, p, progress=progress)}


def _frequency_words(session: Session, filters: Sequence[int], space: ConceptSpace, top_rows: torch.Tensor, s: int
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The training concepts by frequency, the same for every filter and image (the prior baseline)."""
    meta = session.meta
    counts = torch.tensor(meta["concept_counts"], dtype=torch.float64)
    order = [meta["concepts"][i] for i in counts.argsort(descending=True, stable=True).tolist()]
    ids = [space.index[c] for c in order if c in space.index][:s]
    words = torch.tensor(ids, dtype=torch.long)[None, None, :].expand(len(filters), top_rows.shape[1], -1)
    inactive = (session.cache.threshold[torch.as_tensor(filters, dtype=torch.long)] <= 0).tolist()
    return words, diversity([[space.labels[i] for i in ids]] * len(filters), inactive)


_REGISTERED = [
    Method("attention", "filter attention: a = cos(F_u, F_k), input a * mean_hw(F) (LaViSE)",
           map_inputs=lambda maps, filt, thr: attention_inputs(maps, filt)),
    Method("activation-masking", "mean_hw(F * [F_u >= T_u])",
           map_inputs=activation_mask_inputs),
    Method("image-masking", "the image outside the filter's region set to the mean, re-run through the backbone",
           layer_wide=False, prepare=_image_masking),
    Method("original", "mean_hw(F): the whole image's features",
           map_inputs=lambda maps, filt, thr: original_inputs(maps, filt)),
    Method("netdissect", "reference concepts ranked by dataset-wide IoU with the filter's regions",
           needs_explainer=False, needs_labels=True, layer_wide=False, prepare=_netdissect),
    Method("frequency", "the training concepts by frequency, for every filter (a prior; evaluate only)",
           needs_explainer=False, needs_labels=True, explain=False, evaluate_words=_frequency_words),
]
REGISTRY: dict[str, Method] = {m.name: m for m in _REGISTERED}
assert tuple(REGISTRY) == ALL_METHODS and {m.name for m in _REGISTERED if m.explain} == set(METHODS), \
    "defaults.METHODS / ALL_METHODS must name the registered methods"


def method_names(explain: bool = False) -> tuple[str, ...]:
    """The methods `explain` offers (``explain=True``) or `evaluate` scores, in the order of their --help."""
    return METHODS if explain else ALL_METHODS


def get_method(name: str | Method, *, explain: bool = False, or_all: bool = False) -> Method:
    """The registered method ``name`` (offered by `explain` when ``explain``); one clear error otherwise."""
    if isinstance(name, Method):
        name = name.name
    m = REGISTRY.get(name)
    if m is None or (explain and not m.explain):
        raise LaviseError(f"unknown method {name!r}; choose from {', '.join(method_names(explain))}"
                          f"{' or all' if or_all else ''}")
    return m


def parse_methods(spec: str) -> list[str]:
    """``attention,original`` or ``all`` -> the method names `evaluate` scores, checked."""
    if spec.strip() == "all":
        return list(ALL_METHODS)
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for n in names:
        get_method(n, or_all=True)
    return names


def check_word_settings(retrieval: str, rank: str) -> None:
    """One clear line for an unknown --retrieval or --rank."""
    if retrieval not in RETRIEVALS:
        raise LaviseError(f"unknown retrieval {retrieval!r}; choose from {', '.join(RETRIEVALS)}")
    if rank not in RANKS:
        raise LaviseError(f"unknown rank {rank!r}; choose from {', '.join(RANKS)}")


def explain_settings(session: Session, method: str, vocab: Vocabulary, *, p: int, s: int, k: int,
                     retrieval: str = DEFAULT_RETRIEVAL, rank: str = DEFAULT_RANK) -> dict[str, Any] | None:
    """The ``settings`` :func:`run_explain` will report for these arguments, known before running it
    (what names its saved result); None for a method whose settings depend on its words (netdissect)."""
    m = get_method(method, explain=True)
    if not m.needs_explainer:
        return None
    return {"p": min(p, session.cache.n), "s": min(s, len(vocab.words)), "k": k, "retrieval": retrieval, "rank": rank}


def run_explain(session: Session, filters: Sequence[int], method: str, vocab: Vocabulary, *, p: int, s: int, k: int,
                progress: Any = None, netdissect_words: torch.Tensor | None = None,
                retrieval: str = DEFAULT_RETRIEVAL, rank: str = DEFAULT_RANK, rank_s: int | None = None
                ) -> Explanation:
    """Explain ``filters`` with ``method`` over the session's target set.

    ``netdissect_words``: precomputed fixed words (``(F, s)``), else the method prepares its own.
    """
    check_word_settings(retrieval, rank)
    m = get_method(method, explain=True)
    m.check_target(session.target)
    if netdissect_words is not None:
        extra: dict[str, Any] = {"fixed_words": netdissect_words}
    else:
        extra = m.prepare(session, filters, vocab, p, s, progress) if m.prepare is not None else {}
    return explain_filters(session.explainer if m.needs_explainer else None, session.cache, vocab, filters,
                           method=m.name, p=p, s=s, k=k, retrieval=retrieval, rank=rank, rank_s=rank_s,
                           progress=progress, **extra)


def evaluate_methods(
    session: Session,
    methods: Sequence[str],
    vocab: Vocabulary,
    *,
    cuts: Sequence[int] = (5, 10, 20),
    p: int = 25,
    filters: Sequence[int] | None = None,
    progress: Any = None,
    retrieval: str = DEFAULT_RETRIEVAL,
    rank: str = DEFAULT_RANK,
    cells: bool = True,
    memo: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """recall@s of each method over the labelled target set (per method.md), with its diversity.

    ``memo``: a dict shared by several calls (``evaluate -e A -e B``) keeps the ground truth of one
    target pass (same cached maps, filters, ``p``, concepts and mask size), so explainers of one
    layer compute it once.

    ``retrieval`` picks each image's words (it changes recall), ``rank`` a filter's words (it
    changes only the diversity figures); ``cells=False`` scores the plain bilinear regions (before
    the saturated-region fix, for comparison).  A recall without counted pairs is None (JSON null).
    """
    check_word_settings(retrieval, rank)
    if not session.target.labelled:
        raise LaviseError("evaluate needs labels: use a preprocessed dataset as target (not --image-dir DIR)")
    if not has_ground_truth(session.target):
        raise LaviseError(f"the target set {session.target.description} has no labelled (image, concept) pair: "
                          "evaluate needs ground truth; choose an annotated split with --split or --dataset")
    chosen = [get_method(m, or_all=True) for m in methods]
    d = session.cache.shape[0]
    filters = list(filters) if filters is not None else list(range(d))
    smax = max(cuts)
    space = ConceptSpace.of(session.target, usable=set(vocab.words))
    trained = set(session.meta.get("trained_concepts", session.meta["concepts"]))
    novel_setting = len(trained) < len(session.meta["concepts"])
    seen_mask = torch.tensor([c in trained for c in space.labels], dtype=torch.bool)
    top_rows = top_images(session.cache, p)[torch.as_tensor(filters, dtype=torch.long)]
    key = (str(session.cache.root), tuple(filters), int(top_rows.shape[1]), tuple(space.labels), session.size, cells)
    gt = memo.get(key) if memo is not None else None
    if gt is None:
        gt = ground_truth(session.target, session.cache, filters, top_rows, session.size, space, progress, cells=cells)
        if memo is not None:
            memo[key] = gt
    v2c = vocab_to_concepts(vocab, space)
    results: dict[str, Any] = {}
    per_filter: dict[str, Any] = {}
    for m in chosen:
        if m.evaluate_words is not None:
            words, div = m.evaluate_words(session, filters, space, top_rows, smax)
        else:
            ex = run_explain(session, filters, m.name, vocab, p=p, s=smax, k=5, progress=progress,
                             retrieval=retrieval, rank=rank, rank_s=DIVERSITY_S)
            words = v2c[ex.image_words]
            div = diversity(ex.words, ex.inactive)
        r = recall_at(words, gt, cuts)
        r["diversity"] = {key: div[key] for key in ("distinct_top1", "top1_share", "filters_per_word")}
        r["diversity_detail"] = {"filters": div["filters"], "most_common": div["most_common"]}
        per_filter[m.name] = r.pop("_per_filter")
        if novel_setting:
            for label, mask in (("seen", seen_mask), ("unseen", ~seen_mask)):
                sub = recall_at(words, gt, cuts, subset=mask)
                sub.pop("_per_filter")
                r[label] = sub
        results[m.name] = r
    return nan_to_none({
        "explainer": session.entry.name,
        "model": session.meta["model"],
        "layer": session.meta["layer"],
        "precision": session.precision,
        "target": session.target.description,
        "target_images": session.cache.n,
        "target_images_trained_on": session.overlap,
        "vocabulary": vocab.describe(),
        "p": int(top_rows.shape[1]),
        "recall": list(cuts),
        "iou_threshold": 0.04,
        "retrieval": retrieval,
        "rank": rank,
        "region": "bilinear + cells at T" if cells else "bilinear",
        "novel_concepts": novel_setting,
        "methods": results,
        "per_filter": {m: {"filters": filters, **v} for m, v in per_filter.items()},
    })


__all__ = ["Method", "REGISTRY", "method_names", "get_method", "parse_methods", "check_word_settings",
           "explain_settings", "run_explain", "evaluate_methods", "netdissect_words", "DIVERSITY_S"]


def saved_explanation(ses: Session, chosen: Sequence[int], voc: Vocabulary, method: str, *, p: int, s: int, k: int,
                      retrieval: str, rank: str, progress: Any = None, reuse: bool = False
                      ) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The explanation document of the ``chosen`` filters, saved where `lavise explain` saves it for
    these settings (``doc["saved"]``), its result key, and whether it was read back.

    ``reuse``: a result saved from the same inputs (explainer, cached maps, vocabulary, code) is read
    back instead of explaining again (`heatmap` and `report`); `explain` itself always explains.
    """
    from .results import explanation_doc, explanation_inputs, explanation_key, load_result, result_path, save_result

    inputs = explanation_inputs(ses, voc)
    kind = f"explain-{method}"
    if reuse:
        settings = explain_settings(ses, method, voc, p=p, s=s, k=k, retrieval=retrieval, rank=rank)
        if settings is not None:
            key = explanation_key(ses, voc, chosen, settings)
            doc = load_result(ses, kind, key, inputs)
            if doc is not None:
                doc["saved"] = str(result_path(ses, kind, key))
                return doc, key, True
    ex = run_explain(ses, list(chosen), method, voc, p=p, s=s, k=k, progress=progress, retrieval=retrieval, rank=rank)
    doc = explanation_doc(ses, ex)
    key = explanation_key(ses, voc, chosen, ex.settings)
    doc["saved"] = str(save_result(ses, kind, doc, key, inputs=inputs))
    return doc, key, False
