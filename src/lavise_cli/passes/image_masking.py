"""Image masking: the backbone re-run on each top image with everything outside a filter's
region set to the dataset mean, one forward per (filter, top image) pair.

All pairs are computed in one pass (:func:`lavise_cli.passes.runner.run_pass`) and cached beside
the target pass's maps (:class:`~lavise_cli.passes.target.LayerMaps`); the function returned by
:func:`image_masking_inputs` looks them up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from ..data.images import View, model_input, read_rgb
from ..explain import regions, top_images
from ..store import stable_digest, temp_sibling
from .runner import Item, Sink, run_pass
from .target import LayerMaps

PAIR_CHUNK = 1024  # pairs whose regions are checked at once


class MaskedPairs(Dataset):
    """The pairs in groups of at most ``batch``, as items ``x`` (b, 3, S, S) of masked images.

    Item 0 (when there are pairs with an empty region) is one all-mean image for all of them: an
    empty region masks the whole image, so every such pair has the same input.
    """

    def __init__(self, cache: LayerMaps, paths: Sequence[Path], pair_f: torch.Tensor, pair_r: torch.Tensor,
                 order: torch.Tensor, empty: torch.Tensor, batch: int, size: int, mean: Sequence[float],
                 std: Sequence[float]):
        self.cache, self.paths, self.pair_f, self.pair_r = cache, list(paths), pair_f, pair_r
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.groups = ([empty] if len(empty) else []) + [order[s:s + batch] for s in range(0, len(order), batch)]
        self.empty = len(empty) > 0

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> Item:
        sel = self.groups[k]
        if k == 0 and self.empty:
            return Item(k, torch.zeros(1, 3, self.size, self.size), sel)
        cache = self.cache
        uniq, inv = torch.unique(self.pair_r[sel], return_inverse=True)  # each image decoded once
        maps = cache.maps(uniq)
        imgs = torch.stack([model_input(read_rgb(self.paths[int(cache.rows[r])]), View(), self.size, self.mean,
                                        self.std) for r in uniq.tolist()])
        keep = regions(maps[inv], self.pair_f[sel], cache.threshold, self.size)  # (b, S, S)
        return Item(k, imgs[inv] * keep[:, None].to(imgs.dtype), sel)  # normalised space: 0 is the dataset mean


class PooledRows(Sink):
    """Each pair's pooled (spatial mean) map, at its place in ``z``."""

    def __init__(self, z: torch.Tensor):
        self.z = z

    def add(self, out: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for sel, rows in out:
            self.z[sel] = rows  # one row for the all-mean item: the same for all its pairs


def pooled_rows(layer: str) -> Callable[[list[Item], Mapping[str, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The compute: the spatial mean of ``layer``'s map of each input row, per item."""

    def compute(good: list[Item], maps: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pooled = maps[layer].float().flatten(2).mean(2).cpu()
        out, r0 = [], 0
        for it in good:
            n = it.x.shape[0]  # type: ignore[union-attr]
            out.append((it.data, pooled[r0:r0 + n]))
            r0 += n
        return out

    return compute


def image_masking_inputs(cache: LayerMaps, paths: Sequence[Path], net: nn.Module, layer: str, filters: Sequence[int],
                         p: int, *, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
                         precision: str, batch: int = 64, progress: Any = None
                         ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``z`` for (rows, filters): the image outside the filter's region set to the dataset mean, re-run.

    The pairs are each filter's ``p`` top images exactly as :func:`lavise_cli.explain.explain_filters`
    picks them; the result is cached beside ``cache`` (keyed by the pairs and the precision).
    """
    filt = torch.as_tensor(list(filters), dtype=torch.long)
    top = top_images(cache, p)[filt]  # (F, p)
    pair_f = filt.repeat_interleave(top.shape[1])
    pair_r = top.reshape(-1)
    # "cells": the region includes the footprint of the cells at T_u (see explain.regions).
    key = [filt.tolist(), top.tolist(), precision, "cells"]  # the precision of these forwards, too
    path = cache.root / f"image-masking-{stable_digest(key)[:16]}.safetensors"
    if path.exists():
        z = load_file(str(path))["z"].float()
    else:
        z = torch.empty(len(pair_r), cache.shape[0])
        nonempty = torch.zeros(len(pair_r), dtype=torch.bool)
        for c0 in range(0, len(pair_r), PAIR_CHUNK):
            idx = torch.arange(c0, min(len(pair_r), c0 + PAIR_CHUNK))
            uniq, inv = torch.unique(pair_r[idx], return_inverse=True)
            nonempty[idx] = regions(cache.maps(uniq)[inv], pair_f[idx], cache.threshold, size).flatten(1).any(1)
        order = torch.argsort(pair_r, stable=True)  # group pairs by image: each image decoded once
        order = order[nonempty[order]]
        ds = MaskedPairs(cache, paths, pair_f, pair_r, order, torch.nonzero(~nonempty).squeeze(1), batch, size,
                         mean, std)
        run_pass(ds, net, [layer], pooled_rows(layer), [PooledRows(z)], device=device, precision=precision,
                 batch_size=1, workers=0, progress=progress, label="image masking (backbone per pair)", unit="pair",
                 weights=[0 if k == 0 and ds.empty else len(g) for k, g in enumerate(ds.groups)])
        tmp = temp_sibling(path)  # a concurrent identical run writes its own, and the same bytes
        save_file({"z": z.half().contiguous()}, str(tmp))
        tmp.replace(path)
    where = {(int(u), int(r)): i for i, (u, r) in enumerate(zip(pair_f.tolist(), pair_r.tolist()))}

    def fn(rows: torch.Tensor, filt_rows: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([where[(int(u), int(r))] for u, r in zip(filt_rows.tolist(), rows.tolist())])
        return z[idx]

    return fn
