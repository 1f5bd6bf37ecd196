"""Images/s of the reference feature pass with 1 process and with 2 ``torchrun`` ranks.

The pass is ``lavise_cli.passes.features.reference_features`` (resnet18 ``layer4``, random seeded
weights, fp32, batch 32, decoding in a thread beside the forward) over generated JPEGs, run by
this script itself in a worker mode, timed from a barrier before the pass to its publication:

- 1 process, torch's own threads (2 on a 2-core machine): the baseline;
- 1 process, 1 thread: what each rank gets below;
- ``torchrun --standalone --nproc_per_node 2``, 1 thread a rank (gloo): each rank decodes and
  runs half of the images; rank 0 publishes.

The ratio is the 2-rank rate over the 1-process rate.  Runs are interleaved, the best of
``--repeats`` counts; every run starts from an empty feature cache.

    python benchmarks/distributed.py                     # 192 generated 640x480 JPEGs
    python benchmarks/distributed.py --images 384 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lavise_cli  # noqa: F401  (first: it sets lavise's OMP_WAIT_POLICY before torch loads OpenMP)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, load, synthetic_dataset, table, temp_store  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One process (or one rank): the timed feature pass; rank 0 prints one JSON line."""
    from lavise_cli import distributed
    from lavise_cli.data.index import load_index
    from lavise_cli.models import load_model
    from lavise_cli.passes.features import reference_features
    from lavise_cli.store import Store

    ctx = distributed.setup()
    torch.set_num_threads(args.threads)
    st = Store(args.home)
    ix = load_index(st, args.dataset)
    model = load_model(args.model, "none")
    split = ix.splits["train"]
    distributed.gather("ready")  # every rank has loaded its model: the clock starts together
    t0 = time.perf_counter()
    f = reference_features(st, model, [args.layer], split, ix.digest, batch_size=args.batch_size, workers=0,
                           precision="fp32")
    seconds = time.perf_counter() - t0
    if ctx.rank == 0:
        print(json.dumps({"seconds": seconds, "pairs": int(len(f[args.layer].z)), "threads": torch.get_num_threads(),
                          "world": ctx.world}), flush=True)
    distributed.shutdown()


def launch(args: argparse.Namespace, home: Path, procs: int, threads: int) -> dict[str, float]:
    from lavise_cli.store import Store

    shutil.rmtree(Store(home).kind_dir("features"), ignore_errors=True)  # a miss every time
    me = [str(Path(__file__).resolve()), "--worker", "--home", str(home), "--threads", str(threads),
          "--model", args.model, "--layer", args.layer, "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(procs), *me]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192, help="generated images (default 192)")
    ap.add_argument("--width", type=int, default=640, help="generated image width (default 640)")
    ap.add_argument("--height", type=int, default=480, help="generated image height (default 480)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the best counts (default 2)")
    ap.add_argument("--model", default="resnet18", help="torchvision model (default resnet18, random seeded weights)")
    ap.add_argument("--layer", default="layer4", help="layer (default layer4)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default="synthetic", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(environment())
    cores = len(os.sched_getaffinity(0))
    with temp_store(args.keep) as (tmp, store):
        data = synthetic_dataset(tmp, store, splits={"train": args.images}, width=args.width, height=args.height)
        print(f"data: {data.describe()}, {args.width}x{args.height} JPEG, generated in {data.seconds:.1f} s")
        print(f"({load()})")
        configs = [("1 process", 1, torch.get_num_threads()), ("1 process, 1 thread", 1, 1),
                   ("torchrun, 2 ranks x 1 thread", 2, 1)]
        runs: dict[str, list[dict[str, float]]] = {c[0]: [] for c in configs}
        for _ in range(args.repeats):
            for name, procs, threads in configs:
                runs[name].append(launch(args, store.root, procs, threads))
        n = args.images
        best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
        base = n / best["1 process"]["seconds"]
        rows = [[name, procs, threads, best[name]["seconds"], n / best[name]["seconds"],
                 (n / best[name]["seconds"]) / base] for name, procs, threads in configs]
        print()
        print(table(f"{args.model} {args.layer}, 224 px, {best['1 process']['pairs']} pairs, fp32, {cores} cores, "
                    f"best of {args.repeats} interleaved runs", ["", "processes", "threads each", "seconds",
                                                                  "images/s", "x 1 process"], rows))
        print("all runs (s): " + "; ".join(f"{name} " + ", ".join(f"{r['seconds']:.2f}" for r in rs)
                                         for name, rs in runs.items()))
        print(f"({load()})")
        two = n / best["torchrun, 2 ranks x 1 thread"]["seconds"]
        print(f"RATIO 2 ranks / 1 process = {two / base:.2f}; 2 ranks / 1 process at 1 thread = "
              f"{two / (n / best['1 process, 1 thread']['seconds']):.2f}")


if __name__ == "__main__":
    main()
