"""``lavise download``: reference datasets, word vectors and model weights (or local copies)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from .. import download as dl
from ..data.register import describe_dataset
from ..errors import LaviseError
from ..store import Entry
from .app import app
from .common import emit_json, handle_errors, human_size, info, out, progress, state

download_app = typer.Typer(
    help=(
        "Download reference datasets, word vectors and model weights, or register local copies"
        " with --from.\n\n"
        "Example:\n\n"
        "  lavise download coco --split val\n\n"
        "  lavise download coco --from ~/data/coco --name coco-local\n\n"
        "  lavise download glove"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(download_app, name="download")


class Split(str, Enum):
    train = "train"
    val = "val"
    all = "all"


FROM_DIR_HELP = "Register an existing local copy in DIR instead of downloading (nothing is copied)."
NAME_HELP = "Name of the store entry (to keep several datasets of the same kind)."
JSON_HELP = "Print the entry's manifest as one JSON document on stdout."


def entry_summary(entry: Entry) -> dict[str, Any]:
    """What ``--json`` prints for a store entry: its manifest plus where it lives."""
    return {"path": str(entry.path), **entry.manifest}


def _report_dataset(entry: Entry, as_json: bool) -> None:
    if as_json:
        emit_json(entry_summary(entry))
        return
    d = describe_dataset(entry)
    splits = ", ".join(f"{s} {n:,} images" for s, n in d["splits"].items())
    out.print(f"registered dataset [bold]{entry.name}[/] ({d['format']}: {splits}) at {d['root']}", highlight=False)


def _coco(kind: str, split: Split, from_: Optional[Path], name: Optional[str], as_json: bool) -> None:
    store = state.store
    panoptic = kind == "coco-panoptic"
    if from_ is not None:
        info(f"checking the COCO layout in {from_}")
        splits = None if split is Split.all else [split.value]
        entry = dl.register_coco(store, from_, name or kind, panoptic=panoptic, splits=splits)
    else:
        with progress(transfer=True) as bar:
            entry = dl.download_dataset(store, kind, split=split.value, name=name, progress=bar, announce=info)
    _report_dataset(entry, as_json)


@download_app.command("coco")
@handle_errors
def coco(
    split: Split = typer.Option(
        Split.all, "--split", help="Which split to get: train (18 GiB of images), val (0.8 GiB) or all."
    ),
    from_: Optional[Path] = typer.Option(None, "--from", metavar="DIR", help=FROM_DIR_HELP),
    name: Optional[str] = typer.Option(None, "--name", help=NAME_HELP + " [default: coco]"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """COCO 2017 instance annotations and images from the official site, or a local copy.

    A local copy (--from) must be laid out as COCO ships it: annotations/instances_{train,val}2017.json
    with the images in train2017/ and val2017/; either split may be missing.

    Example:

      lavise download coco --split val

      lavise download coco --from ../shared/data/coco_tiny --name coco-tiny --json
    """
    _coco("coco", split, from_, name, as_json)


@download_app.command("coco-panoptic")
@handle_errors
def coco_panoptic(
    split: Split = typer.Option(Split.all, "--split", help="Which split to get: train, val or all."),
    from_: Optional[Path] = typer.Option(None, "--from", metavar="DIR", help=FROM_DIR_HELP),
    name: Optional[str] = typer.Option(None, "--name", help=NAME_HELP + " [default: coco-panoptic]"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """COCO 2017 panoptic annotations (133 thing and stuff categories) and images, or a local copy.

    A local copy (--from) needs annotations/panoptic_{split}2017.json, its PNGs in
    annotations/panoptic_{split}2017/ and the images in {split}2017/.

    Example:

      lavise download coco-panoptic --split val

      lavise download coco-panoptic --from ../shared/data/coco128_panoptic
    """
    _coco("coco-panoptic", split, from_, name, as_json)


@download_app.command("vg")
@handle_errors
def vg(
    from_: Optional[Path] = typer.Option(None, "--from", metavar="DIR", help=FROM_DIR_HELP),
    name: Optional[str] = typer.Option(None, "--name", help=NAME_HELP + " [default: vg]"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Visual Genome 1.4: images (about 15 GiB), objects and object synsets, or a local copy.

    A local copy (--from) needs objects.json and VG_100K/ and/or VG_100K_2/ (image_data.json and
    object_synsets.json are recorded when present).

    Example:

      lavise download vg

      lavise download vg --from ~/data/visual_genome
    """
    store = state.store
    if from_ is not None:
        info(f"checking the Visual Genome layout in {from_}")
        entry = dl.register_vg(store, from_, name or "vg")
    else:
        with progress(transfer=True) as bar:
            entry = dl.download_dataset(store, "vg", name=name, progress=bar, announce=info)
    _report_dataset(entry, as_json)


@download_app.command("broden")
@handle_errors
def broden(
    from_: Optional[Path] = typer.Option(None, "--from", metavar="DIR", help=FROM_DIR_HELP + " Required for Broden."),
    name: Optional[str] = typer.Option(None, "--name", help=NAME_HELP + " [default: broden]"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Broden (NetDissect's densely labelled images: objects, parts, materials, scenes, textures, colours), a local copy.

    The folder is laid out as NetDissect makes it (e.g. broden1_224/ from NetDissect's
    script/dlbroden.sh): index.csv, label.csv and images/. Preprocess it with
    `lavise preprocess broden` (choose categories with --categories).

    Example:

      lavise download broden --from ~/data/broden1_224

      lavise preprocess broden --categories object,part,material,color
    """
    if from_ is None:
        raise LaviseError("lavise cannot fetch Broden itself: get broden1_224 with NetDissect's script/dlbroden.sh, "
                          "then register the folder with `lavise download broden --from DIR`")
    info(f"checking the Broden layout in {from_}")
    entry = dl.register_broden(state.store, from_, name or "broden")
    _report_dataset(entry, as_json)


@download_app.command("glove")
@handle_errors
def glove(
    source: str = typer.Argument(
        dl.DEFAULT_GLOVE, metavar="[NAME|URL]", help="A gensim-data name (e.g. glove-wiki-gigaword-100) or a URL."
    ),
    from_: Optional[Path] = typer.Option(
        None,
        "--from",
        metavar="FILE",
        help=(
            "Register a local file instead: GloVe text (.txt/.gz, no header), word2vec text or binary,"
            " or gensim KeyedVectors (a folder holding exactly one such file works too)."
        ),
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the embedding in the store."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Word vectors for naming filters: GloVe 6B 300-d by default, any gensim-data name or URL.

    Example:

      lavise download glove

      lavise download glove glove-wiki-gigaword-100 --name glove100

      lavise download glove --from ../shared/data/glove/glove.6B.50d.top100k.txt.gz
    """
    store = state.store
    if from_ is not None:
        from ..embeddings import register_embedding

        with progress() as bar:
            entry = register_embedding(store, from_, name=name, progress=bar)
    else:
        with progress(transfer=True) as bar:
            entry = dl.download_glove(store, source, name=name, progress=bar, announce=info)
    if as_json:
        emit_json(entry_summary(entry))
    else:
        out.print(
            f"registered embedding [bold]{entry.name}[/] ({human_size(entry.size)}) at {entry.path}", highlight=False
        )


@download_app.command("weights")
@handle_errors
def weights(
    model: str = typer.Argument(
        ..., help="A torchvision model name, e.g. resnet18 (see torchvision.models.list_models())."
    ),
    weights_: str = typer.Option(
        "DEFAULT", "--weights", help="Which weights: DEFAULT or an entry such as IMAGENET1K_V1."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was fetched as one JSON document on stdout."),
) -> None:
    """Prefetch torchvision weights into torch's own cache (TORCH_HOME), for later offline runs.

    Example:

      lavise download weights resnet18

      lavise download weights resnet50 --weights IMAGENET1K_V2
    """
    result = dl.download_weights(model, weights_)
    if as_json:
        emit_json(result)
    else:
        out.print(f"{result['weights']} cached at {result['path']}", highlight=False)
