"""The paper's layer (Table 3) and annotation-rate (Fig. 7) experiments on the shared real data.

Runs, each as its own ``lavise`` process in a fresh home, the recipes of docs/evaluate.md:

    download glove / coco / coco-panoptic --from ../shared/data/...   then preprocess both
    train resnet18 coco-tiny --weights none --layer layer2 --layer layer3 --layer layer4   (one pass)
    evaluate -e <the three> --methods attention,original
    train examples/efficientnet_lite0.py:build coco-tiny coco-panoptic --layer <block 10> --layer <block 15>
    evaluate -e <the two> --methods attention,original
    train examples/efficientnet_lite0.py:build coco-tiny coco-panoptic --layer features --seen-fraction 0.3,0.5,0.7,0.9
    evaluate -e <the four>                                   (recall on unseen concepts per seen share)

and prints the recall tables (each cell: mean over (filter, image) pairs / mean over filters) and
each command's seconds.  resnet18 has random weights here (no torchvision weights can be fetched):
its rows show the mechanics only; EfficientNet-Lite0 is a real ImageNet model.

    .venv/bin/python benchmarks/paper_experiments.py            # ~10 min on a 2-core CPU
    .venv/bin/python benchmarks/paper_experiments.py --only layers

Needs ``../shared/data`` and the test extra (the Lite0 packages); exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import environment, load, table  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
LITE0 = str(ROOT / "examples" / "efficientnet_lite0.py") + ":build"
LITE0_BLOCKS = ["features.net._blocks.10._swish", "features.net._blocks.15._swish"]
FRACTIONS = (0.3, 0.5, 0.7, 0.9)
CUTS = (5, 10, 20)


def lavise(home: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "lavise_cli", "--home", str(home), *args], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"lavise {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stdout


def cell(r: dict[str, Any], s: int) -> str:
    v = r[f"recall@{s}"]
    return f"{v['pair_mean']:.3f} / {v['filter_mean']:.3f}"


def recall_rows(doc: dict[str, Any]) -> list[list[object]]:
    docs = doc["explainers"] if "explainers" in doc else [doc]
    return [[d["explainer"], d["layer"], m, r["filters"], r["pairs"], *(cell(r, s) for s in CUTS)]
            for d in docs for m, r in d["methods"].items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("layers", "rate"), default=None, help="run one experiment")
    ap.add_argument("--home", type=Path, default=None, help="keep the store here (default: temporary)")
    a = ap.parse_args()
    tiny, pan = SHARED / "coco_tiny", SHARED / "coco128_panoptic"
    glove = SHARED / "glove" / "glove.6B.50d.top100k.txt.gz"
    for p in (tiny, pan, glove):
        if not p.exists():
            sys.exit(f"needs {p} (the shared real data); not found")
    home = a.home or Path(tempfile.mkdtemp(prefix="lavise-paper-"))
    print(f"# {environment()}; {load()}; home {home}", flush=True)
    secs: list[list[object]] = []

    def step(what: str, *args: str) -> str:
        s, out = lavise(home, *args)
        secs.append([what, s])
        print(f"  {what}: {s:.1f} s", flush=True)
        return out

    step("register glove", "download", "glove", "--from", str(glove), "--name", "glove50")
    step("register coco-tiny", "download", "coco", "--from", str(tiny), "--name", "coco-tiny")
    step("register coco-panoptic", "download", "coco-panoptic", "--from", str(pan), "--name", "coco-panoptic")
    step("preprocess coco-tiny", "preprocess", "coco-tiny", "--embedding", "glove50")
    step("preprocess coco-panoptic", "preprocess", "coco-panoptic", "--embedding", "glove50")
    heads = ["explainer", "layer", "method", "filters", "pairs", *(f"R@{s}" for s in CUTS)]
    if a.only in (None, "layers"):
        step("train resnet18 layer2-4 (one pass)", "train", "resnet18", "coco-tiny", "--weights", "none",
             "--layer", "layer2", "--layer", "layer3", "--layer", "layer4")
        out = step("evaluate resnet18 layers", "evaluate", *(x for l in ("layer2", "layer3", "layer4")
                                                            for x in ("-e", f"resnet18-{l}-coco-tiny")),
                   "--methods", "attention,original", "--json")
        print(table("\nTable 3, resnet18 (random weights: mechanics only), coco_tiny val", heads,
                    recall_rows(json.loads(out))), flush=True)
        step("train lite0 two blocks (one pass)", "train", LITE0, "coco-tiny", "coco-panoptic", "--name", "lite0",
             *(x for b in LITE0_BLOCKS for x in ("--layer", b)))
        out = step("evaluate lite0 blocks", "evaluate", *(x for b in LITE0_BLOCKS for x in ("-e", f"lite0-{b}")),
                   "--methods", "attention,original", "--json")
        print(table("\nTable 3, EfficientNet-Lite0 (ImageNet), coco_tiny + coco128_panoptic val", heads,
                    recall_rows(json.loads(out))), flush=True)
    if a.only in (None, "rate"):
        step("train lite0 x4 seen fractions (one pass)", "train", LITE0, "coco-tiny", "coco-panoptic",
             "--layer", "features", "--seen-fraction", ",".join(str(f) for f in FRACTIONS), "--name", "lite0-rate")
        out = step("evaluate lite0 seen fractions", "evaluate",
                   *(x for f in FRACTIONS for x in ("-e", f"lite0-rate-seen{f}")), "--json")
        doc = json.loads(out)
        rows = [[r["seen_fraction"], r["method"], r["filters"], r["pairs"], *(cell(r, s) for s in CUTS)]
                for r in doc["annotation_rate"]]
        print(table("\nAnnotation rate (Fig. 7), Lite0 `features`, recall on UNSEEN concepts",
                    ["seen", "method", "filters", "pairs", *(f"R@{s}" for s in CUTS)], rows))
        seen = [[d["seen_fraction"], m, cell(r["seen"], 5), cell(r["unseen"], 5)]
                for d in doc["explainers"] for m, r in d["methods"].items() if "seen" in r]
        print(table("\nthe same explainers on seen vs unseen concepts", ["seen", "method", "R@5 seen", "R@5 unseen"],
                    seen), flush=True)
    print(table("\nseconds per command", ["command", "s"], secs))


if __name__ == "__main__":
    main()
