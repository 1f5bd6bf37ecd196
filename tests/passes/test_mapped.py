"""``train``'s features read through a memory mapping (src/lavise_cli/passes/mapped.py; issue 10,
item 3): rows gathered from the cached shards equal the rows of the concatenated tensor (across
shard boundaries, through a kept subset and a concatenation of entries), training on the mapped
rows gives the losses and weights of training on the tensor, and the mapped pages are given back.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lavise_cli.passes import mapped
from lavise_cli.passes.features import PairShards, _load_cached
from lavise_cli.passes.mapped import MappedRows
from lavise_cli.passes.pieces import Shards
from lavise_cli.store import Store
from lavise_cli.train import TrainSettings, evaluate_loss, train_explainer


def feature_entry(store: Store, key: str, sizes: list[int], d: int, n_concepts: int = 5, seed: int = 0) -> None:
    """A cached feature entry written by the feature pass's own sink: one shard per size."""
    g = torch.Generator().manual_seed(seed)
    sink = PairShards({"layer": key})
    with store.writing("features", key, settings={"d": d}) as tmp:
        start = 0
        for i, n in enumerate(sizes):
            concept = torch.randint(0, n_concepts, (n,), generator=g)
            centres = torch.randn(n_concepts, d, generator=g) * 1.5
            z = (centres[concept] + torch.randn(n, d, generator=g)).abs()  # post-ReLU-like, with a signal
            image = (torch.arange(start, start + n) // 3).long()
            sink.add({"layer": {"z": z.half(), "image": image, "concept": concept, "view": torch.zeros(n, dtype=torch.long)}})
            sink.flush(tmp / "stage", Shards(index=i), final=i == len(sizes) - 1)
            start += n
        for f in sorted((tmp / "stage" / key).iterdir()):
            f.replace(tmp / f.name)


def concatenated(store: Store, key: str) -> torch.Tensor:
    """The entry's z read whole, independently of the mapping (safetensors' own loader)."""
    return torch.cat([load_file(str(p))["z"] for p in sorted(store.path("features", key).glob("z-*.safetensors"))])


def test_rows_across_shard_boundaries_equal_the_concatenated_tensor(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = [37, 1, 50, 29]
    feature_entry(store, "k", sizes, d=6)
    f = _load_cached(store, "k", "layer")
    z = concatenated(store, "k")
    assert z.dtype == torch.float16 and len(z) == sum(sizes)
    assert f.rows.shape == z.shape and len(f.rows) == len(z) and f.rows.dtype == torch.float16
    # every row at and around each boundary, in a scrambled order, with repeats and negative indices
    bounds = torch.tensor([0, 37, 38, 88, len(z) - 1])  # the shards' first rows, and the last row
    near = torch.cat([bounds - 1, bounds, bounds + 1]).clamp(0, len(z) - 1)
    idx = torch.cat([near, near.flip(0), torch.randperm(len(z), generator=torch.Generator().manual_seed(1)),
                     torch.tensor([-1, -len(z)])])
    got = f.rows.rows(idx)
    assert got.dtype == torch.float32 and torch.equal(got, z[idx].float())
    assert torch.equal(f.rows.rows(idx, dtype=None), z[idx])
    assert torch.equal(f.rows.rows(slice(30, 95)), z[30:95].float())
    assert torch.equal(f.rows.rows(torch.tensor([40])), z[[40]].float())
    assert f.rows.rows(torch.zeros(0, dtype=torch.long)).shape == (0, 6)
    assert torch.equal(f.z, z)  # the loaded tensor, for callers that want one
    with pytest.raises(IndexError):
        f.rows.rows(torch.tensor([len(z)]))

    # a kept subset (a row map) of one entry, concatenated with another entry
    feature_entry(store, "k2", [10, 20], d=6, seed=5)
    f2 = _load_cached(store, "k2", "layer")
    keep = torch.rand(len(z), generator=torch.Generator().manual_seed(2)) < 0.6
    both = MappedRows.cat([f.rows.select(keep), f2.rows])
    ref = torch.cat([z[keep], concatenated(store, "k2")])
    assert both.shape == ref.shape
    perm = torch.randperm(len(ref), generator=torch.Generator().manual_seed(3))
    assert torch.equal(both.rows(perm), ref[perm].float())
    assert torch.equal(both.tensor(), ref)
    monkeypatch.setattr(mapped, "COPY_BYTES", 7 * 6 * 2)  # copies of 7 rows: chunks across the shards
    assert torch.equal(both.to_device("cpu"), ref) and torch.equal(both.tensor(), ref)
    # a subset of a subset, and int indices as well as a bool mask
    sub = both.select(torch.arange(0, len(ref), 3))
    assert torch.equal(sub.rows(torch.arange(len(sub))), ref[::3].float())


def test_training_on_mapped_rows_equals_training_on_the_tensor(store: Store, tmp_path: Path) -> None:
    feature_entry(store, "k", [70, 45, 61], d=16)
    f = _load_cached(store, "k", "layer")
    keep = f.concept != 2  # a kept subset, as train's seen-fraction / mapped-concept filter makes
    z = concatenated(store, "k")[keep]
    t, g = f.concept[keep], f.image[keep]
    t = torch.where(t > 2, t - 1, t)
    cv = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    s = TrainSettings(epochs=5, batch_size=16, patience=100, seed=3)
    rows = f.rows.select(keep)
    a, la, ba = train_explainer(z, t, g, cv, s)
    b, lb, bb = train_explainer(rows, t, g, cv, s)
    assert la == lb and ba == bb, "the mapped rows gave other losses"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert evaluate_loss(a, z, t, cv, s.margin) == evaluate_loss(a, rows, t, cv, s.margin)

    # interrupted and resumed on the mapped rows: the uninterrupted tensor run's result, bit for bit
    ck = tmp_path / "checkpoint.pt"

    def stop_after_2(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_explainer(rows, t, g, cv, s, checkpoint=ck, on_epoch=stop_after_2)
    c, lc, bc = train_explainer(rows, t, g, cv, s, checkpoint=ck, resume=True)
    assert lc == la and bc == ba
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED") or not Path("/proc/self/status").exists(),
                    reason="madvise(MADV_DONTNEED) and /proc are Linux's")
def test_mapped_pages_are_given_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random gathers over 32 MB of mapped rows: without giving pages back the file's pages pile
    up in the resident set; with an 8 MB budget they stay under it (give or take a block)."""
    d, n = 1024, 16384  # 2 KB rows, 32 MB
    feature_entry(store, "big", [n // 2, n // 2], d=d)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))

    def peak_growth(budget: int) -> int:
        monkeypatch.setattr(mapped, "RELEASE_BYTES", budget)
        rows = _load_cached(store, "big", "layer").rows  # fresh mappings
        base, peak = _rss_file_kb(), 0
        for s in range(0, n, 16):
            rows.rows(perm[s:s + 16])
            peak = max(peak, _rss_file_kb() - base)
        rows.release()
        assert _rss_file_kb() - base < 4096
        return peak

    kept = peak_growth(1 << 40)  # never given back
    bounded = peak_growth(8 << 20)
    assert kept > 24 * 1024, f"the gathers mapped only {kept} KB: this check cannot tell anything"
    assert bounded < 8 * 1024 + 2048, f"{bounded} KB of mapped pages stayed resident"
