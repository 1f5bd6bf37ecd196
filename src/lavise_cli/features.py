"""One pass of the frozen backbone over a reference set: the pooled masked features, cached.

Because the backbone is frozen and the explainer starts with average pooling, the explainer's
input for a pair (image ``x``, concept mask ``M``) is ``z = mean_hw(F(x) * M')``, with ``M'``
the mask under the image's own geometric transform, area-averaged onto the feature grid.  Every
``z`` is computed in one pass and stored as fp16 safetensors shards in the store, keyed by
everything it depends on.  The pass writes shards as it goes and can resume after an interrupt.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from .data.images import View, apply_view_masks, model_input, read_rgb
from .data.index import SplitIndex
from .data.loader import image_batches
from .errors import DataError
from .models import TargetModel, capture, forward_to, layer_shapes
from .runtime import autocast, backbone, backbone_input, default_workers, resolve_precision
from .store import Store, atomic_write_json, stable_digest, temp_sibling

SHARD_PAIRS = 65536
FEATURES_VERSION = 1


@dataclass
class PairFeatures:
    """The cached pooled masked features of one split at one layer."""

    z: torch.Tensor  # (P, d) float16
    image: torch.Tensor  # (P,) int64, index into the split's images
    concept: torch.Tensor  # (P,) int64, index into the dataset's concepts
    view: torch.Tensor  # (P,) int64, index into the views
    key: str
    layer: str
    hit: bool


def feature_grids(model: TargetModel, layers: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """(d, h, w) of each layer for the model's input size."""
    shapes = dict(layer_shapes(model.module, model.preprocess.input_size))
    out = {}
    for name in layers:
        shp = shapes.get(name)
        if shp is None or len(shp) != 3:
            from .errors import LaviseError

            raise LaviseError(f"layer {name!r} does not output a 4-D feature map ({shp}); pick another --layer")
        out[name] = (int(shp[0]), int(shp[1]), int(shp[2]))
    return out


class _PairImages(Dataset):
    """Images of a split (those with pairs) with their views and their masks on each grid."""

    def __init__(self, split: SplitIndex, images: Sequence[int], views: Sequence[View], size: int,
                 mean: Sequence[float], std: Sequence[float], grids: Sequence[tuple[int, int]]):
        self.split, self.images, self.views, self.size = split, list(images), list(views), size
        self.mean, self.std, self.grids = tuple(mean), tuple(std), list(grids)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.images[k]
        try:
            img = read_rgb(self.split.image_path(i))
        except DataError:
            img = None
        concepts, masks = self.split.masks(i)
        if img is None or tuple(img.shape[1:]) != tuple(masks.shape[1:]):
            return {"image": i, "ok": False}
        x = torch.stack([model_input(img, v, self.size, self.mean, self.std) for v in self.views])
        m = {g: torch.stack([apply_view_masks(masks, v, g) for v in self.views]) for g in self.grids}
        return {"image": i, "ok": True, "x": x, "masks": m, "concepts": torch.from_numpy(concepts)}


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def feature_key(model: TargetModel, layer: str, split: SplitIndex, index_digest: str, views: Sequence[View],
                precision: str = "fp32") -> str:
    """The cache key of a split's pooled features: ``precision`` is the resolved one (fp32, bf16, fp16)."""
    return stable_digest({
        "v": FEATURES_VERSION,
        "precision": precision,
        "model": model.key(),
        "layer": layer,
        "dataset": split.dataset,
        "split": split.split,
        "index": index_digest,
        "views": [v.as_list() for v in views],
    })[:24]


def _load_cached(store: Store, key: str, layer: str) -> PairFeatures:
    root = store.path("features", key)
    shards = sorted(root.glob("z-*.safetensors"))
    parts = [load_file(str(p)) for p in shards]
    cat = {k: torch.cat([p[k] for p in parts]) for k in ("z", "image", "concept", "view")} if parts else None
    if cat is None:
        d = int(store.manifest("features", key)["settings"]["d"])  # type: ignore[index]
        cat = {"z": torch.zeros(0, d, dtype=torch.float16), **{k: torch.zeros(0, dtype=torch.int64) for k in ("image", "concept", "view")}}
    return PairFeatures(z=cat["z"], image=cat["image"].long(), concept=cat["concept"].long(), view=cat["view"].long(),
                        key=key, layer=layer, hit=True)


def pooled_masked(feat: torch.Tensor, owner: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``z[p] = mean_hw(feat[owner[p]] * masks[p])`` for all pairs at once.

    ``feat`` (N, d, h, w), ``owner`` (P,), ``masks`` (P, h, w) -> (P, d).
    """
    n, d, h, w = feat.shape
    f = feat.reshape(n, d, h * w)[owner]  # (P, d, hw)
    return torch.bmm(f, masks.reshape(-1, h * w, 1).to(f.dtype)).squeeze(-1) / (h * w)


def reference_features(
    store: Store,
    model: TargetModel,
    layers: Sequence[str],
    split: SplitIndex,
    index_digest: str,
    *,
    views: Sequence[View] = (View(),),
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    progress: Any = None,
) -> dict[str, PairFeatures]:
    """Pooled masked features of every pair of ``split`` at each layer; cached, one backbone pass.

    Layers whose cache exists are loaded; the others share a single pass over the images.
    ``precision`` (auto, fp32, bf16, fp16; see :func:`lavise_cli.runtime.resolve_precision`) is
    the backbone's autocast precision, part of the cache key.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    keys = {layer: feature_key(model, layer, split, index_digest, views, precision) for layer in layers}
    out: dict[str, PairFeatures] = {}
    todo = [layer for layer in layers if not store.exists("features", keys[layer])]
    for layer in layers:
        if layer not in todo:
            out[layer] = _load_cached(store, keys[layer], layer)
    if not todo:
        return out
    # Partial results live in one folder per pass, so an interrupted pass resumes where it stopped;
    # its lock keeps a concurrent identical pass waiting, and that one then reuses what this one published.
    pass_key = stable_digest(sorted(keys[layer] for layer in todo))[:24]
    with store.lock("features", f".partial-{pass_key}"):
        if not any(store.exists("features", keys[layer]) for layer in todo):
            _feature_pass(store, model, split, index_digest, views, device, batch_size, workers, precision, progress,
                          keys, todo, out, pass_key)
            return out
    # A concurrent identical run did (some of) this pass while this one waited: use what it published.
    return reference_features(store, model, layers, split, index_digest, views=views, device=device,
                              batch_size=batch_size, workers=workers, precision=precision, progress=progress)


def _feature_pass(store: Store, model: TargetModel, split: SplitIndex, index_digest: str, views: Sequence[View],
                  device: torch.device, batch_size: int, workers: int | None, precision: str, progress: Any,
                  keys: dict[str, str], todo: list[str], out: dict[str, PairFeatures], pass_key: str) -> None:
    """The backbone pass of :func:`reference_features` for the ``todo`` layers (its lock held); fills ``out``."""
    grids = feature_grids(model, todo)
    partial = store.kind_dir("features") / f".partial-{pass_key}"
    partial.mkdir(parents=True, exist_ok=True)
    state_path = partial / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else \
        {"next": 0, "shards": 0, "skipped": [], "keys": sorted(keys[layer] for layer in todo)}
    with_pairs = [i for i in range(len(split.images)) if len(split.image_pairs(i))]
    todo_images = with_pairs[state["next"]:]
    ds = _PairImages(split, todo_images, views, model.preprocess.input_size, model.preprocess.mean,
                     model.preprocess.std, sorted({grids[layer][1:] for layer in todo}))
    if workers is None:
        workers = default_workers(device)
    net = backbone(model.module, device)
    buf: dict[str, dict[str, list[torch.Tensor]]] = {layer: {k: [] for k in ("z", "image", "concept", "view")} for layer in todo}
    buffered = 0
    task = progress.add_task(f"feature pass {model.name}", total=len(with_pairs), completed=state["next"], unit="img") \
        if progress is not None else None
    done = state["next"]
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal buffered
        for layer in todo:
            b = buf[layer]
            if not b["z"]:
                continue
            tensors = {k: torch.cat(v) for k, v in b.items()}
            tensors = {"z": tensors["z"].half().contiguous(), "image": tensors["image"].int(),
                       "concept": tensors["concept"].int(), "view": tensors["view"].to(torch.int8)}
            shard = partial / keys[layer] / f"z-{state['shards']:05d}.safetensors"
            shard.parent.mkdir(exist_ok=True)
            tmp_shard = temp_sibling(shard)
            save_file(tensors, str(tmp_shard))
            os.replace(tmp_shard, shard)
            for v in b.values():
                v.clear()
        state["shards"] += 1
        state["next"] = done
        atomic_write_json(state_path, state)
        buffered = 0

    nv = len(views)
    batches = image_batches(ds, batch_size, workers, device, _collate)
    with torch.inference_mode(), capture(net, todo, stop=True) as feats:
        for batch in batches:
            good = [it for it in batch if it["ok"]]
            state["skipped"].extend(int(it["image"]) for it in batch if not it["ok"])
            if good:
                x = backbone_input(torch.cat([it["x"] for it in good]), device)
                with autocast(device, precision):
                    forward_to(net, x, feats)
                # owner of each (image, view, concept) pair: its row in x
                counts = torch.tensor([len(it["concepts"]) for it in good])
                img_rows = torch.arange(len(good)).repeat_interleave(counts)  # (P0,)
                concepts = torch.cat([it["concepts"] for it in good])
                images = torch.tensor([it["image"] for it in good]).repeat_interleave(counts)
                for layer in todo:
                    g = grids[layer][1:]
                    # masks (V, K, h, w) per image -> (V * P0, h, w) ordered view-major
                    per_view = [torch.cat([it["masks"][g][v] for it in good]) for v in range(nv)]
                    masks = torch.cat(per_view).to(device)
                    owner = torch.cat([img_rows * nv + v for v in range(nv)]).to(device)
                    z = pooled_masked(feats[layer].float(), owner, masks)
                    b = buf[layer]
                    b["z"].append(z.half().cpu())
                    b["image"].append(images.repeat(nv))
                    b["concept"].append(concepts.repeat(nv))
                    b["view"].append(torch.arange(nv).repeat_interleave(len(concepts)))
                buffered += len(concepts) * nv
            done += len(batch)
            if task is not None:
                progress.update(task, completed=done)
            if buffered >= SHARD_PAIRS:
                flush()
    flush()
    seconds = time.perf_counter() - t0
    for layer in todo:
        d, h, w = grids[layer]
        src = partial / keys[layer]
        with store.writing(
            "features",
            keys[layer],
            inputs={"model": model.key(), "layer": layer, "dataset": split.dataset, "split": split.split,
                    "index": index_digest, "views": [v.as_list() for v in views], "precision": precision},
            settings={"d": d, "grid": [h, w], "layer": layer, "model": model.name, "dataset": split.dataset,
                      "split": split.split, "views": len(views), "images_skipped": sorted(set(state["skipped"])),
                      "seconds": seconds, "precision": precision},
        ) as tmp:
            if src.exists():
                for p in sorted(src.glob("z-*.safetensors")):
                    shutil.move(str(p), tmp / p.name)
        out[layer] = _load_cached(store, keys[layer], layer)
        out[layer].hit = False
    shutil.rmtree(partial, ignore_errors=True)
