"""The one runner of every pass of the frozen backbone over images.

A pass is a :class:`~torch.utils.data.Dataset` of :class:`Item` (a prepared image, or several
rows of one), a ``compute`` (what to make of one batch's captured layer maps) and ``sinks``
(what to keep of it: shards, statistics).  :func:`run_pass` owns everything else: the loader
and its prefetch, the hooks with early stop (:func:`lavise_cli.models.capture`), device,
memory layout and precision (:mod:`lavise_cli.runtime`), progress, checkpoints and resume, the
lock of the pass's work folder, and publishing its store entries.

Work folder (``StoreOutput``):

- resumable (``resumable=True``): ``<kind>/.partial-<key>/`` with ``state.json``
  (``next``, ``shards``, ``skipped``, ``keys``) and the sinks' shards; a checkpoint is taken
  whenever a sink is due (every sink flushes, then the state is written atomically), so an
  interrupted pass continues at ``next``.  The folder's lock (:meth:`Store.lock` on its name)
  makes a concurrent identical pass wait, then reuse what this one published.
- otherwise: the temporary folder of the one entry (:meth:`Store.writing`), under the lock
  ``.pass-<key>``; an interrupted pass starts again.

Ranks: ``rank``/``world`` give each of ``world`` processes a contiguous block of the items;
shards and state then carry the rank in their names (``z-r001-00003.safetensors``,
``state-r001.json``) so that the blocks' shards sort in item order.  A resumable pass publishes
when every rank has finished (the last one to finish publishes); today the ranks share the
work folder's lock, so they run one after the other — a later change may let them overlap.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data.loader import image_batches
from ..layers import capture, forward_to
from ..runtime import TRIM_EVERY, autocast, backbone, backbone_input, default_workers, resolve_precision, trim_memory
from ..store import Store, atomic_write_json, temp_sibling

STATE = "state.json"


@dataclass
class Item:
    """One prepared element of a pass: ``x`` (rows, 3, S, S) backbone input, or None when the
    image could not be read (it is then skipped and recorded); ``index`` names it for the state's
    ``skipped`` list; ``data`` is the compute's own (masks, concepts, pair numbers...)."""

    index: int
    x: torch.Tensor | None
    data: Any = None


def collate(items: list[Item]) -> list[Item]:
    return items


class Compute(Protocol):
    """What to make of a batch: ``(good items, {layer: captured map}) -> output`` for the sinks."""

    def __call__(self, items: list[Item], maps: Mapping[str, torch.Tensor]) -> Any: ...


class Sink:
    """What a pass keeps of the computed outputs (the base keeps nothing).

    ``add`` takes each batch's output; ``due`` asks for a checkpoint (or, in a pass that is not
    resumable, a flush); ``flush`` writes what is buffered into the work folder (all of it in a
    resumable pass; ``final`` at the end); ``state_dict``/``load_state_dict`` carry what a
    checkpoint must keep beyond the written shards (tensors).
    """

    def add(self, out: Any) -> None:
        pass

    def due(self) -> bool:
        return False

    def flush(self, folder: Path, shards: "Shards", final: bool) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


@dataclass
class Shards:
    """Names of shard files: ``<prefix>-00003.safetensors`` (one process) or
    ``<prefix>-r001-00003.safetensors`` (rank 1 of several); ``index`` is the checkpoint count."""

    index: int = 0
    rank: int = 0
    world: int = 1

    def name(self, prefix: str, index: int | None = None) -> str:
        i = self.index if index is None else index
        return f"{prefix}-{i:05d}.safetensors" if self.world == 1 else f"{prefix}-r{self.rank:03d}-{i:05d}.safetensors"


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors shard atomically (a temporary sibling, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@dataclass
class Publication:
    """One store entry a pass publishes: its key, inputs, and (from the finished pass) settings
    and extra manifest fields; ``folder`` is where its files are in a resumable work folder."""

    key: str
    inputs: dict[str, Any]
    settings: Callable[["PassResult"], dict[str, Any]]
    extra: Callable[["PassResult"], dict[str, Any]] = lambda _r: {}
    folder: str = ""


@dataclass
class StoreOutput:
    """Where a pass's results go: ``entries`` of ``kind``, from the work folder named ``work``."""

    store: Store
    kind: str
    work: str
    entries: list[Publication]
    resumable: bool = True


@dataclass
class PassResult:
    """``ran``: False when every entry already existed (or a concurrent pass made them)."""

    ran: bool
    seconds: float = 0.0
    skipped: list[int] = field(default_factory=list)
    published: bool = False


def rank_block(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``n`` items that ``rank`` of ``world`` processes takes."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    return range(n * rank // world, n * (rank + 1) // world)


def run_pass(
    images: Dataset,
    model: nn.Module,
    layers: Sequence[str],
    compute: Compute,
    sinks: Sequence[Sink],
    *,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    progress: Any = None,
    label: str = "pass",
    unit: str = "img",
    weights: Sequence[int] | None = None,
    output: StoreOutput | None = None,
    rank: int = 0,
    world: int = 1,
) -> PassResult:
    """Run ``model`` to ``layers`` over ``images``, hand each batch's maps to ``compute`` and its
    output to every sink; with ``output``, lock, checkpoint, resume and publish (see the module).

    ``weights`` (one per item) size the progress bar when items are not one unit each.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if output is None:
        return _loop(images, model, layers, compute, sinks, device, precision, batch_size, workers, progress, label,
                     unit, weights, None, None, Shards(0, rank, world))
    st, kind = output.store, output.kind
    if all(st.exists(kind, e.key) for e in output.entries):
        return PassResult(ran=False)
    with st.lock(kind, output.work):
        if any(st.exists(kind, e.key) for e in output.entries):
            return PassResult(ran=False)  # a concurrent identical pass made (some of) them while this one waited
        if output.resumable:
            return _resumable(images, model, layers, compute, sinks, device, precision, batch_size, workers, progress,
                              label, unit, weights, output, rank, world)
        if world != 1:
            raise ValueError("a pass that is not resumable runs as one process (world=1)")
        (pub,) = output.entries
        settings: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        # The manifest is written when `writing` exits, from these dicts as they are then.
        with st.writing(kind, pub.key, inputs=pub.inputs, settings=settings, extra=extra) as tmp:
            result = _loop(images, model, layers, compute, sinks, device, precision, batch_size, workers, progress,
                           label, unit, weights, tmp, None, Shards())
            settings.update(pub.settings(result))
            extra.update(pub.extra(result))
        result.published = True
        return result


def _resumable(images: Dataset, model: nn.Module, layers: Sequence[str], compute: Compute, sinks: Sequence[Sink],
               device: torch.device, precision: str, batch_size: int, workers: int | None, progress: Any, label: str,
               unit: str, weights: Sequence[int] | None, output: StoreOutput, rank: int, world: int) -> PassResult:
    st, kind = output.store, output.kind
    folder = st.kind_dir(kind) / output.work
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(e.key for e in output.entries)
    suffix = "" if world == 1 else f"-r{rank:03d}"
    state_path = folder / (STATE if world == 1 else f"state{suffix}.json")
    if world != 1 and not (folder / STATE).exists():
        atomic_write_json(folder / STATE, {"keys": keys, "world": world})  # what the sweep reads
    state = json.loads(state_path.read_text()) if state_path.exists() else \
        {"next": 0, "shards": 0, "skipped": [], "keys": keys}
    for i, sink in enumerate(sinks):
        saved = folder / f"sink-{i}{suffix}.safetensors"
        if saved.exists():
            sink.load_state_dict(load_file(str(saved)))
    result = _loop(images, model, layers, compute, sinks, device, precision, batch_size, workers, progress, label,
                   unit, weights, folder, (state, state_path, suffix), Shards(state["shards"], rank, world))
    if world != 1:
        state["done"] = True
        atomic_write_json(state_path, state)
        states = [folder / f"state-r{r:03d}.json" for r in range(world)]
        if not all(p.exists() and json.loads(p.read_text()).get("done") for p in states):
            return result  # another rank's part is still to run; the last rank publishes
        result.skipped = sorted({i for p in states for i in json.loads(p.read_text())["skipped"]})
    for pub in output.entries:
        src = folder / pub.folder
        with st.writing(kind, pub.key, inputs=pub.inputs, settings=pub.settings(result), extra=pub.extra(result)) \
                as tmp:
            if src.exists():
                for p in sorted(src.glob("*.safetensors")):
                    if not p.name.startswith("sink-"):
                        shutil.move(str(p), tmp / p.name)
    shutil.rmtree(folder, ignore_errors=True)
    result.published = True
    return result


def _loop(images: Dataset, model: nn.Module, layers: Sequence[str], compute: Compute, sinks: Sequence[Sink],
          device: torch.device, precision: str, batch_size: int, workers: int | None, progress: Any, label: str,
          unit: str, weights: Sequence[int] | None, folder: Path | None,
          resume: tuple[dict[str, Any], Path, str] | None, shards: Shards) -> PassResult:
    """The pass itself: batches of this rank's items from ``state['next']`` on; checkpoints when resumable."""
    state = resume[0] if resume is not None else {"next": 0, "skipped": []}
    block = rank_block(len(images), shards.rank, shards.world)  # type: ignore[arg-type]
    todo = range(block.start + state["next"], block.stop)
    weight = (lambda i: int(weights[i])) if weights is not None else (lambda _i: 1)
    task = progress.add_task(label, total=sum(weight(i) for i in block),
                             completed=sum(weight(i) for i in block[:state["next"]]), unit=unit) \
        if progress is not None else None
    if workers is None:
        workers = default_workers(device)
    net = backbone(model, device)
    done = state["next"]
    t0 = time.perf_counter()

    def checkpoint(final: bool) -> None:
        for sink in sinks:
            sink.flush(folder, shards, final)  # type: ignore[arg-type]
        if resume is None:
            return
        _, state_path, suffix = resume
        for i, sink in enumerate(sinks):
            s = sink.state_dict()
            if s:
                save_shard(s, state_path.parent / f"sink-{i}{suffix}.safetensors")
        shards.index += 1
        state["shards"] = shards.index
        state["next"] = done
        atomic_write_json(state_path, state)

    batches = image_batches(Subset(images, todo), batch_size, workers, device, collate)
    n_batches = 0
    with torch.inference_mode(), capture(net, layers, stop=True) as feats:
        for batch in batches:
            good = [it for it in batch if it.x is not None]
            state["skipped"].extend(int(it.index) for it in batch if it.x is None)
            if good:
                x = backbone_input(torch.cat([it.x for it in good]), device)  # type: ignore[misc]
                with autocast(device, precision):
                    forward_to(net, x, feats)
                out = compute(good, feats)
                for sink in sinks:
                    sink.add(out)
            if task is not None:
                progress.advance(task, sum(weight(block.start + j) for j in range(done, done + len(batch))))
            done += len(batch)
            if any(sink.due() for sink in sinks):
                checkpoint(final=False)
            n_batches += 1
            if n_batches % TRIM_EVERY == 0:
                trim_memory()  # freed image and map buffers go back to the system: memory flat in images
    checkpoint(final=True)
    return PassResult(ran=True, seconds=time.perf_counter() - t0, skipped=sorted(set(state["skipped"])))
