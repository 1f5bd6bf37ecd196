"""Streaming statistics (src/lavise_cli/passes/stats.py).

``RunningTopK`` is checked against ``torch.quantile`` on data small enough for it (uneven
batches, heavy ties, ReLU6-saturated rows, all-zero rows).  Every statistic merged from two
halves of a stream equals the one-pass result exactly, and survives a ``state_dict`` round trip
(through safetensors, as a checkpoint stores it).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lavise_cli.passes.stats import QUANTILE, FilterMoments, RunningTopK

UNEVEN = (1, 7, 300, 13, 2, 64, 5)


def _stream(x: torch.Tensor, k: int, sizes=UNEVEN) -> RunningTopK:
    r = RunningTopK(x.shape[0], k)
    i = j = 0
    while i < x.shape[1]:
        s = sizes[j % len(sizes)]
        r.add(x[:, i:i + s])
        i += s
        j += 1
    assert r.count == x.shape[1]
    return r


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 at ``t``."""
    t = t.float()
    return (torch.nextafter(t, torch.full_like(t, math.inf)) - t).abs()


def assert_exact_quantile(got: torch.Tensor, x: torch.Tensor, q: float = QUANTILE) -> None:
    """``got`` is the q-quantile of each row of ``x``: torch.quantile computed in float64 and
    rounded to float32 (within one float32 spacing), and torch.quantile in float32 within the
    error of its own float32 rank arithmetic."""
    exact = torch.quantile(x.double(), q, dim=1)
    err = (got.double() - exact).abs()
    assert (err <= _ulp(exact).double()).all(), (got, exact)
    f32 = torch.quantile(x.float(), q, dim=1)
    assert torch.allclose(got, f32, rtol=0, atol=1e-5 * max(1.0, float(x.abs().max()))), (got, f32)


def _data(seed: int, kind: str, n: int, d: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, n, generator=g)
    if kind == "ties":  # few distinct values: the quantile's neighbours are usually equal
        x = torch.randint(0, 4, (d, n), generator=g).float() * 0.25
    elif kind == "relu6":  # saturated at the cap: the top 0.5 % is all 6.0
        x = (torch.relu(x) * 8.0).clamp(max=6.0)
        x[1] = 0.0  # a dead filter: every value 0
        x[2, : n // 2] = 6.0
    elif kind == "mixed":
        x[0] = 0.0
        x[3] = x[3].round()
    return x


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["continuous", "ties", "relu6", "mixed"])
def test_running_topk_equals_torch_quantile_uneven_batches(seed: int, kind: str) -> None:
    n = [201, 544, 1000, 2831][seed]
    x = _data(seed, kind, n)
    r = _stream(x, RunningTopK.k_for(n))
    got = r.quantile(QUANTILE)
    assert got.shape == (x.shape[0],)
    assert_exact_quantile(got, x)
    if kind in ("ties", "relu6"):
        # With tied neighbours the interpolation is a no-op: bit-exact even against float32 torch.quantile.
        assert torch.equal(got, torch.quantile(x, QUANTILE, dim=1))
    if kind == "relu6":
        assert float(got[1]) == 0.0  # all-zero row
        assert float(got[2]) == 6.0  # half the row at the cap


def test_running_topk_batching_does_not_matter() -> None:
    x = _data(7, "continuous", 1500)
    k = RunningTopK.k_for(1500)
    a = _stream(x, k, sizes=(1,) * 3 + (1497,)).quantile()
    b = _stream(x, k, sizes=(1500,)).quantile()
    c = _stream(x, k, sizes=(3, 11, 1, 250)).quantile()
    assert torch.equal(a, b) and torch.equal(b, c)
    # Column order of the stream does not matter either.
    perm = torch.randperm(1500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_stream(x[:, perm], k).quantile(), b)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 199, 200, 201, 1000, 4001])
def test_k_for_is_enough(n: int) -> None:
    x = _data(n, "continuous", n, d=3)
    k = RunningTopK.k_for(n)
    assert k <= n + 1
    # The buffer never holds more than k values, yet the quantile is exact.
    r = _stream(x, k)
    assert r.values.shape[1] == min(k, n)
    assert_exact_quantile(r.quantile(), x)
    # ...and k_for is about what it takes: it grows like 0.5 % of n.
    assert k <= math.ceil((1 - QUANTILE) * n) + 2


def test_too_small_buffer_is_refused_not_wrong() -> None:
    n = 2000
    x = _data(3, "continuous", n)
    r = _stream(x, 3)  # k_for(2000) is 12
    with pytest.raises(ValueError):
        r.quantile(QUANTILE)


def test_running_topk_other_quantiles_and_errors() -> None:
    x = _data(5, "continuous", 400)
    r = _stream(x, 400)  # keeps everything: any quantile
    for q in (0.0, 0.5, 0.9, 0.995, 1.0):
        assert_exact_quantile(r.quantile(q), x, q)
    with pytest.raises(ValueError):
        RunningTopK(3, 5).quantile()
    with pytest.raises(ValueError):
        RunningTopK(3, 5).add(torch.zeros(4, 2))


def test_running_topk_state_roundtrip() -> None:
    x = _data(9, "continuous", 900)
    r = _stream(x[:, :500], RunningTopK.k_for(900))
    r2 = RunningTopK(x.shape[0], 1)
    r2.load_state_dict(r.state_dict())
    r.add(x[:, 500:])
    r2.add(x[:, 500:])
    assert torch.equal(r.quantile(), r2.quantile())
    assert_exact_quantile(r2.quantile(), x)



# ----------------------------------------------------------------------------------------------
# merge and state_dict
# ----------------------------------------------------------------------------------------------
def _roundtrip(state: dict[str, torch.Tensor], tmp: Path) -> dict[str, torch.Tensor]:
    """A state through a safetensors file, as a pass checkpoint keeps it."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return load_file(str(tmp))


@pytest.mark.parametrize("kind", ["continuous", "ties", "relu6", "mixed"])
@pytest.mark.parametrize("cut", [1, 700, 1999])
def test_running_topk_merge_of_two_halves_equals_one_pass(kind: str, cut: int) -> None:
    n = 2000
    x = _data(11, kind, n)
    k = RunningTopK.k_for(n)
    whole = _stream(x, k)
    a, b = _stream(x[:, :cut], k), _stream(x[:, cut:], k)
    merged = a.merge(b)
    assert merged.count == n
    assert torch.equal(merged.quantile(), whole.quantile())
    assert torch.equal(merged.values.sort(dim=1).values, whole.values.sort(dim=1).values)
    assert_exact_quantile(merged.quantile(), x)
    with pytest.raises(ValueError):
        RunningTopK(3, 5).merge(RunningTopK(4, 5))


def test_filter_moments_merge_of_two_halves_equals_one_pass() -> None:
    g = torch.Generator().manual_seed(0)
    # values on a 1/1024 grid (as fp16 activations are): float64 sums them without rounding
    x = torch.randint(-8192, 8192, (7, 3001), generator=g).float() / 1024
    x[4] = 0.0
    whole, a, b = FilterMoments(7), FilterMoments(7), FilterMoments(7)
    for s in range(0, 3001, 97):
        whole.update(x[:, s:s + 97])
    a.update(x[:, :1234])
    b.update(x[:, 1234:2000])
    b.update(x[:, 2000:])
    merged = a.merge(b)
    assert merged.count == whole.count == 3001
    assert torch.equal(merged.max, whole.max) and torch.equal(merged.max, x.amax(1))
    assert torch.equal(merged.sum, whole.sum) and torch.equal(merged.mean, whole.mean)
    assert torch.equal(merged.mean, x.double().mean(1).float())
    # arbitrary floats: the same to float64 rounding
    y = torch.randn(5, 999, generator=g)
    w, p, q = FilterMoments(5), FilterMoments(5), FilterMoments(5)
    w.update(y)
    p.update(y[:, :400])
    q.update(y[:, 400:])
    torch.testing.assert_close(p.merge(q).sum, w.sum, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        FilterMoments(3).update(torch.zeros(4, 2))


def test_state_dict_round_trips(tmp_path: Path) -> None:
    x = _data(9, "continuous", 900)
    topk, moments = RunningTopK(6, RunningTopK.k_for(900)), FilterMoments(6)
    topk.update(x[:, :500])
    moments.update(x[:, :500])
    t2, m2 = RunningTopK(1, 1), FilterMoments(1)
    t2.load_state_dict(_roundtrip(topk.state_dict(), tmp_path / "t.safetensors"))
    m2.load_state_dict(_roundtrip(moments.state_dict(), tmp_path / "m.safetensors"))
    for s in (topk, t2):
        s.update(x[:, 500:])
    for s in (moments, m2):
        s.update(x[:, 500:])
    assert (t2.d, t2.k, t2.count) == (topk.d, topk.k, topk.count) == (6, topk.k, 900)
    assert torch.equal(t2.quantile(), topk.quantile())
    assert_exact_quantile(t2.quantile(), x)
    assert m2.count == moments.count and torch.equal(m2.sum, moments.sum) and torch.equal(m2.max, moments.max)
