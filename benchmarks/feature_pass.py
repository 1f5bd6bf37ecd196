"""Images/s of lavise's feature pass against a bare ``model(x)`` loop, in the same process.

The feature pass (``lavise_cli.passes.features.reference_features``) decodes every image of a split,
decodes and transforms its masks, runs the backbone to the layer and mask-pools every
(image, concept) pair, writing fp16 shards to the store.  The bare loop runs ``model(x)`` under
``torch.inference_mode`` over the very same input tensors, decoded beforehand, in the same
batches: in fp32 (NCHW), fp32 channels-last, and bf16 autocast channels-last.  The feature pass
runs at ``--precision`` (default ``auto``: bf16 on CPUs with AVX512-BF16/AMX, else fp32); the
ratio is the feature pass's rate over the fastest bare rate (issues 3 and 9: at least 0.8).

    python benchmarks/feature_pass.py                # 256 synthetic 640x480 JPEGs, ~3 masks each
    python benchmarks/feature_pass.py --images 512 --batch-size 32 --workers 1
    python benchmarks/feature_pass.py --precision bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lavise_cli  # noqa: F401  (first: it sets lavise's OMP_WAIT_POLICY before torch loads OpenMP)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Timer, bare_forward, decoded_batches, environment, load, synthetic_dataset, table, temp_store,
)

from lavise_cli.passes.features import reference_features  # noqa: E402
from lavise_cli.models import load_model  # noqa: E402
from lavise_cli.runtime import PRECISIONS, cpu_native_bf16, resolve_precision  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="generated images in the timed split (default 256)")
    ap.add_argument("--warmup-images", type=int, default=64, help="images in the separate warm-up split (default 64)")
    ap.add_argument("--width", type=int, default=640, help="generated image width (default 640)")
    ap.add_argument("--height", type=int, default=480, help="generated image height (default 480)")
    ap.add_argument("--masks", type=int, default=3, help="masks per image, +-1 (default 3)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers of the feature pass (default: lavise's own choice, 0 on <= 2 cores)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions of each side; the best is reported (default 2)")
    ap.add_argument("--model", default="resnet18", help="torchvision model (default resnet18, random seeded weights)")
    ap.add_argument("--layer", default="layer4", help="layer (default layer4)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--bf16-images", type=int, default=None,
                    help="images of the bare bf16 forward (default: all on CPUs with native bf16; else 64, since "
                         "emulated bf16 is several times slower than fp32 and only its rate is wanted)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="the feature pass's precision (default auto, as lavise's commands)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment())
    precision = resolve_precision(args.precision, "cpu")
    print(f"precision: --precision {args.precision} -> {precision} (CPU native bf16: {cpu_native_bf16()})")
    with temp_store(args.keep) as (tmp, store):
        data = synthetic_dataset(tmp, store, splits={"train": args.images, "val": args.warmup_images},
                                 width=args.width, height=args.height, masks_per_image=args.masks)
        print(f"data: {data.describe()}, {args.width}x{args.height} JPEG, generated in {data.seconds:.1f} s")
        split, warm = data.index.splits["train"], data.index.splits["val"]
        model = load_model(args.model, "none")
        # The same seeded weights, untouched by lavise: one kept NCHW, one converted to channels_last.
        bare_nchw = load_model(args.model, "none").module.eval()
        bare_cl = load_model(args.model, "none").module.eval().to(memory_format=torch.channels_last)
        pre = model.preprocess
        paths = [split.image_path(i) for i in range(len(split.images)) if len(split.image_pairs(i))]
        pairs = len(split.pair_image)

        def feature_pass() -> Timer:
            with Timer() as t:
                f = reference_features(store, model, [args.layer], split, data.index.digest,
                                       batch_size=args.batch_size, workers=args.workers, precision=precision)
            assert not f[args.layer].hit and len(f[args.layer].z) == pairs
            store.remove("features", f[args.layer].key)  # the next repetition is a miss again
            return t

        # Warm-up: a pass over a different split (another cache key), and bare forwards.
        with Timer() as tw:
            reference_features(store, model, [args.layer], warm, data.index.digest, batch_size=args.batch_size,
                               workers=args.workers, precision=precision)
        batches = decoded_batches(paths, pre.input_size, pre.mean, pre.std, args.batch_size)
        n_bf = len(paths) if args.bf16_images is None and cpu_native_bf16() else (args.bf16_images or 64)
        bf_batches = decoded_batches(paths[:n_bf], pre.input_size, pre.mean, pre.std, args.batch_size)
        n_bf = min(n_bf, len(paths))
        bare_forward(bare_nchw, batches[:2])
        bare_forward(bare_cl, batches[:2], channels_last=True)
        bare_forward(bare_cl, batches[:2], channels_last=True, bf16=True)
        print(f"warm-up: feature pass over {len(warm.images)} images in {tw.seconds:.1f} s; bare forwards over 2 batches")
        print(f"({load()})")

        # Interleaved repetitions, so that a burst of load from elsewhere hits every side alike.
        fp: list[Timer] = []
        bare: list[Timer] = []
        bare_c: list[Timer] = []
        bare_b: list[Timer] = []
        for _ in range(args.repeats):
            fp.append(feature_pass())
            bare.append(bare_forward(bare_nchw, batches))
            bare_c.append(bare_forward(bare_cl, batches, channels_last=True))
            bare_b.append(bare_forward(bare_cl, bf_batches, channels_last=True, bf16=True))
        n = len(paths)

        def best(ts: list[Timer]) -> Timer:
            return min(ts, key=lambda t: t.seconds)

        b_fp, b_bare, b_cl, b_bf = best(fp), best(bare), best(bare_c), best(bare_b)
        rate_fp, rate_bare, rate_cl = (n / b.seconds for b in (b_fp, b_bare, b_cl))
        rate_bf = n_bf / b_bf.seconds
        best_bare = max(rate_bare, rate_cl, rate_bf)
        rows = [
            [f"feature pass (reference_features), {precision}", n, args.batch_size, b_fp.seconds, b_fp.cpu, rate_fp,
             rate_fp / best_bare],
            ["bare model(x), fp32 NCHW", n, args.batch_size, b_bare.seconds, b_bare.cpu, rate_bare, rate_bare / best_bare],
            ["bare model(x), fp32 channels_last", n, args.batch_size, b_cl.seconds, b_cl.cpu, rate_cl, rate_cl / best_bare],
            ["bare model(x), bf16 autocast channels_last", n_bf, args.batch_size, b_bf.seconds, b_bf.cpu, rate_bf,
             rate_bf / best_bare],
        ]
        print()
        print(table(f"{args.model} {args.layer}, {pre.input_size} px, {pairs} pairs, best of {args.repeats} interleaved runs",
                    ["", "images", "batch", "seconds", "CPU s", "images/s", "x fastest bare"], rows))
        print("all runs (s): feature pass " + ", ".join(f"{t.seconds:.2f}" for t in fp)
              + "; bare NCHW " + ", ".join(f"{t.seconds:.2f}" for t in bare)
              + "; bare channels_last " + ", ".join(f"{t.seconds:.2f}" for t in bare_c)
              + "; bare bf16 channels_last " + ", ".join(f"{t.seconds:.2f}" for t in bare_b))
        workers = args.workers if args.workers is not None else "auto"
        print(f"torch threads: {torch.get_num_threads()}; feature-pass workers: {workers}; {load()}")
        print(f"RATIO feature pass ({precision}) / fastest bare forward = {rate_fp / best_bare:.2f}  (bar: >= 0.8)")


if __name__ == "__main__":
    main()
