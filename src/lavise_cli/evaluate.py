"""Objective evaluation: IoU ground truth, recall@s, NetDissect, the frequency baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .data.images import View, masks_at
from .errors import LaviseError
from .embeddings import Vocabulary
from .explain import regions
from .passes.target import TargetCache, TargetSet

IOU_THRESHOLD = 0.04


def iou_matrix(regions_: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IoU of every region (R, H, W) bool with every mask (K, H, W) bool -> (R, K)."""
    r = regions_.flatten(1).float()
    m = masks.flatten(1).float()
    inter = r @ m.T
    union = r.sum(1, keepdim=True) + m.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))


@dataclass
class ConceptSpace:
    """The evaluation concepts (labels of the target set's mapped concepts)."""

    labels: list[str]
    index: dict[str, int]

    @classmethod
    def of(cls, target: TargetSet, usable: set[str] | None = None) -> "ConceptSpace":
        labels: list[str] = []
        for names in target.source_concepts:
            for c in names:
                if c not in labels and (usable is None or c in usable):
                    labels.append(c)
        return cls(labels, {c: i for i, c in enumerate(labels)})


def image_masks(target: TargetSet, row_image: int, size: int, space: ConceptSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """(concept ids ``(K,)`` in ``space``, masks bool ``(K, size, size)``) of one target image."""
    src, i = target.items[row_image]
    concepts, masks = target.sources[src].masks(i)
    names = target.source_concepts[src]
    ids = torch.tensor([space.index.get(names[c], -1) for c in concepts.tolist()], dtype=torch.long)
    keep = ids >= 0
    if not keep.any():
        return ids[:0], torch.zeros(0, size, size, dtype=torch.bool)
    return ids[keep], masks_at(masks[keep], View(), size)


@torch.no_grad()
def ground_truth(target: TargetSet, cache: TargetCache, filters: Sequence[int], top_rows: torch.Tensor,
                 size: int, space: ConceptSpace, progress: Any = None, cells: bool = True) -> torch.Tensor:
    """``G`` as bool ``(F, p, C)``: concepts whose mask has IoU > 0.04 with the filter's region.

    ``cells=False``: the plain bilinear region, without the footprint of cells at ``T_u``.
    """
    if not target.labelled:
        raise LaviseError("evaluation needs a labelled target set (a preprocessed dataset), not a plain image folder")
    filt = torch.as_tensor(list(filters), dtype=torch.long)
    nf, p = top_rows.shape
    gt = torch.zeros(nf, p, len(space.labels), dtype=torch.bool)
    uniq = torch.unique(top_rows)
    task = progress.add_task("ground truth (IoU)", total=len(uniq), unit="img") if progress is not None else None
    for r in uniq.tolist():  # one image at a time; every filter that has it among its top images at once
        fi, pi = torch.nonzero(top_rows == r, as_tuple=True)
        ids, masks = image_masks(target, int(cache.rows[r]), size, space)
        if len(ids):
            fmap = cache.maps([r])
            reg = regions(fmap.expand(len(fi), -1, -1, -1), filt[fi], cache.threshold, size, cells=cells)
            hit = iou_matrix(reg, masks) > IOU_THRESHOLD  # (f, K)
            gt[fi[:, None], pi[:, None], ids[None, :]] |= hit
        if task is not None:
            progress.advance(task)
    return gt


def recall_at(words: torch.Tensor, gt: torch.Tensor, cuts: Sequence[int], subset: torch.Tensor | None = None
              ) -> dict[str, Any]:
    """recall@s = |W_s ∩ G| / |G| per (filter, image) pair, skipping pairs with empty ``G``.

    ``words`` (F, p, S) concept ids (-1 = a word that is no evaluation concept), best first;
    ``gt`` (F, p, C) bool; ``subset`` (C,) bool restricts ``G`` (seen or unseen concepts).
    """
    nf, p, C = gt.shape
    g = gt & subset[None, None, :] if subset is not None else gt
    n_g = g.sum(2)  # (F, p)
    counted = n_g > 0
    out: dict[str, Any] = {}
    for s in cuts:
        w = words[:, :, :s]
        named = torch.zeros(nf, p, C + 1, dtype=torch.bool)
        named.scatter_(2, torch.where(w >= 0, w, torch.full_like(w, C)), True)
        hits = (named[:, :, :C] & g).sum(2).float()
        rec = torch.where(counted, hits / n_g.clamp_min(1), torch.zeros_like(hits))
        pair_mean = float(rec[counted].mean()) if counted.any() else float("nan")
        per_filter = rec.sum(1) / counted.sum(1).clamp_min(1)
        has = counted.any(1)
        filter_mean = float(per_filter[has].mean()) if has.any() else float("nan")
        out[f"recall@{s}"] = {"pair_mean": pair_mean, "filter_mean": filter_mean}
        out.setdefault("_per_filter", {})[f"recall@{s}"] = torch.where(has, per_filter, torch.full_like(per_filter, float("nan"))).tolist()
    out["pairs"] = int(counted.sum())
    out["skipped"] = int((~counted).sum())
    out["filters"] = int(counted.any(1).sum())
    return out


def vocab_to_concepts(vocab: Vocabulary, space: ConceptSpace) -> torch.Tensor:
    """Concept id of each vocabulary entry (-1 when it is no evaluation concept)."""
    return torch.tensor([space.index.get(w, -1) for w in vocab.words], dtype=torch.long)


@torch.no_grad()
def netdissect_iou(target: TargetSet, cache: TargetCache, size: int, space: ConceptSpace, progress: Any = None
                   ) -> torch.Tensor:
    """Dataset-wide IoU ``(d, C)`` of every filter's thresholded maps with every concept (Bau et al. 2017)."""
    d = cache.shape[0]
    inter = torch.zeros(d, len(space.labels), dtype=torch.float64)
    area_r = torch.zeros(d, dtype=torch.float64)
    area_m = torch.zeros(len(space.labels), dtype=torch.float64)
    all_f = torch.arange(d)
    task = progress.add_task("NetDissect IoU", total=cache.n, unit="img") if progress is not None else None
    for r in range(cache.n):
        fmap = cache.maps([r])
        reg = regions(fmap.expand(d, -1, -1, -1), all_f, cache.threshold, size)
        area_r += reg.flatten(1).sum(1).double()
        ids, masks = image_masks(target, int(cache.rows[r]), size, space)
        if len(ids):
            inter[:, ids] += (reg.flatten(1).float() @ masks.flatten(1).float().T).double()
            area_m[ids] += masks.flatten(1).sum(1).double()
        if task is not None:
            progress.advance(task)
    union = area_r[:, None] + area_m[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter)).float()
