"""The library calls behind `explain`, `evaluate` and `heatmap`, by their old home.

The work lives in :mod:`lavise_cli.session` (explainer + model + target set + its cached pass),
:mod:`lavise_cli.methods` (the method registry, ``run_explain``, ``evaluate_methods``) and
:mod:`lavise_cli.results` (result documents and where they are saved); this module re-exports
them so that existing imports keep working, and holds the image-masking pass.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from .data.images import View, model_input, read_rgb
from .defaults import ALL_METHODS, METHODS
from .explain import parse_filters, regions, top_images
from .methods import (DIVERSITY_S, check_word_settings, evaluate_methods, get_method, netdissect_words,
                      parse_methods, run_explain)
from .models import capture, forward_to
from .results import explanation_doc, nan_to_none, result_path, save_result
from .runtime import autocast, backbone, backbone_input
from .session import (Session, check_filters, has_ground_truth, model_for, open_explainer, open_session,
                      training_overlap, vocabulary_for)
from .store import stable_digest, temp_sibling


def image_masking_inputs(session: Session, filters: Sequence[int], p: int, batch: int = 64, progress: Any = None):
    """``z`` for (rows, filters): the image outside the filter's region set to the dataset mean, re-run.

    This is the one method that runs the backbone again, once per (filter, top image) pair, so all
    pairs are computed in one go and cached beside the target pass; the returned function looks
    them up.
    """
    size = session.size
    cache = session.cache
    filt = torch.as_tensor(list(filters), dtype=torch.long)
    top = top_images(cache, p)[filt]  # (F, p) exactly as explain_filters picks them
    pair_f = filt.repeat_interleave(top.shape[1])
    pair_r = top.reshape(-1)
    # "cells": the region includes the footprint of the cells at T_u (see explain.regions).
    key = [filt.tolist(), top.tolist(), session.precision, "cells"]  # the precision of these forwards, too
    path = cache.root / f"image-masking-{stable_digest(key)[:16]}.safetensors"
    if path.exists():
        z = load_file(str(path))["z"].float()
    else:
        dev = session.device
        net = backbone(session.model.module, dev)
        layer = session.meta["layer"]
        pre = session.model.preprocess
        z = torch.empty(len(pair_r), cache.shape[0])
        # A pair whose region is empty masks its whole image: every such pair has the same input
        # (the dataset mean everywhere), so it is run once, not once per pair.
        nonempty = torch.zeros(len(pair_r), dtype=torch.bool)
        for c0 in range(0, len(pair_r), 1024):
            idx = torch.arange(c0, min(len(pair_r), c0 + 1024))
            uniq, inv = torch.unique(pair_r[idx], return_inverse=True)
            nonempty[idx] = regions(cache.maps(uniq)[inv], pair_f[idx], cache.threshold, size).flatten(1).any(1)
        order = torch.argsort(pair_r, stable=True)  # group pairs by image: each image decoded once
        order = order[nonempty[order]]
        task = progress.add_task("image masking (backbone per pair)", total=len(order), unit="pair") \
            if progress is not None else None

        def run(x: torch.Tensor) -> torch.Tensor:
            with autocast(dev, session.precision):
                forward_to(net, backbone_input(x, dev), feats)
            return feats[layer].float().flatten(2).mean(2).cpu()

        with torch.inference_mode(), capture(net, [layer], stop=True) as feats:
            if not bool(nonempty.all()):
                z[~nonempty] = run(torch.zeros(1, 3, size, size))
            for s0 in range(0, len(order), batch):
                sel = order[s0:s0 + batch]
                uniq, inv = torch.unique(pair_r[sel], return_inverse=True)
                maps = cache.maps(uniq)
                imgs = torch.stack([model_input(read_rgb(session.target.paths[int(cache.rows[r])]), View(), size,
                                                  pre.mean, pre.std) for r in uniq.tolist()])
                keep = regions(maps[inv], pair_f[sel], cache.threshold, size)  # (b, S, S)
                z[sel] = run(imgs[inv] * keep[:, None].to(imgs.dtype))  # normalised space: 0 is the dataset mean
                if task is not None:
                    progress.advance(task, len(sel))
        tmp = temp_sibling(path)  # a concurrent identical run writes its own, and the same bytes
        save_file({"z": z.half().contiguous()}, str(tmp))
        tmp.replace(path)
    where = {(int(u), int(r)): i for i, (u, r) in enumerate(zip(pair_f.tolist(), pair_r.tolist()))}

    def fn(rows: torch.Tensor, filt_rows: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([where[(int(u), int(r))] for u, r in zip(filt_rows.tolist(), rows.tolist())])
        return z[idx]

    return fn



__all__ = ["METHODS", "ALL_METHODS", "Session", "open_explainer", "open_session", "vocabulary_for", "run_explain", "evaluate_methods",
           "parse_filters", "explanation_doc", "save_result", "netdissect_words", "image_masking_inputs",
           "check_filters", "check_word_settings", "get_method", "has_ground_truth", "model_for", "nan_to_none",
           "parse_methods", "result_path", "training_overlap", "DIVERSITY_S"]
