"""The target pass: one streaming pass of the backbone over an image set (:class:`ImageSet`).

It caches every image's feature map at one layer (fp16 safetensors shards) and computes, per
filter, the exact 0.995-quantile threshold ``T_u`` (a running top-k, see :class:`lavise_cli.passes.stats.RunningTopK`),
each image's maximum and mean activation, from which the top-p images follow.  Memory does not
grow with the number of images beyond the top-k buffers; the maps and the per-image statistics
live on disk and are streamed (:class:`LayerMaps`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
from .stats import QUANTILE, RunningTopK

SHARD_IMAGES = 256
TARGET_VERSION = 2  # 2: per-image statistics in images-NNNNN shards, not in stats.safetensors
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


IMAGE_BLOCK = 4096  # rows of per-image statistics read at a time when they are held in memory


class LayerMaps:
    """The result of a target pass, with lazy access to what it cached on disk.

    On disk (a target entry): ``stats.safetensors`` (per filter the threshold ``T_u``, the maps'
    shape) and, aligned shard for shard, ``maps-NNNNN`` (fp16 maps) and ``images-NNNNN`` (per
    image its row's image number and each filter's maximum and mean).  Nothing that grows with the
    number of images is read unless asked for: :meth:`image_blocks` streams the per-image
    statistics (what :func:`lavise_cli.explain.top_images` needs), :meth:`max_at` reads a few of
    them, :meth:`maps` the maps of a few rows; :attr:`img_max` / :attr:`img_mean` load the whole
    ``(N, d)`` matrices for the analyses that need them (comparisons, relevance).

    ``img_max``, ``img_mean`` and ``rows`` may also be given as tensors (a cache held in memory).
    """

    def __init__(self, root: Path, layer: str, threshold: torch.Tensor, shape: tuple[int, int, int], hit: bool,
                 img_max: torch.Tensor | None = None, img_mean: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, seconds: float = 0.0):
        self.root, self.layer, self.threshold, self.shape, self.hit = Path(root), layer, threshold, shape, hit
        self.seconds = seconds
        self._max, self._mean, self._rows = img_max, img_mean, rows
        self._starts: list[int] | None = None
        self._top: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"LayerMaps(root={str(self.root)!r}, layer={self.layer!r}, shape={self.shape}, hit={self.hit})"

    def _image_shards(self) -> list[Path]:
        return sorted(self.root.glob("images-*.safetensors"))

    @property
    def rows(self) -> torch.Tensor:
        """``(N,)`` the target set's image number of each row (8 bytes per image)."""
        if self._rows is None:
            parts = []
            for path in self._image_shards():
                with safe_open(str(path), framework="pt") as fh:
                    parts.append(fh.get_tensor("rows"))
            self._rows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return self._rows

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    def image_blocks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first row, max (b, d), mean (b, d))`` blocks of the per-image statistics in row
        order, read one shard at a time: memory does not grow with the number of images."""
        if self._max is not None and self._mean is not None:
            for a in range(0, self._max.shape[0], IMAGE_BLOCK):
                yield a, self._max[a:a + IMAGE_BLOCK], self._mean[a:a + IMAGE_BLOCK]
            return
        a = 0
        for path in self._image_shards():
            with safe_open(str(path), framework="pt") as fh:
                mx, mean = fh.get_tensor("max"), fh.get_tensor("mean")
            yield a, mx, mean
            a += mx.shape[0]

    def _whole(self, which: str) -> torch.Tensor:
        parts = [(mx if which == "max" else mean) for _a, mx, mean in self.image_blocks()]
        return torch.cat(parts) if parts else torch.zeros(0, self.shape[0])

    @property
    def img_max(self) -> torch.Tensor:
        """``(N, d)`` each image's maximum per filter (loaded whole on first use)."""
        if self._max is None:
            self._max = self._whole("max")
        return self._max

    @property
    def img_mean(self) -> torch.Tensor:
        """``(N, d)`` each image's mean per filter (loaded whole on first use)."""
        if self._mean is None:
            self._mean = self._whole("mean")
        return self._mean

    def max_at(self, rows: torch.Tensor | Sequence[int], filters: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The maximum of ``filters[i]`` on row ``rows[i]`` (same-length sequences), reading only
        the shards (and their rows' span) that hold them."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        filters = torch.as_tensor(filters, dtype=torch.long)
        if self._max is not None:
            return self._max[rows, filters]
        out = torch.empty(len(rows))
        for sel, got in self._shard_rows("images", "max", rows):
            out[sel] = got[torch.arange(len(sel)), filters[sel]]
        return out

    def top_rows(self, p: int) -> torch.Tensor:
        """``(d, min(p, N))`` rows of the images with the largest maximum activation per filter.

        Ties (common under saturation) are broken by the image's mean activation, then row order.
        Computed in one stream over :meth:`image_blocks` keeping ``p`` candidates per filter (so
        memory is ``d x (p + block)``, whatever ``N``); remembered per ``p``.
        """
        if p not in self._top:
            d = self.shape[0]
            rows, mx, mean = torch.zeros(d, 0, dtype=torch.long), torch.zeros(d, 0), torch.zeros(d, 0)
            for a, bmax, bmean in self.image_blocks():
                b = bmax.shape[0]
                rows = torch.cat([rows, torch.arange(a, a + b).expand(d, b)], dim=1)
                mx = torch.cat([mx, bmax.T.float()], dim=1)
                mean = torch.cat([mean, bmean.T.float()], dim=1)
                # lexicographic (max desc, mean desc, row asc): stable sorts, the last key first
                order = torch.argsort(rows, dim=1, stable=True)
                order = order.gather(1, torch.argsort(-mean.gather(1, order), dim=1, stable=True))
                order = order.gather(1, torch.argsort(-mx.gather(1, order), dim=1, stable=True))[:, :p]
                rows, mx, mean = rows.gather(1, order), mx.gather(1, order), mean.gather(1, order)
            self._top[p] = rows.contiguous()
        return self._top[p]

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
        out = torch.empty(len(rows), *self.shape)
        for sel, got in self._shard_rows("maps", "maps", rows):
            out[sel] = got.float()
        return out

    def _shard_rows(self, prefix: str, name: str, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per shard ``<prefix>-NNNNN`` holding some of ``rows``: (their positions in ``rows``, the
        tensor ``name``'s rows for them); only the rows' span of each shard is read.  The maps and
        images shards are aligned, so :meth:`shard_starts` serves both."""
        starts = torch.tensor(self.shard_starts(), dtype=torch.long)
        shard_of = torch.searchsorted(starts, rows, right=True) - 1
        for s in torch.unique(shard_of).tolist():
            sel = torch.nonzero(shard_of == s).squeeze(1)
            local = rows[sel] - int(starts[s])
            lo, hi = int(local.min()), int(local.max()) + 1
            with safe_open(str(self.root / f"{prefix}-{s:05d}.safetensors"), framework="pt") as fh:
                block = fh.get_slice(name)[lo:hi]
            yield sel, block[local - lo]


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
    """Per filter, the exact 0.995-quantile threshold over every map value (a running top-k, kept
    in each piece's checkpoint state and merged over the pieces — ranks, shares, earlier runs —
    into ``stats.safetensors`` when the pass publishes); per image, each filter's maximum and mean,
    written beside the maps at each checkpoint (``images-NNNNN`` shards, aligned with
    ``maps-NNNNN``), so that nothing held grows with the number of images but the top-k buffer
    (0.5 % of the map values, what an exact quantile needs)."""

    def __init__(self, n_images: int, description: str = "the image set"):
        self.n_images, self.description = n_images, description
        self.topk: RunningTopK | None = None
        self.shape: tuple[int, int, int] | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, out: tuple[list[int], torch.Tensor]) -> None:
        rows, f = out
        if self.shape is None:
            self.shape = (f.shape[1], f.shape[2], f.shape[3])
            self.topk = RunningTopK(self.shape[0], RunningTopK.k_for(self.n_images * self.shape[1] * self.shape[2]))
        assert self.topk is not None
        self.topk.update(f.flatten(2).permute(1, 0, 2).reshape(self.shape[0], -1))
        flat = f.detach().float().flatten(2)
        self.pending.append((torch.as_tensor(rows, dtype=torch.long).cpu(), flat.amax(2).cpu(), flat.mean(2).cpu()))

    def flush(self, folder: Path, shards: Shards, final: bool) -> None:
        if self.pending:
            rows, mx, mean = (torch.cat(parts) for parts in zip(*self.pending))
            save_shard({"rows": rows, "max": mx, "mean": mean}, folder / shards.name("images"))
        self.pending = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.topk is None or self.shape is None:
            return {}
        return {**{f"topk.{k}": v for k, v in self.topk.state_dict().items()}, "shape": torch.tensor(self.shape)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.topk, self.shape, self.pending = None, None, []
        if not state:
            return
        self.shape = tuple(int(x) for x in state["shape"].tolist())  # type: ignore[assignment]
        self.topk = RunningTopK(self.shape[0], 1)  # type: ignore[index]
        self.topk.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("topk.")})

    def publish(self, folder: Path, parts: list[dict[str, torch.Tensor]]) -> None:
        merged = TargetStats(self.n_images, self.description)
        for part in parts:
            if not part:
                continue
            if merged.topk is None:
                merged.load_state_dict(part)
            else:
                one = TargetStats(self.n_images, self.description)
                one.load_state_dict(part)
                assert one.topk is not None
                merged.topk.merge(one.topk)
        if merged.topk is None or merged.shape is None:
            raise DataError(f"no image of {self.description} could be decoded")
        self.topk, self.shape = merged.topk, merged.shape
        save_file({"threshold": merged.topk.quantile(QUANTILE).contiguous(), "shape": torch.tensor(merged.shape)},
                  str(folder / "stats.safetensors"))


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
    return LayerMaps(root=root, layer=layer, threshold=s["threshold"], shape=tuple(int(x) for x in s["shape"].tolist()),  # type: ignore[arg-type]
                     hit=hit)


# The older names (kept for callers written before the rename).
TargetSet = ImageSet
TargetCache = LayerMaps
