"""The one runner of every pass of the frozen backbone over images.

A pass is a :class:`~torch.utils.data.Dataset` of :class:`Item` (a prepared image, or several
rows of one), a ``compute`` (what to make of one batch's captured layer maps) and ``sinks``
(what to keep of it: shards, statistics).  :func:`run_pass` owns everything else: the loader
and its prefetch, the hooks with early stop (:func:`lavise_cli.models.capture`), device,
memory layout and precision (:mod:`lavise_cli.runtime`), progress, checkpoints and resume, the
lock of the pass's work folder, and publishing its store entries.

Work folder (``StoreOutput``): ``<kind>/.partial-<key>/``, the pass split in **pieces**
(contiguous blocks of items, each with its state, shards and sinks' checkpoints): planned under
the folder's lock, run by each process holding only its pieces' locks, published under the
folder's lock once every piece is done; the folder, its pieces and their files are
:mod:`lavise_cli.passes.pieces` (:class:`~lavise_cli.passes.pieces.WorkFolder`).

Ranks: under ``torchrun`` (:mod:`lavise_cli.distributed`) every rank calls :func:`run_pass`
with the same pass; their control messages are gathered objects, so a rank's failure stops all.
``rank``/``world`` (explicit) run one share of the pass as ``--shard`` does.  A pass without a
store output is not shared: it runs whole in the process that calls it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .. import distributed
from ..data.loader import image_batches
from ..distributed import Context
from ..errors import ShareDone
from ..layers import capture, forward_to
from ..runtime import TRIM_EVERY, autocast, backbone, backbone_input, default_workers, resolve_precision, trim_memory
from ..store import Store, atomic_write_json
from .pieces import (  # noqa: F401  (their home was here: importable from lavise_cli.passes.runner as before)
    PIECE_SHARD, STATE, Shards, WorkFolder, aligned_block, piece_tag, rank_block, save_shard, split_ranges)


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

    def publish(self, folder: Path, parts: list[dict[str, torch.Tensor]]) -> None:
        """Once every piece of a stored pass is done, in the process that publishes it: ``parts``
        are the pieces' final :meth:`state_dict` in item order (from every rank, share or earlier
        run); write what the entry needs beyond the shards (e.g. merged statistics) into ``folder``."""


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
    context: Context | None = None,
) -> PassResult:
    """Run ``model`` to ``layers`` over ``images``, hand each batch's maps to ``compute`` and its
    output to every sink; with ``output``, lock, checkpoint, resume and publish (see the module).

    ``weights`` (one per item) size the progress bar when items are not one unit each.
    ``rank``/``world`` (other than 0/1): run only that share of a stored pass (as ``--shard``);
    else ``context`` (default: this process's, :func:`lavise_cli.distributed.current`) says
    whether the ranks of a torchrun job share the pass.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if output is None:
        return _loop(images, model, layers, compute, sinks, device, precision, batch_size, workers, progress, label,
                     unit, weights, None, None, Shards(0, rank, world), rank_block(len(images), rank, world))  # type: ignore[arg-type]
    st, kind = output.store, output.kind
    if all(st.exists(kind, e.key) for e in output.entries):
        return PassResult(ran=False)
    if world != 1 or rank != 0:
        ctx = Context(rank=rank, world=world)
    else:
        ctx = context if context is not None else distributed.current()
    run = _Run(images, model, layers, compute, list(sinks), device, precision, batch_size, workers, progress, label,
               unit, weights, output)
    return run.grouped(ctx) if ctx.group else run.alone(ctx)


class _Run:
    """One stored pass: its pieces planned under the work folder's lock, run, then published."""

    def __init__(self, images: Dataset, model: nn.Module, layers: Sequence[str], compute: Compute,
                 sinks: list[Sink], device: torch.device, precision: str, batch_size: int, workers: int | None,
                 progress: Any, label: str, unit: str, weights: Sequence[int] | None, output: StoreOutput):
        self.images, self.model, self.layers, self.compute, self.sinks = images, model, layers, compute, sinks
        self.device, self.precision, self.batch_size, self.workers = device, precision, batch_size, workers
        self.progress, self.label, self.unit, self.weights, self.output = progress, label, unit, weights, output
        self.st, self.kind = output.store, output.kind
        self.n = len(images)  # type: ignore[arg-type]
        self.work = WorkFolder(self.st, self.kind, output.work, sorted(e.key for e in output.entries), self.n)
        self.folder = self.work.path
        self.fresh = [s.state_dict() for s in sinks]  # a sink's state before any item
        self.dirty = False  # the sinks hold a piece's items
        self.seconds = 0.0
        self.skipped: list[int] = []

    # -- one process (alone, or one --shard share) ------------------------------------------------
    def alone(self, ctx: Context) -> PassResult:
        share = aligned_block(self.n, ctx.rank, ctx.world, self.batch_size) if ctx.world > 1 else None
        ran = False
        while True:
            with contextlib.ExitStack() as held:
                with self.work.lock():
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        return PassResult(ran=False)  # a concurrent identical pass made (some of) them
                    mine, busy, gaps = self.work.plan(share, in_place=True)
                    todo = mine + [self.work.new_piece(g.start, g.stop) for g in gaps]
                    if not todo and not busy and (share is None or self.work.complete()):
                        return self.publish(ran)
                    for s in todo:
                        held.enter_context(self.work.piece_lock(s["start"]))
                self.run_pieces(todo)
                ran = ran or bool(todo)
                # publish (or not) under the folder's lock, taken before the pieces' locks go
                with self.work.lock():
                    held.close()
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        return PassResult(ran=False)
                    if self.work.complete():
                        return self.publish(ran)
                    if share is not None:  # this share is done; others are still to run
                        return PassResult(ran=True, seconds=self.seconds, skipped=sorted(set(self.skipped)))
            for start in busy:  # wait for the pieces another live process runs, then plan again
                with self.work.piece_lock(start):
                    pass

    # -- the ranks of a torchrun job ---------------------------------------------------------------
    def grouped(self, ctx: Context) -> PassResult:
        while True:
            with contextlib.ExitStack() as folder_lock, contextlib.ExitStack() as held:
                plan: dict[str, Any] = {}
                if ctx.rank == 0:
                    folder_lock.enter_context(self.work.lock())
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        plan = {"exists": True}
                    else:
                        _mine, busy, gaps = self.work.plan(None, in_place=False)
                        if not gaps and busy:
                            plan = {"wait": busy}
                        else:
                            plan = {"assign": [[(r.start, r.stop) for r in split_ranges(gaps, rank, ctx.world, self.batch_size)]
                                               for rank in range(ctx.world)]}
                            for rng in plan["assign"]:
                                for a, b in rng:
                                    self.work.new_piece(a, b)
                plan = distributed.gather(plan)[0]
                if plan.get("exists"):
                    return PassResult(ran=False)
                if "wait" in plan:
                    folder_lock.close()
                    if ctx.rank == 0:
                        for start in plan["wait"]:
                            with self.work.piece_lock(start):
                                pass
                    distributed.gather("waited")
                    continue
                mine = [json.loads(self.work.state_path(a).read_text()) for a, _b in plan["assign"][ctx.rank]]
                for s in mine:
                    held.enter_context(self.work.piece_lock(s["start"]))
                distributed.gather("claimed")  # every rank holds its pieces: the plan may be seen now
                folder_lock.close()
                self.run_pieces(mine)
                held.close()
            distributed.gather("ran")  # every rank's pieces are done (or a rank's error stops all)
            result = PassResult(ran=True, seconds=self.seconds, skipped=sorted(set(self.skipped)))
            status = None
            if ctx.rank == 0:
                with self.work.lock():
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        status = "exists"  # a concurrent process published the pass
                    elif self.work.complete():
                        result = self.publish(True)
                        status = "published"
                    else:
                        status = "again"  # pieces another process holds or left: plan again
            status = distributed.gather(status)[0]
            if status == "again":
                continue
            result.published = True
            return result

    # -- running pieces, publishing (the entries' files: WorkFolder.publish) ----------------------
    def run_pieces(self, todo: list[dict[str, Any]]) -> None:
        if not todo:
            return
        weight = (lambda i: int(self.weights[i])) if self.weights is not None else (lambda _i: 1)
        task = self.progress.add_task(
            self.label, total=sum(weight(i) for s in todo for i in range(s["start"], s["stop"])),
            completed=sum(weight(i) for s in todo for i in range(s["start"], s["start"] + s["next"])),
            unit=self.unit) if self.progress is not None else None
        for s in todo:
            tag = piece_tag(s["start"])
            for i, sink in enumerate(self.sinks):
                saved = self.work.sink_state(i, s) if s["next"] > 0 else None
                if saved is not None:
                    sink.load_state_dict(saved)
                elif self.dirty:
                    sink.load_state_dict({k: v.clone() for k, v in self.fresh[i].items()})
            self.dirty = True
            result = _loop(self.images, self.model, self.layers, self.compute, self.sinks, self.device, self.precision,
                           self.batch_size, self.workers, None, self.label, self.unit, self.weights, self.folder,
                           (s, self.work.state_path(s["start"]), f"-{tag}"),
                           Shards(s["shards"], piece=s["start"]), range(s["start"], s["stop"]),
                           task=(self.progress, task) if task is not None else None)
            s["done"] = True
            s["seconds"] = float(s.get("seconds", 0.0)) + result.seconds
            atomic_write_json(self.work.state_path(s["start"]), s)
            self.seconds += result.seconds
            self.skipped += result.skipped

    def publish(self, ran: bool) -> PassResult:
        """Under the work folder's lock, every piece done: merge the sinks' states, publish the entries."""
        pieces = self.work.pieces()
        result = PassResult(ran=ran, seconds=sum(float(s.get("seconds", 0.0)) for s in pieces),
                            skipped=sorted({int(i) for s in pieces for i in s["skipped"]}))
        for i, sink in enumerate(self.sinks):
            parts = [part for s in pieces if (part := self.work.sink_state(i, s)) is not None]
            sink.publish(self.folder, parts)
        self.work.publish(self.output.entries, result, pieces)
        result.published = True
        return result


def _loop(images: Dataset, model: nn.Module, layers: Sequence[str], compute: Compute, sinks: Sequence[Sink],
          device: torch.device, precision: str, batch_size: int, workers: int | None, progress: Any, label: str,
          unit: str, weights: Sequence[int] | None, folder: Path | None,
          resume: tuple[dict[str, Any], Path, str] | None, shards: Shards, block: range,
          task: tuple[Any, Any] | None = None) -> PassResult:
    """The pass itself: batches of the items of ``block`` from ``state['next']`` on; checkpoints when resumable."""
    state = resume[0] if resume is not None else {"next": 0, "skipped": []}
    todo = range(block.start + state["next"], block.stop)
    weight = (lambda i: int(weights[i])) if weights is not None else (lambda _i: 1)
    if task is None and progress is not None:
        task = (progress, progress.add_task(label, total=sum(weight(i) for i in block),
                                            completed=sum(weight(i) for i in block[:state["next"]]), unit=unit))
    if workers is None:
        workers = default_workers(device)
    net = backbone(model, device)
    done = state["next"]
    skipped: list[int] = []
    t0 = time.perf_counter()

    def checkpoint(final: bool) -> None:
        for sink in sinks:
            sink.flush(folder, shards, final)  # type: ignore[arg-type]
        if resume is None:
            return
        _, state_path, suffix = resume
        # the sinks' states are named by checkpoint: the piece's state says which one is current
        for i, sink in enumerate(sinks):
            s = sink.state_dict()
            if s:
                save_shard(s, state_path.parent / f"sink-{i}{suffix}-{shards.index:05d}.safetensors")
        shards.index += 1
        state["shards"] = shards.index
        state["next"] = done
        atomic_write_json(state_path, state)
        for i in range(len(sinks)):
            (state_path.parent / f"sink-{i}{suffix}-{shards.index - 2:05d}.safetensors").unlink(missing_ok=True)

    batches = image_batches(Subset(images, todo), batch_size, workers, device, collate)
    n_batches = 0
    with torch.inference_mode(), capture(net, layers, stop=True) as feats:
        for batch in batches:
            good = [it for it in batch if it.x is not None]
            bad = [int(it.index) for it in batch if it.x is None]
            state["skipped"].extend(bad)
            skipped.extend(bad)
            if good:
                x = backbone_input(torch.cat([it.x for it in good]), device)  # type: ignore[misc]
                with autocast(device, precision):
                    forward_to(net, x, feats)
                out = compute(good, feats)
                for sink in sinks:
                    sink.add(out)
            if task is not None:
                task[0].advance(task[1], sum(weight(block.start + j) for j in range(done, done + len(batch))))
            done += len(batch)
            if any(sink.due() for sink in sinks):
                checkpoint(final=False)
            n_batches += 1
            if n_batches % TRIM_EVERY == 0:
                trim_memory()  # freed image and map buffers go back to the system: memory flat in images
    checkpoint(final=True)
    return PassResult(ran=True, seconds=time.perf_counter() - t0, skipped=sorted(set(skipped)))


def share_done(result: PassResult, what: str) -> None:
    """After a stored pass that did not publish: under ``--shard I/N`` this process's share is
    done and the rest is left to the other shares (:class:`~lavise_cli.errors.ShareDone`)."""
    ctx = distributed.current()
    if result.ran and not result.published and ctx.world > 1 and not ctx.group:
        raise ShareDone(f"{what}: share {ctx.rank}/{ctx.world} is done; the pass completes when every share "
                        "has run (the last one to finish, or any later lavise command, publishes it and goes on)")
