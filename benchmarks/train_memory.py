"""``train``'s memory with the cached features loaded vs memory-mapped (issue 10, item 3).

Builds one cached feature entry of random post-ReLU-like fp16 ``z`` (``--pairs`` x ``--d``),
written as the feature pass writes it (``PairShards``: ``z-NNNNN.safetensors`` shards of
65,536 pairs, in a store entry), then trains an explainer on it for ``--epochs`` epochs in a
fresh process per way of holding ``z``:

- ``in memory``: the shards read whole and concatenated, as ``train`` did before (the
  previous ``_load_cached``);
- ``mapped``: ``lavise_cli.passes.features._load_cached(...).rows`` (``MappedRows``), batches
  gathered from the mapping (what ``train`` does now).

Prints each process's peak RSS (``ru_maxrss``), its RSS before ``z`` was touched, and the
seconds per epoch; checks that both give the same losses and the same explainer weights.

    python benchmarks/train_memory.py                       # 200k pairs x d 512
    python benchmarks/train_memory.py --pairs 400000 --d 1024 --epochs 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import lavise_cli  # noqa: F401  (first: it sets lavise's OMP_WAIT_POLICY before torch loads OpenMP)
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, load, table, temp_store  # noqa: E402

from lavise_cli.passes.features import SHARD_PAIRS, PairShards, _load_cached  # noqa: E402
from lavise_cli.passes.pieces import Shards  # noqa: E402
from lavise_cli.store import Store  # noqa: E402
from lavise_cli.train import TrainSettings, train_explainer  # noqa: E402

KEY = "bench-features"


def build(store: Store, pairs: int, d: int, concepts: int, seed: int = 0) -> None:
    """A feature entry written by the feature pass's own sink, a shard's worth of rows at a time."""
    g = torch.Generator().manual_seed(seed)
    sink = PairShards({"layer": KEY})  # writes <folder>/<key>/z-NNNNN.safetensors, as in the pass
    with store.writing("features", KEY, settings={"d": d, "layer": "layer"}) as tmp:
        stage = tmp / "stage"
        for i, s in enumerate(range(0, pairs, SHARD_PAIRS)):
            n = min(SHARD_PAIRS, pairs - s)
            rows = torch.arange(s, s + n)
            sink.add({"layer": {"z": torch.randn(n, d, generator=g).relu_().half(), "image": rows // 3,
                                "concept": torch.randint(0, concepts, (n,), generator=g),
                                "view": torch.zeros(n, dtype=torch.int64)}})
            sink.flush(stage, Shards(index=i), final=s + n >= pairs)
        for f in sorted((stage / KEY).iterdir()):
            f.replace(tmp / f.name)
        (stage / KEY).rmdir()
        stage.rmdir()


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child(mode: str, root: str, epochs: int, e: int, seed: int = 0) -> None:
    store = Store(root=Path(root))
    f = _load_cached(store, KEY, "layer")  # maps z; loads the small per-pair columns
    before = rss_mb()
    t0 = time.perf_counter()
    if mode == "memory":
        # The previous loader: every shard's z read and concatenated.
        from safetensors import safe_open

        parts = []
        for sp in sorted(store.path("features", KEY).glob("z-*.safetensors")):
            with safe_open(str(sp), framework="pt") as fh:
                parts.append(fh.get_tensor("z"))
        z = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
    else:
        z = f.rows
    t_load = time.perf_counter() - t0
    n_concepts = int(f.concept.max()) + 1
    cv = F.normalize(torch.randn(n_concepts, e, generator=torch.Generator().manual_seed(seed)), dim=1)
    walls = [time.perf_counter()]
    settings = TrainSettings(epochs=epochs, patience=10**9, batch_size=256, seed=seed)
    model, losses, _ = train_explainer(z, f.concept, f.image, cv, settings,
                                       on_epoch=lambda _e: walls.append(time.perf_counter()))
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values())).hexdigest()
    print(json.dumps({"mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_z_mb": before, "load_s": t_load,
                      "epoch_s": [b - a for a, b in zip(walls, walls[1:])], "losses": losses, "weights": digest}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200_000, help="cached pairs (default 200000)")
    ap.add_argument("--d", type=int, default=512, help="feature size (default 512)")
    ap.add_argument("--concepts", type=int, default=80, help="concepts (default 80)")
    ap.add_argument("--embedding-dim", type=int, default=300, help="e (default 300)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    ap.add_argument("--modes", default="memory,mapped", help="which runs, in order (default memory,mapped)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.epochs, args.embedding_dim)
        return
    print(environment())
    with temp_store() as (_tmp, store):
        t0 = time.perf_counter()
        build(store, args.pairs, args.d, args.concepts)
        size = sum(p.stat().st_size for p in store.path("features", KEY).glob("z-*.safetensors"))
        print(f"feature entry: {args.pairs} pairs x d {args.d}, {size / 2**20:.0f} MiB in "
              f"{len(list(store.path('features', KEY).glob('z-*')))} shards, built in {time.perf_counter() - t0:.1f} s")
        res = {}
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(store.root), "--epochs", str(args.epochs),
                                  "--embedding-dim", str(args.embedding_dim)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} run failed:\n{out.stderr}")
            out = out.stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
            print(f"  {mode}: done ({load()})")
    rows = [[m, r["peak_rss_mb"], r["rss_before_z_mb"], r["load_s"], ", ".join(f"{s:.2f}" for s in r["epoch_s"]),
             min(r["epoch_s"])] for m, r in res.items()]
    print(table(f"train_explainer, {args.epochs} epochs, batch 256, fresh process each",
                ["z held", "peak RSS MiB", "RSS before z MiB", "load s", "each epoch (s)", "best epoch s"], rows))
    if {"memory", "mapped"} <= res.keys():
        a, b = res["memory"], res["mapped"]
        print(f"same losses: {a['losses'] == b['losses']}, same weights: {a['weights'] == b['weights']}")
        print(f"RATIO mapped / in memory: peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x, "
              f"seconds per epoch (best) {min(b['epoch_s']) / min(a['epoch_s']):.2f}x")


if __name__ == "__main__":
    main()
