"""`lavise heatmap` and `lavise report`: what each filter sees, in pictures beside its words."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.table import Table

from ..errors import LaviseError
from .app import app
from .common import emit_json, handle_errors, info, lazy, out, progress
from .explaining import SessionOptions, explanation
from .options import (BATCH, DATASET, DEVICE, EXPLAINER, METHOD, PRECISION, RANK, RETRIEVAL, SPLIT, VOCAB,
                      VOCAB_SIZE)

if TYPE_CHECKING:
    from ..embeddings import Vocabulary
    from ..session import Session

build_report = lazy("visualize", "build_report")
files_dir_for = lazy("visualize", "files_dir_for")
heatmap_paths = lazy("visualize", "heatmap_paths")
has_ground_truth = lazy("session", "has_ground_truth")
evaluate_methods = lazy("methods", "evaluate_methods")
get_method = lazy("methods", "get_method")
result_path = lazy("results", "result_path")

P = typer.Option(25, "--explain-images", "-p",
                 help="Top images the words are gathered over (explain's -p); the pictures show the first of them.")
S = typer.Option(5, "--words-per-image", "-s", help="Words per top image (explain's -s).")
K = typer.Option(5, "--top", "-k", help="Words shown per filter (explain's -k).")
IMAGE_DIR = typer.Option(None, "--image-dir", help="Use a folder of plain images as the target set instead.")


def _explain(opts: SessionOptions, method: str, p: int, s: int, k: int, prog: Any
             ) -> tuple[Session, dict[str, Any], dict[str, Any], list[int], Vocabulary]:
    """Exactly what `lavise explain` does for the same settings, its saved result read back when
    there is one (``doc["reused"]``): session, explanation doc, result key, filters, vocabulary."""
    get_method(method, explain=True)
    if min(p, s, k) < 1:
        raise LaviseError("-p, -s and -k must be at least 1")
    opts.check()
    ses, chosen, voc = opts.open(prog)
    # The same result file `lavise explain` writes for these settings: the words behind the pictures.
    # Saved from the same inputs (explainer, cached maps, vocabulary, code), it is read back, not redone.
    doc, key, reused = explanation(opts, ses, chosen, voc, method, p=p, s=s, k=k, prog=prog, reuse=True)
    doc["reused"] = reused
    return ses, doc, key, chosen, voc


@app.command()
@handle_errors
def heatmap(
    explainer: Optional[str] = EXPLAINER,
    filters: Optional[str] = typer.Option(None, "--filters", "-f", help="Filters: 150,275 or ranges 0-63."),
    all_filters: bool = typer.Option(False, "--all", help="One picture for every filter of the layer."),
    method: str = METHOD,
    images: int = typer.Option(5, "--images", "-n", help="Top images shown per filter."),
    columns: Optional[int] = typer.Option(None, "--columns", help="Images per row (default: up to 5)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNGs (default: in the store)."),
    explain_images: int = P,
    words_per_image: int = S,
    top: int = K,
    dataset: List[str] = DATASET,
    split: Optional[str] = SPLIT,
    image_dir: Optional[Path] = IMAGE_DIR,
    vocab: str = VOCAB,
    vocab_size: Optional[int] = VOCAB_SIZE,
    device: str = DEVICE,
    batch_size: int = BATCH,
    precision: str = PRECISION,
    retrieval: str = RETRIEVAL,
    rank: str = RANK,
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout: PNG paths with the words."),
) -> None:
    """Draw each filter's top images with its region highlighted, under the filter's words (one PNG each).

    The region is the one `evaluate` scores: the filter's map upsampled bilinearly to the input
    size, at least its threshold T (0.995 quantile); the rest of the image is dimmed and the
    region outlined in yellow. The images are the first of `explain`'s top images for the same
    settings, so a picture always matches its words.

    Examples:

      lavise heatmap --filters 150,275

      lavise heatmap -f 0-15 -n 10 --out pictures/

      lavise heatmap -f 7 --method original --json

      lavise heatmap -f 3 --image-dir my_photos/ --vocab my_words.txt
    """
    if filters is None and not all_filters:
        raise LaviseError("say which filters: --filters 150,275 (ranges like 0-63 work) or --all")
    if images < 1:
        raise LaviseError("--images must be at least 1")
    if columns is not None and columns < 1:
        raise LaviseError("--columns must be at least 1")
    if explain_images < 1:
        raise LaviseError("-p/--explain-images must be at least 1")
    opts = SessionOptions(explainer=explainer, filters=filters, all_filters=all_filters, dataset=dataset, split=split,
                          image_dir=image_dir, vocab=vocab, vocab_size=vocab_size, device=device, batch_size=batch_size,
                          precision=precision, retrieval=retrieval, rank=rank)
    t0 = time.perf_counter()
    with progress() as prog:
        ses, doc, key, _, _ = _explain(opts, method, max(explain_images, images), words_per_image, top, prog)
        folder = Path(out_dir).expanduser() if out_dir is not None else \
            result_path(ses, method, key, suffix="", folder="heatmaps")
        paths = heatmap_paths(ses, doc, folder, images, cols=columns, progress=prog)
    if json_out:
        emit_json({
            "explainer": doc["explainer"], "model": doc["model"], "layer": doc["layer"], "method": method,
            "precision": doc["precision"],
            "target": doc["target"], "explanation": doc["saved"], "folder": str(folder.resolve()),
            "heatmaps": [{"filter": f["filter"], "png": str(pth.resolve()), "inactive": f["inactive"],
                          "words": f["words"], "confidence": f["confidence"],
                          "images": [t["path"] for t in f["top_images"][:images]]}
                         for f, pth in zip(doc["filters"], paths)],
        })
        return
    for pth in paths:
        out.print(str(pth.resolve()), highlight=False, soft_wrap=True)
    info(f"{len(paths)} heatmap(s) in {time.perf_counter() - t0:.1f} s; words saved in {doc['saved']}")


@app.command()
@handle_errors
def report(
    explainer: Optional[str] = EXPLAINER,
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML page (default: in the store); "
                                            "thumbnails go to a folder NAME_files/ beside it."),
    filters: Optional[str] = typer.Option(None, "--filters", "-f", help="Filters: 0-63, 150,275 (default: all)."),
    method: str = METHOD,
    images: int = typer.Option(15, "--images", "-n", help="Highlighted images per filter (the paper's raters saw 15)."),
    thumb: int = typer.Option(128, "--thumb", help="Thumbnail size in pixels."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate",
                                  help="Score recall@5/10/20 when the target set is labelled."),
    explain_images: int = P,
    words_per_image: int = S,
    top: int = K,
    dataset: List[str] = DATASET,
    split: Optional[str] = SPLIT,
    image_dir: Optional[Path] = IMAGE_DIR,
    vocab: str = VOCAB,
    vocab_size: Optional[int] = VOCAB_SIZE,
    device: str = DEVICE,
    batch_size: int = BATCH,
    precision: str = PRECISION,
    retrieval: str = RETRIEVAL,
    rank: str = RANK,
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """One static HTML page for a whole layer: every filter's words beside its highlighted images.

    At the top the explainer's settings and recall table; then one card per filter (highlighted
    thumbnails, words with counts, novel words marked, the filter's recall), sortable by filter
    or recall and filterable by word or minimum recall. The page opens from disk with no network;
    its "human evaluation" mode adds a 1-5 rating per filter and a CSV download of the ratings.

    Examples:

      lavise report

      lavise report --out layer4.html --filters 0-255

      lavise report --method original --no-evaluate

      lavise report --image-dir my_photos/ --images 10
    """
    if images < 1:
        raise LaviseError("--images must be at least 1")
    if not 16 <= thumb <= 1024:
        raise LaviseError("--thumb must be between 16 and 1024 pixels")
    if explain_images < 1:
        raise LaviseError("-p/--explain-images must be at least 1")
    opts = SessionOptions(explainer=explainer, filters=filters, all_filters=filters is None, dataset=dataset,
                          split=split, image_dir=image_dir, vocab=vocab, vocab_size=vocab_size, device=device,
                          batch_size=batch_size, precision=precision, retrieval=retrieval, rank=rank)
    t0 = time.perf_counter()
    with progress() as prog:
        ses, doc, key, chosen, voc = _explain(opts, method, max(explain_images, images), words_per_image, top, prog)
        evaluation = None
        if evaluate and ses.target.labelled and has_ground_truth(ses.target):
            evaluation = evaluate_methods(ses, [method], voc, cuts=(5, 10, 20), p=doc["settings"]["p"],
                                          filters=chosen, progress=prog, retrieval=retrieval, rank=rank)
        elif evaluate:
            info("the target set has no labels: the report has no recall (use an annotated, preprocessed dataset)")
        page = Path(out_file).expanduser() if out_file is not None else \
            result_path(ses, f"report-{method}", key, suffix=".html")
        if page.suffix.lower() not in {".html", ".htm"}:
            page = page.with_suffix(page.suffix + ".html") if page.suffix else page.with_suffix(".html")
        page = build_report(ses, doc, evaluation, page, n_images=images, thumb=thumb, progress=prog)
    files = files_dir_for(page)
    n_thumbs = sum(1 for _ in files.glob("*.jpg"))  # one per distinct image
    n_shown = sum(len(f["top_images"][:images]) for f in doc["filters"])  # highlighted (filter, image) pairs
    res: dict[str, Any] = {"report": str(page), "thumbnails": str(files), "images": n_shown,
                           "thumbnail_files": n_thumbs,
                           "filters": len(doc["filters"]), "method": method, "precision": ses.precision,
                           "explanation": doc["saved"], "explanation_reused": doc["reused"],
                           "evaluated": evaluation is not None, "seconds": round(time.perf_counter() - t0, 2)}
    if evaluation is not None:
        res["recall"] = {k: v for k, v in evaluation["methods"][method].items()}
    if json_out:
        emit_json(res)
        return
    t = Table(title=f"report · {doc['explainer']} · {method} · {doc['target']}")
    t.add_column("")
    t.add_column("value", overflow="fold")
    t.add_row("images shown", str(n_shown))
    t.add_row("thumbnails", f"{n_thumbs} (one per distinct image)")
    t.add_row("filters", str(len(doc["filters"])))
    if evaluation is not None:
        r = evaluation["methods"][method]
        t.add_row("recall@5/10/20 (pairs)", " / ".join(
            "-" if r[f"recall@{c}"]["pair_mean"] is None else f"{r[f'recall@{c}']['pair_mean']:.3f}" for c in (5, 10, 20)))
    else:
        t.add_row("recall", "not evaluated")
    t.add_row("time", f"{res['seconds']:.1f} s")
    out.print(t)
    # Paths whole, on lines of their own (a table would cut them to "…" in a narrow terminal).
    out.print(f"page {page}", highlight=False, soft_wrap=True)
    out.print(f"thumbnails {files}", highlight=False, soft_wrap=True)
    info(f"open it with a browser: {Path(page).resolve().as_uri()}")  # percent-encoded: spaces, #, %, ...
