"""The target pass: one streaming pass of the backbone over an image set (:class:`ImageSet`).

It caches every image's feature map at one layer (fp16 safetensors shards) and computes, per
filter, the exact 0.995-quantile threshold ``T_u`` (a running top-k, see :class:`lavise_cli.passes.stats.RunningTopK`),
each image's maximum and mean activation, from which the top-p images follow.  Memory does not
grow with the number of images beyond the top-k buffers; the maps live on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ..data.images import View, model_input, read_rgb
from ..data.index import DatasetIndex, SplitIndex
from ..errors import DataError, LaviseError
from ..models import TargetModel
from ..runtime import resolve_precision
from ..store import Store, stable_digest
from .runner import Item, Publication, Shards, Sink, StoreOutput, run_pass, save_shard, share_done
from .stats import QUANTILE, ImageRows, RunningTopK

SHARD_IMAGES = 256
TARGET_VERSION = 1
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
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


def labelled_target(indexes: Sequence[DatasetIndex], split: str | None = None) -> ImageSet:
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
    return ImageSet(description=description, paths=paths,
                     key={"datasets": [ix.digest for ix in indexes], "split": names[0] if same else names},
                     sources=sources, source_concepts=concepts, items=items)


def folder_target(folder: Path) -> ImageSet:
    """Every image file under ``folder`` (recursively, sorted): an unlabelled target set."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise LaviseError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise LaviseError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {folder}")
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return ImageSet(description=str(folder), paths=paths, key={"folder": str(folder), "files": stable_digest(listing)})


class ImageFiles(Dataset):
    """Image files as :class:`~lavise_cli.passes.runner.Item`: ``x`` (1, 3, S, S), None when unreadable."""

    def __init__(self, paths: Sequence[Path], size: int, mean: Sequence[float], std: Sequence[float]):
        self.paths, self.size, self.mean, self.std = list(paths), size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        try:
            img = read_rgb(self.paths[i])
        except DataError:
            return Item(i, None)
        return Item(i, model_input(img, View(), self.size, self.mean, self.std)[None])


@dataclass
class LayerMaps:
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
    _starts: list[int] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    def shard_starts(self) -> list[int]:
        """The first row of each ``maps-NNNNN`` shard (and the total last): shards hold
        :data:`SHARD_IMAGES` rows, or, from a pass split in pieces, whatever each checkpoint held."""
        if self._starts is None:
            starts = [0]
            for p in sorted(self.root.glob("maps-*.safetensors")):
                with safe_open(str(p), framework="pt") as fh:
                    starts.append(starts[-1] + int(fh.get_slice("maps").get_shape()[0]))
            self._starts = starts
        return self._starts

    def maps(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feature maps ``(len(rows), d, h, w)`` float32 of the given rows (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        d, h, w = self.shape
        out = torch.empty(len(rows), d, h, w)
        starts = torch.tensor(self.shard_starts(), dtype=torch.long)
        shard_of = torch.searchsorted(starts, rows, right=True) - 1
        for s in torch.unique(shard_of).tolist():
            sel = torch.nonzero(shard_of == s).squeeze(1)
            local = rows[sel] - int(starts[s])
            lo, hi = int(local.min()), int(local.max()) + 1
            with safe_open(str(self.root / f"maps-{s:05d}.safetensors"), framework="pt") as fh:
                block = fh.get_slice("maps")[lo:hi]  # only the rows' span of the shard is read
            out[sel] = block[local - lo].float()
        return out


def layer_maps_of(good: list[Item], maps: Mapping[str, torch.Tensor], layer: str) -> tuple[list[int], torch.Tensor]:
    """The target pass's compute: the batch's image numbers and its float32 maps at ``layer``."""
    return [it.index for it in good], maps[layer].float()


class MapShards(Sink):
    """The cached maps: fp16 ``maps-NNNNN.safetensors`` shards of about :data:`SHARD_IMAGES` rows
    (one per checkpoint), in the order the images decoded (see :meth:`LayerMaps.maps`)."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []

    def add(self, out: tuple[list[int], torch.Tensor]) -> None:
        self.pending.append(out[1].half().cpu())

    def due(self) -> bool:
        return sum(len(p) for p in self.pending) >= SHARD_IMAGES

    def flush(self, folder: Path, shards: Shards, final: bool) -> None:
        if self.pending:
            save_shard({"maps": torch.cat(self.pending)}, folder / shards.name("maps"))
        self.pending = []


class TargetStats(Sink):
    """Per filter, the exact 0.995-quantile threshold over every map value (a running top-k), and
    per image, each filter's maximum and mean; kept in each piece's checkpoint state, merged over
    the pieces (ranks, shares, earlier runs) into ``stats.safetensors`` when the pass publishes."""

    def __init__(self, n_images: int, description: str = "the image set"):
        self.n_images, self.description = n_images, description
        self.topk: RunningTopK | None = None
        self.images = ImageRows()
        self.shape: tuple[int, int, int] | None = None

    def add(self, out: tuple[list[int], torch.Tensor]) -> None:
        rows, f = out
        if self.shape is None:
            self.shape = (f.shape[1], f.shape[2], f.shape[3])
            self.topk = RunningTopK(self.shape[0], RunningTopK.k_for(self.n_images * self.shape[1] * self.shape[2]))
        assert self.topk is not None
        self.topk.update(f.flatten(2).permute(1, 0, 2).reshape(self.shape[0], -1))
        self.images.update(rows, f)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.topk is None or self.shape is None:
            return {}
        return {**{f"topk.{k}": v for k, v in self.topk.state_dict().items()},
                **{f"images.{k}": v for k, v in self.images.state_dict().items()}, "shape": torch.tensor(self.shape)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.topk, self.images, self.shape = None, ImageRows(), None
        if not state:
            return
        self.shape = tuple(int(x) for x in state["shape"].tolist())  # type: ignore[assignment]
        self.topk = RunningTopK(self.shape[0], 1)  # type: ignore[index]
        self.topk.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("topk.")})
        self.images.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("images.")})

    def publish(self, folder: Path, parts: list[dict[str, torch.Tensor]]) -> None:
        merged = TargetStats(self.n_images, self.description)
        for part in parts:
            if not part:
                continue
            one = TargetStats(self.n_images, self.description)
            one.load_state_dict(part)
            if merged.topk is None:
                merged.load_state_dict(part)
            else:
                assert one.topk is not None
                merged.topk.merge(one.topk)
                merged.images.merge(one.images)
        if merged.topk is None or merged.shape is None:
            raise DataError(f"no image of {self.description} could be decoded")
        self.topk, self.images, self.shape = merged.topk, merged.images, merged.shape
        save_file({"threshold": merged.topk.quantile(QUANTILE).contiguous(), "img_max": merged.images.max.contiguous(),
                   "img_mean": merged.images.mean.contiguous(), "rows": merged.images.rows,
                   "shape": torch.tensor(merged.shape)}, str(folder / "stats.safetensors"))


def target_pass(
    store: Store,
    model: TargetModel,
    layer: str,
    target: ImageSet,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    progress: Any = None,
) -> LayerMaps:
    """Cache feature maps of ``layer`` over ``target`` and the per-filter statistics (cached).

    ``precision`` (auto, fp32, bf16, fp16) is the backbone's autocast precision, part of the key.
    The pass is :func:`lavise_cli.passes.runner.run_pass` with :class:`MapShards` and
    :class:`TargetStats` as sinks of one compute, resumable in ``targets/.partial-<key>/`` and
    shared among the ranks of a torchrun job (or run as one ``--shard`` share).
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    inputs = {"v": TARGET_VERSION, "model": model.key(), "layer": layer, "target": target.key, "q": QUANTILE,
              "precision": precision}
    key = stable_digest(inputs)[:24]
    if store.exists("targets", key):
        return _load_target(store, key, layer, hit=True)
    ds = ImageFiles(target.paths, model.preprocess.input_size, model.preprocess.mean, model.preprocess.std)
    settings = {"layer": layer, "target": target.description, "images": len(target.paths), "precision": precision}

    # A concurrent identical pass is waited for (its work folder's lock), then its entry is used.
    result = run_pass(ds, model.module, [layer], lambda good, maps: layer_maps_of(good, maps, layer),
                      [MapShards(), TargetStats(len(target.paths), target.description)], device=device, precision=precision, batch_size=batch_size,
                      workers=workers, progress=progress, label=f"target pass {layer}",
                      output=StoreOutput(store, "targets", f".partial-{key}", [Publication(
                          key, inputs, lambda _r: settings,
                          extra=lambda r: {"seconds": r.seconds, "failed_images": len(r.skipped)})]))
    if not result.published and result.ran:
        share_done(result, f"target pass {layer} of {target.description}")
    cache = _load_target(store, key, layer, hit=not result.ran)
    cache.seconds = result.seconds
    return cache


def _load_target(store: Store, key: str, layer: str, hit: bool) -> LayerMaps:
    root = store.path("targets", key)
    s = load_file(str(root / "stats.safetensors"))
    return LayerMaps(root=root, layer=layer, threshold=s["threshold"], img_max=s["img_max"], img_mean=s["img_mean"],
                     rows=s["rows"], shape=tuple(int(x) for x in s["shape"].tolist()), hit=hit)  # type: ignore[arg-type]


# The older names (kept for callers written before the rename).
TargetSet = ImageSet
TargetCache = LayerMaps
