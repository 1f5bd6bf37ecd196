"""`lavise compare groups` and `lavise compare models` (paper §4.6 and §4.5.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ..errors import LaviseError
from .app import app
from .common import emit_json, handle_errors, info, lazy, out, progress, state, warn_trained_on
from .options import BATCH, DATASET, DEVICE, EXPLAINER, PRECISION, RANK, RETRIEVAL, SPLIT, VOCAB, VOCAB_SIZE

compare_groups = lazy("analyses.group_compare", "compare_groups")
compare_models = lazy("analyses.model_compare", "compare_models")
make_groups = lazy("analyses.image_groups", "make_groups")
parse_group_specs = lazy("analyses.image_groups", "parse_group_specs")
read_groups_file = lazy("analyses.image_groups", "read_groups_file")
write_groups_page = lazy("visualize.compare_page", "write_groups_page")
write_models_page = lazy("visualize.compare_page", "write_models_page")

compare_app = typer.Typer(
    help="Compare image groups (which filters fire more often on one) or two models (what each learned).",
    no_args_is_help=True, rich_markup_mode="rich",
)
app.add_typer(compare_app, name="compare")

P = typer.Option(25, "--explain-images", "-p", help="Images the words are gathered over (explain's -p).")
S = typer.Option(5, "--words-per-image", "-s", help="Words per image (explain's -s).")
K = typer.Option(5, "--words", "-k", help="Words shown per filter (explain's -k).")
OUT = typer.Option(None, "--out", "-o", help="Folder for the HTML page (and its images).")
JSON = typer.Option(False, "--json", help="One JSON document on stdout.")


@compare_app.command("groups")
@handle_errors
def groups_cmd(
    explainer: Optional[str] = EXPLAINER,
    group: List[str] = typer.Option([], "--group", "-g", help="NAME=SOURCE, twice or more: SOURCE an image folder, "
                                    "a text file of image paths, or a dataset (coco-tiny, coco-tiny:val)."),
    groups_file: Optional[Path] = typer.Option(None, "--groups-file", help="CSV of image,group rows instead of --group."),
    top: int = typer.Option(10, "--top", "-n", help="Filters listed per direction (per pair of groups)."),
    images: int = typer.Option(5, "--images", help="Qualified images per group shown on the page and in JSON."),
    thumb: int = typer.Option(128, "--thumb", help="Image size on the page, in pixels."),
    explain_images: int = P,
    words_per_image: int = S,
    words: int = K,
    vocab: str = VOCAB,
    vocab_size: Optional[int] = VOCAB_SIZE,
    retrieval: str = RETRIEVAL,
    rank: str = RANK,
    device: str = DEVICE,
    batch_size: int = BATCH,
    precision: str = PRECISION,
    out_dir: Optional[Path] = OUT,
    json_out: bool = JSON,
) -> None:
    """Which filters fire more often on one group of images than on another (paper §4.6).

    One target pass over all the groups' images (cached: the same images again are served from
    the store). Per filter, T is the 0.995 quantile of its activations over all groups; an image
    is qualified when its maximum activation reaches T. Per pair of groups: the difference of the
    shares of qualified images, Fisher's exact test (small counts) or the two-proportion z-test,
    and Benjamini-Hochberg q-values over all tests; each listed filter has words from filter
    attention over its qualified images in the group it favours. An image in two groups is
    refused. A difference is an association in the data, not a cause (docs/compare.md).

    Examples:

      lavise compare groups --group men=men.txt --group women=women.txt

      lavise compare groups -e lite0 -g cars=photos/cars -g other=photos/other --top 5 --out cmp/

      lavise compare groups --groups-file groups.csv --json > diff.json
    """
    if group and groups_file is not None:
        raise LaviseError("give the groups either with --group NAME=SOURCE or with --groups-file, not both")
    if not 16 <= thumb <= 1024:
        raise LaviseError("--thumb must be between 16 and 1024 pixels")
    specs = parse_group_specs(group)
    listed = read_groups_file(groups_file) if groups_file is not None else []
    groups = make_groups(state.store, specs, listed)
    with progress() as prog:
        doc, ses = compare_groups(state.store, groups, explainer, top=top, p=explain_images, s=words_per_image,
                                  k=words, images=images, vocab=vocab, vocab_size=vocab_size, retrieval=retrieval,
                                  rank=rank, device=device, batch_size=batch_size, precision=precision, progress=prog)
        warn_trained_on(ses)
        if out_dir is not None:
            doc["page"] = str(write_groups_page(ses.cache, doc, out_dir, thumb))
    if json_out:
        emit_json(doc)
        return
    ps = doc["pass"]
    info(f"target pass over {ps['images']} images: " + ("served from the cache" if ps["cached"]
                                                          else f"ran in {ps['seconds']:.1f} s (now cached)"))
    names = list(doc["groups"])
    out.print("groups: " + ", ".join(f"{n} {g['images']} images" for n, g in doc["groups"].items())
              + f" · {doc['active_filters']} of {doc['filters_total']} filters active · {doc['tests']} tests, "
              f"{doc['significant']} with q < 0.05", highlight=False)
    by_dir: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in doc["filters"]:
        a, b = f["pair"]
        by_dir.setdefault((f["favours"], b if f["favours"] == a else a), []).append(f)
    for a_, b_ in ((a, b) for i, a in enumerate(names) for b in names[i + 1:]):
        for fav, other in ((a_, b_), (b_, a_)):
            rows = by_dir.get((fav, other), [])
            t = Table(title=f"more often active on {fav} than on {other}")
            t.add_column("filter", justify="right")
            t.add_column(f"share {fav}", justify="right")
            t.add_column(f"share {other}", justify="right")
            t.add_column("difference", justify="right")
            t.add_column("p", justify="right")
            t.add_column("q", justify="right")
            t.add_column("words ([magenta]*[/] novel)")
            for f in rows:
                q = f["q_value"]
                t.add_row(str(f["filter"]), f"{f['shares'][fav]:.2f}", f"{f['shares'][other]:.2f}",
                          f"{f['shares'][fav] - f['shares'][other]:+.2f}", f"{f['p_value']:.2g}",
                          f"[green]{q:.3g}[/]" if q < 0.05 else f"{q:.3g}",
                          ", ".join(f"[magenta]{w['word']}*[/]" if w["novel"] else w["word"] for w in f["words"]))
            if not rows:
                t.caption = "no filter"
            out.print(t)
    info("share = images whose maximum activation reaches T; p: Fisher's exact test (small counts) or the "
         "two-proportion z-test; q: Benjamini-Hochberg over all tests; "
         "an association in these images, not a cause")
    if "page" in doc:
        out.print(f"page {doc['page']}", highlight=False, soft_wrap=True)


@compare_app.command("models")
@handle_errors
def models_cmd(
    explainer_a: str = typer.Argument(..., help="The first explainer (its val split is the default target set)."),
    explainer_b: str = typer.Argument(..., help="The second explainer."),
    dataset: List[str] = DATASET,
    split: Optional[str] = SPLIT,
    top: int = typer.Option(10, "--top", "-n", help="Concepts and matched pairs shown in the tables."),
    explain_images: int = P,
    words_per_image: int = S,
    words: int = K,
    vocab: str = VOCAB,
    vocab_size: Optional[int] = VOCAB_SIZE,
    retrieval: str = RETRIEVAL,
    rank: str = RANK,
    device: str = DEVICE,
    batch_size: int = BATCH,
    precision: str = PRECISION,
    out_dir: Optional[Path] = OUT,
    json_out: bool = JSON,
) -> None:
    """What two models learned: their concepts on one target set with one vocabulary (paper §4.5.5).

    A model's learned concepts are the distinct top-1 words over its active filters (and, stricter,
    those named by 2 or more filters); the tables list the shared ones and each model's own. For
    two models of one architecture and layer width, filters are matched one-to-one by the
    correlation of their per-image maximum activations (Hungarian matching), words side by side.

    Examples:

      lavise compare models lite0 lite0-random

      lavise compare models lite0 lite0-random --dataset coco-tiny --vocab concepts --json

      lavise compare models resnet18-a resnet18-b --out cmp/
    """
    if top < 1:
        raise LaviseError("--top must be at least 1")
    with progress() as prog:
        doc, ses_a, ses_b = compare_models(state.store, explainer_a, explainer_b, datasets=dataset, split=split,
                                       vocab=vocab, vocab_size=vocab_size, p=explain_images, s=words_per_image,
                                       k=words, retrieval=retrieval, rank=rank, device=device,
                                       batch_size=batch_size, precision=precision, progress=prog)
        warn_trained_on(ses_a)
        warn_trained_on(ses_b)
        if out_dir is not None:
            doc["page"] = str(write_models_page(doc, out_dir))
    if json_out:
        emit_json(doc)
        return
    names = list(doc["models"])
    a, b = names
    info("target passes: " + ", ".join(f"{n} {'cached' if m['pass_cached'] else 'ran'}" for n, m in doc["models"].items()))
    t = Table(title=f"learned concepts on {doc['target']} ({doc['target_images']} images) · vocabulary "
                    f"{doc['vocabulary'].get('source')} ({doc['vocabulary'].get('size')})")
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    for label, key in (("active filters", "active_filters"), ("concepts (distinct top-1 words)", "concepts"),
                       ("named by >= 2 filters", "concepts_2plus")):
        t.add_row(label, *(str(doc["models"][n][key]) for n in names))
    t.add_row("shared / only", *(f"{len(doc['shared'])} / {len(doc['only'][n])}" for n in names))
    out.print(t)
    ct = Table(title=f"concepts (filters naming each first: {a} / {b}), most filters first, {top} each")
    ct.add_column("shared")
    ct.add_column(f"only {a}")
    ct.add_column(f"only {b}")

    def cell(words: list[str], i: int) -> str:
        if i >= len(words):
            return ""
        w = words[i]
        return f"{w} ({doc['models'][a]['words'].get(w, 0)}/{doc['models'][b]['words'].get(w, 0)})"

    for i in range(min(top, max(len(doc["shared"]), *(len(v) for v in doc["only"].values())))):
        ct.add_row(cell(doc["shared"], i), cell(doc["only"][a], i), cell(doc["only"][b], i))
    out.print(ct)
    m = doc.get("matching")
    if isinstance(m, dict):
        mt = Table(title=f"matched filters (correlation of per-image max activations over {m['images']} images): "
                         f"mean {m['mean_correlation']:.3f}, {m['pairs_over_0.5']} above 0.5, "
                         f"{m['same_top1_word']} with the same top word; best {top}")
        mt.add_column(a, justify="right")
        mt.add_column("words")
        mt.add_column(b, justify="right")
        mt.add_column("words")
        mt.add_column("corr.", justify="right")
        for p_ in doc["matches"][:top]:
            mt.add_row(str(p_["a"]), ", ".join(p_["words_a"]) or "inactive", str(p_["b"]),
                       ", ".join(p_["words_b"]) or "inactive", f"{p_['correlation']:.3f}")
        out.print(mt)
    else:
        info(f"filters not matched: {m}")
    if "page" in doc:
        out.print(f"page {doc['page']}", highlight=False, soft_wrap=True)
