"""Helpers shared by the benchmark scripts: a synthetic COCO-like dataset in a temporary store,
pre-decoded input batches, timing and plain-text tables.

The synthetic data (random shapes over photo-like backgrounds, GloVe files) is written by
:mod:`lavise_cli.testing`, the same helper the test suite uses.

Nothing here is timed itself.  Everything goes through lavise's public functions
(``register_coco``, ``register_embedding``, ``preprocess``, ``load_index``), so the benchmarks
exercise the same code paths as ``lavise download coco --from DIR`` + ``lavise preprocess``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lavise_cli.data.images import View, apply_view_image, normalize, read_rgb
from lavise_cli.data.index import DatasetIndex, load_index, preprocess
from lavise_cli.data.register import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.store import Store
from lavise_cli.testing import concept_names, embedding_words, write_coco_split, write_glove

EMBEDDING_DIM = 300


# -- the temporary store ----------------------------------------------------------------------


@contextlib.contextmanager
def temp_store(keep: bool = False) -> Iterator[tuple[Path, Store]]:
    """A fresh store (data and cache) under a temporary folder, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="lavise-bench-"))
    try:
        yield tmp, Store(root=tmp / "store")
    finally:
        if keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- a synthetic COCO-like dataset --------------------------------------------------------------


@dataclass
class BenchData:
    root: Path  # the COCO-like folder
    store: Store
    name: str
    index: DatasetIndex
    categories: list[str]
    seconds: float  # generation + registration + preprocess

    def describe(self) -> str:
        parts = []
        for split, sp in self.index.splits.items():
            parts.append(f"{split}: {len(sp.images)} images, {len(sp.pair_image)} pairs")
        return f"{self.name} ({'; '.join(parts)}; {len(self.categories)} concepts)"


def synthetic_dataset(tmp: Path, store: Store, *, splits: dict[str, int], width: int, height: int,
                      n_concepts: int = 20, masks_per_image: int = 3, name: str = "synthetic",
                      seed: int = 0) -> BenchData:
    """Generate, register (``register_coco``), embed (``register_embedding``) and ``preprocess``."""
    t0 = time.perf_counter()
    cats = concept_names(n_concepts)
    root = tmp / name
    offset = 0
    for k, (split, n) in enumerate(splits.items()):
        write_coco_split(root, split, n, width, height, cats, masks_per_image, seed=seed + 1000 * k, id_offset=offset)
        offset += n
    if not store.exists("embeddings", "bench-glove"):
        glove = write_glove(tmp / "bench-glove.txt", embedding_words(cats), dim=EMBEDDING_DIM, seed=seed)
        register_embedding(store, glove, name="bench-glove")
    register_coco(store, root, name, splits=list(splits))
    preprocess(store, name, embedding="bench-glove", seed=seed)
    ix = load_index(store, name)
    return BenchData(root=root, store=store, name=name, index=ix, categories=cats, seconds=time.perf_counter() - t0)


# -- inputs, timing, output ----------------------------------------------------------------------


def decode(path: Path, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One image exactly as lavise feeds it to the model (same decode, resize, normalisation)."""
    return normalize(apply_view_image(read_rgb(path), View(), size), tuple(mean), tuple(std))


def decoded_batches(paths: Sequence[Path], size: int, mean: Sequence[float], std: Sequence[float],
                    batch_size: int) -> list[torch.Tensor]:
    xs = [decode(p, size, mean, std) for p in paths]
    return [torch.stack(xs[s:s + batch_size]) for s in range(0, len(xs), batch_size)]


@torch.inference_mode()
def bare_forward(net: torch.nn.Module, batches: Sequence[torch.Tensor], channels_last: bool = False,
                 bf16: bool = False) -> "Timer":
    """Time ``net(x)`` over ``batches`` (inputs already in memory); channels_last converts them first;
    ``bf16`` runs the forward under CPU bf16 autocast."""
    if channels_last:
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    with Timer() as t, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in batches:
            net(x)
    return t


class Timer:
    """Wall seconds (``seconds``) and this process's CPU seconds (``cpu``, all threads) of a block.

    On a busy machine wall time exceeds CPU time / threads: compare them before trusting a figure.
    """

    def __enter__(self) -> "Timer":
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def load() -> str:
    """The machine's load average: other processes on a small machine skew every timing."""
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
            f"cpu cores {os.cpu_count()} ({cpu}), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table that survives copy-paste into notes and issues."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 100000:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)
