"""Explainer training on cached features: seconds per epoch, and cached vs recompute-every-epoch.

Part 1 times ``lavise_cli.train.train_explainer`` over 100k cached pairs of random ``z``
(fp16, as the cache stores them) for each feature size ``d``: embedding dimension 300,
80 concepts, batch 256, the default 10 % of the images held out for validation (so an epoch is
a training pass over ~90k pairs plus a validation pass over ~10k), patience large enough that
every epoch runs.  Issue 3's bar: under 5 s per epoch at d=512.

Part 2 compares, on the same small generated data (64 images of 640x480, ~3 masks each), a
full cached ``lavise_cli.train.train`` (one feature pass, then 10 epochs) against a reference
loop written here the way the published implementations work: in every epoch, for every pair,
decode and transform its image, run the backbone to the layer, mask-pool, then take the
explainer step (same module, loss, optimiser, batch size, validation split).  Issue 3's bar:
the cached train at least 10x faster.

    python benchmarks/train_epoch.py
    python benchmarks/train_epoch.py --pairs 100000 --dims 512 --epochs 5 --skip-reference
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lavise_cli  # noqa: F401  (first: it sets lavise's OMP_WAIT_POLICY before torch loads OpenMP)
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Timer, bare_forward, decode, decoded_batches, environment, load, synthetic_dataset, table, temp_store,
)

from lavise_cli.data.images import View, apply_view_masks  # noqa: E402
from lavise_cli.embeddings import load_embedding  # noqa: E402
from lavise_cli.explainer import Explainer, hinge_rank_loss  # noqa: E402
from lavise_cli.passes.features import feature_grids, pooled_masked  # noqa: E402
from lavise_cli.models import capture, load_model  # noqa: E402
from lavise_cli.train import TrainSettings, merged_concepts, train, train_explainer  # noqa: E402


# -- part 1 ---------------------------------------------------------------------------------------


def epoch_times(n_pairs: int, d: int, e: int, n_concepts: int, epochs: int, batch: int, seed: int = 0
                ) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each epoch of ``train_explainer`` over random cached pairs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_pairs, d, generator=g).relu_().half()  # post-ReLU-like features, fp16 as cached
    target = torch.randint(0, n_concepts, (n_pairs,), generator=g)
    group = torch.arange(n_pairs) // 3  # ~3 pairs per image
    cv = F.normalize(torch.randn(n_concepts, e, generator=g), dim=1)
    walls, cpus = [time.perf_counter()], [time.process_time()]

    def tick(_epoch: int) -> None:
        walls.append(time.perf_counter())
        cpus.append(time.process_time())

    settings = TrainSettings(epochs=epochs, patience=10**9, batch_size=batch, seed=seed)
    train_explainer(z, target, group, cv, settings, on_epoch=tick)
    return [b - a for a, b in zip(walls, walls[1:])], [b - a for a, b in zip(cpus, cpus[1:])]


# -- part 2: the recompute-every-epoch reference -----------------------------------------------------


class RecomputeReference:
    """Backbone features recomputed for every pair in every epoch, as the published code does."""

    def __init__(self, split, model, layer: str, local_to_concept: torch.Tensor, forward_batch: int = 32):
        self.split, self.model, self.layer = split, model, layer
        self.grid = feature_grids(model, [layer])[layer][1:]
        self.forward_batch = forward_batch
        pre = model.preprocess
        self.size, self.mean, self.std = pre.input_size, pre.mean, pre.std
        self.net = model.module.eval().to(memory_format=torch.channels_last)  # the faster CPU layout
        pair_image = torch.as_tensor(split.pair_image)
        self.pair_image = pair_image
        offsets = torch.as_tensor(split.offsets)
        self.pair_slot = torch.arange(len(pair_image)) - offsets[pair_image]  # the pair's row in masks(i)
        self.target = local_to_concept[torch.as_tensor(split.pair_concept)]

    def item(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input image, mask on the feature grid) of pair ``p``: decoded from disk every time."""
        i = int(self.pair_image[p])
        x = decode(self.split.image_path(i), self.size, self.mean, self.std)
        _, masks = self.split.masks(i)
        m = apply_view_masks(masks[int(self.pair_slot[p]):int(self.pair_slot[p]) + 1], View(), self.grid)[0]
        return x, m

    @torch.no_grad()
    def features(self, pairs: torch.Tensor) -> torch.Tensor:
        out = []
        with capture(self.net, [self.layer]) as feats:
            for s in range(0, len(pairs), self.forward_batch):
                items = [self.item(int(p)) for p in pairs[s:s + self.forward_batch]]
                x = torch.stack([it[0] for it in items]).contiguous(memory_format=torch.channels_last)
                self.net(x)
                m = torch.stack([it[1] for it in items])
                out.append(pooled_masked(feats[self.layer].float(), torch.arange(len(items)), m))
        return torch.cat(out)

    def train(self, cv: torch.Tensor, settings: TrainSettings) -> list[dict[str, float]]:
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        group = self.pair_image
        groups = torch.unique(group)
        perm = groups[torch.randperm(len(groups), generator=gen)]
        n_val = int(round(settings.val_fraction * len(groups))) if len(groups) > 1 else 0
        is_val = torch.isin(group, perm[:n_val])
        tr, va = torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)
        model = Explainer(self.net_d(), cv.shape[1])
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        losses = []
        for epoch in range(settings.epochs):
            model.train()
            order = tr[torch.randperm(len(tr), generator=gen)]
            total = 0.0
            for s in range(0, len(order), settings.batch_size):
                b = order[s:s + settings.batch_size]
                if len(b) < 2:
                    continue
                z = self.features(b)  # the backbone, again, for every pair of the batch
                loss = hinge_rank_loss(model(z), self.target[b], cv, settings.margin)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            model.eval()
            with torch.no_grad():
                val = float(hinge_rank_loss(model(self.features(va)), self.target[va], cv, settings.margin)) if len(va) else 0.0
            losses.append({"epoch": epoch + 1, "train": total / max(len(tr), 1), "val": val})
        return losses

    def net_d(self) -> int:
        return feature_grids(self.model, [self.layer])[self.layer][0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000, help="cached pairs in part 1 (default 100000)")
    ap.add_argument("--dims", default="512,2048", help="feature sizes d in part 1 (default 512,2048)")
    ap.add_argument("--embedding-dim", type=int, default=300, help="e (default 300)")
    ap.add_argument("--concepts", type=int, default=80, help="concepts (default 80)")
    ap.add_argument("--batch", type=int, default=256, help="explainer batch size (default 256)")
    ap.add_argument("--epochs", default="3,2", help="timed epochs in part 1, one per d or one for all (default 3,2)")
    ap.add_argument("--images", type=int, default=64, help="generated images in part 2 (default 64, 640x480)")
    ap.add_argument("--train-epochs", type=int, default=10, help="epochs of both trains in part 2 (default 10)")
    ap.add_argument("--workers", type=int, default=None, help="feature-pass DataLoader workers (default: lavise's choice)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--skip-epochs", action="store_true", help="skip part 1")
    ap.add_argument("--skip-reference", action="store_true", help="skip part 2")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment())

    if not args.skip_epochs:
        print(f"\npart 1: train_explainer over {args.pairs} cached pairs ({load()})")
        rows = []
        dims = [int(x) for x in args.dims.split(",")]
        epochs = [int(x) for x in args.epochs.split(",")]
        epochs = (epochs * len(dims))[:len(dims)] if len(epochs) == 1 else epochs + [epochs[-1]] * (len(dims) - len(epochs))
        for d, n_ep in zip(dims, epochs):
            walls, cpus = epoch_times(args.pairs, d, args.embedding_dim, args.concepts, n_ep, args.batch)
            later = walls[1:] or walls
            rows.append([f"d={d}", args.pairs, args.batch, ", ".join(f"{w:.2f}" for w in walls),
                         statistics.median(later), min(walls), statistics.median(cpus[1:] or cpus)])
        print(table(f"seconds per epoch (e={args.embedding_dim}, {args.concepts} concepts, 10 % validation; "
                    f"the first epoch includes setup)",
                    ["", "pairs", "batch", "each epoch (s)", "median after 1st", "best", "CPU s/epoch"], rows))
        print(f"({load()}; bar: d=512 under 5 s per epoch)")

    if not args.skip_reference:
        with temp_store() as (tmp, store):
            data = synthetic_dataset(tmp, store, splits={"train": args.images}, width=640, height=480)
            split = data.index.splits["train"]
            print(f"\npart 2: {data.describe()}, 640x480 JPEG ({load()})")
            settings = TrainSettings(epochs=args.train_epochs, patience=10**9, seed=0)
            layer = "layer4"
            model = load_model("resnet18", "none")
            # Warm the backbone up once for both sides.
            pre = model.preprocess
            warm = decoded_batches([split.image_path(i) for i in range(min(32, len(split.images)))],
                                   pre.input_size, pre.mean, pre.std, 32)
            bare_forward(model.module, warm)
            bare_forward(model.module.to(memory_format=torch.channels_last), warm, channels_last=True)

            with Timer() as t_cached:
                res = train(store, "resnet18", [data.name], layers=[layer], weights="none", settings=settings,
                            batch_size=32, workers=args.workers)[0]
            emb = load_embedding(store, "bench-glove")
            concepts, cvecs, _ = merged_concepts([data.index], emb, None, 0)
            cidx = {c: i for i, c in enumerate(concepts)}
            local = torch.tensor([cidx.get(c, -1) for c in data.index.concepts])
            ref = RecomputeReference(split, model, layer, local)
            with Timer() as t_ref:
                ref_losses = ref.train(cvecs, settings)
            pairs = len(split.pair_image)
            rows = [
                ["cached: lavise train (1 feature pass + epochs)", settings.epochs, pairs, t_cached.seconds, t_cached.cpu,
                 f"features {res.seconds['features']:.2f} s, training {res.seconds['training']:.2f} s, "
                 f"cache {res.feature_cache}"],
                ["reference: backbone for every pair, every epoch", settings.epochs, pairs, t_ref.seconds, t_ref.cpu,
                 f"{settings.epochs * pairs} backbone image-forwards"],
            ]
            print(table(f"full train, {settings.epochs} epochs, resnet18 {layer}, batch {settings.batch_size}",
                        ["", "epochs", "pairs", "seconds", "CPU s", "detail"], rows))
            print(f"final val loss: cached {res.losses[-1]['val']:.3f}, reference {ref_losses[-1]['val']:.3f} "
                  f"(same seed and pair order: they agree up to the fp16 rounding of the cache)")
            print(f"({load()})")
            print(f"RATIO reference / cached = {t_ref.seconds / t_cached.seconds:.1f}x  (bar: >= 10x)")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
