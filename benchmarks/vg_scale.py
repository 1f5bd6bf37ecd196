"""Memory and time of Visual Genome's registration and preprocessing as the set grows (issue 10, item 3).

Builds Visual Genome 1.4 folders of N images (default 2k and 16k) from the REAL annotations of
``../shared/data/vg_sample`` (VG's first 100 images: their objects, names, synsets and
image_data entries, replicated under new image and object ids, so ``objects.json`` has the real
file's ≈ 3.5 KB of JSON per image). Every coordinate and image size is divided by ``--shrink``
(default 8: images of ≈ 100 x 75 px), so that drawing the masks stays cheap and what is measured
is the reading of the annotations; one JPEG per distinct size, every image file a symlink to its
size's. Then runs, each as its own ``lavise`` process:

    download vg --from DIR        (registering: counts image_data.json)
    preprocess NAME --min-images 1  (the mask index; 1 so that every size does the same work per image)

and prints per size: seconds, milliseconds per image and peak RSS of each (``os.wait4``'s
``ru_maxrss``: the largest resident set of the process or of any of its worker processes), and
the pairs written; then the ratio of the largest size's peak RSS to the smallest's.

    .venv/bin/python benchmarks/vg_scale.py                                 # 2k and 16k, this checkout
    .venv/bin/python benchmarks/vg_scale.py --src /tmp/old/src --workdir W  # another version's code

``--src`` runs the ``lavise`` processes on another source tree (e.g. an older version, from
``git archive REV src | tar -x -C /tmp/old``); ``--workdir`` keeps the generated folders there and
reuses them on the next run. Needs ``../shared/data`` (vg_sample and the GloVe file).
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
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")


def build_set(src: Path, out: Path, n: int, shrink: int) -> None:
    """A VG folder of ``n`` images under ``out``: vg_sample's entries replicated in turn under new
    ids (objects.json and image_data.json written entry by entry, never held whole)."""
    from PIL import Image

    objects = json.loads((src / "objects.json").read_text())
    meta = {m["image_id"]: m for m in json.loads((src / "image_data.json").read_text())}
    objects = [e for e in objects if e["image_id"] in meta]
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "VG_100K").mkdir(parents=True)
    protos: dict[tuple[int, int], Path] = {}
    oid = 1
    with open(tmp / "objects.json", "w") as fo, open(tmp / "image_data.json", "w") as fm:
        fo.write("[")
        fm.write("[")
        for k in range(n):
            entry = objects[k % len(objects)]
            m = meta[entry["image_id"]]
            iid = k + 1
            w, h = max(1, m["width"] // shrink), max(1, m["height"] // shrink)
            if (w, h) not in protos:
                protos[(w, h)] = tmp / f"proto_{w}x{h}.jpg"
                Image.new("RGB", (w, h), (w % 256, h % 256, 90)).save(protos[(w, h)], quality=80)
            os.symlink(f"../{protos[(w, h)].name}", tmp / "VG_100K" / f"{iid}.jpg")  # relative: survives the rename
            objs = []
            for o in entry["objects"]:
                o = {**o, "object_id": oid, "x": o["x"] // shrink, "y": o["y"] // shrink,
                     "w": max(1, o["w"] // shrink), "h": max(1, o["h"] // shrink)}
                oid += 1
                objs.append(o)
            fo.write(("," if k else "") + json.dumps({"image_id": iid, "objects": objs}))
            fm.write(("," if k else "") + json.dumps({**m, "image_id": iid, "width": w, "height": h,
                                                       "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{iid}.jpg"}))
        fo.write("]")
        fm.write("]")
    for f in ("object_synsets.json", "object_alias.txt"):
        shutil.copy(src / f, tmp / f)
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,16000", help="comma-separated numbers of images")
    ap.add_argument("--shrink", type=int, default=8, help="divide coordinates and image sizes by this")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the lavise source tree the commands run")
    ap.add_argument("--workers", type=int, default=None, help="preprocess --workers (default: lavise's)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the folders and the store here (default: temporary)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    sample, glove = SHARED / "vg_sample", SHARED / "glove" / "glove.6B.50d.top100k.txt.gz"
    if not sample.is_dir() or not glove.is_file():
        sys.exit(f"needs {sample} and {glove} (the shared real data); not found")
    env = {**os.environ, "PYTHONPATH": str(a.src.resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    work = a.workdir or Path(tempfile.mkdtemp(prefix="lavise-vgscale-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"# lavise from {a.src}; shrink {a.shrink}; cores {os.cpu_count()}, load average {load[0]:.1f}", flush=True)
    home = work / f"home-{os.getpid()}"
    rows: list[dict[str, Any]] = []
    try:
        run(home, "download", "glove", "--from", str(glove), "--name", "glove50", env=env)
        for n in sizes:
            data = work / f"vg-{n}-s{a.shrink}"
            if not data.is_dir():
                build_set(sample, data, n, a.shrink)
            name = f"vg{n}"
            r: dict[str, Any] = {"images": n, "objects_mb": (data / "objects.json").stat().st_size / 2**20}
            r["register_s"], r["register_rss"], _ = run(home, "download", "vg", "--from", str(data), "--name", name,
                                                        env=env)
            extra = ["--workers", str(a.workers)] if a.workers else []
            r["preprocess_s"], r["preprocess_rss"], out = run(home, "preprocess", name, "--min-images", "1",
                                                              "--json", *extra, env=env)
            summary = json.loads(out)
            r["pairs"] = sum(s["pairs"] for s in summary["splits"].values())
            r["kept"] = sum(s["images"] for s in summary["splits"].values())
            rows.append(r)
            print(f"{n:>6} images ({r['objects_mb']:.1f} MB objects.json) {r['pairs']:>8} pairs"
                  f" | register {r['register_s']:6.1f} s {r['register_rss']:6.0f} MiB"
                  f" | preprocess {r['preprocess_s']:6.1f} s {1000 * r['preprocess_s'] / n:5.1f} ms/img"
                  f" {r['preprocess_rss']:6.0f} MiB", flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        for cmd in ("register", "preprocess"):
            print(f"{cmd}: peak RSS {hi['images']} / {lo['images']} images x{hi[f'{cmd}_rss'] / lo[f'{cmd}_rss']:.2f}, "
                  f"time per image x{(hi[f'{cmd}_s'] / hi['images']) / (lo[f'{cmd}_s'] / lo['images']):.2f}")
    if a.json:
        a.json.write_text(json.dumps({"src": str(a.src), "shrink": a.shrink, "load": load, "sizes": rows}, indent=1))


if __name__ == "__main__":
    main()
