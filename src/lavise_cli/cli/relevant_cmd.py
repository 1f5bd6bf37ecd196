"""`lavise relevant`: which filters each class depends on (sparse lasso selection), checked by ablation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ..errors import LaviseError
from .app import app
from .common import PRECISION_HELP, check_number, emit_json, handle_errors, info, lazy, out, progress, state
from .train_cmd import parse_floats

run_relevant = lazy("analyses.relevant", "run_relevant")


def parse_list(text: Optional[str], what: str, whole: bool = False) -> list[float]:
    if text is None or not text.strip():
        return []
    try:
        vals = [int(x) if whole else float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LaviseError(f"{what} takes comma-separated {'whole ' if whole else ''}numbers, e.g. "
                          f"{'4,8,12' if whole else '0.5,1,2'}") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise LaviseError(f"{what} takes numbers above 0, got {text}")
    return vals


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def _rand(r: dict[str, Any]) -> str:
    return f"{_pct(r['mean'])} ± {100 * r['std']:.1f}"


@app.command()
@handle_errors
def relevant(
    model: str = typer.Argument(..., help="torchvision model name or package.module:fn / file.py:fn (as in `train`)."),
    images: Optional[Path] = typer.Option(None, "--images", "-i",
                                          help="Image folder: one sub-folder per class (or any images with "
                                               "--labels predicted)."),
    dataset: List[str] = typer.Option([], "--dataset", help="A registered COCO-format dataset instead of --images "
                                      "(with --label-by category)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of --dataset (default: its target split)."),
    labels: str = typer.Option("folders", "--labels", help="folders (the sub-folders of --images) or predicted "
                               "(the model's own top-1; the ablation then measures agreement)."),
    label_by: Optional[str] = typer.Option(None, "--label-by", help="category: with --dataset, one multi-label "
                                           "lasso per category (ablation = agreement with the unablated top-1)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Maps folders to outputs: lines `index name` or "
                                           "`index<TAB>wnid<TAB>name` (several lines with one name: a superclass)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Dotted layer path (default: last 4-D feature map)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="torchvision weights name, `none`, or a state-dict file."),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=16, max=4096, help="Square input size."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean on [0,1] images, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std, e.g. 0.229,0.224,0.225."),
    pool: str = typer.Option("max", "--pool", help="Per-image response of a filter: max or mean over its map."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="μ: each class's L1 budget ‖w‖₁ ≤ μ on "
                                             "standardised responses (see docs/relevant.md)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", "-k", help="Each class's K largest positive lasso "
                                            "weights (default 5 when --sparsity is not given)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="μ values, e.g. 0.5,1,2,4: the union selected and "
                                        "ablated at each (the tipping-point table)."),
    sweep_per_class: Optional[str] = typer.Option(None, "--sweep-per-class", help="K values, e.g. 4,8,12: as "
                                                  "--sweep with --per-class."),
    explainer: Optional[str] = typer.Option(None, "--explainer", "-e", help="Name each relevant filter's words with "
                                            "this explainer (filter attention on these images)."),
    top_words: int = typer.Option(5, "--top", min=1, help="Words shown per filter with --explainer."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Write an HTML page: per class its filters' "
                                           "heatmaps on the class's images."),
    heatmap_images: int = typer.Option(5, "--heatmap-images", min=1, help="Images per heatmap with --out."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N, mps."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per batch."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Which filters of a layer each class depends on: a sparse (lasso) selection per class, checked
    by ablation (Oramas et al., ICLR 2019).

    The model's accuracy with nothing removed, with the selected filters zeroed, and with as many random filters zeroed (5 seeded draws, mean ± sd), per class and for the union over classes.

    Examples:

      lavise relevant resnet18 --images photos/ --classes imagenet_classes.tsv

      lavise relevant examples/mnist_cnn.py:build --weights mnist_cnn.pt --images digits/ --layer relu4 --per-class 8

      lavise relevant examples/mnist_cnn.py:build --weights mnist_cnn.pt --images digits/ --sweep-per-class 4,8,12

      lavise relevant examples/efficientnet_lite0.py:build --images photos/ --labels predicted --json

      lavise relevant resnet18 --dataset coco-tiny --label-by category --explainer resnet18-layer4-coco
    """
    check_number("--sparsity", sparsity, low=0, low_open=True)
    if sparsity is not None and per_class is not None:
        raise LaviseError("give --sparsity or --per-class, not both")
    if per_class is not None and per_class < 1:
        raise LaviseError("--per-class must be at least 1")
    if pool not in ("max", "mean"):
        raise LaviseError(f"unknown --pool {pool!r}; choose max or mean")
    if labels not in ("folders", "predicted"):
        raise LaviseError(f"unknown --labels {labels!r}; choose folders or predicted")
    if label_by not in (None, "category"):
        raise LaviseError(f"unknown --label-by {label_by!r}; the one choice is category")
    if (images is None) == (not dataset):
        raise LaviseError("give the images: --images FOLDER, or --dataset NAME with --label-by category")
    if dataset and label_by is None and labels != "predicted":
        raise LaviseError("with --dataset, say how to label: --label-by category (or --labels predicted)")
    if images is not None and label_by is not None:
        raise LaviseError("--label-by category needs a registered dataset (--dataset NAME), not --images")
    mus = parse_list(sweep, "--sweep")
    ks = [int(k) for k in parse_list(sweep_per_class, "--sweep-per-class", whole=True)]
    with progress() as prog:
        res, page = run_relevant(
            state.store, model, images=images, datasets=dataset, split=split, predicted=labels == "predicted",
            label_by=label_by, classes=classes, layer=layer, weights=weights, input_size=input_size,
            mean=parse_floats(mean, 3, "--mean"), std=parse_floats(std, 3, "--std", positive=True), pool=pool,
            sparsity=sparsity, per_class=per_class, sweep=mus, sweep_per_class=ks, explainer=explainer,
            top_words=top_words, out_dir=out_dir, heatmap_images=heatmap_images, device=device,
            batch_size=batch_size, precision=precision, progress=prog)
    doc = res.as_dict()
    if page is not None:
        doc["page"] = str(page)
    if json_out:
        emit_json(doc)
        return
    for name, c in doc["classes"].items():
        t = Table(title=f"class {name}: {len(c['filters'])} filters", caption=f"{c['images']} images")
        t.add_column("filter", justify="right")
        t.add_column("weight", justify="right")
        if doc["explainer"]:
            t.add_column("words ([magenta]*[/] novel)")
        for u, w in zip(c["filters"], c["weights"]):
            cells = [str(u), f"{w:.4f}"]
            if doc["explainer"]:
                cells.append(", ".join(f"[magenta]{x['word']}*[/]" if x["novel"] else x["word"]
                                       for x in c["words"].get(str(u), [])) or "[dim]inactive[/]")
            t.add_row(*cells)
        out.print(t)
    acc = "agreement with the unablated top-1" if doc["settings"]["accuracy"].startswith("agreement") else "accuracy"
    t = Table(title=f"ablation at {doc['layer']}: {acc} with filters zeroed")
    for col in ("set", "images", "removed", "nothing removed", "selected removed", "random removed (5 runs)"):
        t.add_column(col, justify="left" if col == "set" else "right")
    u = doc["union"]["ablation"]
    t.add_row("[bold]union[/]", str(u["images"]), str(u["removed"]), _pct(u["baseline"]), _pct(u["selected"]),
              _rand(u["random"]))
    for name, c in doc["classes"].items():
        a = c["ablation"]
        t.add_row(f"class {name}", str(a["images"]), str(a["removed"]), _pct(a["baseline"]), _pct(a["selected"]),
                  _rand(a["random"]))
    out.print(t)
    if doc["sweep"]:
        key = "sparsity" if "sparsity" in doc["sweep"][0] else "per_class"
        t = Table(title=f"sweep: the union at each {'μ' if key == 'sparsity' else 'K per class'}")
        for col in ("μ" if key == "sparsity" else "K", "removed", "nothing removed", "selected removed",
                    "random removed (5 runs)"):
            t.add_column(col, justify="right")
        for r in doc["sweep"]:
            k = "sparsity" if "sparsity" in r else "per_class"
            t.add_row(f"{r[k]:g}", str(r["removed"]), _pct(r["baseline"]), _pct(r["selected"]), _rand(r["random"]))
        out.print(t)
    if page is not None:
        out.print(f"page {page}", highlight=False, soft_wrap=True)
    info(f"{doc['images']} images, {doc['pool']}-pooled responses of {doc['layer']}; random: mean ± sd of 5 seeded "
         "draws of as many filters")
