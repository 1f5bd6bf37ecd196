"""Class-relevant filters (Oramas et al., ICLR 2019, as its reproduction states it), checked by ablation.

The analysis behind `lavise relevant`: label the images (:mod:`.class_labels`), one target pass
for the layer's per-image responses, per class a lasso picks the filters whose responses predict
the class (:mod:`.lasso`), and the ablation check removes them and measures the model's accuracy
against as many random filters removed (:mod:`.ablation`).  The names of those modules are
importable from here as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..defaults import DEFAULT_METHOD  # filter attention
from ..errors import LaviseError
from ..layers import resolve_layer
from ..models import TargetModel
from ..passes.target import ImageFiles, ImageSet, LayerMaps, target_pass
from ..runtime import resolve_precision
from ..store import Store
from .ablation import (KEEP_DECODED_BYTES, RANDOM_RUNS, AblationSet, KeptImages, Logits, _acc, _mean_sd,
                       ablation_predictions, model_outputs, random_sets, stacks_sets, zeroed)
from .class_labels import (Labels, category_labels, class_names_of, folder_labels, predicted_labels,
                           read_classes_file)
from .lasso import Selection, lasso_select, standardise

POOLS = ("max", "mean")


@dataclass
class RelevantResult:
    model: str
    layer: str
    pool: str
    labels: Labels
    images: int  # images that decoded
    selections: dict[str, Selection]
    union: list[int]
    ablation: dict[str, dict[str, Any]]  # "union" and each class name
    sweep: list[dict[str, Any]]
    settings: dict[str, Any]
    cache: LayerMaps | None = None
    words: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    explainer: str | None = None

    def as_dict(self) -> dict[str, Any]:
        classes = {}
        for c, sel in self.selections.items():
            classes[c] = {"filters": sel.filters, "weights": [round(w, 6) for w in sel.weights],
                          "alpha": sel.alpha, "l1": sel.l1, "images": int(self.labels.member[:, self.labels.classes.index(c)].sum()),
                          "words": {str(u): self.words[u] for u in sel.filters if u in self.words},
                          "ablation": self.ablation[c]}
        return {"model": self.model, "layer": self.layer, "pool": self.pool, "labels": self.labels.kind,
                "target": self.labels.target.description, "images": self.images, "settings": self.settings,
                "explainer": self.explainer,
                "classes": classes, "union": {"filters": self.union, "ablation": self.ablation["union"]},
                "sweep": self.sweep}


def relevant_filters(
    store: Store,
    model: TargetModel,
    layer: str,
    labels: Labels | None,
    *,
    target: ImageSet | None = None,
    class_names: Sequence[str] | None = None,
    pool: str = "max",
    sparsity: float | None = None,
    per_class: int | None = None,
    sweep: Sequence[float] = (),
    sweep_per_class: Sequence[int] = (),
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    progress: Any = None,
) -> RelevantResult:
    """Per class the relevant filters of ``layer`` (lasso), and the ablation check.

    ``labels`` None: the model's own top-1 on ``target`` (``--labels predicted``; the ablation then
    measures agreement with the unablated model).  ``sweep``: μ values (``sweep_per_class``: K
    values) at which the union is selected again and ablated: the tipping-point table.
    """
    if pool not in POOLS:
        raise LaviseError(f"unknown --pool {pool!r}; choose from {', '.join(POOLS)}")
    if sparsity is None and per_class is None:
        per_class = 5
    if sparsity is not None and per_class is not None:
        raise LaviseError("give --sparsity or --per-class, not both")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    tgt = labels.target if labels is not None else target
    if tgt is None:
        raise ValueError("labels or target")
    cache = target_pass(store, model, layer, tgt, device=device, batch_size=batch_size, workers=workers,
                        precision=precision, progress=progress)
    d = cache.shape[0]
    rows = cache.rows.long()  # image numbers of the decoded images
    n_img = len(tgt.paths)
    size = model.preprocess.input_size
    base = ImageFiles(tgt.paths, size, model.preprocess.mean, model.preprocess.std)
    images = KeptImages(base, keep=n_img * 3 * size * size * 4 <= KEEP_DECODED_BYTES)
    run_kw = dict(device=device, precision=precision, batch_size=batch_size, progress=progress,
                  row_bytes=4 * d * cache.shape[1] * cache.shape[2])

    # The unablated model's top-1 (the baseline; the labels of --labels predicted).
    base_pred = ablation_predictions(model, layer, images, torch.ones(1, d), **run_kw)[0]  # type: ignore[arg-type]
    if labels is None:
        labels = predicted_labels(tgt, base_pred, class_names)
    member = labels.member[rows]  # (n, C) over decoded images
    for c, name in enumerate(labels.classes):
        if int(member[:, c].sum()) < 2:
            raise LaviseError(f"class {name!r} has fewer than 2 images that decode; each class needs at least 2")
    resp = cache.img_max if pool == "max" else cache.img_mean
    x = standardise(resp)

    def select(mu: float | None, k: int | None) -> dict[str, Selection]:
        return {name: lasso_select(x, member[:, c], sparsity=mu, per_class=k)
                for c, name in enumerate(labels.classes)}  # type: ignore[union-attr]

    selections = select(sparsity, per_class)
    union = sorted({u for s in selections.values() for u in s.filters})
    all_images = torch.ones(n_img, dtype=torch.bool)
    class_images = []
    for c in range(len(labels.classes)):
        m = torch.zeros(n_img, dtype=torch.bool)
        m[rows[member[:, c]]] = True
        class_images.append(m)

    sets = [AblationSet("union", union, all_images, random_sets(d, len(union)))]
    for c, name in enumerate(labels.classes):
        sel = selections[name].filters
        sets.append(AblationSet(f"class:{name}", sel, class_images[c], random_sets(d, len(sel))))
    levels: list[tuple[str, float, dict[str, Selection]]] = [("sparsity", mu, select(mu, None)) for mu in sweep]
    levels += [("per_class", k, select(None, int(k))) for k in sweep_per_class]
    for i, (_kind, _v, sels) in enumerate(levels):
        u = sorted({f for s in sels.values() for f in s.filters})
        sets.append(AblationSet(f"sweep:{i}", u, all_images, random_sets(d, len(u))))

    keeps = []
    for st in sets:
        for removed in [st.removed, *st.random]:
            k = torch.ones(d)
            k[torch.as_tensor(removed, dtype=torch.long)] = 0
            keeps.append(k)
    pred = ablation_predictions(model, layer, images, torch.stack(keeps), **run_kw)  # type: ignore[arg-type]

    if labels.outputs is None:
        truth_ok = lambda p: torch.where(base_pred >= 0, (p == base_pred).long(), -1)  # noqa: E731
    else:
        # per image, the set of outputs of its class(es): correct when the top-1 is one of them
        ok_out = torch.zeros(n_img, model_outputs(model), dtype=torch.bool)
        for c, outs in enumerate(labels.outputs):
            ok_out[rows[member[:, c]][:, None], torch.as_tensor(outs)[None, :]] = True

        def truth_ok(p: torch.Tensor) -> torch.Tensor:
            inside = (p >= 0) & (p < ok_out.shape[1])
            hit = torch.zeros(n_img, dtype=torch.bool)
            hit[inside] = ok_out[torch.arange(n_img)[inside], p[inside]]
            return torch.where(p >= 0, hit.long(), -1)

    base_ok = truth_ok(base_pred)
    ablation: dict[str, dict[str, Any]] = {}
    sweep_rows: list[dict[str, Any]] = []
    r = 0
    for st in sets:
        sel_ok = truth_ok(pred[r])
        rand = [_acc(truth_ok(pred[r + 1 + j]), st.images) for j in range(len(st.random))]
        r += 1 + len(st.random)
        entry = {"baseline": _acc(base_ok, st.images), "selected": _acc(sel_ok, st.images),
                 "random": _mean_sd(rand), "removed": len(st.removed), "images": int(st.images.sum())}
        if st.name == "union":
            ablation["union"] = entry
        elif st.name.startswith("class:"):
            ablation[st.name[6:]] = entry
        else:
            kind, v, _ = levels[int(st.name[6:])]
            sweep_rows.append({kind: v, "removed": entry["removed"], "baseline": entry["baseline"],
                               "selected": entry["selected"], "random": entry["random"]})
    settings = {"pool": pool, "sparsity": sparsity, "per_class": per_class, "random_runs": RANDOM_RUNS,
                "precision": precision, "accuracy": "agreement with the unablated top-1" if labels.agreement
                else "top-1 in the class's outputs"}
    return RelevantResult(model=model.name, layer=layer, pool=pool, labels=labels, images=cache.n,
                          selections=selections, union=union, ablation=ablation, sweep=sweep_rows,
                          settings=settings, cache=cache)


# -- the command's library call -------------------------------------------------------------------


def explainer_words(store: Store, name: str, model: TargetModel, layer: str | None, result: RelevantResult,
                    *, device: torch.device | str = "cpu", top: int = 5, p: int = 25,
                    progress: Any = None) -> None:
    """Each relevant filter's words (filter attention over the result's images), into ``result.words``."""
    from ..methods import run_explain
    from ..results import explanation_doc
    from ..session import Session, open_explainer, training_overlap, vocabulary_for

    entry, ex = open_explainer(store, name)
    meta = ex.meta
    if meta["model"] != model.name or meta["weights_digest"] != model.weights_digest:
        raise LaviseError(f"explainer {entry.name!r} was trained for model {meta['model']} ({meta['weights']}), not "
                          f"this {model.name} ({model.weights}); pick a matching --explainer")
    if meta["layer"] != result.layer:
        raise LaviseError(f"explainer {entry.name!r} explains layer {meta['layer']}, not {result.layer}; "
                          f"use --layer {meta['layer']} or another explainer")
    assert result.cache is not None
    target = result.labels.target
    ses = Session(store, entry, ex, model, target, result.cache, torch.device(device),
                  overlap=training_overlap(entry, target), precision=result.settings["precision"])
    filters = sorted({u for s in result.selections.values() for u in s.filters})
    if not filters:
        return
    voc = vocabulary_for(ses)
    expl = run_explain(ses, filters, DEFAULT_METHOD, voc, p=min(p, result.cache.n), s=5, k=top, progress=progress)
    doc = explanation_doc(ses, expl)
    for f in doc["filters"]:
        result.words[int(f["filter"])] = [] if f["inactive"] else \
            [{"word": w["word"], "images": w["images"], "novel": w["novel"]} for w in f["words"]]
    result.explainer = entry.name


def run_relevant(
    store: Store,
    model_spec: str,
    *,
    images: Path | None = None,
    datasets: Sequence[str] = (),
    split: str | None = None,
    predicted: bool = False,
    label_by: str | None = None,
    classes: Path | None = None,
    layer: str | None = None,
    weights: str = "DEFAULT",
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pool: str = "max",
    sparsity: float | None = None,
    per_class: int | None = None,
    sweep: Sequence[float] = (),
    sweep_per_class: Sequence[int] = (),
    explainer: str | None = None,
    top_words: int = 5,
    out_dir: Path | None = None,
    heatmap_images: int = 5,
    device: str = "auto",
    batch_size: int = 32,
    precision: str = "auto",
    progress: Any = None,
) -> tuple[RelevantResult, Path | None]:
    """What `lavise relevant` does: load the model, label the images, select, ablate, explain, draw."""
    from ..data.index import load_index
    from ..layers import default_layer
    from ..models import load_model
    from ..passes.target import folder_target, labelled_target
    from ..runtime import resolve_device

    dev = resolve_device(device)
    tm = load_model(model_spec, weights, input_size=input_size, mean=mean, std=std)
    lay = layer or default_layer(tm.module, tm.preprocess.input_size)
    resolve_layer(tm.module, lay)
    n_out = model_outputs(tm)
    labels: Labels | None
    target: ImageSet | None = None
    if datasets:
        tgt = labelled_target([load_index(store, n) for n in datasets], split)
        labels = None if predicted else category_labels(tgt)
        target = tgt
    elif predicted:
        assert images is not None
        target, labels = folder_target(images), None
    else:
        assert images is not None
        labels = folder_labels(images, n_out, classes)
    res = relevant_filters(store, tm, lay, labels, target=target, class_names=class_names_of(classes), pool=pool,
                           sparsity=sparsity, per_class=per_class, sweep=sweep, sweep_per_class=sweep_per_class,
                           device=dev, precision=precision, batch_size=batch_size, progress=progress)
    if explainer is not None:
        explainer_words(store, explainer, tm, lay, res, device=dev, top=top_words, progress=progress)
    page = None
    if out_dir is not None:
        from .relevant_page import write_page

        page = write_page(res, Path(out_dir).expanduser(), tm.preprocess.input_size, n_images=heatmap_images,
                          progress=progress)
    return res, page


__all__ = ["Labels", "Selection", "RelevantResult", "POOLS", "RANDOM_RUNS", "folder_labels", "category_labels",
           "predicted_labels", "read_classes_file", "class_names_of", "standardise", "lasso_select", "zeroed",
           "stacks_sets", "ablation_predictions", "random_sets", "relevant_filters", "model_outputs", "Logits",
           "explainer_words", "run_relevant"]
