"""The target pass: one streaming pass of the backbone over a target image set.

It caches every image's feature map at one layer (fp16 safetensors shards) and computes, per
filter, the exact 0.995-quantile threshold ``T_u`` (a running top-k, see :class:`RunningTopK`),
each image's maximum and mean activation, from which the top-p images follow.  Memory does not
grow with the number of images beyond the top-k buffers; the maps live on disk.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from .data.images import View, model_input, read_rgb
from .data.index import DatasetIndex, SplitIndex
from .data.loader import image_batches
from .errors import DataError, LaviseError
from .models import TargetModel, capture, forward_to
from .runtime import autocast, backbone, backbone_input, default_workers, resolve_precision
from .store import Store, stable_digest

QUANTILE = 0.995
SHARD_IMAGES = 256
TARGET_VERSION = 1
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class RunningTopK:
    """The ``k`` largest values per row seen so far, for an exact streaming upper quantile.

    ``add(x)`` takes ``(d, m)`` values (any ``m``, batches of any size); ``quantile(q)`` returns
    exactly what ``torch.quantile(all_values, q, dim=1)`` (linear interpolation) would, provided
    ``k >= n - floor((n - 1) * q)`` for the total count ``n`` — see :meth:`k_for`.
    """

    def __init__(self, d: int, k: int):
        self.d, self.k = d, max(1, int(k))
        self.values = torch.full((d, 0), float("-inf"))
        self.count = 0

    @staticmethod
    def k_for(n: int, q: float = QUANTILE) -> int:
        return int(n - math.floor((n - 1) * q)) + 1

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        if x.shape[0] != self.d:
            raise ValueError(f"expected {self.d} rows, got {x.shape[0]}")
        self.count += x.shape[1]
        both = torch.cat([self.values, x], dim=1)
        k = min(self.k, both.shape[1])
        self.values = both.topk(k, dim=1, sorted=False).values

    def quantile(self, q: float = QUANTILE) -> torch.Tensor:
        n = self.count
        if n == 0:
            raise ValueError("no values added")
        pos = (n - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        need = n - lo  # descending rank of the lower neighbour, counted from 1
        if need > self.values.shape[1]:
            raise ValueError(f"top-k buffer of {self.values.shape[1]} is too small for q={q} over {n} values")
        desc = self.values.sort(dim=1, descending=True).values
        v_lo = desc[:, n - 1 - lo]
        v_hi = desc[:, n - 1 - hi]
        return v_lo + (pos - lo) * (v_hi - v_lo)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values, "count": torch.tensor(self.count), "k": torch.tensor(self.k)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.values, self.count, self.k = s["values"], int(s["count"]), int(s["k"])


@dataclass
class TargetSet:
    """Images to explain filters on; labelled when they come from preprocessed datasets."""

    description: str
    paths: list[Path]
    key: dict[str, Any]
    # For a labelled set: per image, (source number, image index in that source's split).
    sources: list[SplitIndex] = field(default_factory=list)
    source_concepts: list[list[str]] = field(default_factory=list)
    items: list[tuple[int, int]] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.sources)


def labelled_target(indexes: Sequence[DatasetIndex], split: str | None = None) -> TargetSet:
    """The union of the datasets' ``split`` as one labelled target set.

    ``split=None``: each dataset's target split (``val``, or the held-out part of a dataset that
    has no train split).
    """
    paths, items, sources, concepts, names = [], [], [], [], []
    for ix in indexes:
        name = split or ix.target_split
        if name not in ix.splits:
            known = ", ".join(ix.splits) or "none"
            raise LaviseError(f"dataset {ix.name!r} has no {name!r} split (it has: {known}); choose one with --split")
        sp = ix.splits[name]
        k = len(sources)
        sources.append(sp)
        concepts.append(ix.concepts)
        names.append(name)
        for i in range(len(sp.images)):
            paths.append(sp.image_path(i))
            items.append((k, i))
    same = len(set(names)) == 1
    description = (f"{'+'.join(ix.name for ix in indexes)}/{names[0]}" if same
                   else "+".join(f"{ix.name}/{n}" for ix, n in zip(indexes, names)))
    return TargetSet(description=description, paths=paths,
                     key={"datasets": [ix.digest for ix in indexes], "split": names[0] if same else names},
                     sources=sources, source_concepts=concepts, items=items)


def folder_target(folder: Path) -> TargetSet:
    """Every image file under ``folder`` (recursively, sorted): an unlabelled target set."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise LaviseError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise LaviseError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {folder}")
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return TargetSet(description=str(folder), paths=paths, key={"folder": str(folder), "files": stable_digest(listing)})


class _Images(Dataset):
    def __init__(self, paths: Sequence[Path], size: int, mean: Sequence[float], std: Sequence[float]):
        self.paths, self.size, self.mean, self.std = list(paths), size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        try:
            img = read_rgb(self.paths[i])
        except DataError:
            return i, None
        return i, model_input(img, View(), self.size, self.mean, self.std)


def _collate(items: list[tuple[int, torch.Tensor | None]]) -> list[tuple[int, torch.Tensor | None]]:
    return items


@dataclass
class TargetCache:
    """The result of a target pass, with lazy access to the cached feature maps."""

    root: Path
    layer: str
    threshold: torch.Tensor  # (d,)
    img_max: torch.Tensor  # (N, d) over the images that decoded
    img_mean: torch.Tensor  # (N, d)
    rows: torch.Tensor  # (N,) index into the target set's images of each row
    shape: tuple[int, int, int]  # (d, h, w)
    hit: bool
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    def maps(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feature maps ``(len(rows), d, h, w)`` float32 of the given rows (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        d, h, w = self.shape
        out = torch.empty(len(rows), d, h, w)
        shard_of = rows // SHARD_IMAGES
        for s in torch.unique(shard_of).tolist():
            sel = torch.nonzero(shard_of == s).squeeze(1)
            local = rows[sel] - s * SHARD_IMAGES
            lo, hi = int(local.min()), int(local.max()) + 1
            with safe_open(str(self.root / f"maps-{s:05d}.safetensors"), framework="pt") as fh:
                block = fh.get_slice("maps")[lo:hi]  # only the rows' span of the shard is read
            out[sel] = block[local - lo].float()
        return out


def target_pass(
    store: Store,
    model: TargetModel,
    layer: str,
    target: TargetSet,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    progress: Any = None,
) -> TargetCache:
    """Cache feature maps of ``layer`` over ``target`` and the per-filter statistics (cached).

    ``precision`` (auto, fp32, bf16, fp16) is the backbone's autocast precision, part of the key.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    inputs = {"v": TARGET_VERSION, "model": model.key(), "layer": layer, "target": target.key, "q": QUANTILE,
              "precision": precision}
    key = stable_digest(inputs)[:24]
    if store.exists("targets", key):
        return _load_target(store, key, layer, hit=True)
    # A concurrent identical pass is waited for, then its entry is used.
    with store.lock("targets", f".pass-{key}"):
        if store.exists("targets", key):
            return _load_target(store, key, layer, hit=True)
        seconds = _target_pass(store, model, layer, target, key, inputs, device, batch_size, workers, precision,
                               progress)
    cache = _load_target(store, key, layer, hit=False)
    cache.seconds = seconds
    return cache


def _target_pass(store: Store, model: TargetModel, layer: str, target: TargetSet, key: str, inputs: dict[str, Any],
                 device: torch.device, batch_size: int, workers: int | None, precision: str, progress: Any) -> float:
    """The pass of :func:`target_pass` (its lock held); returns its seconds."""
    net = backbone(model.module, device)
    if workers is None:
        workers = default_workers(device)
    ds = _Images(target.paths, model.preprocess.input_size, model.preprocess.mean, model.preprocess.std)
    task = progress.add_task(f"target pass {layer}", total=len(ds), unit="img") if progress is not None else None
    t0 = time.perf_counter()
    topk: RunningTopK | None = None
    maxes, means, rows, failed = [], [], [], 0
    pending: list[torch.Tensor] = []
    n_written = 0
    shape: tuple[int, int, int] | None = None
    with store.writing("targets", key, inputs=inputs, settings={"layer": layer, "target": target.description,
                                                                 "images": len(target.paths),
                                                                 "precision": precision}) as tmp:
        def flush(final: bool = False) -> None:
            nonlocal pending, n_written
            while pending and (final or sum(len(p) for p in pending) >= SHARD_IMAGES):
                allm = torch.cat(pending)
                block, rest = allm[:SHARD_IMAGES], allm[SHARD_IMAGES:]
                save_file({"maps": block.contiguous()}, str(tmp / f"maps-{n_written // SHARD_IMAGES:05d}.safetensors"))
                n_written += len(block)
                pending = [rest] if len(rest) else []
                if final and not pending:
                    break

        with torch.inference_mode(), capture(net, [layer], stop=True) as feats:
            for batch in image_batches(ds, batch_size, workers, device, _collate):
                good = [(i, x) for i, x in batch if x is not None]
                failed += len(batch) - len(good)
                if good:
                    x = backbone_input(torch.stack([x for _, x in good]), device)
                    with autocast(device, precision):
                        forward_to(net, x, feats)
                    f = feats[layer].float()
                    if shape is None:
                        shape = (f.shape[1], f.shape[2], f.shape[3])
                        n_total = len(target.paths) * shape[1] * shape[2]
                        topk = RunningTopK(shape[0], RunningTopK.k_for(n_total))
                    flat = f.flatten(2)  # (B, d, hw)
                    assert topk is not None
                    topk.add(flat.permute(1, 0, 2).reshape(shape[0], -1))
                    maxes.append(flat.amax(2).cpu())
                    means.append(flat.mean(2).cpu())
                    rows.extend(i for i, _ in good)
                    pending.append(f.half().cpu())
                    flush()
                if task is not None:
                    progress.advance(task, len(batch))
        flush(final=True)
        if topk is None or shape is None:
            raise DataError(f"no image of {target.description} could be decoded")
        threshold = topk.quantile(QUANTILE)
        save_file({"threshold": threshold.contiguous(), "img_max": torch.cat(maxes).contiguous(),
                   "img_mean": torch.cat(means).contiguous(), "rows": torch.tensor(rows, dtype=torch.long),
                   "shape": torch.tensor(shape)}, str(tmp / "stats.safetensors"))
    seconds = time.perf_counter() - t0
    store.update_manifest("targets", key, seconds=seconds, failed_images=failed)
    return seconds


def _load_target(store: Store, key: str, layer: str, hit: bool) -> TargetCache:
    root = store.path("targets", key)
    s = load_file(str(root / "stats.safetensors"))
    return TargetCache(root=root, layer=layer, threshold=s["threshold"], img_max=s["img_max"], img_mean=s["img_mean"],
                       rows=s["rows"], shape=tuple(int(x) for x in s["shape"].tolist()), hit=hit)  # type: ignore[arg-type]
