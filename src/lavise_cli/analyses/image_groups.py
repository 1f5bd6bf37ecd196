"""Groups of images for `lavise compare groups`: from folders, text files of image paths,
registered datasets or a CSV of ``image,group`` rows; checked, and joined into one image set."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LaviseError
from ..passes.target import IMAGE_EXTS, ImageSet, labelled_target
from ..store import Store, stable_digest


@dataclass
class Group:
    """A named group of images and where they came from."""

    name: str
    source: str
    paths: list[Path]


def _listed_paths(listing: Path) -> list[Path]:
    """The image paths of a text file, one per line (blank lines and ``#`` comments skipped);
    relative paths are relative to the file's folder."""
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LaviseError(f"cannot read the image list {listing}: {e}") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        out.append(p if p.is_absolute() else listing.parent / p)
    return out


def group_paths(store: Store | None, name: str, source: str) -> list[Path]:
    """The images of one group: SOURCE an image folder, a text file of image paths, or a registered
    dataset ``name`` / ``name:split`` (its target split by default)."""
    p = Path(source).expanduser()
    if p.is_dir():
        paths = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS and q.is_file())
        if not paths:
            raise LaviseError(f"group {name!r}: no images ({', '.join(sorted(IMAGE_EXTS))}) under {p}")
        return paths
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTS:
            raise LaviseError(f"group {name!r}: {p} is one image; give a folder or a text file listing the images")
        return _listed_paths(p)
    dataset, _, split = source.rpartition(":") if ":" in source else (source, "", "")
    if store is not None and dataset and store.exists("datasets", dataset):
        from ..data.index import load_index

        return list(labelled_target([load_index(store, dataset)], split or None).paths)
    known = ", ".join(e.name for e in store.list("datasets")) if store is not None else ""
    raise LaviseError(f"group {name!r}: {source!r} is neither an image folder, a text file of image paths, nor a "
                      f"registered dataset (registered: {known or 'none'})")


def parse_group_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=SOURCE`` strings -> (name, source), checked."""
    out = []
    for spec in specs:
        name, eq, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not eq or not name or not source:
            raise LaviseError(f"cannot read --group {spec!r}: write NAME=SOURCE, e.g. --group men=men.txt")
        out.append((name, source))
    return out


def read_groups_file(path: Path) -> list[tuple[str, list[Path]]]:
    """A CSV of ``image,group`` rows (a header row ``image,group`` is optional) -> groups in order of
    first appearance; relative image paths are relative to the CSV's folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LaviseError(f"groups file {path} does not exist")
    groups: dict[str, list[Path]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.reader(fh), 1):
                cells = [c.strip() for c in row]
                if not cells or not any(cells) or cells[0].startswith("#"):
                    continue
                if i == 1 and [c.lower() for c in cells[:2]] == ["image", "group"]:
                    continue
                if len(cells) != 2 or not cells[0] or not cells[1]:
                    raise LaviseError(f"groups file {path}, line {i}: expected two columns image,group, got {row!r}")
                img = Path(cells[0]).expanduser()
                groups.setdefault(cells[1], []).append(img if img.is_absolute() else path.parent / img)
    except (OSError, UnicodeDecodeError) as e:
        raise LaviseError(f"cannot read groups file {path}: {e}") from None
    return list(groups.items())


def make_groups(store: Store | None, specs: Sequence[tuple[str, str]] = (),
                listed: Sequence[tuple[str, Sequence[Path]]] = ()) -> list[Group]:
    """Groups from ``(name, source)`` specs and/or ``(name, paths)`` lists, checked: at least two,
    distinct names, each with images that exist, and no image in two groups.

    An image in two groups is refused: the test of equal proportions assumes independent samples
    (the same image counted on both sides would pull the shares together).  An image listed twice
    in one group counts once.
    """
    groups: list[Group] = []
    for name, source in specs:
        groups.append(Group(name, source, group_paths(store, name, source)))
    for name, paths in listed:
        groups.append(Group(name, "groups file", [Path(p) for p in paths]))
    if len(groups) < 2:
        raise LaviseError("compare needs at least two groups: --group A=SOURCE --group B=SOURCE (or --groups-file)")
    seen_names: set[str] = set()
    owner: dict[Path, str] = {}
    for g in groups:
        if g.name in seen_names:
            raise LaviseError(f"group name {g.name!r} is used twice: give each group its own name")
        seen_names.add(g.name)
        uniq: list[Path] = []
        mine: set[Path] = set()
        missing = []
        for p in g.paths:
            r = p.expanduser().resolve()
            if not r.is_file():
                missing.append(p)
                continue
            if r in mine:
                continue
            other = owner.get(r)
            if other is not None:
                raise LaviseError(f"image {p} is in both groups {other!r} and {g.name!r}: groups must not share "
                                  "images (the test compares independent samples); remove it from one of them")
            mine.add(r)
            owner[r] = g.name
            uniq.append(r)
        if missing:
            raise LaviseError(f"group {g.name!r}: {len(missing)} of its {len(g.paths)} images do not exist "
                              f"(first: {missing[0]}); fix the list or the paths")
        if not uniq:
            raise LaviseError(f"group {g.name!r} has no image")
        g.paths = uniq
    return groups


def union_set(groups: Sequence[Group]) -> tuple[ImageSet, np.ndarray]:
    """The union of the groups' images as one image set (sorted, so the same images in any group
    order are the same cached pass) and each image's group number."""
    of: dict[Path, int] = {}
    for k, g in enumerate(groups):
        for p in g.paths:
            of[p] = k
    paths = sorted(of, key=str)
    listing = []
    for p in paths:
        st = p.stat()
        listing.append((str(p), st.st_size, st.st_mtime_ns))
    desc = " + ".join(f"{g.name} ({len(g.paths)})" for g in groups)
    target = ImageSet(description=f"groups {desc}", paths=paths, key={"images": stable_digest(listing)})
    return target, np.asarray([of[p] for p in paths], dtype=np.int64)


__all__ = ["Group", "group_paths", "parse_group_specs", "read_groups_file", "make_groups", "union_set"]
