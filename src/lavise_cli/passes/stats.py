"""Streaming statistics of a pass, mergeable across the parts of a split pass.

Each has ``update`` (a batch), ``merge(other)`` (the same statistic over another part of the
stream, e.g. another rank's images) and ``state_dict``/``load_state_dict`` (tensors only, so a
checkpoint can save them as safetensors).

- :class:`RunningTopK`: the ``k`` largest values per filter, for an exact upper quantile;
- :class:`FilterMoments`: per filter, the count, float64 sum (so the mean) and maximum.

(Per-image statistics are not held: the target pass writes them as shards beside its maps.)
"""

from __future__ import annotations

import math

import torch

QUANTILE = 0.995


class RunningTopK:
    """The ``k`` largest values per row seen so far, for an exact streaming upper quantile.

    ``update(x)`` takes ``(d, m)`` values (any ``m``, batches of any size); ``quantile(q)`` returns
    exactly what ``torch.quantile(all_values, q, dim=1)`` (linear interpolation) would, provided
    ``k >= n - floor((n - 1) * q)`` for the total count ``n`` — see :meth:`k_for`.  Merging two
    parts keeps the ``k`` largest of both, so it equals the one-pass result exactly.
    """

    def __init__(self, d: int, k: int):
        self.d, self.k = d, max(1, int(k))
        self.values = torch.full((d, 0), float("-inf"))
        self.count = 0

    @staticmethod
    def k_for(n: int, q: float = QUANTILE) -> int:
        return int(n - math.floor((n - 1) * q)) + 1

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().cpu()
        if x.shape[0] != self.d:
            raise ValueError(f"expected {self.d} rows, got {x.shape[0]}")
        self.count += x.shape[1]
        self._keep(x)

    add = update  # the older name

    def _keep(self, x: torch.Tensor) -> None:
        both = torch.cat([self.values, x], dim=1)
        k = min(self.k, both.shape[1])
        self.values = both.topk(k, dim=1, sorted=False).values

    def merge(self, other: "RunningTopK") -> "RunningTopK":
        if other.d != self.d:
            raise ValueError(f"cannot merge {other.d} rows into {self.d}")
        self.k = max(self.k, other.k)
        self.count += other.count
        self._keep(other.values)
        return self

    def quantile(self, q: float = QUANTILE) -> torch.Tensor:
        n = self.count
        if n == 0:
            raise ValueError("no values added")
        pos = (n - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        need = n - lo  # descending rank of the lower neighbour, counted from 1
        if need > self.values.shape[1]:
            raise ValueError(f"top-k buffer of {self.values.shape[1]} is too small for q={q} over {n} values")
        desc = self.values.sort(dim=1, descending=True).values
        v_lo = desc[:, n - 1 - lo]
        v_hi = desc[:, n - 1 - hi]
        return v_lo + (pos - lo) * (v_hi - v_lo)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "count": torch.tensor(self.count), "k": torch.tensor(self.k)}

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.values, self.count, self.k = s["values"], int(s["count"]), int(s["k"])
        self.d = int(self.values.shape[0])


class FilterMoments:
    """Per filter (row): how many values, their float64 sum (so the mean) and their maximum.

    Merging adds counts and sums and takes the larger maximum: the count and maximum equal the
    one-pass result exactly; the sum (and mean) exactly whenever float64 adds the parts without
    rounding (e.g. fp16/bf16 activations, far below 2**29 of them), else to float64 rounding.
    """

    def __init__(self, d: int):
        self.d = d
        self.count = 0
        self.sum = torch.zeros(d, dtype=torch.float64)
        self.max = torch.full((d,), float("-inf"))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().cpu()
        if x.shape[0] != self.d:
            raise ValueError(f"expected {self.d} rows, got {x.shape[0]}")
        if x.shape[1] == 0:
            return
        self.count += int(x.shape[1])
        self.sum += x.double().sum(1)
        self.max = torch.maximum(self.max, x.float().amax(1))

    def merge(self, other: "FilterMoments") -> "FilterMoments":
        if other.d != self.d:
            raise ValueError(f"cannot merge {other.d} rows into {self.d}")
        self.count += other.count
        self.sum += other.sum
        self.max = torch.maximum(self.max, other.max)
        return self

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor(self.count), "sum": self.sum, "max": self.max}

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.count, self.sum, self.max = int(s["count"]), s["sum"], s["max"]
        self.d = int(self.sum.shape[0])
