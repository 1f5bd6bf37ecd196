"""`lavise train` and `lavise layers`."""

from __future__ import annotations

import math
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import LaviseError
from ..defaults import TrainSettings
from .app import app
from .common import PRECISION_HELP, check_number, emit_json, handle_errors, info, lazy, out, progress, state

layer_shapes = lazy("models", "layer_shapes")
load_model = lazy("models", "load_model")
train_fn = lazy("train", "train")

_D = TrainSettings()


def parse_floats(text: Optional[str], n: int, what: str, positive: bool = False) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise LaviseError(f"{what} takes {n} comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if len(vals) != n:
        raise LaviseError(f"{what} takes {n} comma-separated numbers, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise LaviseError(f"{what} takes finite numbers, got {text}")
    if positive and min(vals) <= 0:
        raise LaviseError(f"{what} takes numbers above 0 (images are divided by them), got {text}")
    return vals


def parse_fractions(text: Optional[str]) -> list[float]:
    """``--seen-fraction``: one share or a comma list, each in (0, 1]; [] when not given."""
    if text is None:
        return []
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LaviseError(f"--seen-fraction takes a share or a comma list of shares in (0, 1], e.g. 0.7 or "
                          f"0.3,0.5,0.7,0.9; got {text}") from None
    if not vals:
        raise LaviseError("--seen-fraction takes a share or a comma list of shares in (0, 1], e.g. 0.3,0.5,0.7,0.9")
    for v in vals:
        check_number("--seen-fraction", v, low=0, high=1, low_open=True)
    return list(dict.fromkeys(vals))


@app.command()
@handle_errors
def train(
    model: str = typer.Argument(..., help="torchvision model name (resnet18, vgg16, ...) or package.module:fn / file.py:fn."),
    datasets: List[str] = typer.Argument(..., help="Preprocessed reference dataset(s); several are merged by label."),
    layer: List[str] = typer.Option([], "--layer", help="Dotted layer path; repeatable (default: last 4-D feature map)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="torchvision weights name, `none`, or a state-dict file."),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=16, max=4096,
                                              help="Square input size, 16-4096 (default: the weights' or 224)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean on [0,1] images, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std, e.g. 0.229,0.224,0.225."),
    name: Optional[str] = typer.Option(None, "--name", help="Explainer name (default: {model}-{layer}-{dataset})."),
    embedding: Optional[str] = typer.Option(None, "--embedding", help="Word vectors (default: the datasets' own)."),
    epochs: int = typer.Option(_D.epochs, "--epochs", min=1, help="Most epochs, at least 1 (early stopping may end sooner)."),
    lr: float = typer.Option(_D.lr, "--lr", help="AdamW learning rate (> 0)."),
    weight_decay: float = typer.Option(_D.weight_decay, "--weight-decay", help="AdamW weight decay (>= 0)."),
    train_batch_size: int = typer.Option(_D.batch_size, "--train-batch-size", min=2,
                                        help="Explainer batch size (at least 2)."),
    patience: int = typer.Option(_D.patience, "--patience", min=1,
                                help="Epochs without validation gain before stopping (at least 1)."),
    val_fraction: float = typer.Option(_D.val_fraction, "--val-fraction", help="Share of train images held out (0 <= x < 1)."),
    seen_fraction: Optional[str] = typer.Option(None, "--seen-fraction",
                                                help="Train on the seen concepts only (e.g. 0.7; 0 < x <= 1) for novel-concept "
                                                     "tests; a comma list (0.3,0.5,0.7,0.9) trains one explainer per share, "
                                                     "named ...-seen0.3, from the one feature pass."),
    seed: int = typer.Option(_D.seed, "--seed", min=0, max=2**32 - 1, help="Seed: the same seed repeats a run exactly."),
    views: str = typer.Option("full", "--views", help="Cached views per image: full,flip,crop,crop-flip."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per batch in the feature pass."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Image-decoding worker processes (default: none on <= 2 CPU cores, where a thread decodes ahead; else a quarter of the cores, at most 4; up to 8 with a GPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same settings."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Train an explainer for a layer of MODEL on reference DATASET(s): one cached backbone pass.

    Examples:

      lavise train resnet18 coco

      lavise train resnet50 coco --layer layer3 --layer layer4

      lavise train resnet18 coco-tiny --weights none --epochs 20

      lavise train my_models.py:build coco --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5

      lavise train resnet18 coco --resume

      torchrun --nproc_per_node 4 -m lavise_cli train resnet50 coco   (the ranks share the feature pass)

      lavise --shard 0/4 train resnet50 coco   (one share of it, e.g. an array job; see docs/distributed.md)

      lavise train resnet18 coco --seen-fraction 0.3,0.5,0.7,0.9
    """
    check_number("--lr", lr, low=0, low_open=True)
    check_number("--weight-decay", weight_decay, low=0)
    check_number("--val-fraction", val_fraction, low=0, high=1, high_open=True)
    fractions = parse_fractions(seen_fraction)
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=train_batch_size,
                             patience=patience, val_fraction=val_fraction, seed=seed,
                             seen_fraction=fractions[0] if len(fractions) == 1 else None)
    with progress() as prog:
        results = train_fn(state.store, model, datasets, layers=layer, weights=weights, input_size=input_size,
                           mean=parse_floats(mean, 3, "--mean"), std=parse_floats(std, 3, "--std", positive=True), name=name,
                           embedding=embedding, settings=settings, views=views, device=device,
                           batch_size=batch_size, workers=workers, resume=resume, precision=precision,
                           progress=prog, seen_fractions=fractions if len(fractions) > 1 else None)
    if json_out:
        docs = [r.as_dict() for r in results]
        emit_json(docs[0] if len(docs) == 1 else {"explainers": docs})
        return
    cache_text = {"hit": "[green]hit[/]", "partial": "partial (some datasets' features reused, the rest computed "
                  "and cached)", "miss": "miss (computed and cached)"}
    for r in results:
        t = Table(title=f"explainer {r.name}")
        t.add_column("")
        t.add_column("value", overflow="fold")
        t.add_row("layer", r.layer)
        t.add_row("feature cache", cache_text.get(r.feature_cache, r.feature_cache))
        t.add_row("pairs, training", str(r.pairs["train"]))
        t.add_row("pairs, validation", str(r.pairs["val"]))
        t.add_row("epochs", f"{r.epochs} (best {r.best_epoch})")
        if r.losses:
            t.add_row("validation loss", f"{r.losses[0]['val']:.3f} → best {r.best_val_loss:.3f}")
        t.add_row("time, feature pass", f"{r.seconds['features']:.1f} s ({r.precision})")
        t.add_row("time, training", f"{r.seconds['training']:.1f} s")
        out.print(t)
        out.print(f"saved {r.path}", highlight=False, soft_wrap=True)  # whole, on its own line (never cut to "…")


@app.command()
@handle_errors
def layers(
    model: str = typer.Argument(..., help="torchvision model name or package.module:fn / file.py:fn."),
    weights: str = typer.Option("none", "--weights", help="Weights to load (shapes do not depend on them)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=16, max=4096, help="Square input size (16-4096)."),
    all_layers: bool = typer.Option(False, "--all", help="Also list layers whose output is not 4-D."),
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """List a model's layers with their output shapes (the --layer names).

    Examples:

      lavise layers resnet18

      lavise layers examples/efficientnet_lite0.py:build --json
    """
    tm = load_model(model, weights, input_size=input_size)
    shapes = layer_shapes(tm.module, tm.preprocess.input_size)
    rows = [(n, s) for n, s in shapes if all_layers or len(s) == 3]
    from ..models import default_layer

    default = default_layer(tm.module, tm.preprocess.input_size)
    if json_out:
        emit_json({"model": model, "input_size": tm.preprocess.input_size, "default": default,
                   "layers": [{"name": n, "shape": list(s)} for n, s in rows]})
        return
    t = Table(title=f"{model} at {tm.preprocess.input_size}px (default layer: {default})")
    t.add_column("layer")
    t.add_column("output (C × H × W)", justify="right")
    for n, s in rows:
        t.add_row(f"[bold]{n}[/]" if n == default else n, " × ".join(map(str, s)))
    out.print(t)
    info("pass a name with --layer; the default is shown in bold")
