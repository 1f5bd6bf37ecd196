"""`lavise store`, `lavise preprocess`: what the store holds, and building mask indexes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import LaviseError
from ..store import CACHE_KINDS, KINDS
from .app import app
from .common import check_number, emit_json, handle_errors, human_size, info, lazy, out, progress, state

preprocess_dataset = lazy("data.index", "preprocess")
register_instances_file = lazy("data.index", "register_instances_file")
choose_embedding = lazy("data.index", "choose_embedding")
describe_dataset = lazy("data.register", "describe_dataset")

# No help= here: the callback's docstring (with its examples) is the group's --help.
store_app = typer.Typer(no_args_is_help=False, rich_markup_mode="rich")
app.add_typer(store_app, name="store")


@store_app.callback(invoke_without_command=True)
@handle_errors
def store_list(
    ctx: typer.Context,
    kind: Optional[str] = typer.Option(None, "--kind", help=f"Only this kind: {', '.join(KINDS)}."),
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """List, remove and clean up what the artifact store holds, with sizes on disk.

    Without a subcommand: every dataset, embedding, index, explainer and result, and the caches
    (feature and target passes) with the model, layer and dataset each was made for.

    Examples:

      lavise store

      lavise store --kind explainers --json

      lavise store rm explainers resnet18-layer4-coco

      lavise store gc --dry-run
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..cleanup import cache_description

    st = state.store
    entries = st.list(kind)
    if json_out:
        # Sizes are bytes on disk now (an explainer's results/ included); caches and explainers
        # also say what they were made for (model, layer, dataset).
        emit_json({"root": str(st.root), "cache": str(st.cache), "entries": [
            {"kind": e.kind, "name": e.name, "size": e.size, "created": e.created, "path": str(e.path),
             **cache_description(e)} for e in entries]})
        return
    # The paths stay whole on lines of their own (never cut to "…" by a narrow table).
    out.print(f"lavise store: {st.root} (caches: {st.cache})", highlight=False, soft_wrap=True)
    table = Table(title="lavise store")
    for col in ("kind", "name", "size", "created"):
        table.add_column(col, justify="right" if col == "size" else "left",
                         overflow="fold", no_wrap=col != "name")
    for e in entries:
        name = e.name
        if e.kind in CACHE_KINDS:  # a hash: say what it caches, under it
            d = cache_description(e)
            name += "\n[dim]" + " · ".join(str(d[k]) for k in ("model", "layer", "dataset") if d.get(k)) + "[/]"
        table.add_row(e.kind, name, human_size(e.size), e.created[:19].replace("T", " "))
    if not entries:
        info("the store is empty: start with `lavise download coco` (or `--from DIR` offline)")
    out.print(table)


@store_app.command("gc")
@handle_errors
def store_gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Remove the caches nothing refers to, and say how much space that frees.

    A feature cache goes when its dataset index was rebuilt or removed, or when no explainer was
    trained on it; a target cache goes when its target set's index was rebuilt or removed, or when
    no explainer of its model and layer is left. Run it when no `lavise train` is under way (a
    running train's fresh feature cache has no explainer yet).

    Examples:

      lavise store gc --dry-run

      lavise store gc --json
    """
    from ..cleanup import cache_description, collect_garbage

    found = collect_garbage(state.store, dry_run=dry_run)
    freed = sum(u.size for u in found)
    if json_out:
        emit_json({"dry_run": dry_run, "freed": freed, "removed": [
            {"kind": u.entry.kind, "name": u.entry.name, "size": u.size, "reason": u.reason, "path": str(u.entry.path),
             **cache_description(u.entry)} for u in found]})
        return
    verb = "would remove" if dry_run else "removed"
    for u in found:
        d = cache_description(u.entry)
        what = " · ".join(str(d[k]) for k in ("model", "layer", "dataset") if d.get(k))
        out.print(f"{verb} {u.entry.kind[:-1]} cache {u.entry.name} ({what}, {human_size(u.size)}): {u.reason}",
                  highlight=False, soft_wrap=True)
    if not found:
        info("no unreferenced caches: nothing to remove")
    else:
        info(f"{len(found)} unreferenced cache(s): {human_size(freed)} "
             + ("would be freed (dry run; nothing removed)" if dry_run else "freed"))


@store_app.command("rm")
@handle_errors
def store_rm(
    kind: str = typer.Argument(..., help=f"One of: {', '.join(KINDS)}."),
    name: str = typer.Argument(..., help="The entry's name (see `lavise store`)."),
    keep_downloads: bool = typer.Option(False, "--keep-downloads",
                                        help="For a downloaded dataset: keep its archives and unpacked files."),
    force: bool = typer.Option(False, "--force",
                               help="Remove word vectors even while an index or explainer uses them."),
) -> None:
    """Remove one entry from the store.

    Removing a dataset that `lavise download` fetched also removes its archives and unpacked
    files under the store's downloads/ folder (unless --keep-downloads); a dataset registered
    with --from only forgets the folder, which is never touched. Word vectors that an index or an
    explainer was built with are kept unless --force.

    Examples:

      lavise store rm features 3f2a9c...

      lavise store rm datasets coco --keep-downloads
    """
    st = state.store
    if kind == "datasets":
        from ..data.register import remove_dataset

        removed = remove_dataset(st, name, keep_downloads=keep_downloads)
        info(f"removed {kind} {name}")
        if removed.downloads is not None:
            info(f"removed its downloaded files ({human_size(removed.freed)}, {removed.downloads})")
        return
    if kind == "embeddings":
        from ..cleanup import remove_embedding

        remove_embedding(st, name, force=force)
    else:
        st.remove(kind, name)
    info(f"removed {kind} {name}")


@app.command()
@handle_errors
def preprocess(
    dataset: str = typer.Argument(..., help="A registered dataset name, or a COCO-format instances JSON file."),
    embedding: Optional[str] = typer.Option(None, "--embedding", help="Word vectors (default: the latest registered)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder, when DATASET is a JSON file."),
    name: Optional[str] = typer.Option(None, "--name", help="Name to register a JSON file under."),
    split: Optional[str] = typer.Option(None, "--split", help="Split name of a JSON file (default: from its name)."),
    seen_fraction: float = typer.Option(0.7, "--seen-fraction", help="Share of concepts in the seen split (0 < x <= 1)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1,
                             help="Seed of the seen/unseen concept split and of the held-out images."),
    held_out_fraction: float = typer.Option(0.2, "--held-out-fraction",
                                            help="For a dataset without a train split (e.g. COCO val alone): share of its "
                                                 "images held out as the target part (split `held-out`); the rest is "
                                                 "the reference part (split `reference`) that train uses (0 < x < 1)."),
    min_images: Optional[int] = typer.Option(None, "--min-images", min=1,
                                             help="Visual Genome: leave out concepts seen in fewer "
                                                  "training images (default 100, as in the paper)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Visual Genome (no official split): share "
                                                                              "of images in the seeded val split (default 0.1; 0 < x < 1)."),
    categories: Optional[str] = typer.Option(None, "--categories",
                                             help="Broden: comma list of the categories to read, of object, part, "
                                                  "material, scene, texture, color (default: all in index.csv)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                           help="Processes that check images (default: up to 4)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when the index is current."),
    json_out: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Build the mask index of a dataset: one mask per (image, concept), concepts mapped to words.

    Examples:

      lavise preprocess coco

      lavise preprocess coco-tiny --json

      lavise preprocess lvis_v1_val.json --images val2017/ --name lvis-val

      lavise preprocess vg --min-images 100 --val-fraction 0.1

      lavise preprocess broden --categories object,part,material,color

    A dataset without a train split (COCO val alone) is divided, seeded: 80 % of its images become
    the reference part (split `reference`) that train uses and 20 % the held-out part (split
    `held-out`) that explain and evaluate use by default, so explanations are never scored on the
    explainer's own training images.
    """
    check_number("--seen-fraction", seen_fraction, low=0, high=1, low_open=True)
    check_number("--held-out-fraction", held_out_fraction, low=0, high=1, low_open=True, high_open=True)
    check_number("--val-fraction", val_fraction, low=0, high=1, low_open=True, high_open=True)
    cats = None
    if categories is not None:
        cats = [c.strip() for c in categories.split(",") if c.strip()]
        if not cats:
            raise LaviseError("--categories takes a comma list, e.g. object,part,material,color")
    st = state.store
    if dataset.endswith(".json"):
        if images is None:
            raise LaviseError("a JSON annotation file needs its images: add --images DIR")
        entry = register_instances_file(st, Path(dataset), images, name=name, split=split)
        dataset = entry.name
        info(f"registered {dataset} from {describe_dataset(entry)['root']}")
    chosen, why = choose_embedding(st, dataset, embedding) if st.exists("datasets", dataset) else (None, "")
    if chosen is not None:
        info(f"word vectors: {chosen} ({why}; choose others with --embedding NAME)")
    with progress() as prog:
        summary = preprocess_dataset(st, dataset, embedding=embedding, seen_fraction=seen_fraction, seed=seed,
                                     held_out_fraction=held_out_fraction, min_images=min_images,
                                     val_fraction=val_fraction, workers=workers, force=force, progress=prog,
                                     categories=cats)
    vg_split = summary.get("image_split")
    if vg_split:
        info(f"{dataset}: images split (seed {vg_split['seed']}) into train {vg_split['train']:,} / val "
             f"{vg_split['val']:,}; concepts seen in fewer than {summary['min_images']} training images left out: "
             f"{summary['concepts_below_min_images']:,}")
    if summary.get("broden_categories"):
        info(f"{dataset}: Broden categories read: {', '.join(summary['broden_categories'])}")
    held = summary.get("held_out")
    if held:
        info(f"{dataset} has no train split: its {held['reference'] + held['held_out']:,} {held['source']} images are "
             f"divided (seed {held['seed']}) into a reference part of {held['reference']:,} (split `reference`, what "
             f"`lavise train` uses) and a held-out part of {held['held_out']:,} (split `held-out`, what explain and "
             "evaluate use by default)")
    for sp, s in summary["splits"].items():
        if not s["pairs"]:
            info(f"[yellow]warning:[/] split {sp} of {dataset} has no (image, concept) pairs "
                 f"({s['images']} images kept): nothing to train on or score there; check its annotations")
    if json_out:
        emit_json(summary)
        return
    if summary.get("cached"):
        info(f"[green]index of {dataset} is current[/] (inputs unchanged); use --force to rebuild")
    for sp, s in summary["splits"].items():
        t = Table(title=f"{dataset} / {sp}")
        t.add_column("")
        t.add_column("count", justify="right")
        t.add_row("images", str(s["images"]))
        t.add_row("(image, concept) pairs", str(s["pairs"]))
        t.add_row("concepts present", str(s["concepts"]))
        t.add_row("pairs of unmapped concepts", str(s["pairs_unmapped"]))
        for reason, n in sorted(s["dropped"].items()):
            t.add_row(f"[yellow]{reason}[/]", str(n))
        out.print(t)
    out.print(f"concepts: {summary['concepts']} ({summary['mapped']} mapped to {summary['embedding']}, "
              f"{summary['seen']} seen / {summary['unseen']} unseen)")
    if summary["unmapped"]:
        out.print(f"[yellow]unmapped[/] (no word vector, left out): {', '.join(summary['unmapped'])}")
    if summary.get("dropped_list"):
        out.print(f"[yellow]{summary['dropped_images']} image(s) left out[/], each named with the reason in "
                  f"{summary['dropped_list']}", highlight=False, soft_wrap=True)
