"""Time `relevant`'s ablation passes: many sets stacked in one forward vs one set per pass.

``ablation_predictions`` repeats the layer's output once per ablation set so that the network
up to the layer runs once per batch for many sets.  This script times it on the MNIST CNN of
``examples/mnist_cnn.py`` (seeded random weights; the weights do not change the cost) over
``--images`` generated 28x28 inputs held in memory, for ``--sets`` sets of zeroed filters:

- stacked (the default: up to 64 sets per forward),
- one set per pass (``MAX_SETS_PER_PASS = 1``),
- a bare baseline: ``--sets`` plain ``model(x)`` loops over the same tensors (no hook, no runner).

    .venv/bin/python benchmarks/relevant_ablation.py          # ~1 min on an idle 2-core CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from lavise_cli.analyses import ablation
from lavise_cli.models import Preprocess, TargetModel
from lavise_cli.passes.runner import Item

ROOT = Path(__file__).resolve().parents[1]


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Item:
        return Item(i, self.x[i:i + 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--sets", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = importlib.util.spec_from_file_location("mnist_cnn", ROOT / "examples" / "mnist_cnn.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    torch.manual_seed(0)
    net = mod.MnistCNN().eval()
    tm = TargetModel(module=net, name="mnist", weights="none", weights_digest="-", preprocess=Preprocess(28))
    x = torch.randn(a.images, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(a.sets, 64)
    for s in range(a.sets):
        keep[s, torch.randperm(64, generator=torch.Generator().manual_seed(s))[:s % 60]] = 0
    ds = Tensors(x)

    def stacked() -> torch.Tensor:
        return ablation.ablation_predictions(tm, "relu4", ds, keep, batch_size=32, row_bytes=4 * 64 * 7 * 7)

    def one_by_one() -> torch.Tensor:
        old = ablation.MAX_SETS_PER_PASS
        ablation.MAX_SETS_PER_PASS = 1
        try:
            return stacked()
        finally:
            ablation.MAX_SETS_PER_PASS = old

    def bare() -> None:
        with torch.inference_mode():
            for _ in range(a.sets):
                for b in x.split(32):
                    net(b)

    times = {}
    for name, fn in (("bare model(x), one loop per set", bare), ("stacked sets (default)", stacked),
                     ("one set per pass", one_by_one)):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        if out is not None:
            times[name + " result"] = out  # type: ignore[assignment]
    same = torch.equal(times.pop("stacked sets (default) result"), times.pop("one set per pass result"))  # type: ignore[arg-type]
    base = times["bare model(x), one loop per set"]
    print(f"{a.sets} ablation sets x {a.images} images, MNIST CNN layer relu4 (64 x 7 x 7), threads "
          f"{torch.get_num_threads()}")
    print(f"{'':36s} {'seconds':>8s} {'x bare':>8s}")
    for name, t in times.items():
        print(f"{name:36s} {t:8.2f} {t / base:8.2f}")
    print(f"stacked and one-per-pass predictions identical: {same}")


if __name__ == "__main__":
    main()
