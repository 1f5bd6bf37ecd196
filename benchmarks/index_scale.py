"""Memory and time of the data path as the reference set grows (issue 10, item 3).

Builds COCO-format sets of N images (default 1k, 4k and 16k) from the REAL polygons of
``../shared/data/coco_tiny`` (its 160 images and their instance annotations, replicated under
new image and annotation ids; the image files are symlinks to the originals), then runs, each as
its own ``lavise`` process:

    download coco --from DIR --split val      (registering: checks and counts the annotation file)
    preprocess                                 (the mask index)
    train resnet18 --weights none              (the feature pass over the reference part, 1 epoch)
    explain --all --split val                  (the target pass over the whole set, every filter)
    evaluate --split val                       (recall of every filter: the target pass reused)

and prints per size: seconds, seconds per image and peak RSS of each command, and the index's
bytes on disk; then the ratios of the largest size to the smallest (the bar: peak RSS within
1.25x, time per image within 1.3x).  Peak RSS is the largest resident set of the command's
process or of any of its children (``os.wait4``'s ``ru_maxrss``), not their sum.

    .venv/bin/python benchmarks/index_scale.py --sizes 1000,4000          # ~10 min on a busy 2-core CPU
    .venv/bin/python benchmarks/index_scale.py                             # 1k, 4k and 16k
    .venv/bin/python benchmarks/index_scale.py --sizes 1000 --no-trim      # the runner without malloc_trim

Needs ``../shared/data`` (coco_tiny and the GloVe file); exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _processes import measured_run as run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lavise_cli.store import Store  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")


def build_set(src: Path, out: Path, n: int) -> None:
    """A COCO layout of ``n`` images under ``out`` (split val): coco_tiny's images and annotations
    (train and val) replicated in turn under new ids, the image files symlinked."""
    sources = []  # (image dict, annotations, path)
    cats: dict[int, Any] = {}
    for split in ("train", "val"):
        d = json.loads((src / "annotations" / f"instances_{split}2017.json").read_text())
        by_img: dict[int, list[Any]] = {}
        for a in d["annotations"]:
            by_img.setdefault(a["image_id"], []).append(a)
        for c in d["categories"]:
            cats[c["id"]] = c
        for im in sorted(d["images"], key=lambda x: x["id"]):
            sources.append((im, by_img.get(im["id"], []), src / f"{split}2017" / im["file_name"]))
    (out / "annotations").mkdir(parents=True)
    images_dir = out / "val2017"
    images_dir.mkdir()
    aid = 1
    # Written by hand, image by image, so that building a 16k set does not hold it all.
    with open(out / "annotations" / "instances_val2017.json", "w") as fh:
        fh.write('{"info": {"description": "coco_tiny replicated"}, "images": [')
        for k in range(n):
            im, _, path = sources[k % len(sources)]
            name = f"{k + 1:07d}.jpg"
            os.symlink(path, images_dir / name)
            fh.write(("," if k else "") + json.dumps({"id": k + 1, "file_name": name, "width": im["width"],
                                                       "height": im["height"]}))
        fh.write('], "annotations": [')
        first = True
        for k in range(n):
            _, anns, _ = sources[k % len(sources)]
            for a in anns:
                fh.write(("" if first else ",") + json.dumps({**a, "id": aid, "image_id": k + 1}))
                first, aid = False, aid + 1
        fh.write('], "categories": ' + json.dumps(sorted(cats.values(), key=lambda c: c["id"])) + "}")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,4000,16000", help="comma-separated numbers of images")
    ap.add_argument("--input-size", type=int, default=112, help="backbone input size (small: 16k stays feasible)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the sets and the store here (default: temporary)")
    ap.add_argument("--no-trim", action="store_true", help="LAVISE_NO_TRIM=1: the runner does not call malloc_trim")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    coco, glove = SHARED / "coco_tiny", SHARED / "glove" / "glove.6B.50d.top100k.txt.gz"
    if not coco.is_dir() or not glove.is_file():
        sys.exit(f"needs {coco} and {glove} (the shared real data); not found")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if a.no_trim:
        env["LAVISE_NO_TRIM"] = "1"
    work = a.workdir or Path(tempfile.mkdtemp(prefix="lavise-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"# {a.model} {a.layer}, input {a.input_size} px, --weights none; cores {os.cpu_count()}, "
          f"load average {load[0]:.1f}; malloc_trim {'off' if a.no_trim else 'on'}", flush=True)
    rows = []
    try:
        for n in sizes:
            data, home = work / f"set-{n}", work / f"home-{n}"
            for p in (data, home):
                shutil.rmtree(p, ignore_errors=True)
            build_set(coco, data, n)
            run(home, "download", "glove", "--from", str(glove), "--name", "glove50", env=env)
            name = f"scale{n}"
            r: dict[str, Any] = {"images": n, "annotation_mb": (data / "annotations" / "instances_val2017.json").stat().st_size / 2**20}
            r["register_s"], r["register_rss"], _ = run(home, "download", "coco", "--from", str(data), "--name", name,
                                                        "--split", "val", env=env)
            r["preprocess_s"], r["preprocess_rss"], out = run(home, "preprocess", name, "--json", env=env)
            summary = json.loads(out)
            r["pairs"] = summary["splits"]["val"]["pairs"]
            r["index_bytes"] = du(Store(home).path("indexes", name))
            ex = f"ex{n}"
            r["train_s"], r["train_rss"], _ = run(
                home, "train", a.model, name, "--weights", "none", "--input-size", str(a.input_size),
                "--layer", a.layer, "--epochs", "1", "--name", ex, env=env)
            r["explain_s"], r["explain_rss"], _ = run(home, "explain", "-e", ex, "--all", "--dataset", name,
                                                      "--split", "val", "--json", env=env)
            # evaluate reuses the cached target pass: its own cost is the ground truth of the top images
            r["evaluate_s"], r["evaluate_rss"], _ = run(home, "evaluate", "-e", ex, "--dataset", name,
                                                        "--split", "val", "--json", env=env)
            rows.append(r)
            print(f"{n:>6} images {r['pairs']:>7} pairs | register {r['register_s']:7.1f} s {r['register_rss']:6.0f} MiB"
                  f" | preprocess {r['preprocess_s']:7.1f} s {r['preprocess_rss']:6.0f} MiB"
                  f" | index {r['index_bytes'] / 2**20:7.2f} MiB"
                  f" | train {r['train_s']:7.1f} s {r['train_rss']:6.0f} MiB"
                  f" | explain --all {r['explain_s']:7.1f} s {r['explain_rss']:6.0f} MiB"
                  f" | evaluate {r['evaluate_s']:7.1f} s {r['evaluate_rss']:6.0f} MiB", flush=True)
            shutil.rmtree(home / "cache", ignore_errors=True)  # the maps: GBs at 16k
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    head = ["images", "pairs", "ann MB", "register s", "RSS MiB", "preprocess s", "ms/img", "RSS MiB",
            "index MiB", "B/pair", "train s", "ms/img", "RSS MiB", "explain s", "ms/img", "RSS MiB",
            "evaluate s", "RSS MiB"]
    print(" | ".join(head))
    for r in rows:
        n = r["images"]
        cells = [n, r["pairs"], f"{r['annotation_mb']:.1f}", f"{r['register_s']:.1f}", f"{r['register_rss']:.0f}",
                 f"{r['preprocess_s']:.1f}", f"{1000 * r['preprocess_s'] / n:.1f}", f"{r['preprocess_rss']:.0f}",
                 f"{r['index_bytes'] / 2**20:.2f}", f"{r['index_bytes'] / max(r['pairs'], 1):.0f}",
                 f"{r['train_s']:.1f}", f"{1000 * r['train_s'] / n:.1f}", f"{r['train_rss']:.0f}",
                 f"{r['explain_s']:.1f}", f"{1000 * r['explain_s'] / n:.1f}", f"{r['explain_rss']:.0f}",
                 f"{r['evaluate_s']:.1f}", f"{r['evaluate_rss']:.0f}"]
        print(" | ".join(str(c) for c in cells))
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        print(f"\nratios {hi['images']} / {lo['images']} images (bar: RSS <= 1.25, time per image <= 1.3):")
        for cmd in ("register", "preprocess", "train", "explain", "evaluate"):
            rss = hi[f"{cmd}_rss"] / lo[f"{cmd}_rss"]
            per = (hi[f"{cmd}_s"] / hi["images"]) / (lo[f"{cmd}_s"] / lo["images"])
            print(f"  {cmd:<10} peak RSS x{rss:.2f} {'ok' if rss <= 1.25 else 'OVER'}"
                  f"   time per image x{per:.2f} {'ok' if per <= 1.3 else 'OVER'}")
    if a.json:
        a.json.write_text(json.dumps({"sizes": rows, "input_size": a.input_size, "model": a.model,
                                      "trim": not a.no_trim, "load": load}, indent=1))


if __name__ == "__main__":
    main()
