"""`lavise explain` and `lavise evaluate`."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import LaviseError
from ..defaults import ALL_METHODS, DEFAULT_METHOD
from .app import app
from .common import emit_json, handle_errors, info, lazy, out, progress
from .explaining import SessionOptions, explanation
from .options import (BATCH, DATASET, DEVICE, EXPLAINER, LAYER, METHOD, MODEL, PRECISION, RANK, RETRIEVAL, SPLIT,
                      VOCAB, VOCAB_SIZE)

get_method = lazy("methods", "get_method")
save_result = lazy("results", "save_result")
parse_methods = lazy("methods", "parse_methods")
evaluate_methods = lazy("methods", "evaluate_methods")

# What `explain --csv` prints, in order (its --help lists the same): similarity_sum is the word's
# cosine similarity summed over the images naming it, so it can exceed 1; specificity and layer_mean
# the word's (docs/method.md), confidence the filter's.
CSV_COLUMNS = ("filter", "rank", "word", "images", "similarity_sum", "novel", "inactive", "specificity", "layer_mean",
               "confidence")

@app.command()
@handle_errors
def explain(
    explainer: Optional[str] = EXPLAINER,
    filters: Optional[str] = typer.Option(None, "--filters", "-f", help="Filters: 150,275 or ranges 0-63."),
    all_filters: bool = typer.Option(False, "--all", help="Explain every filter of the layer."),
    method: str = METHOD,
    words_per_image: int = typer.Option(5, "--words-per-image", "-s", help="Words per top image."),
    images_per_filter: int = typer.Option(25, "--images", "-p", help="Top images per filter."),
    top: int = typer.Option(5, "--top", "-k", help="Words shown per filter."),
    dataset: List[str] = DATASET,
    split: Optional[str] = SPLIT,
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Explain on a folder of plain images instead."),
    vocab: str = VOCAB,
    vocab_size: Optional[int] = VOCAB_SIZE,
    model: Optional[str] = MODEL,
    layer: Optional[str] = LAYER,
    device: str = DEVICE,
    batch_size: int = BATCH,
    precision: str = PRECISION,
    retrieval: str = RETRIEVAL,
    rank: str = RANK,
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    csv_out: bool = typer.Option(False, "--csv", help=f"CSV on stdout, one row per word: {', '.join(CSV_COLUMNS)}."),
) -> None:
    """Explain filters in words: filter attention (default) or a baseline method.

    Examples:

      lavise explain --filters 150,275

      lavise explain --all --json > words.json

      lavise explain -f 0-63 --method original -p 15 -s 5 -k 3

      lavise explain -f 7 --image-dir my_photos/ --vocab my_words.txt
    """
    if filters is None and not all_filters:
        raise LaviseError("say which filters: --filters 150,275 (ranges like 0-63 work) or --all")
    get_method(method, explain=True)
    if min(words_per_image, images_per_filter, top) < 1:
        raise LaviseError("-s, -p and -k must be at least 1")
    opts = SessionOptions(explainer=explainer, filters=filters, all_filters=all_filters, dataset=dataset, split=split,
                          image_dir=image_dir, vocab=vocab, vocab_size=vocab_size, device=device, batch_size=batch_size,
                          precision=precision, retrieval=retrieval, rank=rank, model=model, layer=layer)
    opts.check()  # before the (possibly long) target pass
    with progress() as prog:
        ses, chosen, voc = opts.open(prog)
        # Saved with a digest of its inputs: `heatmap` and `report` with the same settings read it back.
        doc, _, _ = explanation(opts, ses, chosen, voc, method, p=images_per_filter, s=words_per_image, k=top,
                                prog=prog)
    if json_out:
        emit_json(doc)
        return
    if csv_out:
        buf = io.StringIO()
        wr = csv.writer(buf)
        wr.writerow(CSV_COLUMNS)
        for f in doc["filters"]:
            for r, w in enumerate(f["words"], 1):
                wr.writerow([f["filter"], r, w["word"], w["images"], w["similarity_sum"], int(w["novel"]),
                             int(f["inactive"]), w["specificity"], w["layer_mean"], f["confidence"]])
        sys.stdout.write(buf.getvalue())
        return
    t = Table(title=f"{ses.entry.name} · {method} · {ses.target.description} ({ses.cache.n} images) · "
                    f"vocabulary {voc.source} ({len(voc.words)})")
    t.add_column("filter", justify="right")
    t.add_column(f"words (images of {doc['settings']['p']} naming each; [magenta]*[/] novel)")
    t.add_column("conf.", justify="right")
    for f in doc["filters"]:
        if f["inactive"]:
            t.add_row(str(f["filter"]), "[dim]inactive (its top 0.5 % never rises above 0)[/]", "")
            continue
        words = ", ".join(f"{'[magenta]' + w['word'] + '*[/]' if w['novel'] else w['word']} ({w['images']})"
                          for w in f["words"])
        t.add_row(str(f["filter"]), words, "-" if f["confidence"] is None else f"{f['confidence']:.2f}")
    t.caption = (f"words by {'specificity to the filter' if rank == 'specific' else 'count'}, retrieval {retrieval}; "
                 "conf. = share of top images naming the top word x its specificity")
    out.print(t)
    info(f"saved {doc['saved']}")


@app.command()
@handle_errors
def evaluate(
    explainers: List[str] = typer.Option([], "--explainer", "-e",
                                         help="Explainer name (default: the latest trained); repeat it to compare "
                                              "several in one table (-e A -e B ...)."),
    recall: str = typer.Option("5,10,20", "--recall", "-r", help="Cut-offs s for recall@s."),
    methods: str = typer.Option(DEFAULT_METHOD, "--methods", help=f"Comma list of {', '.join(ALL_METHODS)}, or all."),
    filters: Optional[str] = typer.Option(None, "--filters", "-f", help="Filters to score (default: all)."),
    images_per_filter: int = typer.Option(25, "--images", "-p", min=1, help="Top images per filter."),
    dataset: List[str] = DATASET,
    split: Optional[str] = SPLIT,
    vocab: str = VOCAB,
    vocab_size: Optional[int] = VOCAB_SIZE,
    model: Optional[str] = MODEL,
    layer: Optional[str] = LAYER,
    device: str = DEVICE,
    batch_size: int = BATCH,
    precision: str = PRECISION,
    retrieval: str = RETRIEVAL,
    rank: str = RANK,
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout (with several explainers: "
                                                        "{\"explainers\": [one entry per explainer]})."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", hidden=True),
) -> None:
    """Score explanations against ground-truth concepts: recall@s (LaViSE's objective measure).

    Several explainers (-e A -e B ...) give one table with a row per explainer and method, e.g. the
    paper's layer comparison (Table 3) after `lavise train MODEL DATA --layer layer2 --layer layer3
    --layer layer4`; explainers trained with --seen-fraction 0.3,0.5,0.7,0.9 add a table of the
    recall on unseen concepts per seen fraction (the annotation-rate experiment, Fig. 7).

    Examples:

      lavise evaluate --recall 5,10,20

      lavise evaluate --methods all --json > recall.json

      lavise evaluate --vocab concepts --methods attention,original,frequency

      lavise evaluate -e resnet18-layer2-coco -e resnet18-layer3-coco -e resnet18-layer4-coco
    """
    if image_dir is not None:
        raise LaviseError("evaluate needs labels: a plain image folder (--image-dir) has none; score on a "
                          "preprocessed dataset (--dataset NAME)")
    try:
        cuts = sorted({int(x) for x in recall.split(",") if x.strip()})
    except ValueError:
        raise LaviseError("--recall takes comma-separated whole numbers, e.g. 5,10,20") from None
    if not cuts or cuts[0] < 1:
        raise LaviseError("--recall takes positive cut-offs, e.g. 5,10,20")
    chosen_methods = parse_methods(methods)
    names: list[Optional[str]] = list(dict.fromkeys(explainers)) or [None]
    each = [SessionOptions(explainer=name, filters=filters, all_filters=filters is None, dataset=dataset, split=split,
                           image_dir=None, vocab=vocab, vocab_size=vocab_size, device=device, batch_size=batch_size,
                           precision=precision, retrieval=retrieval, rank=rank, model=model, layer=layer)
            for name in names]
    for opts in each:  # every explainer and --filters checked before any (long) target pass
        opts.check()
    results = []
    memo: dict = {}  # the ground truth of explainers that share a target pass, computed once
    with progress() as prog:
        for opts in each:
            ses, chosen, voc = opts.open(prog)
            if not ses.target.labelled:
                raise LaviseError("evaluate needs a labelled target set (a preprocessed dataset)")
            res = evaluate_methods(ses, chosen_methods, voc, cuts=cuts, p=images_per_filter, filters=chosen,
                                   progress=prog, retrieval=retrieval, rank=rank, memo=memo)
            path = save_result(ses, "evaluate", res, {"target": ses.target.key, "vocab": voc.describe(),
                                                      "methods": chosen_methods, "filters": chosen, "p": images_per_filter,
                                                      "cuts": cuts, "precision": ses.precision, "retrieval": retrieval,
                                                      "rank": rank, "region": res["region"]})
            res["saved"] = str(path)
            res["seen_fraction"] = (ses.meta.get("settings") or {}).get("seen_fraction")
            res["target_description"] = f"{ses.target.description} ({ses.cache.n} images)"
            results.append(res)
    if json_out:
        docs = [{k: v for k, v in r.items() if k not in ("per_filter", "target_description")}
                | {"per_filter_saved": r["saved"]} for r in results]
        if len(docs) == 1:
            emit_json(docs[0])
        else:
            emit_json({"explainers": docs, "annotation_rate": annotation_rate(results, cuts)})
        return
    print_evaluation(results, cuts, retrieval, rank)


def print_evaluation(results: list[dict], cuts: list[int], retrieval: str, rank: str) -> None:
    """The tables of ``evaluate``: recall (a row per explainer x method), diversity, and with
    explainers trained on shares of the concepts, the unseen recall per share."""
    several = len(results) > 1
    first = results[0]
    title = "recall@s" if several else f"recall@s · {first['explainer']}"
    target = first.get("target_description") or f"{first['target']} ({first['target_images']} images)"
    t = Table(title=f"{title} on {target} · vocabulary {first['vocabulary']['source']} "
                    f"({first['vocabulary']['size']})")
    if several:  # explainers by number (names can be long): the legend follows the tables
        t.add_column("#", justify="right", no_wrap=True)
    # Narrow enough for 80 columns: the counts header wraps, no figure is ever cut.
    t.add_column("method", no_wrap=True)
    for s in cuts:
        t.add_column(f"R@{s}", justify="right", no_wrap=True)
    t.add_column("filters / pairs / skipped", justify="right")  # the header wraps, the figures never
    t.caption = (f"R@s cells: mean over (filter, image) pairs / mean over filters · retrieval {retrieval}"
                 + (" · rows '· seen'/'· unseen': the method's recall on the concepts the explainer was / was not "
                    "trained on" if any(r.get("novel_concepts") for r in results) else ""))
    # Diversity in a table of its own, so that the recall table keeps its width.
    dt = Table(title=f"diversity of the filters' words (ranked by {rank})")
    if several:
        dt.add_column("#", justify="right", no_wrap=True)
    dt.add_column("method", no_wrap=True)
    for name in ("distinct top-1", "top-1 share (word)", "filters/word"):
        dt.add_column(name, justify="right", no_wrap=True)
    dt.caption = ("over active filters: distinct top-1 words, share of filters whose top-1 word is the most "
                  "common one, mean filters per top-5 word")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for k, res in enumerate(results, start=1):
        lead = [str(k)] if several else []
        rows = []
        for m, r in res["methods"].items():
            rows.append((m, r))
            for sub in ("seen", "unseen"):
                if sub in r:
                    rows.append((f"  · {sub}", r[sub]))
        for m, r in rows:
            cells = []
            for s in cuts:
                cells.append(f"{fmt(r[f'recall@{s}']['pair_mean'])}/{fmt(r[f'recall@{s}']['filter_mean'])}")
            t.add_row(*lead, m, *cells, f"{r['filters']}/{r['pairs']}/{r['skipped']}")
        for m, r in res["methods"].items():
            dv = r.get("diversity")
            if dv is not None:
                common = (r.get("diversity_detail") or {}).get("most_common")
                share = fmt(dv["top1_share"]) + (f" ({common})" if common else "")
                dt.add_row(*lead, m, str(dv["distinct_top1"]), share,
                           "-" if dv["filters_per_word"] is None else f"{dv['filters_per_word']:.1f}")
        if several and res is not results[-1]:
            t.add_section()
    out.print(t)
    out.print(dt)
    number = {res["explainer"]: k for k, res in enumerate(results, start=1)}
    if several:
        for k, res in enumerate(results, start=1):
            seen = "" if res.get("seen_fraction") is None else f", seen fraction {res['seen_fraction']:g}"
            out.print(f"  #{k} {res['explainer']} ({res['model']} {res['layer']}{seen})", highlight=False,
                      soft_wrap=True)
    rate = annotation_rate(results, cuts)
    if several and rate:
        at = Table(title="annotation rate: recall@s on unseen concepts by share of concepts annotated (seen)")
        at.add_column("seen", justify="right", no_wrap=True)
        at.add_column("#", justify="right", no_wrap=True)
        at.add_column("method", no_wrap=True)
        for s in cuts:
            at.add_column(f"unseen R@{s}", justify="right", no_wrap=True)
        at.add_column("filters / pairs", justify="right")
        at.caption = "cells: mean over (filter, image) pairs / mean over filters; ground truth: unseen concepts only"
        for row in rate:
            at.add_row(f"{row['seen_fraction']:g}", str(number[row["explainer"]]), row["method"],
                       *[f"{fmt(row[f'recall@{s}']['pair_mean'])}/{fmt(row[f'recall@{s}']['filter_mean'])}" for s in cuts],
                       f"{row['filters']}/{row['pairs']}")
        out.print(at)
    info("pairs with no ground-truth concept (IoU > 0.04) are skipped; saved "
         + ", ".join(str(r.get("saved")) for r in results))


def annotation_rate(results: list[dict], cuts: list[int]) -> list[dict]:
    """Rows of the annotation-rate table: per explainer trained on a share of the concepts (its
    ``seen_fraction``) and method, the recall on the unseen concepts; sorted by share."""
    rows = []
    for res in results:
        frac = res.get("seen_fraction")
        if frac is None or not res.get("novel_concepts"):
            continue
        for m, r in res["methods"].items():
            if "unseen" in r:
                u = r["unseen"]
                rows.append({"seen_fraction": frac, "explainer": res["explainer"], "method": m,
                             "filters": u["filters"], "pairs": u["pairs"],
                             **{f"recall@{s}": u[f"recall@{s}"] for s in cuts}})
    return sorted(rows, key=lambda r: (r["seen_fraction"], r["explainer"], r["method"]))
