"""Classes over an image set for `lavise relevant`: one folder per class, a registered dataset's
categories (multi-label), or the model's own top-1; and ``--classes`` files naming the outputs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LaviseError, notice
from ..passes.target import IMAGE_EXTS, ImageSet
from ..store import stable_digest

WNID = re.compile(r"^n\d{8}$")


@dataclass
class Labels:
    """Classes over an image set.

    ``member`` ``(N, C)`` bool: image ``i`` belongs to class ``c`` (several at once for
    multi-label categories).  ``outputs[c]``: the model outputs that count as class ``c`` when the
    ablation scores accuracy (a folder may stand for several outputs, e.g. a WordNet superclass);
    ``None`` when accuracy is agreement with the unablated model's top-1 (``--labels predicted``,
    ``--label-by category``).
    """

    target: ImageSet
    classes: list[str]
    member: torch.Tensor
    outputs: list[list[int]] | None
    kind: str  # folder, category, predicted

    @property
    def agreement(self) -> bool:
        return self.outputs is None


def read_classes_file(path: Path) -> list[tuple[int, list[str]]]:
    """``index name`` or ``index<TAB>wnid<TAB>name`` lines -> (index, the names it answers to)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LaviseError(f"--classes file {path} does not exist")
    rows: list[tuple[int, list[str]]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t") if "\t" in line else line.strip().split(None, 1)
        try:
            idx = int(parts[0])
        except ValueError:
            raise LaviseError(f"--classes file {path}, line {n}: write `index name` or `index<TAB>wnid<TAB>name`, "
                              f"got {line.strip()[:60]!r}") from None
        names = [p.strip() for p in parts[1:] if p.strip()]
        rows.append((idx, names))
    if not rows:
        raise LaviseError(f"--classes file {path} lists no class")
    return rows


def folder_labels(root: Path, n_outputs: int, classes_file: Path | None = None) -> Labels:
    """One sub-folder per class under ``root`` (images anywhere below it).

    A folder maps to the model's outputs by ``classes_file`` (every line whose name or wnid equals
    the folder's name: several lines with the same name make a superclass), else by its name: a
    whole number is the output index; wnids (``n01440764``), one folder per output, are indices in
    torchvision's order (sorted).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise LaviseError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise LaviseError(f"{root} has no sub-folders: put each class's images in a folder of its own "
                          "(or use --labels predicted)")
    per: list[list[Path]] = [sorted(p for p in f.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
                             for f in folders]
    names = [f.name for f in folders]
    for name, ps in zip(names, per):
        if len(ps) < 2:
            raise LaviseError(f"class {name!r} has {len(ps)} image(s) under {root / name}; each class needs at "
                              "least 2 (add images or remove the folder)")
    outputs: list[list[int]] = []
    if classes_file is not None:
        rows = read_classes_file(classes_file)
        indices = sorted(i for i, _ in rows)
        if indices != list(range(n_outputs)):
            raise LaviseError(f"--classes file {classes_file} lists {len(rows)} classes (indices "
                              f"{indices[0]}..{indices[-1]}) but the model has {n_outputs} outputs; give one line per "
                              "output, indices 0..N-1")
        for name in names:
            hit = [i for i, ns in rows if name in ns or name == str(i)]
            if not hit:
                raise LaviseError(f"folder {name!r} matches no class of {classes_file} (by name, wnid or index); "
                                  "rename it or fix the file")
            outputs.append(sorted(hit))
    elif all(n.isdigit() for n in names):
        bad = [n for n in names if int(n) >= n_outputs]
        if bad:
            raise LaviseError(f"folder {bad[0]!r} names output {bad[0]} but the model has {n_outputs} outputs "
                              f"(0..{n_outputs - 1})")
        outputs = [[int(n)] for n in names]
    elif all(WNID.match(n) for n in names) and len(names) == n_outputs:
        outputs = [[i] for i in range(n_outputs)]  # torchvision's ImageFolder order: sorted wnids
    else:
        raise LaviseError(f"cannot tell which model output each folder of {root} is: name the folders by output "
                          "index, or give --classes FILE (lines `index name` or `index<TAB>wnid<TAB>name`)")
    paths = [p for ps in per for p in ps]
    member = torch.zeros(len(paths), len(names), dtype=torch.bool)
    start = 0
    for c, ps in enumerate(per):
        member[start:start + len(ps), c] = True
        start += len(ps)
    listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    target = ImageSet(description=str(root), paths=paths, key={"folder": str(root), "files": stable_digest(listing)})
    return Labels(target=target, classes=names, member=member, outputs=outputs, kind="folder")


def category_labels(target: ImageSet) -> Labels:
    """Multi-label presence of each concept of a labelled image set (a registered COCO-format dataset)."""
    if not target.labelled:
        raise LaviseError("--label-by category needs a registered dataset (--dataset NAME)")
    names = sorted({c for cs in target.source_concepts for c in cs})
    col = {c: j for j, c in enumerate(names)}
    member = torch.zeros(len(target.paths), len(names), dtype=torch.bool)
    for i, (k, img) in enumerate(target.items):
        sp = target.sources[k]
        for p in sp.image_pairs(img):
            member[i, col[target.source_concepts[k][int(sp.pair_concept[p])]]] = True
    keep = (member.sum(0) >= 2)
    if not bool(keep.any()):
        raise LaviseError(f"no category of {target.description} is present in 2 or more images")
    dropped = [n for n, k in zip(names, keep.tolist()) if not k]
    if dropped:
        notice(f"{len(dropped)} categories in fewer than 2 images left out ({', '.join(dropped[:5])}"
               f"{', ...' if len(dropped) > 5 else ''})")
    return Labels(target=target, classes=[n for n, k in zip(names, keep.tolist()) if k], member=member[:, keep],
                  outputs=None, kind="category")


def predicted_labels(target: ImageSet, predictions: torch.Tensor, class_names: Sequence[str] | None = None,
                     min_images: int = 2) -> Labels:
    """Classes = the model's own top-1 (``predictions`` (N,), -1 where an image did not decode);
    classes predicted for fewer than ``min_images`` images are left out (said in a notice)."""
    preds = predictions.long()
    valid = preds >= 0
    uniq, counts = torch.unique(preds[valid], return_counts=True)
    kept = uniq[counts >= min_images].tolist()
    if not kept:
        raise LaviseError(f"no output is the model's top-1 for {min_images} or more of the {int(valid.sum())} images; "
                          "use more images or labelled folders")
    left = len(uniq) - len(kept)
    if left:
        notice(f"{left} predicted classes with fewer than {min_images} images left out; {len(kept)} classes kept")

    def name(i: int) -> str:  # the index first: names repeat (ImageNet has two "crane" classes)
        return f"{i} {class_names[i]}" if class_names is not None and i < len(class_names) else str(i)

    member = torch.stack([preds == i for i in kept], 1)
    return Labels(target=target, classes=[name(i) for i in kept], member=member, outputs=None, kind="predicted")


def class_names_of(classes_file: Path | None) -> list[str] | None:
    if classes_file is None:
        return None
    rows = dict(read_classes_file(classes_file))
    return [(rows[i][-1] if rows.get(i) else str(i)) for i in range(max(rows) + 1)]


__all__ = ["Labels", "WNID", "read_classes_file", "folder_labels", "category_labels", "predicted_labels",
           "class_names_of"]
