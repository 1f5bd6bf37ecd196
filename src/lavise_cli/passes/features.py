"""One pass of the frozen backbone over a reference set: the pooled masked features, cached.

Because the backbone is frozen and the explainer starts with average pooling, the explainer's
input for a pair (image ``x``, concept mask ``M``) is ``z = mean_hw(F(x) * M')``, with ``M'``
the mask under the image's own geometric transform, area-averaged onto the feature grid.  Every
``z`` is computed in one pass and stored as fp16 safetensors shards in the store, keyed by
everything it depends on.  The pass writes shards as it goes and can resume after an interrupt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..data.images import View, apply_view_masks, model_input, read_rgb
from ..data.index import SplitIndex
from ..errors import DataError, LaviseError
from ..layers import layer_shapes
from ..models import TargetModel
from ..runtime import resolve_precision
from ..store import Store, stable_digest
from .mapped import MappedRows
from .runner import Item, Publication, Shards, Sink, StoreOutput, run_pass, save_shard, share_done

SHARD_PAIRS = 65536
FEATURES_VERSION = 1


@dataclass
class PairFeatures:
    """The cached pooled masked features of one split at one layer.

    ``rows`` maps ``z`` (P, d) float16 from the cache's shards (nothing of it is read until rows
    are gathered); ``z`` loads it whole, for callers that want a tensor."""

    rows: MappedRows  # (P, d) float16, memory-mapped
    image: torch.Tensor  # (P,) int64, index into the split's images
    concept: torch.Tensor  # (P,) int64, index into the dataset's concepts
    view: torch.Tensor  # (P,) int64, index into the views
    key: str
    layer: str
    hit: bool

    @cached_property
    def z(self) -> torch.Tensor:
        """(P, d) float16, loaded in memory (``lavise train`` gathers from ``rows`` instead)."""
        return self.rows.tensor()


def feature_grids(model: TargetModel, layers: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """(d, h, w) of each layer for the model's input size."""
    shapes = dict(layer_shapes(model.module, model.preprocess.input_size))
    out = {}
    for name in layers:
        shp = shapes.get(name)
        if shp is None or len(shp) != 3:
            raise LaviseError(f"layer {name!r} does not output a 4-D feature map ({shp}); pick another --layer")
        out[name] = (int(shp[0]), int(shp[1]), int(shp[2]))
    return out


class PairImages(Dataset):
    """Images of a split (those with pairs) with their views and their masks on each grid, as
    :class:`~lavise_cli.passes.runner.Item`: ``x`` (V, 3, S, S) or None when the image cannot be read."""

    def __init__(self, split: SplitIndex, images: Sequence[int], views: Sequence[View], size: int,
                 mean: Sequence[float], std: Sequence[float], grids: Sequence[tuple[int, int]]):
        self.split, self.images, self.views, self.size = split, list(images), list(views), size
        self.mean, self.std, self.grids = tuple(mean), tuple(std), list(grids)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> Item:
        i = self.images[k]
        try:
            img = read_rgb(self.split.image_path(i))
        except DataError:
            img = None
        concepts, masks = self.split.masks(i)
        if img is None or tuple(img.shape[1:]) != tuple(masks.shape[1:]):
            return Item(i, None)
        x = torch.stack([model_input(img, v, self.size, self.mean, self.std) for v in self.views])
        m = {g: torch.stack([apply_view_masks(masks, v, g) for v in self.views]) for g in self.grids}
        return Item(i, x, {"masks": m, "concepts": torch.from_numpy(concepts)})


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
    # z is mapped, not read (it is pairs x d x 2 bytes: GBs for COCO or VG); the small per-pair
    # columns are loaded, one column at a time.
    cat: dict[str, torch.Tensor] = {}
    for k in ("image", "concept", "view"):
        parts = []
        for sp in shards:
            with safe_open(str(sp), framework="pt") as fh:
                parts.append(fh.get_tensor(k))
        cat[k] = (parts[0] if len(parts) == 1 else torch.cat(parts)).long() if parts else torch.zeros(0, dtype=torch.int64)
    d = None if shards else int(store.manifest("features", key)["settings"]["d"])  # type: ignore[index]
    rows = MappedRows.open(shards, "z", width=d)
    return PairFeatures(rows=rows, image=cat["image"], concept=cat["concept"], view=cat["view"],
                        key=key, layer=layer, hit=True)


def pooled_masked(feat: torch.Tensor, owner: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``z[p] = mean_hw(feat[owner[p]] * masks[p])`` for all pairs at once.

    ``feat`` (N, d, h, w), ``owner`` (P,), ``masks`` (P, h, w) -> (P, d).
    """
    n, d, h, w = feat.shape
    f = feat.reshape(n, d, h * w)[owner]  # (P, d, hw)
    return torch.bmm(f, masks.reshape(-1, h * w, 1).to(f.dtype)).squeeze(-1) / (h * w)



class PooledMasked:
    """The feature pass's compute: per layer, ``z`` of every (image, view, concept) pair of a batch."""

    def __init__(self, grids: dict[str, tuple[int, int, int]], views: int, device: torch.device):
        self.grids, self.nv, self.device = grids, views, device

    def __call__(self, good: list[Item], maps: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        nv = self.nv
        # owner of each (image, view, concept) pair: its row in x
        counts = torch.tensor([len(it.data["concepts"]) for it in good])
        img_rows = torch.arange(len(good)).repeat_interleave(counts)  # (P0,)
        concepts = torch.cat([it.data["concepts"] for it in good])
        images = torch.tensor([it.index for it in good]).repeat_interleave(counts)
        out = {}
        for layer, (_d, h, w) in self.grids.items():
            # masks (V, K, h, w) per image -> (V * P0, h, w) ordered view-major
            per_view = [torch.cat([it.data["masks"][(h, w)][v] for it in good]) for v in range(nv)]
            masks = torch.cat(per_view).to(self.device)
            owner = torch.cat([img_rows * nv + v for v in range(nv)]).to(self.device)
            z = pooled_masked(maps[layer].float(), owner, masks)
            out[layer] = {"z": z.half().cpu(), "image": images.repeat(nv), "concept": concepts.repeat(nv),
                          "view": torch.arange(nv).repeat_interleave(len(concepts))}
        return out


class PairShards(Sink):
    """The feature pass's sink: each layer's pair rows, as ``<key>/z-NNNNN.safetensors`` shards of
    about :data:`SHARD_PAIRS` pairs (fp16 ``z``, int32 image and concept, int8 view)."""

    def __init__(self, keys: dict[str, str]):
        self.keys = keys
        self.buf: dict[str, dict[str, list[torch.Tensor]]] = {
            layer: {k: [] for k in ("z", "image", "concept", "view")} for layer in keys}
        self.buffered = 0

    def add(self, out: dict[str, dict[str, torch.Tensor]]) -> None:
        for layer, rows in out.items():
            for k, v in rows.items():
                self.buf[layer][k].append(v)
        self.buffered += len(next(iter(out.values()))["z"]) if out else 0

    def due(self) -> bool:
        return self.buffered >= SHARD_PAIRS

    def flush(self, folder: Path, shards: Shards, final: bool) -> None:
        for layer, b in self.buf.items():
            if not b["z"]:
                continue
            t = {k: torch.cat(v) for k, v in b.items()}
            save_shard({"z": t["z"].half(), "image": t["image"].int(), "concept": t["concept"].int(),
                        "view": t["view"].to(torch.int8)}, folder / self.keys[layer] / shards.name("z"))
            for v in b.values():
                v.clear()
        self.buffered = 0


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
    rank: int = 0,
    world: int = 1,
) -> dict[str, PairFeatures]:
    """Pooled masked features of every pair of ``split`` at each layer; cached, one backbone pass.

    Layers whose cache exists are loaded; the others share a single pass over the images, run by
    :func:`lavise_cli.passes.runner.run_pass` (resumable, in ``features/.partial-<key>/``).
    ``precision`` (auto, fp32, bf16, fp16; see :func:`lavise_cli.runtime.resolve_precision`) is
    the backbone's autocast precision, part of the cache key.  ``rank``/``world``: this process's
    part of a pass split across processes (the result is complete once every part has run); by
    default the process's own (torchrun ranks share the pass; see :mod:`lavise_cli.distributed`).
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
    grids = feature_grids(model, todo)
    with_pairs = [i for i in range(len(split.images)) if len(split.image_pairs(i))]
    ds = PairImages(split, with_pairs, views, model.preprocess.input_size, model.preprocess.mean,
                    model.preprocess.std, sorted({grids[layer][1:] for layer in todo}))

    def publication(layer: str) -> Publication:
        d, h, w = grids[layer]
        return Publication(
            key=keys[layer], folder=keys[layer],
            inputs={"model": model.key(), "layer": layer, "dataset": split.dataset, "split": split.split,
                    "index": index_digest, "views": [v.as_list() for v in views], "precision": precision},
            settings=lambda r: {"d": d, "grid": [h, w], "layer": layer, "model": model.name, "dataset": split.dataset,
                                "split": split.split, "views": len(views), "images_skipped": r.skipped,
                                "seconds": r.seconds, "precision": precision})

    # Partial results live in one folder per pass, so an interrupted pass resumes where it stopped;
    # its lock keeps a concurrent identical pass waiting, and that one then reuses what this one published.
    pass_key = stable_digest(sorted(keys[layer] for layer in todo))[:24]
    result = run_pass(ds, model.module, todo, PooledMasked({layer: grids[layer] for layer in todo}, len(views), device),
                      [PairShards({layer: keys[layer] for layer in todo})], device=device, precision=precision,
                      batch_size=batch_size, workers=workers, progress=progress, label=f"feature pass {model.name}",
                      output=StoreOutput(store, "features", f".partial-{pass_key}", [publication(la) for la in todo]),
                      rank=rank, world=world)
    if result.ran and not result.published:
        share_done(result, f"feature pass {model.name} on {split.dataset}/{split.split}")
        return out  # this share is done (explicit rank/world); the last share publishes the whole
    if not result.ran:
        # A concurrent identical run did (some of) this pass while this one waited: use what it published.
        return reference_features(store, model, layers, split, index_digest, views=views, device=device,
                                  batch_size=batch_size, workers=workers, precision=precision, progress=progress,
                                  rank=rank, world=world)
    for layer in todo:
        out[layer] = _load_cached(store, keys[layer], layer)
        out[layer].hit = False
    return out
