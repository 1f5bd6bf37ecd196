"""The ablation check of class-relevant filters: zero chosen channels of a layer, measure accuracy.

A forward hook zeroes chosen channels of the layer and the model's accuracy is measured: nothing
removed, the selected filters removed, and as many random filters removed (5 seeded draws).  All
ablation sets of a run go through the one pass runner in as few passes as possible: the layer's
output of a batch is repeated once per set, each copy with its channels zeroed, and the rest of
the network runs on all copies at once (so the network up to the layer runs once per batch for
many sets); decoded images are kept in memory and reused.  Models whose later layers mix in
activations from before the layer (a skip connection around it) cannot take the repeated batch:
they run one set per pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import LaviseError
from ..layers import resolve_layer, user_code
from ..models import TargetModel
from ..passes.runner import Item, Sink, run_pass

RANDOM_RUNS = 5
STACK_BYTES = 256 << 20  # the layer's output repeated per set, in one forward, at most
MAX_SETS_PER_PASS = 64
KEEP_DECODED_BYTES = 1 << 30  # decoded inputs kept in memory between ablation passes, at most


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


__all__ = ["RANDOM_RUNS", "STACK_BYTES", "MAX_SETS_PER_PASS", "KEEP_DECODED_BYTES", "Logits", "zeroed", "stacks_sets",
           "KeptImages", "Predictions", "ablation_predictions", "AblationSet", "random_sets", "model_outputs"]
