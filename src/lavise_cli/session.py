"""An explainer with its model, a target set and that set's cached pass: what every method runs on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from . import distributed
from .data.images import TRAINING_IMAGES_FILE, count_shared
from .data.index import load_index
from .embeddings import Vocabulary, build_vocabulary, load_embedding
from .errors import LaviseError
from .explain import parse_filters
from .explainer import EXPLAINER_FILE, LoadedExplainer, load_explainer
from .models import TargetModel, load_model
from .runtime import resolve_device, resolve_precision
from .store import Entry, Store
from .passes.target import TargetCache, TargetSet, folder_target, labelled_target, target_pass


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

    @property
    def filters(self) -> int:
        """Filters of the explained layer (``d``)."""
        return self.explainer.filters

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


def check_filters(store: Store, explainer: str | None, spec: str | None, all_filters: bool = False) -> list[int]:
    """The filters ``spec`` names, checked against the explainer's layer before any (long) target pass."""
    return parse_filters(spec, open_explainer(store, explainer)[1].filters, all_filters)


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
    target: TargetSet | None = None,
    model: str | None = None,
    layer: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    progress: Any = None,
) -> Session:
    """Load the explainer (default: the latest), check it fits, and run (or reuse) the target pass.

    The target set is ``target`` (an :class:`~lavise_cli.passes.target.ImageSet` made by the caller,
    e.g. the union of ``compare groups``' images), else ``images`` (a plain folder), else the ``split`` of ``datasets``, else the
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
    if target is not None:
        pass
    elif images is not None:
        target = folder_target(images)
    else:
        names = list(datasets) or list(meta["datasets"])
        target = labelled_target([load_index(store, n) for n in names], split)
    cache = target_pass(store, tm, meta["layer"], target, device=dev, batch_size=batch_size, workers=workers,
                        precision=prec, progress=progress)
    # Under torchrun the ranks shared the target pass; rank 0 alone runs the methods (small next to
    # the pass) and writes the results, the others exit here (lavise_cli.distributed.leave).
    distributed.leave()
    if cache.shape[0] != ex.filters:
        raise LaviseError(f"layer {meta['layer']} of this model has {cache.shape[0]} filters but the explainer "
                          f"expects {ex.filters}: the explainer was trained for another model or layer")
    return Session(store, entry, ex, tm, target, cache, dev, overlap=training_overlap(entry, target),
                   precision=prec)


def training_overlap(entry: Entry, target: TargetSet) -> int | None:
    """How many of the target set's images the explainer was trained on (None when unrecorded)."""
    path = entry.path / TRAINING_IMAGES_FILE
    if not path.is_file():
        return None
    return count_shared(target.paths, load_file(str(path))["identities"])


def has_ground_truth(target: TargetSet) -> bool:
    """True when a labelled target set holds at least one (image, concept) pair."""
    return any(len(sp.pair_image) for sp in target.sources)


def vocabulary_for(session: Session, source: str = "default", size: int | None = None) -> Vocabulary:
    emb = load_embedding(session.store, session.meta["embedding"])
    if emb.dim != int(session.meta["embedding_dim"]):
        raise LaviseError(f"embedding {emb.name} has dimension {emb.dim}, the explainer {session.meta['embedding_dim']}")
    return build_vocabulary(emb, session.meta["concepts"], source, size)


__all__ = ["Session", "open_explainer", "check_filters", "model_for", "open_session", "training_overlap",
           "has_ground_truth", "vocabulary_for"]
