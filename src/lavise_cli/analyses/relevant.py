"""Class-relevant filters (Oramas et al., ICLR 2019, as its reproduction states it), checked by ablation.

Per image the pooled response of every filter of a layer (``X``, standardised per filter), per
class a 0/1 label column; per class a lasso picks the few filters whose responses predict the
class: ``argmin_w ‖Xw − y‖²`` subject to ``‖w‖₁ ≤ μ`` (the constrained form).  The lasso path
(scikit-learn's :func:`sklearn.linear_model.lars_path`, method ``lasso``) gives the penalised
solutions ``(1/2n)‖y − Xw‖² + α‖w‖₁`` for every α exactly; it is piecewise linear in α, so the
constrained solution for a given μ is read off the path by interpolation between its knots (the
α where the path's L1 norm equals μ).  ``per_class=K`` instead takes each class's K largest
positive weights at the first knot that has K of them.  A class's *relevant filters* are its
positive weights (the filter's firing supports the class), ranked by weight; the union over
classes is the model's relevant set.

The ablation check zeroes chosen channels of the layer with a forward hook and measures the
model's accuracy: nothing removed, the selected filters removed, and as many random filters
removed (5 seeded draws).  All ablation sets of a run go through the one pass runner in as few
passes as possible: the layer's output of a batch is repeated once per set, each copy with its
channels zeroed, and the rest of the network runs on all copies at once (so the network up to
the layer runs once per batch for many sets); decoded images are kept in memory and reused.
Models whose later layers mix in activations from before the layer (a skip connection around
it) cannot take the repeated batch: they run one set per pass.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..defaults import DEFAULT_METHOD  # filter attention
from ..errors import LaviseError, notice
from ..layers import resolve_layer, user_code
from ..models import TargetModel
from ..passes.runner import Item, Sink, run_pass
from ..passes.target import IMAGE_EXTS, ImageFiles, ImageSet, LayerMaps, target_pass
from ..runtime import resolve_precision
from ..store import Store, stable_digest

POOLS = ("max", "mean")
RANDOM_RUNS = 5
STACK_BYTES = 256 << 20  # the layer's output repeated per set, in one forward, at most
MAX_SETS_PER_PASS = 64
KEEP_DECODED_BYTES = 1 << 30  # decoded inputs kept in memory between ablation passes, at most
WNID = re.compile(r"^n\d{8}$")


# -- labels --------------------------------------------------------------------------------------


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


# -- the lasso -----------------------------------------------------------------------------------


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Each column (filter) to mean 0, standard deviation 1 over the rows; a constant column is all 0."""
    x = x.double()
    sd = x.std(0, unbiased=False)
    return ((x - x.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))).float()


@dataclass
class Selection:
    """One class's lasso: the relevant filters (positive weights, ranked), the whole weight column,
    and where on the path it was read (α of the penalised form, ‖w‖₁ of the constrained form)."""

    filters: list[int]
    weights: list[float]
    coef: np.ndarray
    alpha: float
    l1: float


def _path(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import lars_path

    alphas, _active, coefs = lars_path(x, y - y.mean(), method="lasso")
    return alphas, coefs  # alphas decreasing; coefs (d, knots)


def _positive(coef: np.ndarray, k: int | None = None) -> tuple[list[int], list[float]]:
    pos = np.flatnonzero(coef > 0)
    order = pos[np.argsort(-coef[pos], kind="stable")]
    if k is not None:
        order = order[:k]
    return [int(u) for u in order], [float(coef[u]) for u in order]


def lasso_select(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, sparsity: float | None = None,
                 per_class: int | None = None) -> Selection:
    """One class's relevant filters: ``x`` (N, d) standardised responses, ``y`` (N,) 0/1.

    ``sparsity`` μ: the constrained lasso ``‖w‖₁ ≤ μ`` (read exactly off the penalised path);
    ``per_class`` K: the K largest positive weights at the first knot of the path with K of them
    (all positive weights of the least-penalised solution when it never has K).
    """
    if (sparsity is None) == (per_class is None):
        raise ValueError("give exactly one of sparsity and per_class")
    xa = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    alphas, coefs = _path(xa, ya)
    l1 = np.abs(coefs).sum(0)
    if sparsity is not None:
        if not math.isfinite(sparsity) or sparsity <= 0:
            raise LaviseError(f"--sparsity must be a number above 0, got {sparsity:g}")
        j = int(np.searchsorted(l1, sparsity, side="right"))  # knots 0..j-1 have l1 <= mu
        if j >= len(l1):
            coef, alpha = coefs[:, -1], float(alphas[-1])
        else:
            lo, hi = j - 1, j
            t = (sparsity - l1[lo]) / (l1[hi] - l1[lo]) if l1[hi] > l1[lo] else 0.0
            coef = coefs[:, lo] + t * (coefs[:, hi] - coefs[:, lo])
            alpha = float(alphas[lo] + t * (alphas[hi] - alphas[lo]))
        filters, weights = _positive(coef)
    else:
        assert per_class is not None
        if per_class < 1:
            raise LaviseError(f"--per-class must be at least 1, got {per_class}")
        npos = (coefs > 0).sum(0)
        hit = np.flatnonzero(npos >= per_class)
        j = int(hit[0]) if len(hit) else coefs.shape[1] - 1
        coef, alpha = coefs[:, j], float(alphas[j])
        filters, weights = _positive(coef, per_class)
    return Selection(filters=filters, weights=weights, coef=coef, alpha=alpha, l1=float(np.abs(coef).sum()))


# -- ablation ------------------------------------------------------------------------------------


class Logits(nn.Module):
    """The model with its output as a ``(rows, K, 1, 1)`` "layer" named ``logits`` (what the pass
    runner captures), and with ``keep`` ``(S, d)`` multiplying the ablated layer's channels: each
    of the ``S`` ablation sets gets its own copy of the layer's output (see :func:`zeroed`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.logits = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return self.logits(out.reshape(out.shape[0], -1)[:, :, None, None])


@contextlib.contextmanager
def zeroed(model: nn.Module, layer: str, keep: torch.Tensor) -> Iterator[None]:
    """While inside: ``layer``'s output ``(B, d, h, w)`` becomes ``(S·B, d, h, w)``, copy ``s``
    multiplied channel-wise by ``keep[s]`` (0 zeroes a channel).  The hook is removed on exit."""
    mod = resolve_layer(model, layer)
    keep = keep.float()

    def hook(_m: nn.Module, _i: Any, o: Any) -> torch.Tensor:
        if not isinstance(o, torch.Tensor) or o.dim() != 4:
            raise LaviseError(f"layer {layer!r} does not output a 4-D feature map; pick another --layer")
        k = keep.to(o.device, o.dtype)
        if k.shape[1] != o.shape[1]:
            raise LaviseError(f"layer {layer!r} has {o.shape[1]} channels, the ablation names {k.shape[1]}")
        s = k.shape[0]
        return (o[None] * k[:, None, :, None, None]).reshape(s * o.shape[0], *o.shape[1:])

    handle = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def stacks_sets(model: nn.Module, layer: str, d: int, size: int) -> bool:
    """Whether the network after ``layer`` takes the layer's output repeated per set (no skip
    connection around the layer): two sets over two seeded random images, stacked in one forward,
    must give what each set gives on its own (a skip connection either fails or broadcasts wrongly)."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, d)
    keep[1, ::2] = 0
    net = Logits(model)
    try:
        with torch.inference_mode(), user_code():
            with zeroed(model, layer, keep):
                both = net(x).flatten(1)
            alone = []
            for s in range(2):
                with zeroed(model, layer, keep[s:s + 1]):
                    alone.append(net(x).flatten(1))
        ref = torch.cat(alone)
        return both.shape == ref.shape and bool(torch.allclose(both, ref, rtol=1e-4, atol=1e-5))
    except LaviseError:
        raise
    except Exception:  # noqa: BLE001 - a shape mismatch after the layer
        return False


class KeptImages(Dataset):
    """Decoded model inputs, kept after their first decode so that later passes reuse them."""

    def __init__(self, base: Dataset, keep: bool):
        self.base, self.keep = base, keep
        self.items: dict[int, Item] = {}

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Item:
        it = self.items.get(i)
        if it is None:
            it = self.base[i]
            if self.keep:
                self.items[i] = it
        return it


class Predictions(Sink):
    """Top-1 of every (set, image): ``pred`` (S, N), -1 until seen."""

    def __init__(self, pred: torch.Tensor, sets: slice):
        self.pred, self.sets = pred, sets

    def add(self, out: tuple[list[int], torch.Tensor]) -> None:
        rows, top = out
        self.pred[self.sets, rows] = top


def ablation_predictions(model: TargetModel, layer: str, images: Dataset, keep: torch.Tensor, *,
                         device: torch.device | str = "cpu", precision: str = "auto", batch_size: int = 32,
                         row_bytes: int | None = None, progress: Any = None) -> torch.Tensor:
    """The model's top-1 ``(S, N)`` on every image of ``images`` (Items as the target pass reads
    them) with each set ``keep[s]`` (``(S, d)``, 0 = zeroed) applied at ``layer``; -1 for an image
    that did not decode.  As few passes of :func:`run_pass` as the sets allow (see the module):
    ``row_bytes``, the layer's output per image (default: 4 bytes x 1280 x 7 x 7), sizes how
    many sets share a forward (:data:`STACK_BYTES` of repeated output at most)."""
    n = len(images)  # type: ignore[arg-type]
    s_all, d = keep.shape
    pred = torch.full((s_all, n), -1, dtype=torch.long)
    net = model.module
    per_set = batch_size * (row_bytes or 4 * 1280 * 7 * 7)
    chunk = max(1, min(MAX_SETS_PER_PASS, STACK_BYTES // per_set)) \
        if stacks_sets(net, layer, d, model.preprocess.input_size) else 1
    chunk = min(chunk, s_all)
    passes = math.ceil(s_all / chunk)
    wrapped = Logits(net).eval()
    for p in range(passes):
        sl = slice(p * chunk, min(s_all, (p + 1) * chunk))
        k = keep[sl]
        s = k.shape[0]

        def compute(good: list[Item], maps: Mapping[str, torch.Tensor], s: int = s) -> tuple[list[int], torch.Tensor]:
            top = maps["logits"].float().flatten(1).argmax(1).view(s, len(good)).cpu()
            return [it.index for it in good], top

        with zeroed(net, layer, k):
            run_pass(images, wrapped, ["logits"], compute, [Predictions(pred, sl)], device=device,
                     precision=precision, batch_size=batch_size, workers=0, progress=progress,
                     label=f"ablation {layer}: sets {sl.start + 1}-{sl.stop} of {s_all}")
    return pred


# -- the whole analysis --------------------------------------------------------------------------


@dataclass
class AblationSet:
    """One named set of removed filters and the images its accuracy is measured on."""

    name: str  # "baseline", "union", "class:<c>", "sweep:<i>"
    removed: list[int]
    images: torch.Tensor  # (N,) bool
    random: list[list[int]] = field(default_factory=list)


def random_sets(d: int, n: int, runs: int = RANDOM_RUNS) -> list[list[int]]:
    """``runs`` seeded draws (seeds 0..runs-1) of ``n`` of the ``d`` filters, without replacement."""
    return [sorted(np.random.default_rng(r).permutation(d)[:n].tolist()) for r in range(runs)]


def _acc(correct: torch.Tensor, images: torch.Tensor) -> float:
    m = images & (correct >= 0)
    return float(correct[m].float().mean()) if bool(m.any()) else float("nan")


def _mean_sd(xs: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": [float(v) for v in a]}


@dataclass
class RelevantResult:
    model: str
    layer: str
    pool: str
    labels: Labels
    images: int  # images that decoded
    selections: dict[str, Selection]
    union: list[int]
    ablation: dict[str, dict[str, Any]]  # "union" and each class name
    sweep: list[dict[str, Any]]
    settings: dict[str, Any]
    cache: LayerMaps | None = None
    words: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    explainer: str | None = None

    def as_dict(self) -> dict[str, Any]:
        classes = {}
        for c, sel in self.selections.items():
            classes[c] = {"filters": sel.filters, "weights": [round(w, 6) for w in sel.weights],
                          "alpha": sel.alpha, "l1": sel.l1, "images": int(self.labels.member[:, self.labels.classes.index(c)].sum()),
                          "words": {str(u): self.words[u] for u in sel.filters if u in self.words},
                          "ablation": self.ablation[c]}
        return {"model": self.model, "layer": self.layer, "pool": self.pool, "labels": self.labels.kind,
                "target": self.labels.target.description, "images": self.images, "settings": self.settings,
                "explainer": self.explainer,
                "classes": classes, "union": {"filters": self.union, "ablation": self.ablation["union"]},
                "sweep": self.sweep}


def model_outputs(model: TargetModel) -> int:
    """How many outputs (classes) the model has: a forward of one blank image."""
    try:
        with torch.inference_mode(), user_code():
            out = Logits(model.module.eval())(torch.zeros(1, 3, model.preprocess.input_size,
                                                          model.preprocess.input_size))
    except LaviseError:
        raise
    except Exception as e:  # noqa: BLE001
        raise LaviseError(f"the model fails on a blank input ({type(e).__name__}: {str(e)[:150]})") from None
    return int(out.shape[1])


def relevant_filters(
    store: Store,
    model: TargetModel,
    layer: str,
    labels: Labels | None,
    *,
    target: ImageSet | None = None,
    class_names: Sequence[str] | None = None,
    pool: str = "max",
    sparsity: float | None = None,
    per_class: int | None = None,
    sweep: Sequence[float] = (),
    sweep_per_class: Sequence[int] = (),
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    progress: Any = None,
) -> RelevantResult:
    """Per class the relevant filters of ``layer`` (lasso), and the ablation check.

    ``labels`` None: the model's own top-1 on ``target`` (``--labels predicted``; the ablation then
    measures agreement with the unablated model).  ``sweep``: μ values (``sweep_per_class``: K
    values) at which the union is selected again and ablated: the tipping-point table.
    """
    if pool not in POOLS:
        raise LaviseError(f"unknown --pool {pool!r}; choose from {', '.join(POOLS)}")
    if sparsity is None and per_class is None:
        per_class = 5
    if sparsity is not None and per_class is not None:
        raise LaviseError("give --sparsity or --per-class, not both")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    tgt = labels.target if labels is not None else target
    if tgt is None:
        raise ValueError("labels or target")
    cache = target_pass(store, model, layer, tgt, device=device, batch_size=batch_size, workers=workers,
                        precision=precision, progress=progress)
    d = cache.shape[0]
    rows = cache.rows.long()  # image numbers of the decoded images
    n_img = len(tgt.paths)
    size = model.preprocess.input_size
    base = ImageFiles(tgt.paths, size, model.preprocess.mean, model.preprocess.std)
    images = KeptImages(base, keep=n_img * 3 * size * size * 4 <= KEEP_DECODED_BYTES)
    run_kw = dict(device=device, precision=precision, batch_size=batch_size, progress=progress,
                  row_bytes=4 * d * cache.shape[1] * cache.shape[2])

    # The unablated model's top-1 (the baseline; the labels of --labels predicted).
    base_pred = ablation_predictions(model, layer, images, torch.ones(1, d), **run_kw)[0]  # type: ignore[arg-type]
    if labels is None:
        labels = predicted_labels(tgt, base_pred, class_names)
    member = labels.member[rows]  # (n, C) over decoded images
    for c, name in enumerate(labels.classes):
        if int(member[:, c].sum()) < 2:
            raise LaviseError(f"class {name!r} has fewer than 2 images that decode; each class needs at least 2")
    resp = cache.img_max if pool == "max" else cache.img_mean
    x = standardise(resp)

    def select(mu: float | None, k: int | None) -> dict[str, Selection]:
        return {name: lasso_select(x, member[:, c], sparsity=mu, per_class=k)
                for c, name in enumerate(labels.classes)}  # type: ignore[union-attr]

    selections = select(sparsity, per_class)
    union = sorted({u for s in selections.values() for u in s.filters})
    all_images = torch.ones(n_img, dtype=torch.bool)
    class_images = []
    for c in range(len(labels.classes)):
        m = torch.zeros(n_img, dtype=torch.bool)
        m[rows[member[:, c]]] = True
        class_images.append(m)

    sets = [AblationSet("union", union, all_images, random_sets(d, len(union)))]
    for c, name in enumerate(labels.classes):
        sel = selections[name].filters
        sets.append(AblationSet(f"class:{name}", sel, class_images[c], random_sets(d, len(sel))))
    levels: list[tuple[str, float, dict[str, Selection]]] = [("sparsity", mu, select(mu, None)) for mu in sweep]
    levels += [("per_class", k, select(None, int(k))) for k in sweep_per_class]
    for i, (_kind, _v, sels) in enumerate(levels):
        u = sorted({f for s in sels.values() for f in s.filters})
        sets.append(AblationSet(f"sweep:{i}", u, all_images, random_sets(d, len(u))))

    keeps = []
    for st in sets:
        for removed in [st.removed, *st.random]:
            k = torch.ones(d)
            k[torch.as_tensor(removed, dtype=torch.long)] = 0
            keeps.append(k)
    pred = ablation_predictions(model, layer, images, torch.stack(keeps), **run_kw)  # type: ignore[arg-type]

    if labels.outputs is None:
        truth_ok = lambda p: torch.where(base_pred >= 0, (p == base_pred).long(), -1)  # noqa: E731
    else:
        # per image, the set of outputs of its class(es): correct when the top-1 is one of them
        ok_out = torch.zeros(n_img, model_outputs(model), dtype=torch.bool)
        for c, outs in enumerate(labels.outputs):
            ok_out[rows[member[:, c]][:, None], torch.as_tensor(outs)[None, :]] = True

        def truth_ok(p: torch.Tensor) -> torch.Tensor:
            inside = (p >= 0) & (p < ok_out.shape[1])
            hit = torch.zeros(n_img, dtype=torch.bool)
            hit[inside] = ok_out[torch.arange(n_img)[inside], p[inside]]
            return torch.where(p >= 0, hit.long(), -1)

    base_ok = truth_ok(base_pred)
    ablation: dict[str, dict[str, Any]] = {}
    sweep_rows: list[dict[str, Any]] = []
    r = 0
    for st in sets:
        sel_ok = truth_ok(pred[r])
        rand = [_acc(truth_ok(pred[r + 1 + j]), st.images) for j in range(len(st.random))]
        r += 1 + len(st.random)
        entry = {"baseline": _acc(base_ok, st.images), "selected": _acc(sel_ok, st.images),
                 "random": _mean_sd(rand), "removed": len(st.removed), "images": int(st.images.sum())}
        if st.name == "union":
            ablation["union"] = entry
        elif st.name.startswith("class:"):
            ablation[st.name[6:]] = entry
        else:
            kind, v, _ = levels[int(st.name[6:])]
            sweep_rows.append({kind: v, "removed": entry["removed"], "baseline": entry["baseline"],
                               "selected": entry["selected"], "random": entry["random"]})
    settings = {"pool": pool, "sparsity": sparsity, "per_class": per_class, "random_runs": RANDOM_RUNS,
                "precision": precision, "accuracy": "agreement with the unablated top-1" if labels.agreement
                else "top-1 in the class's outputs"}
    return RelevantResult(model=model.name, layer=layer, pool=pool, labels=labels, images=cache.n,
                          selections=selections, union=union, ablation=ablation, sweep=sweep_rows,
                          settings=settings, cache=cache)




# -- the command's library call -------------------------------------------------------------------


def explainer_words(store: Store, name: str, model: TargetModel, layer: str | None, result: RelevantResult,
                    *, device: torch.device | str = "cpu", top: int = 5, p: int = 25,
                    progress: Any = None) -> None:
    """Each relevant filter's words (filter attention over the result's images), into ``result.words``."""
    from ..methods import run_explain
    from ..results import explanation_doc
    from ..session import Session, open_explainer, training_overlap, vocabulary_for

    entry, ex = open_explainer(store, name)
    meta = ex.meta
    if meta["model"] != model.name or meta["weights_digest"] != model.weights_digest:
        raise LaviseError(f"explainer {entry.name!r} was trained for model {meta['model']} ({meta['weights']}), not "
                          f"this {model.name} ({model.weights}); pick a matching --explainer")
    if meta["layer"] != result.layer:
        raise LaviseError(f"explainer {entry.name!r} explains layer {meta['layer']}, not {result.layer}; "
                          f"use --layer {meta['layer']} or another explainer")
    assert result.cache is not None
    target = result.labels.target
    ses = Session(store, entry, ex, model, target, result.cache, torch.device(device),
                  overlap=training_overlap(entry, target), precision=result.settings["precision"])
    filters = sorted({u for s in result.selections.values() for u in s.filters})
    if not filters:
        return
    voc = vocabulary_for(ses)
    expl = run_explain(ses, filters, DEFAULT_METHOD, voc, p=min(p, result.cache.n), s=5, k=top, progress=progress)
    doc = explanation_doc(ses, expl)
    for f in doc["filters"]:
        result.words[int(f["filter"])] = [] if f["inactive"] else \
            [{"word": w["word"], "images": w["images"], "novel": w["novel"]} for w in f["words"]]
    result.explainer = entry.name


def run_relevant(
    store: Store,
    model_spec: str,
    *,
    images: Path | None = None,
    datasets: Sequence[str] = (),
    split: str | None = None,
    predicted: bool = False,
    label_by: str | None = None,
    classes: Path | None = None,
    layer: str | None = None,
    weights: str = "DEFAULT",
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pool: str = "max",
    sparsity: float | None = None,
    per_class: int | None = None,
    sweep: Sequence[float] = (),
    sweep_per_class: Sequence[int] = (),
    explainer: str | None = None,
    top_words: int = 5,
    out_dir: Path | None = None,
    heatmap_images: int = 5,
    device: str = "auto",
    batch_size: int = 32,
    precision: str = "auto",
    progress: Any = None,
) -> tuple[RelevantResult, Path | None]:
    """What `lavise relevant` does: load the model, label the images, select, ablate, explain, draw."""
    from ..data.index import load_index
    from ..layers import default_layer
    from ..models import load_model
    from ..passes.target import folder_target, labelled_target
    from ..runtime import resolve_device

    dev = resolve_device(device)
    tm = load_model(model_spec, weights, input_size=input_size, mean=mean, std=std)
    lay = layer or default_layer(tm.module, tm.preprocess.input_size)
    resolve_layer(tm.module, lay)
    n_out = model_outputs(tm)
    labels: Labels | None
    target: ImageSet | None = None
    if datasets:
        tgt = labelled_target([load_index(store, n) for n in datasets], split)
        labels = None if predicted else category_labels(tgt)
        target = tgt
    elif predicted:
        assert images is not None
        target, labels = folder_target(images), None
    else:
        assert images is not None
        labels = folder_labels(images, n_out, classes)
    res = relevant_filters(store, tm, lay, labels, target=target, class_names=class_names_of(classes), pool=pool,
                           sparsity=sparsity, per_class=per_class, sweep=sweep, sweep_per_class=sweep_per_class,
                           device=dev, precision=precision, batch_size=batch_size, progress=progress)
    if explainer is not None:
        explainer_words(store, explainer, tm, lay, res, device=dev, top=top_words, progress=progress)
    page = None
    if out_dir is not None:
        from .relevant_page import write_page

        page = write_page(res, Path(out_dir).expanduser(), tm.preprocess.input_size, n_images=heatmap_images,
                          progress=progress)
    return res, page


__all__ = ["Labels", "Selection", "RelevantResult", "POOLS", "RANDOM_RUNS", "folder_labels", "category_labels",
           "predicted_labels", "read_classes_file", "class_names_of", "standardise", "lasso_select", "zeroed",
           "stacks_sets", "ablation_predictions", "random_sets", "relevant_filters", "model_outputs", "Logits",
           "explainer_words", "run_relevant"]
