"""Fitting an explainer on cached features: ``lavise train``."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file

from . import __version__
from .data.images import TRAINING_IMAGES_FILE, View, image_identities, named_views
from .defaults import TrainSettings  # defined there so that the CLI reads its defaults without torch
from .data.index import DatasetIndex, seen_split, load_index
from .embeddings import Embedding, load_embedding
from .errors import LaviseError
from .explainer import EXPLAINER_FILE, Explainer, hinge_rank_loss, save_explainer
from . import distributed
from .passes.features import reference_features
from .passes.mapped import MappedRows
from .models import check_ignored, default_layer, load_model, resolve_layer
from .runtime import resolve_device, resolve_precision
from .store import Store, stable_digest, temp_sibling


@dataclass
class TrainResult:
    name: str
    path: Path
    layer: str
    feature_cache: str  # "hit" (all reused), "partial" (some datasets' features reused), "miss" (all computed)
    epochs: int
    best_epoch: int
    best_val_loss: float
    seconds: dict[str, float]
    losses: list[dict[str, float]] = field(default_factory=list)
    pairs: dict[str, int] = field(default_factory=dict)  # "train_and_val", "train", "val"
    precision: str = "fp32"  # the feature pass's autocast precision (resolved)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["explainer"] = d.pop("name")
        return d


def merged_concepts(indexes: Sequence[DatasetIndex], emb: Embedding, seen_fraction: float | None, seed: int
                    ) -> tuple[list[str], torch.Tensor, list[bool]]:
    """Mapped concepts of all indexes merged by label, their unit vectors and the seen flags."""
    labels: list[str] = []
    seen_first: dict[str, bool] = {}
    for ix in indexes:
        for c, m, s in zip(ix.concepts, ix.mapped, ix.seen):
            if m and c not in seen_first:
                labels.append(c)
                seen_first[c] = s
    vecs, ok = emb.phrase_vectors(labels)
    labels = [labels[i] for i in ok]
    if seen_fraction is None:
        seen = [True] * len(labels)
    elif len(indexes) == 1 and math.isclose(seen_fraction, indexes[0].manifest["settings"].get("seen_fraction", -1)):
        seen = [seen_first[c] for c in labels]
    else:
        seen = seen_split([True] * len(labels), seen_fraction, seed)
    return labels, torch.from_numpy(vecs), seen


def validation_split(group: torch.Tensor, settings: TrainSettings, gen: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and validation pairs: a seeded split of the images (``group``).

    ``gen`` (seeded with ``settings.seed`` when not given) is advanced as ``train_explainer`` does."""
    gen = gen if gen is not None else torch.Generator().manual_seed(settings.seed)
    groups = torch.unique(group)
    perm = groups[torch.randperm(len(groups), generator=gen)]
    n_val = int(round(settings.val_fraction * len(groups))) if len(groups) > 1 else 0
    is_val = torch.isin(group, perm[:n_val])
    return torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)


def train_explainer(
    feats: torch.Tensor | MappedRows,
    labels: torch.Tensor,
    group: torch.Tensor,
    concept_vectors: torch.Tensor,
    settings: TrainSettings,
    *,
    device: torch.device | str = "cpu",
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: Any = None,
    on_epoch: Callable[[int], None] | None = None,
) -> tuple[Explainer, list[dict[str, float]], int]:
    """Fit an explainer; returns (best module, per-epoch losses, best epoch).

    Validation is a seeded split of the images (``group``).  With ``checkpoint``, the state after
    every epoch is saved there, and ``resume`` continues from it bit for bit.  ``feats`` is a
    tensor or memory-mapped rows (:class:`~lavise_cli.passes.mapped.MappedRows`): on the CPU
    each batch is gathered from the mapping; on another device the rows are copied there once,
    a chunk at a time.  Both give the same values, hence the same losses and weights.
    """
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    tr_idx, va_idx = validation_split(group, settings, gen)
    if len(tr_idx) < 2:
        raise LaviseError("too few training pairs to train an explainer (need at least 2)")
    # z stays in its cached precision (fp16: half the memory of a float32 copy); each batch is
    # converted as it is used, which gives exactly the values a float32 copy would hold.
    if isinstance(feats, MappedRows):
        z: torch.Tensor | MappedRows = feats if device.type == "cpu" else feats.to_device(device)
    else:
        z = feats.to(device)
    t = labels.long().to(device)  # each pair's concept: the loss's class labels
    cv = concept_vectors.float().to(device)
    model = Explainer(z.shape[1], cv.shape[1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    losses: list[dict[str, float]] = []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_val, best_epoch, start, bad = math.inf, 0, 0, 0
    if resume and checkpoint is not None and checkpoint.exists():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        best_state = ck["best_state"]
        losses = [dict(zip(("epoch", "train", "val"), row)) for row in ck["losses"].tolist()]
        for row in losses:
            row["epoch"] = int(row["epoch"])
        best_val, best_epoch, start, bad = float(ck["best_val"]), int(ck["best_epoch"]), int(ck["epoch"]), int(ck["bad"])
        torch.set_rng_state(ck["rng"])
        gen.set_state(ck["gen"])
    task = progress.add_task("training explainer", total=settings.epochs, completed=start, unit="epoch") \
        if progress is not None else None
    bs = settings.batch_size
    last_save = time.perf_counter()
    snapshot: dict[str, Any] | None = None
    try:
        for epoch in range(start, settings.epochs):
            if bad >= settings.patience:
                break
            model.train()
            order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
            total, count = 0.0, 0
            for s in range(0, len(order), bs):
                b = order[s:s + bs]
                if len(b) < 2:  # BatchNorm needs two samples in training mode
                    continue
                loss = hinge_rank_loss(model(batch_rows(z, b)), t[b], cv, settings.margin)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
                count += len(b)
            train_loss = total / max(count, 1)
            val_loss = evaluate_loss(model, z, t, cv, settings.margin, rows=va_idx) if len(va_idx) else train_loss
            losses.append({"epoch": epoch + 1, "train": train_loss, "val": val_loss})
            if val_loss < best_val - 1e-6:
                best_val, best_epoch, bad = val_loss, epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            snapshot = _snapshot(model, opt, best_state, losses, best_val, best_epoch, epoch + 1, bad, gen)
            if checkpoint is not None and (time.perf_counter() - last_save > CHECKPOINT_SECONDS or epoch + 1 == settings.epochs):
                _save_checkpoint(checkpoint, snapshot)
                last_save = time.perf_counter()
            if task is not None:
                progress.update(task, completed=epoch + 1,
                                description=f"training explainer (val {val_loss:.3f}, best {best_val:.3f} @ {best_epoch})")
            if on_epoch is not None:
                on_epoch(epoch + 1)
    except KeyboardInterrupt:
        # Keep the last completed epoch, so that `--resume` continues exactly from there.
        if checkpoint is not None and snapshot is not None:
            _save_checkpoint(checkpoint, snapshot)
        raise
    model.load_state_dict(best_state)
    model.eval()
    return model.cpu(), losses, best_epoch


CHECKPOINT_SECONDS = 10.0


def _snapshot(model: Explainer, opt: torch.optim.Optimizer, best_state: dict[str, torch.Tensor],
              losses: list[dict[str, float]], best_val: float, best_epoch: int, epoch: int, bad: int,
              gen: torch.Generator) -> dict[str, Any]:
    """Everything needed to continue after ``epoch`` bit for bit (copied, so later steps don't change it)."""
    import copy

    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "opt": copy.deepcopy(opt.state_dict()),
        "best_state": best_state,
        "losses": torch.tensor([[r["epoch"], r["train"], r["val"]] for r in losses], dtype=torch.float64),
        "best_val": torch.tensor(best_val), "best_epoch": torch.tensor(best_epoch),
        "epoch": torch.tensor(epoch), "bad": torch.tensor(bad),
        "rng": torch.get_rng_state(), "gen": gen.get_state(),
    }


def _save_checkpoint(path: Path, snapshot: dict[str, Any]) -> None:
    tmp = temp_sibling(path)
    torch.save(snapshot, tmp)
    tmp.replace(path)


def batch_rows(z: torch.Tensor | MappedRows, idx: torch.Tensor | slice) -> torch.Tensor:
    """Rows ``idx`` of ``z`` in float32: ``z[idx].float()``, gathered from the mapping for mapped rows."""
    return z.rows(idx) if isinstance(z, MappedRows) else z[idx].float()


@torch.no_grad()
def evaluate_loss(model: Explainer, z: torch.Tensor | MappedRows, t: torch.Tensor, cv: torch.Tensor, margin: float,
                  chunk: int = 8192, rows: torch.Tensor | None = None) -> float:
    """The mean loss over ``rows`` of ``z`` (all rows when None), a chunk at a time in float32."""
    model.eval()
    total = 0.0
    n = len(z) if rows is None else len(rows)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk) if rows is None else rows[s:s + chunk]
        zb = batch_rows(z, sl)
        total += float(hinge_rank_loss(model(zb), t[sl], cv, margin)) * len(zb)
    return total / max(n, 1)


def train(
    store: Store,
    model_spec: str,
    datasets: Sequence[str],
    *,
    layers: Sequence[str] = (),
    weights: str | None = "DEFAULT",
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str | None = None,
    embedding: str | None = None,
    settings: TrainSettings | None = None,
    views: str = "full",
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    resume: bool = False,
    precision: str = "auto",
    progress: Any = None,
    on_epoch: Callable[[int], None] | None = None,
    seen_fractions: Sequence[float] | None = None,
) -> list[TrainResult]:
    """Train one explainer per layer on the union of the datasets' train splits.

    ``precision`` (auto, fp32, bf16, fp16) is the feature pass's autocast precision, see
    :func:`lavise_cli.runtime.resolve_precision`; the resolved one is in the explainer's metadata.
    ``seen_fractions`` (the annotation-rate experiment, paper Fig. 7): one explainer per layer and
    fraction, each trained on that share of the concepts (``settings.seen_fraction`` set to it;
    named ``...-seen0.3``), all from the one feature pass; with the same seed a smaller fraction's
    seen concepts are a subset of a larger one's.
    """
    settings = settings or TrainSettings()
    if seen_fractions:
        fractions: list[float | None] = []
        for f in seen_fractions:
            if not 0.0 < float(f) <= 1.0:
                raise LaviseError(f"--seen-fraction takes shares in (0, 1], got {f}")
            if float(f) not in fractions:
                fractions.append(float(f))
    else:
        fractions = [settings.seen_fraction]
    if not datasets:
        raise LaviseError("name at least one preprocessed dataset, e.g. `lavise train resnet18 coco`")
    dev = resolve_device(device)
    view_list: list[View] = named_views(views)  # a bad --views fails before anything slow
    prec = resolve_precision(precision, dev)
    indexes = [load_index(store, d) for d in datasets]
    for ix in indexes:
        if ix.training_split is None:
            raise LaviseError(f"dataset {ix.name!r} has no train split to train on: run `lavise preprocess {ix.name}` "
                              "again (it divides a dataset without a train split into reference and held-out parts)")
    emb_names = {ix.manifest["inputs"]["embedding"]["name"] for ix in indexes}
    emb = load_embedding(store, embedding or (emb_names.pop() if len(emb_names) == 1 else None))
    model = load_model(model_spec, weights, input_size=input_size, mean=mean, std=std)
    layers = list(layers) or [default_layer(model.module, model.preprocess.input_size)]
    check_ignored(model, layers)
    for layer in layers:
        resolve_layer(model.module, layer)
    concepts, cvecs, _ = merged_concepts(indexes, emb, None, settings.seed)
    cidx = {c: i for i, c in enumerate(concepts)}
    t0 = time.perf_counter()
    per_ds = []
    hits = []
    for ix in indexes:
        fs = reference_features(store, model, layers, ix.splits[ix.training_split], ix.digest, views=view_list, device=dev,
                                batch_size=batch_size, workers=workers, precision=prec, progress=progress)
        per_ds.append(fs)
        hits.extend(f.hit for f in fs.values())
    t_feat = time.perf_counter() - t0
    # Under torchrun the ranks shared the feature passes; rank 0 alone trains (the explainer is
    # small, see docs/distributed.md), the others exit here (lavise_cli.distributed.leave).
    distributed.leave()
    # The images the explainer learns from, so that explain/evaluate can warn when a target set shares them.
    trained_on = image_identities([ix.splits[ix.training_split].image_path(int(i)) for ix, fs in zip(indexes, per_ds)
                                   for i in torch.unique(next(iter(fs.values())).image).tolist()])
    results = []
    ds_label = "+".join(datasets)
    for layer, fraction in [(layer, f) for layer in layers for f in fractions]:
        run_settings = settings if fraction == settings.seen_fraction else replace(settings, seen_fraction=fraction)
        _, _, seen = merged_concepts(indexes, emb, fraction, settings.seed)
        zs, label_parts, gs = [], [], []
        for k, (ix, fs) in enumerate(zip(indexes, per_ds)):
            f = fs[layer]
            local = torch.tensor([cidx.get(c, -1) for c in ix.concepts], dtype=torch.long)
            label = local[f.concept]  # each pair's concept in the merged list (-1: none)
            keep = label >= 0
            if run_settings.seen_fraction is not None:
                keep &= torch.tensor(seen, dtype=torch.bool)[label.clamp_min(0)]
            every = bool(keep.all())
            # z stays in the mapped cache: a kept subset is a row map, nothing is copied.
            zs.append(f.rows if every else f.rows.select(keep))
            label_parts.append(label if every else label[keep])
            gs.append((f.image if every else f.image[keep]) + k * 10_000_000)
        z = MappedRows.cat(zs)
        labels, grp = torch.cat(label_parts), torch.cat(gs)
        del zs
        train_mask = torch.tensor(seen, dtype=torch.bool) if run_settings.seen_fraction is not None else torch.ones(len(concepts), dtype=torch.bool)
        # The loss ranks against the training concepts only (the seen ones in the novel-concept setting).
        train_concepts = torch.nonzero(train_mask).squeeze(1)
        remap = torch.full((len(concepts),), -1, dtype=torch.long)
        remap[train_concepts] = torch.arange(len(train_concepts))
        labels_train = remap[labels]
        ex_name = name if (name and len(layers) == 1) else (f"{name}-{layer}" if name else f"{_slug(model.name)}-{layer}-{ds_label}")
        if len(fractions) > 1:
            ex_name += f"-seen{fraction:g}"
        ex_name = _slug(ex_name)
        # The checkpoint folder is locked, so a concurrent identical run waits instead of deleting it.
        with store.lock("explainers", f".partial-{ex_name}"):
            checkpoint_dir = store.kind_dir("explainers") / f".partial-{ex_name}"
            run_key = stable_digest({"model": model.key(), "layer": layer, "datasets": [ix.digest for ix in indexes],
                                     "settings": asdict(run_settings), "views": views, "precision": prec})
            if checkpoint_dir.exists() and (not resume or _read_key(checkpoint_dir) != run_key):
                shutil.rmtree(checkpoint_dir)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / "run.json").write_text(json.dumps({"key": run_key}))
            t1 = time.perf_counter()
            module, losses, best_epoch = train_explainer(
                z, labels_train, grp, cvecs[train_concepts], run_settings, device=dev,
                checkpoint=checkpoint_dir / "checkpoint.pt", resume=resume, progress=progress, on_epoch=on_epoch)
            t_train = time.perf_counter() - t1
            tr_idx, va_idx = validation_split(grp, run_settings)  # the split train_explainer made, for the counts
            best_val = min((r["val"] for r in losses), default=float("nan"))
            counts = torch.bincount(labels, minlength=len(concepts)).tolist()
            meta = {
                "format": "lavise-explainer/1",
                "lavise_version": __version__,
                "model": model.name,
                "weights": model.weights,
                "weights_digest": model.weights_digest,
                "preprocess": model.preprocess.as_dict(),
                "layer": layer,
                "d": int(z.shape[1]),
                "embedding": emb.name,
                "embedding_dim": emb.dim,
                "datasets": list(datasets),
                "views": views,
                "precision": prec,
                "concepts": concepts,
                "seen": seen,
                "concept_counts": counts,
                "trained_concepts": [concepts[i] for i in train_concepts.tolist()],
                "settings": asdict(run_settings),
                "losses": losses,
                "best_epoch": best_epoch,
                "best_val_loss": best_val,
                "pairs": int(len(z)),
                "training_images": int(len(trained_on)),
            }
            with store.writing("explainers", ex_name,
                               inputs={"model": model.key(), "layer": layer, "datasets": [ix.digest for ix in indexes],
                                       "embedding": emb.name},
                               settings={**asdict(run_settings), "views": views, "model": model.name, "layer": layer,
                                         "datasets": list(datasets), "precision": prec}) as tmp:
                save_explainer(tmp / EXPLAINER_FILE, module, cvecs, {**meta, "name": ex_name})
                save_file({"identities": trained_on.contiguous()}, str(tmp / TRAINING_IMAGES_FILE))
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        path = store.path("explainers", ex_name) / EXPLAINER_FILE
        results.append(TrainResult(
            name=ex_name, path=path, layer=layer,
            feature_cache="hit" if all(hits) else ("partial" if any(hits) else "miss"),
            epochs=len(losses), best_epoch=best_epoch, best_val_loss=best_val,
            seconds={"features": round(t_feat, 3), "training": round(t_train, 3)}, losses=losses,
            pairs={"train_and_val": int(len(z)), "train": int(len(tr_idx)), "val": int(len(va_idx))},
            precision=prec))
    return results


def _slug(s: str) -> str:
    import re

    if ":" in s:  # a factory: name it after its file or module
        target = s.rsplit(":", 1)[0]
        s = Path(target).stem if target.endswith(".py") else target.split(".")[-1]
    base = s
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", base).strip("-.") or "explainer"


def _read_key(d: Path) -> str | None:
    try:
        return json.loads((d / "run.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None
