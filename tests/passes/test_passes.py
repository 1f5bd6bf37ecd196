"""The one runner of every backbone pass (src/lavise_cli/passes/runner.py).

On a small synthetic pass (a tiny network, generated items, one unreadable): an interrupted
pass resumes where its last checkpoint stopped and publishes what an uninterrupted one does;
one compute feeds two sinks; ``rank``/``world`` parts cover every item exactly once, in order,
and the last part to finish publishes the whole; a pass whose entry exists does not run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from lavise_cli.passes.runner import (Item, Publication, Shards, Sink, StoreOutput, aligned_block, rank_block, run_pass,
                                      save_shard)
from lavise_cli.passes.stats import FilterMoments
from lavise_cli.store import Store

N = 23
BAD = {5, 17}  # items that cannot be read


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.feat = nn.ReLU()
        self.head = nn.Linear(4, 2)
        self.heads = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat(self.conv(x))
        self.heads += 1  # counts forwards that ran past `feat` (an early stop never gets here)
        return self.head(f.mean((2, 3)))


class Numbers(Dataset):
    """Item ``i``: a seeded 8x8 image (``x`` (1, 3, 8, 8)), None for the unreadable ones; reading
    item ``stop_at`` raises KeyboardInterrupt (an interrupt in the middle of a pass)."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.reads = stop_at, []

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Item:
        if i == self.stop_at:
            raise KeyboardInterrupt
        self.reads.append(i)
        if i in BAD:
            return Item(i, None)
        g = torch.Generator().manual_seed(i)
        return Item(i, torch.rand(1, 3, 8, 8, generator=g))


class Pooled:
    """The compute: each image's number and its spatial mean at ``feat``; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, good: list[Item], maps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return torch.tensor([it.index for it in good]), maps["feat"].float().flatten(2).mean(2).cpu()


class RowShards(Sink):
    """Shards ``rows-NNNNN`` of (index, pooled) rows, due every ``every`` rows."""

    def __init__(self, every: int):
        self.every, self.idx, self.z = every, [], []

    def add(self, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.idx.append(out[0])
        self.z.append(out[1])

    def due(self) -> bool:
        return sum(len(i) for i in self.idx) >= self.every

    def flush(self, folder: Path, shards: Shards, final: bool) -> None:
        if self.idx:
            save_shard({"index": torch.cat(self.idx), "z": torch.cat(self.z)}, folder / "k" / shards.name("rows"))
        self.idx, self.z = [], []


class Moments(Sink):
    """Per-filter moments of the pooled rows, kept in the checkpoint's state."""

    def __init__(self) -> None:
        self.m = FilterMoments(4)

    def add(self, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.m.update(out[1].T)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.m.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m.load_state_dict(state)

    def publish(self, folder: Path, parts: list[dict[str, torch.Tensor]]) -> None:
        """The whole pass's moments: every piece's (in item order), merged."""
        self.m = FilterMoments(4)
        for part in parts:
            one = FilterMoments(4)
            one.load_state_dict(part)
            self.m.merge(one)


def output(store: Store) -> StoreOutput:
    return StoreOutput(store, "features", ".partial-test", [Publication(
        "k", {"what": "test"}, lambda r: {"skipped": r.skipped, "seconds": r.seconds}, folder="k")])


def run(store: Store, ds: Dataset, sinks: list[Sink], *, batch_size: int = 3, compute: Any = None, **kw: Any):
    return run_pass(ds, Net(), ["feat"], compute or Pooled(), sinks, device="cpu", precision="fp32",
                    batch_size=batch_size, workers=0, output=output(store), **kw)


def published(store: Store) -> dict[str, torch.Tensor]:
    parts = [load_file(str(p)) for p in sorted(store.path("features", "k").glob("rows-*.safetensors"))]
    return {k: torch.cat([p[k] for p in parts]) for k in ("index", "z")}


def by_hand() -> tuple[torch.Tensor, torch.Tensor]:
    net, ds = Net(), Numbers()
    good = [ds[i] for i in range(N) if i not in BAD]
    with torch.no_grad():
        z = torch.cat([net.feat(net.conv(it.x)).flatten(2).mean(2) for it in good])
    return torch.tensor([it.index for it in good]), z


def test_a_pass_publishes_what_the_network_computes(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    net = Net()
    r = run_pass(Numbers(), net, ["feat"], Pooled(), [RowShards(4)], device="cpu", precision="fp32",
                 batch_size=3, workers=0, output=output(store))
    assert r.ran and r.published and r.skipped == sorted(BAD)
    # only the one-image probe that counts the layer's calls runs the whole network (see models.capture)
    assert net.heads == 1, "the batches' forwards went past the captured layer"
    got = published(store)
    idx, z = by_hand()
    assert torch.equal(got["index"], idx)
    torch.testing.assert_close(got["z"], z)
    assert store.manifest("features", "k")["settings"]["skipped"] == sorted(BAD)
    assert not list(store.kind_dir("features").glob(".partial-*"))
    # the entry exists: nothing runs again
    again = Numbers()
    assert not run(store, again, [RowShards(4)]).ran and again.reads == []


def test_an_interrupted_pass_resumes_and_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    ref_store = Store(tmp_path / "ref")
    ref_moments = Moments()
    run(ref_store, Numbers(), [RowShards(4), ref_moments])
    ref = published(ref_store)

    store = Store(tmp_path / "home")
    with pytest.raises(KeyboardInterrupt):
        run(store, Numbers(stop_at=14), [RowShards(4), Moments()])  # interrupted in the 5th batch
    assert not store.exists("features", "k")
    (partial,) = store.kind_dir("features").glob(".partial-*")
    assert json.loads((partial / "state.json").read_text())["keys"] == ["k"]  # what the sweep reads
    # one process: one piece, from item 0 to the end
    state = json.loads((partial / "state-p000000000.json").read_text())
    # 4 rows are due after batches 2 (items 0-5, one unreadable) and 4 (6-11): items 0-11 are kept
    assert state["next"] == 12 and state["shards"] == 2 and state["skipped"] == [5] and not state["done"]
    assert (state["start"], state["stop"]) == (0, N)
    assert len(list((partial / "k").glob("rows-p000000000-*.safetensors"))) == 2
    # the moments' state at the last recorded checkpoint (the second), and only that one
    assert sorted(p.name for p in partial.glob("sink-*")) == ["sink-1-p000000000-00001.safetensors"]

    resumed_ds, moments = Numbers(), Moments()
    r = run(store, resumed_ds, [RowShards(4), moments])
    assert r.ran and r.published
    assert resumed_ds.reads == list(range(12, N)), "the resumed pass read finished items again"
    got = published(store)
    assert torch.equal(got["index"], ref["index"]) and torch.equal(got["z"], ref["z"])
    assert store.manifest("features", "k")["settings"]["skipped"] == sorted(BAD)
    assert moments.m.count == ref_moments.m.count == N - len(BAD)
    assert torch.equal(moments.m.max, ref_moments.m.max)
    torch.testing.assert_close(moments.m.sum, ref_moments.m.sum, rtol=1e-12, atol=1e-12)
    assert not list(store.kind_dir("features").glob(".partial-*"))


def test_two_sinks_from_one_compute(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    compute, rows, moments = Pooled(), RowShards(1000), Moments()
    run(store, Numbers(), [rows, moments], compute=compute, batch_size=4)
    assert compute.calls == 6  # one call per batch (23 items in batches of 4), both sinks fed from it
    got = published(store)
    assert moments.m.count == len(got["z"]) == N - len(BAD)
    assert torch.equal(moments.m.max, got["z"].amax(0))
    torch.testing.assert_close(moments.m.mean, got["z"].double().mean(0).float())


@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_parts_cover_every_item_exactly_once(tmp_path: Path, world: int) -> None:
    blocks = [rank_block(N, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(N))
    with pytest.raises(ValueError):
        rank_block(N, world, world)

    ref_store = Store(tmp_path / "ref")
    run(ref_store, Numbers(), [RowShards(4)])
    store = Store(tmp_path / "home")
    reads = []
    for rank in range(world):
        ds = Numbers()
        r = run(store, ds, [RowShards(4)], rank=rank, world=world)
        reads += ds.reads
        assert r.ran and r.published == (rank == world - 1)
        assert store.exists("features", "k") == (rank == world - 1), "published before every part ran"
    assert sorted(reads) == list(range(N)), "an item was read by no part or by two"
    # each part wrote its own pieces' shards; published, they are numbered in item order
    names = sorted(p.name for p in store.path("features", "k").glob("rows-*.safetensors"))
    assert names == [f"rows-{i:05d}.safetensors" for i in range(len(names))] and len(names) >= world
    got, ref = published(store), published(ref_store)
    assert got["index"].tolist() == ref["index"].tolist()  # every readable item once, in order
    torch.testing.assert_close(got["z"], ref["z"])  # other batches: the same to float rounding
    assert store.manifest("features", "k")["settings"]["skipped"] == sorted(BAD)
    assert not list(store.kind_dir("features").glob(".partial-*"))


def test_without_a_store_output_the_sinks_get_everything(tmp_path: Path) -> None:
    compute, moments = Pooled(), Moments()
    r = run_pass(Numbers(), Net(), ["feat"], compute, [moments], precision="fp32", batch_size=5, workers=0)
    assert r.ran and not r.published and r.skipped == sorted(BAD)
    idx, z = by_hand()
    assert moments.m.count == len(idx)
    torch.testing.assert_close(moments.m.max, z.amax(0))


def test_a_pass_split_one_way_resumes_another_way(tmp_path: Path) -> None:
    """Shares of 3 (one done, one interrupted after a checkpoint, one never run), then one process:
    it reads only what no share recorded, and publishes what an uninterrupted pass does."""
    ref_store, ref_moments = Store(tmp_path / "ref"), Moments()
    run(ref_store, Numbers(), [RowShards(4), ref_moments], batch_size=2)
    ref = published(ref_store)

    store = Store(tmp_path / "home")
    # shares in whole batches of 2: each batch holds the same items as in one process
    assert [aligned_block(N, r, 3, 2) for r in range(3)] == [range(0, 8), range(8, 16), range(16, 23)]
    r = run(store, Numbers(), [RowShards(4), Moments()], rank=2, world=3, batch_size=2)
    assert r.ran and not r.published
    with pytest.raises(KeyboardInterrupt):  # a checkpoint after items 0-3 (4 rows), then item 6
        run(store, Numbers(stop_at=6), [RowShards(4), Moments()], rank=0, world=3, batch_size=2)
    (partial,) = store.kind_dir("features").glob(".partial-*")
    states = {json.loads(p.read_text())["start"]: json.loads(p.read_text()) for p in partial.glob("state-p*.json")}
    assert states[0]["next"] == 4 and not states[0]["done"] and states[16]["done"] and 8 not in states

    ds, moments = Numbers(), Moments()
    r = run(store, ds, [RowShards(4), moments], batch_size=2)
    assert r.ran and r.published
    assert ds.reads == list(range(4, 16)), "the single process read again what a share had recorded"
    got = published(store)
    assert torch.equal(got["index"], ref["index"]) and torch.equal(got["z"], ref["z"])  # the same batches
    assert store.manifest("features", "k")["settings"]["skipped"] == sorted(BAD)
    # the statistics: every piece's checkpointed state, merged when the pass is published
    assert moments.m.count == ref_moments.m.count == N - len(BAD)
    torch.testing.assert_close(moments.m.max, got["z"].amax(0))
    torch.testing.assert_close(moments.m.sum, got["z"].double().sum(0), rtol=1e-6, atol=1e-9)
    assert not list(store.kind_dir("features").glob(".partial-*"))
