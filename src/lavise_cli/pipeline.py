"""The library calls behind `explain`, `evaluate` and `heatmap`: explainer + target set + cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from .data.images import TRAINING_IMAGES_FILE, View, count_shared, model_input, read_rgb
from .data.index import load_index
from .embeddings import Vocabulary, build_vocabulary, load_embedding
from .errors import LaviseError
from .evaluate import ConceptSpace, ground_truth, netdissect_iou, recall_at, vocab_to_concepts
from .defaults import DEFAULT_RANK, DEFAULT_RETRIEVAL, RANKS, RETRIEVALS
from .explain import METHODS, Explanation, diversity, explain_filters, parse_filters, regions, top_images
from .explainer import EXPLAINER_FILE, LoadedExplainer, load_explainer
from .models import TargetModel, capture, forward_to, load_model
from .runtime import autocast, backbone, backbone_input, resolve_device, resolve_precision
from .store import Entry, Store, atomic_write_json, stable_digest, temp_sibling
from .target import TargetCache, TargetSet, folder_target, labelled_target, target_pass

from .defaults import ALL_METHODS  # noqa: E402  (defined there so that the CLI reads it without torch)
# Words per image behind the diversity figures of `evaluate`: explain's default -s.
DIVERSITY_S = 5


@dataclass
class Session:
    """An explainer with its model, a target set and that set's cached pass."""

    store: Store
    entry: Entry
    explainer: LoadedExplainer
    model: TargetModel
    target: TargetSet
    cache: TargetCache
    device: torch.device
    # Target images the explainer was trained on (None: the explainer did not record its images).
    overlap: int | None = None
    precision: str = "fp32"  # resolved: the target pass's and image masking's autocast precision

    @property
    def meta(self) -> dict[str, Any]:
        return self.explainer.meta

    @property
    def size(self) -> int:
        return self.model.preprocess.input_size

    def results_dir(self) -> Path:
        d = self.entry.path / "results"
        d.mkdir(exist_ok=True)
        return d


def open_explainer(store: Store, name: str | None = None) -> tuple[Entry, LoadedExplainer]:
    if name is None:
        latest = store.latest("explainers")
        if latest is None:
            raise LaviseError("no explainer in the store yet: train one first, e.g. `lavise train resnet18 coco`")
        name = latest.name
    entry = store.get("explainers", name)
    return entry, load_explainer(entry.path / EXPLAINER_FILE)


def model_for(meta: dict[str, Any]) -> TargetModel:
    """Rebuild the explainer's target model exactly as it was trained (checked by digest)."""
    weights = meta["weights"]
    w = "DEFAULT" if weights == "factory" else weights
    pre = meta["preprocess"]
    model = load_model(meta["model"], w, input_size=pre["input_size"], mean=pre["mean"], std=pre["std"])
    if model.weights_digest != meta["weights_digest"]:
        raise LaviseError(
            f"the model {meta['model']} ({weights}) no longer matches the one this explainer was trained on "
            "(its weights changed); train the explainer again"
        )
    return model


def open_session(
    store: Store,
    explainer: str | None = None,
    *,
    datasets: Sequence[str] = (),
    split: str | None = None,
    images: Path | None = None,
    model: str | None = None,
    layer: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    progress: Any = None,
) -> Session:
    """Load the explainer (default: the latest), check it fits, and run (or reuse) the target pass.

    The target set is ``images`` (a plain folder), else the ``split`` of ``datasets``, else the
    ``split`` of the datasets the explainer was trained on.  ``split=None`` takes each dataset's
    target split: ``val``, or the held-out part of a dataset without a train split.  ``precision``
    (auto, fp32, bf16, fp16) is the backbone's, see :func:`lavise_cli.runtime.resolve_precision`.
    """
    entry, ex = open_explainer(store, explainer)
    meta = ex.meta
    if model is not None and model != meta["model"]:
        raise LaviseError(f"explainer {entry.name!r} was trained for model {meta['model']}, not {model}; "
                          "pick a matching --explainer (see `lavise store --kind explainers`)")
    if layer is not None and layer != meta["layer"]:
        raise LaviseError(f"explainer {entry.name!r} was trained for layer {meta['layer']}, not {layer}; "
                          "pick a matching --explainer or train one for that layer")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    tm = model_for(meta)
    if images is not None:
        target = folder_target(images)
    else:
        names = list(datasets) or list(meta["datasets"])
        target = labelled_target([load_index(store, n) for n in names], split)
    cache = target_pass(store, tm, meta["layer"], target, device=dev, batch_size=batch_size, workers=workers,
                        precision=prec, progress=progress)
    if cache.shape[0] != int(meta["d"]):
        raise LaviseError(f"layer {meta['layer']} of this model has {cache.shape[0]} filters but the explainer "
                          f"expects {meta['d']}: the explainer was trained for another model or layer")
    return Session(store, entry, ex, tm, target, cache, dev, overlap=training_overlap(entry, target),
                   precision=prec)


def training_overlap(entry: Entry, target: TargetSet) -> int | None:
    """How many of the target set's images the explainer was trained on (None when unrecorded)."""
    path = entry.path / TRAINING_IMAGES_FILE
    if not path.is_file():
        return None
    return count_shared(target.paths, load_file(str(path))["identities"])


def vocabulary_for(session: Session, source: str = "default", size: int | None = None) -> Vocabulary:
    emb = load_embedding(session.store, session.meta["embedding"])
    if emb.dim != int(session.meta["embedding_dim"]):
        raise LaviseError(f"embedding {emb.name} has dimension {emb.dim}, the explainer {session.meta['embedding_dim']}")
    return build_vocabulary(emb, session.meta["concepts"], source, size)


def image_masking_inputs(session: Session, filters: Sequence[int], p: int, batch: int = 64, progress: Any = None):
    """``z`` for (rows, filters): the image outside the filter's region set to the dataset mean, re-run.

    This is the one method that runs the backbone again, once per (filter, top image) pair, so all
    pairs are computed in one go and cached beside the target pass; the returned function looks
    them up.
    """
    size = session.size
    cache = session.cache
    filt = torch.as_tensor(list(filters), dtype=torch.long)
    top = top_images(cache, p)[filt]  # (F, p) exactly as explain_filters picks them
    pair_f = filt.repeat_interleave(top.shape[1])
    pair_r = top.reshape(-1)
    # "cells": the region includes the footprint of the cells at T_u (see explain.regions).
    key = [filt.tolist(), top.tolist(), session.precision, "cells"]  # the precision of these forwards, too
    path = cache.root / f"image-masking-{stable_digest(key)[:16]}.safetensors"
    if path.exists():
        z = load_file(str(path))["z"].float()
    else:
        dev = session.device
        net = backbone(session.model.module, dev)
        layer = session.meta["layer"]
        pre = session.model.preprocess
        z = torch.empty(len(pair_r), cache.shape[0])
        # A pair whose region is empty masks its whole image: every such pair has the same input
        # (the dataset mean everywhere), so it is run once, not once per pair.
        nonempty = torch.zeros(len(pair_r), dtype=torch.bool)
        for c0 in range(0, len(pair_r), 1024):
            idx = torch.arange(c0, min(len(pair_r), c0 + 1024))
            uniq, inv = torch.unique(pair_r[idx], return_inverse=True)
            nonempty[idx] = regions(cache.maps(uniq)[inv], pair_f[idx], cache.threshold, size).flatten(1).any(1)
        order = torch.argsort(pair_r, stable=True)  # group pairs by image: each image decoded once
        order = order[nonempty[order]]
        task = progress.add_task("image masking (backbone per pair)", total=len(order), unit="pair") \
            if progress is not None else None

        def run(x: torch.Tensor) -> torch.Tensor:
            with autocast(dev, session.precision):
                forward_to(net, backbone_input(x, dev), feats)
            return feats[layer].float().flatten(2).mean(2).cpu()

        with torch.inference_mode(), capture(net, [layer], stop=True) as feats:
            if not bool(nonempty.all()):
                z[~nonempty] = run(torch.zeros(1, 3, size, size))
            for s0 in range(0, len(order), batch):
                sel = order[s0:s0 + batch]
                uniq, inv = torch.unique(pair_r[sel], return_inverse=True)
                maps = cache.maps(uniq)
                imgs = torch.stack([model_input(read_rgb(session.target.paths[int(cache.rows[r])]), View(), size,
                                                  pre.mean, pre.std) for r in uniq.tolist()])
                keep = regions(maps[inv], pair_f[sel], cache.threshold, size)  # (b, S, S)
                z[sel] = run(imgs[inv] * keep[:, None].to(imgs.dtype))  # normalised space: 0 is the dataset mean
                if task is not None:
                    progress.advance(task, len(sel))
        tmp = temp_sibling(path)  # a concurrent identical run writes its own, and the same bytes
        save_file({"z": z.half().contiguous()}, str(tmp))
        tmp.replace(path)
    where = {(int(u), int(r)): i for i, (u, r) in enumerate(zip(pair_f.tolist(), pair_r.tolist()))}

    def fn(rows: torch.Tensor, filt_rows: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([where[(int(u), int(r))] for u, r in zip(filt_rows.tolist(), rows.tolist())])
        return z[idx]

    return fn


def run_explain(session: Session, filters: Sequence[int], method: str, vocab: Vocabulary, *, p: int, s: int, k: int,
                progress: Any = None, netdissect_words: torch.Tensor | None = None,
                retrieval: str = DEFAULT_RETRIEVAL, rank: str = DEFAULT_RANK, rank_s: int | None = None
                ) -> Explanation:
    check_word_settings(retrieval, rank)
    masked = image_masking_inputs(session, filters, p, progress=progress) if method == "image-masking" else None
    return explain_filters(session.explainer if method != "netdissect" else None, session.cache, vocab, filters,
                           method=method, p=p, s=s, k=k, retrieval=retrieval, rank=rank, rank_s=rank_s,
                           masked_inputs=masked,
                           fixed_words=netdissect_words, progress=progress)


def check_word_settings(retrieval: str, rank: str) -> None:
    """One clear line for an unknown --retrieval or --rank."""
    if retrieval not in RETRIEVALS:
        raise LaviseError(f"unknown retrieval {retrieval!r}; choose from {', '.join(RETRIEVALS)}")
    if rank not in RANKS:
        raise LaviseError(f"unknown rank {rank!r}; choose from {', '.join(RANKS)}")


def netdissect_words(session: Session, filters: Sequence[int], vocab: Vocabulary, s: int, progress: Any = None
                     ) -> tuple[torch.Tensor, Vocabulary]:
    """Per filter, the reference concepts ranked by dataset-wide IoU (as indices into a concept vocabulary)."""
    space = ConceptSpace.of(session.target, usable=set(vocab.words))
    iou = netdissect_iou(session.target, session.cache, session.size, space, progress)
    idx = torch.as_tensor(list(filters), dtype=torch.long)
    ranked = iou[idx].argsort(dim=1, descending=True, stable=True)[:, :s]
    pos = torch.tensor([vocab.index[c] for c in space.labels], dtype=torch.long)
    return pos[ranked], vocab


def explanation_doc(session: Session, ex: Explanation) -> dict[str, Any]:
    concepts = set(session.meta["concepts"])
    vw = ex.vocabulary.words
    filters = []
    for j, u in enumerate(ex.filters):
        rows = ex.top_rows[j].tolist()
        extra = ex.word_scores[j] if ex.word_scores else [(float("nan"), float("nan"))] * len(ex.words[j])
        conf = ex.confidence[j] if ex.confidence else {}
        filters.append({
            "filter": u,
            "inactive": bool(ex.inactive[j]),
            "threshold": float(session.cache.threshold[u]),
            # agreement of the top images on the top word x its specificity (explain.filter_confidence)
            "confidence": conf.get("confidence"),
            "agreement": conf.get("agreement"),
            "top_word_specificity": conf.get("specificity"),
            # similarity_sum: the word's cosine similarity summed over the images naming it (so it
            # can exceed 1); "similarity" is the same number under its old name, kept for compatibility.
            "words": [{"word": w, "images": c, "similarity_sum": round(sim, 4), "similarity": round(sim, 4),
                       "novel": w not in concepts, "specificity": round(sp, 4), "layer_mean": round(m, 4)}
                      for (w, c, sim), (sp, m) in zip(ex.words[j], extra)],
            "top_images": [{"row": r, "path": str(session.target.paths[int(session.cache.rows[r])]),
                            "max_activation": float(session.cache.img_max[r, u]),
                            "words": [vw[i] for i in ex.image_words[j, q].tolist()]} for q, r in enumerate(rows)],
        })
    return {
        "explainer": session.entry.name,
        "model": session.meta["model"],
        "layer": session.meta["layer"],
        "method": ex.method,
        "precision": session.precision,
        "target": session.target.description,
        "target_images": session.cache.n,
        "target_images_trained_on": session.overlap,
        "vocabulary": ex.vocabulary.describe(),
        "settings": ex.settings,
        "background_filters": ex.background_filters,
        "diversity": diversity(ex.words, ex.inactive),
        "filters": filters,
    }


def save_result(session: Session, kind: str, doc: dict[str, Any], key: dict[str, Any]) -> Path:
    path = session.results_dir() / f"{kind}-{stable_digest(key)[:12]}.json"
    atomic_write_json(path, doc)
    return path


def has_ground_truth(target: TargetSet) -> bool:
    """True when a labelled target set holds at least one (image, concept) pair."""
    return any(len(sp.pair_image) for sp in target.sources)


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
) -> dict[str, Any]:
    """recall@s of each method over the labelled target set (per method.md), with its diversity.

    ``retrieval`` picks each image's words (it changes recall), ``rank`` a filter's words (it
    changes only the diversity figures); ``cells=False`` scores the plain bilinear regions (before
    the saturated-region fix, for comparison).
    """
    check_word_settings(retrieval, rank)
    if not session.target.labelled:
        raise LaviseError("evaluate needs labels: use a preprocessed dataset as target (not --images DIR)")
    if not has_ground_truth(session.target):
        raise LaviseError(f"the target set {session.target.description} has no labelled (image, concept) pair: "
                          "evaluate needs ground truth; choose an annotated split with --split or --dataset")
    for m in methods:
        if m not in ALL_METHODS:
            raise LaviseError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)} or all")
    d = session.cache.shape[0]
    filters = list(filters) if filters is not None else list(range(d))
    smax = max(cuts)
    space = ConceptSpace.of(session.target, usable=set(vocab.words))
    trained = set(session.meta.get("trained_concepts", session.meta["concepts"]))
    novel_setting = len(trained) < len(session.meta["concepts"])
    seen_mask = torch.tensor([c in trained for c in space.labels], dtype=torch.bool)
    top_rows = top_images(session.cache, p)[torch.as_tensor(filters, dtype=torch.long)]
    gt = ground_truth(session.target, session.cache, filters, top_rows, session.size, space, progress, cells=cells)
    v2c = vocab_to_concepts(vocab, space)
    results: dict[str, Any] = {}
    per_filter: dict[str, Any] = {}
    for m in methods:
        if m == "frequency":
            counts = torch.tensor(session.meta["concept_counts"], dtype=torch.float64)
            order = [session.meta["concepts"][i] for i in counts.argsort(descending=True, stable=True).tolist()]
            ids = [space.index[c] for c in order if c in space.index][:smax]
            words = torch.tensor(ids, dtype=torch.long)[None, None, :].expand(len(filters), top_rows.shape[1], -1)
            inactive = (session.cache.threshold[torch.as_tensor(filters, dtype=torch.long)] <= 0).tolist()
            div = diversity([[space.labels[i] for i in ids]] * len(filters), inactive)
        else:
            nd = netdissect_words(session, filters, vocab, smax, progress)[0] if m == "netdissect" else None
            ex = run_explain(session, filters, m, vocab, p=p, s=smax, k=5, progress=progress,
                             netdissect_words=nd, retrieval=retrieval, rank=rank, rank_s=DIVERSITY_S)
            words = v2c[ex.image_words]
            div = diversity(ex.words, ex.inactive)
        r = recall_at(words, gt, cuts)
        r["diversity"] = {key: div[key] for key in ("distinct_top1", "top1_share", "filters_per_word")}
        r["diversity_detail"] = {"filters": div["filters"], "most_common": div["most_common"]}
        per_filter[m] = r.pop("_per_filter")
        if novel_setting:
            for label, mask in (("seen", seen_mask), ("unseen", ~seen_mask)):
                sub = recall_at(words, gt, cuts, subset=mask)
                sub.pop("_per_filter")
                r[label] = sub
        results[m] = r
    return {
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
    }


def nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


__all__ = ["METHODS", "ALL_METHODS", "Session", "open_explainer", "open_session", "vocabulary_for", "run_explain", "evaluate_methods",
           "parse_filters", "explanation_doc", "save_result", "netdissect_words"]
