"""Seconds for the target pass, for explaining every filter of a layer, and for evaluating them.

On generated labelled images (default 1,000 of 320x240, ~3 masks each, 20 concepts) and
resnet18 layer4 (512 filters, random seeded weights): a quick explainer is trained on a separate
generated train split (``lavise_cli.train.train``, a few epochs); then, in one process,

- the target pass (``lavise_cli.passes.target.target_pass``, a cache miss),
- explaining all 512 filters (``lavise_cli.explain.explain_filters``, method attention, p=25,
  s=5, the default vocabulary) on the cached target pass; issue 4's bar: under 10 s,
- evaluating them (``lavise_cli.pipeline.evaluate_methods`` with methods ["attention"], recall
  at 5, 10, 20: IoU ground truth, explanation with s=20, recall),
- a bare ``model(x)`` forward over the same images, decoded beforehand, as the backbone cost
  (timed before and after the stages above, NCHW and channels_last; the fastest counts),

and prints the share of the total that is not the backbone forward.

    python benchmarks/explain_evaluate.py
    python benchmarks/explain_evaluate.py --images 2000 --vocab raw --vocab-size 2000
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

from lavise_cli.evaluate import ConceptSpace, ground_truth  # noqa: E402
from lavise_cli.explain import explain_filters, top_images  # noqa: E402
from lavise_cli.models import load_model  # noqa: E402
from lavise_cli.pipeline import evaluate_methods, open_session, vocabulary_for  # noqa: E402
from lavise_cli.passes.target import labelled_target, target_pass  # noqa: E402
from lavise_cli.train import TrainSettings, train  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="generated target (val) images (default 1000)")
    ap.add_argument("--train-images", type=int, default=200, help="generated train images for the explainer (default 200)")
    ap.add_argument("--train-epochs", type=int, default=5, help="explainer epochs (default 5)")
    ap.add_argument("--width", type=int, default=320, help="image width (default 320)")
    ap.add_argument("--height", type=int, default=240, help="image height (default 240)")
    ap.add_argument("--concepts", type=int, default=20, help="concepts in the generated data (default 20)")
    ap.add_argument("--vocab", default="default", help="vocabulary: default, concepts, raw or a file (default: default)")
    ap.add_argument("--vocab-size", type=int, default=None, help="vocabulary size limit (as --vocab-size of explain)")
    ap.add_argument("-p", type=int, default=25, help="top images per filter (default 25)")
    ap.add_argument("-s", type=int, default=5, help="words per image (default 5)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: lavise's choice)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--breakdown", action="store_true", help="also time ground_truth alone (costs one more IoU pass)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment())
    layer = "layer4"
    with temp_store() as (tmp, store):
        data = synthetic_dataset(tmp, store, splits={"train": args.train_images, "val": args.images},
                                 width=args.width, height=args.height, n_concepts=args.concepts)
        print(f"data: {data.describe()}, {args.width}x{args.height} JPEG, generated in {data.seconds:.1f} s")
        with Timer() as t_train:
            res = train(store, "resnet18", [data.name], layers=[layer], weights="none",
                        settings=TrainSettings(epochs=args.train_epochs, patience=10**9), batch_size=args.batch_size,
                        workers=args.workers)[0]
        print(f"explainer {res.name}: {res.epochs} epochs on {res.pairs['train_and_val']} pairs in {t_train.seconds:.1f} s "
              f"(not part of the figures below)")

        model = load_model("resnet18", "none")
        # The backbone cost: the same seeded weights untouched by lavise, NCHW and channels_last.
        bare_nchw = load_model("resnet18", "none").module.eval()
        bare_cl = load_model("resnet18", "none").module.eval().to(memory_format=torch.channels_last)
        target = labelled_target([data.index], "val")
        pre = model.preprocess
        batches = decoded_batches(target.paths, pre.input_size, pre.mean, pre.std, args.batch_size)
        bare_forward(bare_nchw, batches[:2])  # warm-up
        bare_forward(bare_cl, batches[:2], channels_last=True)
        # The backbone cost is timed before the lavise stages and again after them; the fastest
        # run counts (a burst of load from elsewhere should not flatter lavise's share).
        bare_runs = [bare_forward(bare_nchw, batches), bare_forward(bare_cl, batches, channels_last=True)]
        print(f"({load()})")

        with Timer() as t_target:
            cache = target_pass(store, model, layer, target, batch_size=args.batch_size, workers=args.workers)
        assert not cache.hit
        session = open_session(store, res.name, datasets=[data.name], split="val")
        assert session.cache.hit
        vocab = vocabulary_for(session, args.vocab, args.vocab_size)
        d = session.cache.shape[0]
        filters = list(range(d))
        explain_runs: list[Timer] = []
        for _ in range(2):
            with Timer() as t:
                ex = explain_filters(session.explainer, session.cache, vocab, filters, method="attention", p=args.p, s=args.s)
            explain_runs.append(t)
        gt_time = None
        if args.breakdown:
            space = ConceptSpace.of(session.target, usable=set(vocab.words))
            top = top_images(session.cache, args.p)
            with Timer() as gt_time:
                ground_truth(session.target, session.cache, filters, top, session.size, space)
        with Timer() as t_eval:
            ev = evaluate_methods(session, ["attention"], vocab, cuts=(5, 10, 20), p=args.p)
        bare_runs += [bare_forward(bare_nchw, batches), bare_forward(bare_cl, batches, channels_last=True)]
        bare = min(bare_runs[0::2], key=lambda t: t.seconds)
        bare_c = min(bare_runs[1::2], key=lambda t: t.seconds)
        backbone = min(bare, bare_c, key=lambda t: t.seconds)
        t_explain = explain_runs[0]
        total = t_target.seconds + t_explain.seconds + t_eval.seconds
        total_cpu = t_target.cpu + t_explain.cpu + t_eval.cpu
        n = len(target.paths)
        rows = [
            ["target pass (target_pass, cache miss)", t_target.seconds, t_target.cpu, f"{n / t_target.seconds:.1f} images/s"],
            [f"explain all {d} filters (attention, p={ex.settings['p']}, s={ex.settings['s']})", t_explain.seconds,
             t_explain.cpu, f"second run {explain_runs[1].seconds:.2f} s; vocabulary {vocab.describe()['source']}, "
             f"{len(vocab.words)} entries"],
            ["evaluate (evaluate_methods ['attention'], recall@5,10,20)", t_eval.seconds, t_eval.cpu,
             f"ground truth alone {gt_time.seconds:.2f} s" if gt_time is not None else "--breakdown: ground truth alone"],
            ["total", total, total_cpu, ""],
            ["bare model(x) forward, same images (backbone cost)", backbone.seconds, backbone.cpu,
             f"best of 2 each: NCHW {bare.seconds:.2f} s, channels_last {bare_c.seconds:.2f} s; "
             f"{n / backbone.seconds:.1f} images/s"],
        ]
        print()
        print(table(f"resnet18 {layer}, {n} target images {args.width}x{args.height}, batch {args.batch_size}",
                    ["stage", "seconds", "CPU s", "detail"], rows))
        r = ev["methods"]["attention"]
        print("recall (sanity check only: random weights and data):",
              ", ".join(f"@{c} {r[f'recall@{c}']['pair_mean']:.3f}" for c in (5, 10, 20)),
              f"over {r['pairs']} pairs, {r['filters']} filters, {r['skipped']} skipped")
        print(f"torch threads {torch.get_num_threads()}; {load()}")
        print(f"explaining all {d} filters on the cached target pass: {t_explain.seconds:.2f} s  (bar: under 10 s)")
        print(f"SHARE of the total that is not the backbone forward = {max(0.0, 1 - backbone.seconds / total):.1%} "
              f"(backbone {backbone.seconds:.2f} s of {total:.2f} s; by CPU time "
              f"{max(0.0, 1 - backbone.cpu / total_cpu):.1%})")


if __name__ == "__main__":
    main()
