"""The explainer and its training (src/lavise_cli/explainer.py, src/lavise_cli/train.py, `lavise train`).

Unit tests on small synthetic features: the loss against a plain double loop, the module against
method.md, BatchNorm in training mode, seeded repeatability, bit-exact resume, the validation split
by image, early stopping.  End to end: `lavise train` on a generated dataset and on the real data
in ../shared/data (skipped when absent), the artifact read back with `safetensors` alone.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lavise_cli.explainer import Explainer, hinge_rank_loss
from lavise_cli.train import TrainSettings, evaluate_loss, train_explainer
from conftest import assert_clear_error

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def loop_hinge_loss(v: torch.Tensor, target: torch.Tensor, concepts: torch.Tensor, margin: float) -> float:
    """mean over the batch of sum over c != t of max(0, margin - v.v_t + v.v_c), as plain loops."""
    total = 0.0
    for b in range(v.shape[0]):
        t = int(target[b])
        pos = sum(float(v[b, k]) * float(concepts[t, k]) for k in range(v.shape[1]))
        for c in range(concepts.shape[0]):
            if c == t:
                continue
            neg = sum(float(v[b, k]) * float(concepts[c, k]) for k in range(v.shape[1]))
            total += max(0.0, margin - pos + neg)
    return total / v.shape[0]


def synthetic(seed: int = 0, d: int = 16, e: int = 8, n_concepts: int = 5, group_sizes: tuple[int, ...] = (),
              signal: float = 1.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features with a concept-dependent mean, targets, image groups (of the given sizes) and unit
    concept vectors."""
    g = torch.Generator().manual_seed(seed)
    sizes = group_sizes or tuple(int(s) for s in torch.randint(3, 8, (16,), generator=g))
    group = torch.cat([torch.full((s,), 1000 + 7 * k, dtype=torch.long) for k, s in enumerate(sizes)])
    n = len(group)
    target = torch.randint(0, n_concepts, (n,), generator=g)
    centres = torch.randn(n_concepts, d, generator=g) * signal
    z = (centres[target] + torch.randn(n, d, generator=g)).abs()  # pooled post-ReLU features are >= 0
    cv = F.normalize(torch.randn(n_concepts, e, generator=g), dim=1)
    return z.half(), target, group, cv


def per_pair_loss(model: Explainer, z: torch.Tensor, t: torch.Tensor, cv: torch.Tensor, margin: float = 1.0
                  ) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        v = model(z.float())
        s = v @ cv.T
        loss = (margin - s.gather(1, t[:, None]) + s).clamp_min(0)
        loss[torch.arange(len(t)), t] = 0
    return loss.sum(1)


def identify_val_groups(z: torch.Tensor, t: torch.Tensor, group: torch.Tensor, cv: torch.Tensor,
                        settings: TrainSettings) -> set[int]:
    """The image groups that train_explainer validates on, found from the outside: after one epoch
    the reported validation loss must be the mean loss over exactly one set of whole groups."""
    one = TrainSettings(**{**settings.__dict__, "epochs": 1, "patience": 100})
    model, losses, _ = train_explainer(z, t, group, cv, one)
    pair = per_pair_loss(model, z, t, cv, one.margin).double()
    groups = torch.unique(group).tolist()
    n_val = int(round(settings.val_fraction * len(groups)))
    assert 0 < n_val < len(groups)
    reported = losses[0]["val"]
    matches = []
    for combo in itertools.combinations(groups, n_val):
        sel = torch.isin(group, torch.tensor(combo))
        if math.isclose(float(pair[sel].mean()), reported, rel_tol=3e-6, abs_tol=1e-7):
            matches.append(set(combo))
    assert len(matches) == 1, f"validation loss {reported} is not the loss of one set of whole images: {matches}"
    return matches[0]


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------
# The loss and the module
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_loss_equals_double_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for b, c, e in ((1, 2, 3), (6, 7, 5), (9, 4, 16)):
        v = F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=1)
        cv = F.normalize(torch.randn(c, e, generator=g, dtype=torch.float64), dim=1)
        t = torch.randint(0, c, (b,), generator=g)
        got = hinge_rank_loss(v, t, cv, margin=1.0)
        assert got.shape == ()
        assert math.isclose(float(got), loop_hinge_loss(v, t, cv, 1.0), rel_tol=1e-10, abs_tol=1e-12)
    # a margin other than 1 and targets all equal
    v = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    cv = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    t = torch.full((4,), 2)
    assert math.isclose(float(hinge_rank_loss(v, t, cv, 0.3)), loop_hinge_loss(v, t, cv, 0.3), rel_tol=1e-10)


def test_loss_is_zero_when_the_target_wins_by_the_margin() -> None:
    cv = torch.eye(3, dtype=torch.float64)
    v = cv.clone()  # v.v_t = 1, v.v_c = 0: margin 1 gives exactly 0 per negative
    assert float(hinge_rank_loss(v, torch.arange(3), cv, 1.0)) == 0.0
    assert float(hinge_rank_loss(v, torch.tensor([1, 2, 0]), cv, 1.0)) == pytest.approx(
        loop_hinge_loss(v, torch.tensor([1, 2, 0]), cv, 1.0))


def test_explainer_architecture_matches_method() -> None:
    d, e = 12, 5
    ex = Explainer(d, e)
    leaves = [m for m in ex.modules() if not list(m.children())]
    assert [type(m) for m in leaves] == [nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d,
                                         nn.Dropout, nn.Linear]
    bn1, do1, lin1, _, bn2, do2, lin2 = leaves
    assert bn1.num_features == d and bn2.num_features == d
    assert do1.p == 0.1 and do2.p == 0.1
    assert (lin1.in_features, lin1.out_features) == (d, d) and lin1.bias is not None
    assert (lin2.in_features, lin2.out_features) == (d, e) and lin2.bias is not None
    assert sum(p.numel() for p in ex.parameters()) == 2 * d + (d * d + d) + 2 * d + (d * e + e)
    # forward: the unit vector of the chain, in that order
    ex.eval()
    with torch.no_grad():
        for m in (bn1, bn2):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        z = torch.randn(7, d, generator=torch.Generator().manual_seed(1))
        out = ex(z)
        h = torch.relu(lin1(bn1(z)))
        expect = F.normalize(lin2(bn2(h)), dim=1)
    assert out.shape == (7, e)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))


def test_batchnorm_layers_train_in_training_mode() -> None:
    z, t, g, cv = synthetic(0)
    model, losses, _ = train_explainer(z, t, g, cv, TrainSettings(epochs=2, batch_size=16, seed=0))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 2
    for bn in bns:
        assert int(bn.num_batches_tracked) > 0
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    # the first BatchNorm's running mean follows the training features (momentum 0.1 towards them)
    assert float(torch.corrcoef(torch.stack([bns[0].running_mean, z.float().mean(0)]))[0, 1]) > 0.9
    assert not model.training  # returned ready for inference
    assert len(losses) == 2


# ------------------------------------------------------------------------------------------
# Repeatability, resume, validation, early stopping
# ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_another_seed_does_not() -> None:
    z, t, g, cv = synthetic(1)
    s = TrainSettings(epochs=3, batch_size=16, seed=7)
    a, la, ba = train_explainer(z, t, g, cv, s)
    b, lb, bb = train_explainer(z, t, g, cv, s)
    assert states_equal(a.state_dict(), b.state_dict())
    assert la == lb and ba == bb
    c, _, _ = train_explainer(z, t, g, cv, TrainSettings(epochs=3, batch_size=16, seed=8))
    assert not states_equal(a.state_dict(), c.state_dict())


def test_resumed_run_ends_with_the_same_weights(tmp_path: Path) -> None:
    z, t, g, cv = synthetic(2)
    s = TrainSettings(epochs=6, batch_size=16, patience=100, seed=3)
    full, full_losses, full_best = train_explainer(z, t, g, cv, s)

    ck = tmp_path / "checkpoint.pt"
    seen: list[int] = []

    def stop_after_3(epoch: int) -> None:
        seen.append(epoch)
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_explainer(z, t, g, cv, s, checkpoint=ck, on_epoch=stop_after_3)
    assert seen == [1, 2, 3] and ck.is_file()
    seen.clear()
    resumed, losses, best = train_explainer(z, t, g, cv, s, checkpoint=ck, resume=True, on_epoch=seen.append)
    assert seen == [4, 5, 6], "the resumed run did not continue after epoch 3"
    assert states_equal(resumed.state_dict(), full.state_dict())
    assert losses == full_losses and best == full_best
    # without --resume the checkpoint is not used: a fresh run, the same result
    fresh, _, _ = train_explainer(z, t, g, cv, s, checkpoint=ck, resume=False)
    assert states_equal(fresh.state_dict(), full.state_dict())


def test_validation_split_is_by_image_and_never_trained_on() -> None:
    z, t, g, cv = synthetic(3, group_sizes=(3, 5, 4, 6, 7, 3, 5, 4, 6, 2, 5, 3))
    s = TrainSettings(epochs=1, batch_size=16, val_fraction=0.25, seed=4)
    val = identify_val_groups(z, t, g, cv, s)
    assert len(val) == 3
    is_val = torch.isin(g, torch.tensor(sorted(val)))
    base, _, _ = train_explainer(z, t, g, cv, s)
    # changing the validation images' features does not change the trained weights ...
    z_val = z.clone()
    z_val[is_val] = (torch.rand(int(is_val.sum()), z.shape[1], generator=torch.Generator().manual_seed(0)) * 5).half()
    other, _, _ = train_explainer(z_val, t, g, cv, s)
    assert states_equal(base.state_dict(), other.state_dict())
    # ... while changing one training image's features does
    train_group = next(x for x in torch.unique(g).tolist() if x not in val)
    z_tr = z.clone()
    z_tr[g == train_group] += 1
    changed, _, _ = train_explainer(z_tr, t, g, cv, s)
    assert not states_equal(base.state_dict(), changed.state_dict())
    # the split is seeded: another seed validates on other images
    assert identify_val_groups(z, t, g, cv, TrainSettings(**{**s.__dict__, "seed": 5})) != val


def test_early_stopping_keeps_the_best_epoch() -> None:
    # no signal: random targets, so the explainer overfits and validation loss turns up
    z, t, g, cv = synthetic(4, signal=0.0, group_sizes=(3, 4, 5, 6, 7, 8, 9, 5, 6, 7, 4, 8))
    s = TrainSettings(epochs=60, batch_size=8, lr=1e-2, patience=3, val_fraction=0.25, seed=0)
    model, losses, best = train_explainer(z, t, g, cv, s)
    vals = [r["val"] for r in losses]
    assert best == 1 + min(range(len(vals)), key=vals.__getitem__)
    assert len(losses) == best + s.patience < s.epochs, "did not stop early"
    assert vals[-1] > vals[best - 1]
    # the returned weights are the best epoch's: a run that ends at that epoch gives the same
    short, _, _ = train_explainer(z, t, g, cv, TrainSettings(**{**s.__dict__, "epochs": best}))
    assert states_equal(model.state_dict(), short.state_dict())
    # and their validation loss, measured from the outside, is the best one
    val = identify_val_groups(z, t, g, cv, s)
    is_val = torch.isin(g, torch.tensor(sorted(val)))
    measured = evaluate_loss(model, z[is_val].float(), t[is_val], cv, s.margin)
    assert measured == pytest.approx(vals[best - 1], rel=1e-5)
    assert measured != pytest.approx(vals[-1], rel=1e-5)


# ------------------------------------------------------------------------------------------
# `lavise train` end to end
# ------------------------------------------------------------------------------------------

META_KEYS = {"model", "weights", "layer", "d", "embedding", "embedding_dim", "concepts", "seen", "settings",
             "losses", "lavise_version"}


def read_artifact(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and metadata of an explainer file, with the safetensors package alone."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="numpy") as fh:
        raw = fh.metadata()
        for k in fh.keys():
            tensors[k] = fh.get_tensor(k)
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


@pytest.fixture
def gen_dataset(store: Any, make_coco: Any, small_glove: Path) -> str:
    from lavise_cli.data.index import preprocess
    from lavise_cli.download import register_coco
    from lavise_cli.embeddings import register_embedding

    register_coco(store, make_coco(split="train"), "gen")
    register_embedding(store, small_glove, name="small")
    preprocess(store, "gen", embedding="small", seen_fraction=0.7)
    return "gen"


def test_seen_fraction_trains_on_seen_concepts_only(cli: Any, store: Any, gen_dataset: str) -> None:
    from lavise_cli.data.index import load_index

    ix = load_index(store, gen_dataset)
    doc = cli.json("train", "resnet18", gen_dataset, "--weights", "none", "--input-size", "64", "--epochs", "2",
                   "--seen-fraction", "0.7", "--name", "novel")
    _, meta = read_artifact(Path(doc["path"]))
    seen = [c for c, s in zip(ix.concepts, ix.seen) if s]
    assert 0 < len(seen) < len(ix.concepts)
    assert meta["concepts"] == ix.concepts
    assert meta["seen"] == ix.seen  # the split made by preprocess
    assert meta["trained_concepts"] == seen
    split = ix.splits["train"]
    seen_idx = {i for i, s in enumerate(ix.seen) if s}
    n_seen_pairs = sum(1 for c in split.pair_concept.tolist() if c in seen_idx)
    assert n_seen_pairs < len(split.pair_concept)
    assert meta["pairs"] == n_seen_pairs == doc["pairs"]["train_and_val"]
    # without it, every concept is trained on
    doc = cli.json("train", "resnet18", gen_dataset, "--weights", "none", "--input-size", "64", "--epochs", "2",
                   "--name", "all")
    _, meta = read_artifact(Path(doc["path"]))
    assert meta["trained_concepts"] == ix.concepts and all(meta["seen"])
    assert meta["pairs"] == len(split.pair_concept)
    assert doc["feature_cache"] == "hit"


def test_cli_bad_views_is_a_usage_error(cli: Any, gen_dataset: str) -> None:
    r = cli("train", "resnet18", gen_dataset, "--weights", "none", "--views", "foo")
    assert r.exit_code == 2  # a bad option value, like Typer's own (not 3: bad data)
    assert_clear_error(r, "unknown view 'foo'", "full, flip, crop, crop-flip")


def test_train_reports_pair_counts_and_a_partial_feature_cache(cli: Any, store: Any, gen_dataset: str,
                                                               make_coco: Any, tmp_path: Path) -> None:
    from lavise_cli.data.index import load_index, preprocess
    from lavise_cli.download import register_coco
    from lavise_cli.train import validation_split

    args = ("--weights", "none", "--input-size", "64", "--epochs", "1", "--val-fraction", "0.34")
    one = cli.json("train", "resnet18", gen_dataset, *args, "--name", "one")
    assert one["feature_cache"] == "miss"
    pairs = one["pairs"]
    assert pairs["train"] + pairs["val"] == pairs["train_and_val"] == len(load_index(store, gen_dataset)
                                                                         .splits["train"].pair_concept)
    assert pairs["val"] > 0 and pairs["train"] > 0
    # The counts are those of the split train_explainer made: one image of three held out.
    from lavise_cli.train import TrainSettings

    img = load_index(store, gen_dataset).splits["train"].pair_image
    tr, va = validation_split(torch.as_tensor(img), TrainSettings(val_fraction=0.34))
    assert (len(tr), len(va)) == (pairs["train"], pairs["val"])

    # A second dataset: its features are computed, the first one's reused -> "partial".
    register_coco(store, make_coco(tmp_path / "coco2", split="train"), "gen2")
    preprocess(store, "gen2", embedding="small", seen_fraction=0.7)
    both = cli("train", "resnet18", gen_dataset, "gen2", *args, "--name", "both")
    assert both.exit_code == 0, both.output
    flat = " ".join(both.stdout.split())
    assert "feature cache │ partial" in flat, both.stdout
    assert "pairs, training" in flat and "pairs, validation" in flat
    again = cli.json("train", "resnet18", gen_dataset, "gen2", *args, "--name", "both")
    assert again["feature_cache"] == "hit"
    assert again["pairs"]["train"] + again["pairs"]["val"] == again["pairs"]["train_and_val"] == 2 * pairs["train_and_val"]


def test_cli_train_table_keeps_the_path_whole(cli: Any, gen_dataset: str) -> None:
    r = cli("train", "resnet18", gen_dataset, "--weights", "none", "--input-size", "64", "--epochs", "1",
            "--name", "a-long-explainer-name-" * 3, env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    path = cli.json("store", "--kind", "explainers")["entries"][0]["path"]
    assert f"saved {path}/explainer.safetensors" in r.stdout, r.stdout
    assert "…" not in r.stdout


@pytest.fixture(scope="module")
def real_home(real_store: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's real store without its cached features and explainers, so that this
    module sees its own first feature pass whatever ran before."""
    home = tmp_path_factory.mktemp("train-real") / "home"
    shutil.copytree(real_store.root, home, ignore=shutil.ignore_patterns("features", "explainers", "targets",
                                                                          "results", ".tmp-*", ".partial-*"))
    return home


@pytest.mark.slow
def test_real_train_end_to_end_and_cache_hit(cli: Any, real_home: Path) -> None:
    from lavise_cli.explainer import load_explainer

    args = ("train", "resnet18", "coco-tiny", "--weights", "none", "--input-size", "96", "--epochs", "3")
    doc = cli.json(*args, home=real_home)
    for key in ("explainer", "path", "feature_cache", "epochs", "best_val_loss", "seconds"):
        assert key in doc, key
    assert doc["explainer"] == "resnet18-layer4-coco-tiny"
    assert doc["feature_cache"] == "miss"
    assert doc["epochs"] == 3 and math.isfinite(doc["best_val_loss"])
    assert doc["seconds"]["features"] > 0 and doc["seconds"]["training"] > 0
    path = Path(doc["path"])
    assert path.is_file() and path.is_relative_to(real_home)

    tensors, meta = read_artifact(path)
    assert META_KEYS <= set(meta), META_KEYS - set(meta)
    assert meta["model"] == "resnet18" and meta["weights"] == "none" and meta["layer"] == "layer4"
    assert meta["d"] == 512 and meta["embedding"] == "glove50" and meta["embedding_dim"] == 50
    assert len(meta["concepts"]) == len(meta["seen"]) == 80 and all(meta["seen"])
    assert [r["epoch"] for r in meta["losses"]] == [1, 2, 3]
    assert meta["settings"]["epochs"] == 3
    assert min(r["val"] for r in meta["losses"]) == pytest.approx(doc["best_val_loss"])
    # the explainer alone: its 14 tensors (BN x2 with stats, Linear x2) and the concept vectors
    assert set(tensors) - {"concept_vectors"} == {f"explainer.{k}" for k in Explainer(512, 50).state_dict()}
    assert tensors["explainer.net.6.weight"].shape == (50, 512)
    assert tensors["concept_vectors"].shape == (80, 50)
    loaded = load_explainer(path)
    assert loaded.concepts == meta["concepts"]

    again = cli.json(*args, home=real_home)
    assert again["feature_cache"] == "hit"
    assert again["seconds"]["features"] < doc["seconds"]["features"]
    assert again["best_val_loss"] == doc["best_val_loss"]  # same seed, same run


@pytest.mark.slow
def test_real_train_on_two_datasets_merges_concepts_by_label(cli: Any, real_home: Path) -> None:
    from lavise_cli.data.index import load_index
    from lavise_cli.store import Store

    st = Store(real_home)
    tiny, pan = load_index(st, "coco-tiny"), load_index(st, "coco-panoptic")
    union = {c for ix in (tiny, pan) for c, m in zip(ix.concepts, ix.mapped) if m}
    doc = cli.json("train", "resnet18", "coco-tiny", "coco-panoptic", "--weights", "none", "--input-size", "96",
                   "--epochs", "2", home=real_home)
    assert doc["explainer"] == "resnet18-layer4-coco-tiny+coco-panoptic"
    _, meta = read_artifact(Path(doc["path"]))
    concepts = meta["concepts"]
    assert concepts.count("person") == 1 and concepts.count("dog") == 1
    assert len(concepts) == len(set(concepts)) == len(union)
    assert set(concepts) == union
    assert "sky" in concepts  # a panoptic stuff class next to the instance categories
    assert meta["datasets"] == ["coco-tiny", "coco-panoptic"]
    mapped_pairs = 0
    for ix in (tiny, pan):
        mapped = {i for i, m in enumerate(ix.mapped) if m}
        mapped_pairs += sum(1 for c in ix.splits["train"].pair_concept.tolist() if c in mapped)
    assert meta["pairs"] == mapped_pairs
    counts = dict(zip(concepts, meta["concept_counts"]))
    person = sum(sum(1 for c in ix.splits["train"].pair_concept.tolist() if ix.concepts[c] == "person")
                 for ix in (tiny, pan))
    assert counts["person"] == person > 0


def test_library_train_interrupted_and_resumed_equals_uninterrupted(store: Any, gen_dataset: str) -> None:
    from lavise_cli.train import train

    kw = dict(weights="none", input_size=64, workers=0, device="cpu")
    s = TrainSettings(epochs=5, patience=100, seed=2, batch_size=4)
    (full,) = train(store, "resnet18", [gen_dataset], name="full", settings=s, **kw)

    def stop(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(store, "resnet18", [gen_dataset], name="part", settings=s, on_epoch=stop, **kw)
    assert not store.exists("explainers", "part")
    epochs: list[int] = []
    (resumed,) = train(store, "resnet18", [gen_dataset], name="part", settings=s, resume=True,
                       on_epoch=epochs.append, **kw)
    assert epochs == [3, 4, 5]
    assert resumed.feature_cache == "hit" and resumed.losses == full.losses
    a, _ = read_artifact(full.path)
    b, meta = read_artifact(resumed.path)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert [r["epoch"] for r in meta["losses"]] == [1, 2, 3, 4, 5]


def test_explainer_metadata_keeps_text_that_looks_like_json(tmp_path: Path) -> None:
    """A layer named "3" (a plain nn.Sequential) must come back as the text "3", not the number 3."""
    import torch

    from lavise_cli.explainer import Explainer, read_metadata, save_explainer

    path = tmp_path / "e.safetensors"
    meta = {"layer": "3", "name": "true", "d": 4, "concepts": ["a", "b"], "weights": "null"}
    save_explainer(path, Explainer(4, 3), torch.zeros(2, 3), meta)
    assert read_metadata(path) == meta
