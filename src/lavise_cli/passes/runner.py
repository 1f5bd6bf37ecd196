"""The one runner of every pass of the frozen backbone over images.

A pass is a :class:`~torch.utils.data.Dataset` of :class:`Item` (a prepared image, or several
rows of one), a ``compute`` (what to make of one batch's captured layer maps) and ``sinks``
(what to keep of it: shards, statistics).  :func:`run_pass` owns everything else: the loader
and its prefetch, the hooks with early stop (:func:`lavise_cli.models.capture`), device,
memory layout and precision (:mod:`lavise_cli.runtime`), progress, checkpoints and resume, the
lock of the pass's work folder, and publishing its store entries.

Work folder (``StoreOutput``): ``<kind>/.partial-<key>/``, the pass split in **pieces**, each a
contiguous block of items with its own state ``state-p<start>.json`` (``start``, ``stop``,
``next``, ``shards``, ``skipped``, ``done``, ``seconds``), its shards
(``z-p000000120-00003.safetensors``) and its sinks' checkpoint state
(``sink-<i>-p<start>-<checkpoint>.safetensors``); ``state.json`` names the entries (``keys``) for the sweep.
A checkpoint is taken whenever a sink is due (every sink flushes, then the piece's state is
written atomically), so an interrupted piece continues at ``next``.

- **Plan** (under the folder's lock, :meth:`Store.lock` on its name): pieces already done are
  kept; a piece another live process is running (its own lock ``<work>-p<start>`` is held) is
  left to it; an unfinished piece nobody runs is continued where it stopped (one process) or cut
  there (torchrun ranks, a share it does not fit in); the items no piece covers become new pieces:
  all of them for one process, this share's for ``--shard I/N``, a balanced split of them across
  the ranks of a torchrun job, in whole batches (:func:`aligned_block`: each batch holds the same
  items whatever the number of processes, so the results do too) (rank 0 plans, every rank takes its pieces' locks, then the folder's
  lock is let go).  So a pass resumes from the shards already written whatever the number of
  processes that wrote them or run it now.
- **Run**: each process runs its pieces holding only their locks, so ranks and shares overlap.
- **Publish** (under the folder's lock, once every piece is done: rank 0 after every rank has
  finished, or whichever process finds the last piece done): each sink's :meth:`Sink.publish`
  gets every piece's final state in item order (merged statistics), the pieces' shards are
  renamed ``<prefix>-NNNNN`` in item order into the entry (:meth:`Store.writing`), and the work
  folder goes.  A concurrent identical pass that finds the entries published uses them.

Ranks: under ``torchrun`` (:mod:`lavise_cli.distributed`) every rank calls :func:`run_pass`
with the same pass; their control messages are gathered objects, so a rank's failure stops all.
``rank``/``world`` (explicit) run one share of the pass as ``--shard`` does.  A pass without a
store output is not shared: it runs whole in the process that calls it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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

from .. import distributed
from ..data.loader import image_batches
from ..distributed import Context
from ..errors import ShareDone
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

    def publish(self, folder: Path, parts: list[dict[str, torch.Tensor]]) -> None:
        """Once every piece of a stored pass is done, in the process that publishes it: ``parts``
        are the pieces' final :meth:`state_dict` in item order (from every rank, share or earlier
        run); write what the entry needs beyond the shards (e.g. merged statistics) into ``folder``."""


@dataclass
class Shards:
    """Names of shard files: ``<prefix>-00003.safetensors`` (a pass without pieces),
    ``<prefix>-p000000120-00003.safetensors`` (the piece of a stored pass that starts at item 120;
    published as ``<prefix>-NNNNN`` in item order) or ``<prefix>-r001-00003.safetensors`` (the older
    rank names); ``index`` is the checkpoint count."""

    index: int = 0
    rank: int = 0
    world: int = 1
    piece: int | None = None

    def name(self, prefix: str, index: int | None = None) -> str:
        i = self.index if index is None else index
        if self.piece is not None:
            return f"{prefix}-{piece_tag(self.piece)}-{i:05d}.safetensors"
        return f"{prefix}-{i:05d}.safetensors" if self.world == 1 else f"{prefix}-r{self.rank:03d}-{i:05d}.safetensors"


def piece_tag(start: int) -> str:
    """The name of the piece of a pass that starts at item ``start``: ``p000000120``."""
    return f"p{start:09d}"


PIECE_SHARD = re.compile(r"^(?P<prefix>.+)-p(?P<start>\d{9})-(?P<index>\d{5})\.safetensors$")


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
        self.folder = self.st.kind_dir(self.kind) / output.work
        self.n = len(images)  # type: ignore[arg-type]
        self.keys = sorted(e.key for e in output.entries)
        self.fresh = [s.state_dict() for s in sinks]  # a sink's state before any item
        self.dirty = False  # the sinks hold a piece's items
        self.seconds = 0.0
        self.skipped: list[int] = []

    # -- the pieces on disk --------------------------------------------------------------------
    def state_path(self, start: int) -> Path:
        return self.folder / f"state-{piece_tag(start)}.json"

    def pieces(self) -> list[dict[str, Any]]:
        out = []
        for p in self.folder.glob("state-p*.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda s: s["start"])

    def piece_lock(self, start: int) -> Any:
        return self.st.lock(self.kind, f"{self.output.work}-{piece_tag(start)}")

    def busy(self, start: int) -> bool:
        with self.st.try_lock(self.kind, f"{self.output.work}-{piece_tag(start)}") as free:
            return not free

    def drop_shards(self, start: int, keep: int) -> None:
        """Remove the piece's shard and sink-state files from checkpoint ``keep`` on (written by a
        checkpoint that an interrupt kept from recording them in the piece's state)."""
        for p in list(self.folder.rglob(f"*-{piece_tag(start)}-*.safetensors")):
            m = PIECE_SHARD.match(p.name)
            if m and int(m["index"]) >= keep:
                p.unlink(missing_ok=True)

    def sink_state(self, i: int, s: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Sink ``i``'s state at the piece's last recorded checkpoint (None: it kept none)."""
        if s["shards"] < 1:
            return None
        path = self.folder / f"sink-{i}-{piece_tag(s['start'])}-{s['shards'] - 1:05d}.safetensors"
        return load_file(str(path)) if path.exists() else None

    def new_piece(self, start: int, stop: int) -> dict[str, Any]:
        s = {"start": start, "stop": stop, "next": 0, "shards": 0, "skipped": [], "done": False, "seconds": 0.0}
        self.drop_shards(start, 0)  # what a piece of that name left before it recorded anything
        atomic_write_json(self.state_path(start), s)
        return s

    def plan(self, share: range | None, in_place: bool) -> tuple[list[dict[str, Any]], list[int], list[range]]:
        """Under the work folder's lock: (unfinished pieces this process continues where they
        stopped, starts of pieces another live process is running, ranges no piece covers).

        An unfinished piece nobody runs is continued in place when ``in_place`` and it lies in
        ``share``; otherwise it is cut where it stopped (its done part kept, the rest uncovered)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads((self.folder / STATE).read_text())
        except (OSError, ValueError):
            known = None
        if known != {"keys": self.keys, "items": self.n}:  # none yet, or an older layout: start afresh
            for p in list(self.folder.iterdir()):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            atomic_write_json(self.folder / STATE, {"keys": self.keys, "items": self.n})  # what the sweep reads
        mine, busy, covered = [], [], []
        for s in self.pieces():
            if s["done"]:
                covered.append(range(s["start"], s["stop"]))
            elif self.busy(s["start"]):
                busy.append(s["start"])
                covered.append(range(s["start"], s["stop"]))
            elif in_place and (share is None or (share.start <= s["start"] and s["stop"] <= share.stop)):
                self.drop_shards(s["start"], s["shards"])
                mine.append(s)
                covered.append(range(s["start"], s["stop"]))
            elif s["next"] > 0:  # keep what it did; the rest is uncovered again
                self.drop_shards(s["start"], s["shards"])
                s.update(stop=s["start"] + s["next"], done=True)
                atomic_write_json(self.state_path(s["start"]), s)
                covered.append(range(s["start"], s["stop"]))
            else:
                self.state_path(s["start"]).unlink(missing_ok=True)
                self.drop_shards(s["start"], 0)
        gaps, at = [], 0
        for r in sorted(covered, key=lambda r: r.start):
            if r.start > at:
                gaps.append(range(at, r.start))
            at = max(at, r.stop)
        if at < self.n:
            gaps.append(range(at, self.n))
        if share is not None:
            gaps = [range(max(g.start, share.start), min(g.stop, share.stop)) for g in gaps]
            gaps = [g for g in gaps if len(g)]
        return mine, busy, gaps

    def complete(self) -> bool:
        at = 0
        for s in self.pieces():
            if not s["done"] or s["start"] != at:
                return False
            at = s["stop"]
        return at == self.n

    # -- one process (alone, or one --shard share) ------------------------------------------------
    def alone(self, ctx: Context) -> PassResult:
        share = aligned_block(self.n, ctx.rank, ctx.world, self.batch_size) if ctx.world > 1 else None
        ran = False
        while True:
            with contextlib.ExitStack() as held:
                with self.st.lock(self.kind, self.output.work):
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        return PassResult(ran=False)  # a concurrent identical pass made (some of) them
                    mine, busy, gaps = self.plan(share, in_place=True)
                    todo = mine + [self.new_piece(g.start, g.stop) for g in gaps]
                    if not todo and not busy and (share is None or self.complete()):
                        return self.publish(ran)
                    for s in todo:
                        held.enter_context(self.piece_lock(s["start"]))
                self.run_pieces(todo)
                ran = ran or bool(todo)
                # publish (or not) under the folder's lock, taken before the pieces' locks go
                with self.st.lock(self.kind, self.output.work):
                    held.close()
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        return PassResult(ran=False)
                    if self.complete():
                        return self.publish(ran)
                    if share is not None:  # this share is done; others are still to run
                        return PassResult(ran=True, seconds=self.seconds, skipped=sorted(set(self.skipped)))
            for start in busy:  # wait for the pieces another live process runs, then plan again
                with self.piece_lock(start):
                    pass

    # -- the ranks of a torchrun job ---------------------------------------------------------------
    def grouped(self, ctx: Context) -> PassResult:
        while True:
            with contextlib.ExitStack() as folder_lock, contextlib.ExitStack() as held:
                plan: dict[str, Any] = {}
                if ctx.rank == 0:
                    folder_lock.enter_context(self.st.lock(self.kind, self.output.work))
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        plan = {"exists": True}
                    else:
                        _mine, busy, gaps = self.plan(None, in_place=False)
                        if not gaps and busy:
                            plan = {"wait": busy}
                        else:
                            plan = {"assign": [[(r.start, r.stop) for r in split_ranges(gaps, rank, ctx.world, self.batch_size)]
                                               for rank in range(ctx.world)]}
                            for rng in plan["assign"]:
                                for a, b in rng:
                                    self.new_piece(a, b)
                plan = distributed.gather(plan)[0]
                if plan.get("exists"):
                    return PassResult(ran=False)
                if "wait" in plan:
                    folder_lock.close()
                    if ctx.rank == 0:
                        for start in plan["wait"]:
                            with self.piece_lock(start):
                                pass
                    distributed.gather("waited")
                    continue
                mine = [json.loads(self.state_path(a).read_text()) for a, _b in plan["assign"][ctx.rank]]
                for s in mine:
                    held.enter_context(self.piece_lock(s["start"]))
                distributed.gather("claimed")  # every rank holds its pieces: the plan may be seen now
                folder_lock.close()
                self.run_pieces(mine)
                held.close()
            distributed.gather("ran")  # every rank's pieces are done (or a rank's error stops all)
            result = PassResult(ran=True, seconds=self.seconds, skipped=sorted(set(self.skipped)))
            status = None
            if ctx.rank == 0:
                with self.st.lock(self.kind, self.output.work):
                    if any(self.st.exists(self.kind, e.key) for e in self.output.entries):
                        status = "exists"  # a concurrent process published the pass
                    elif self.complete():
                        result = self.publish(True)
                        status = "published"
                    else:
                        status = "again"  # pieces another process holds or left: plan again
            status = distributed.gather(status)[0]
            if status == "again":
                continue
            result.published = True
            return result

    # -- running pieces, publishing ------------------------------------------------------------------
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
                saved = self.sink_state(i, s) if s["next"] > 0 else None
                if saved is not None:
                    sink.load_state_dict(saved)
                elif self.dirty:
                    sink.load_state_dict({k: v.clone() for k, v in self.fresh[i].items()})
            self.dirty = True
            result = _loop(self.images, self.model, self.layers, self.compute, self.sinks, self.device, self.precision,
                           self.batch_size, self.workers, None, self.label, self.unit, self.weights, self.folder,
                           (s, self.state_path(s["start"]), f"-{tag}"),
                           Shards(s["shards"], piece=s["start"]), range(s["start"], s["stop"]),
                           task=(self.progress, task) if task is not None else None)
            s["done"] = True
            s["seconds"] = float(s.get("seconds", 0.0)) + result.seconds
            atomic_write_json(self.state_path(s["start"]), s)
            self.seconds += result.seconds
            self.skipped += result.skipped

    def publish(self, ran: bool) -> PassResult:
        """Under the work folder's lock, every piece done: merge, rename the shards in item order, publish."""
        st, kind = self.st, self.kind
        pieces = self.pieces()
        result = PassResult(ran=ran, seconds=sum(float(s.get("seconds", 0.0)) for s in pieces),
                            skipped=sorted({int(i) for s in pieces for i in s["skipped"]}))
        for i, sink in enumerate(self.sinks):
            parts = [part for s in pieces if (part := self.sink_state(i, s)) is not None]
            sink.publish(self.folder, parts)
        recorded = {s["start"]: s["shards"] for s in pieces}
        for pub in self.output.entries:
            src = self.folder / pub.folder
            with st.writing(kind, pub.key, inputs=pub.inputs, settings=pub.settings(result),
                            extra=pub.extra(result)) as tmp:
                if src.exists():
                    seq: dict[str, int] = {}
                    for p in sorted(src.glob("*.safetensors")):
                        if p.name.startswith("sink-"):
                            continue
                        m = PIECE_SHARD.match(p.name)
                        if m is None:
                            shutil.move(str(p), tmp / p.name)
                        elif int(m["index"]) < recorded.get(int(m["start"]), 0):
                            k = seq.get(m["prefix"], 0)
                            seq[m["prefix"]] = k + 1
                            shutil.move(str(p), tmp / f"{m['prefix']}-{k:05d}.safetensors")
        shutil.rmtree(self.folder, ignore_errors=True)
        result.published = True
        return result


def aligned_block(n: int, rank: int, world: int, align: int = 1) -> range:
    """:func:`rank_block` with its ends moved to the nearest multiple of ``align`` (a batch):
    every batch then holds the same items as in one process over all ``n``, so the results do
    not depend on the number of processes (a convolution's last bits may depend on its batch)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    align = max(1, align)

    def cut(r: int) -> int:
        return n if r == world else min(n, (n * r // world + align // 2) // align * align)

    return range(cut(rank), cut(rank + 1))


def split_ranges(ranges: Sequence[range], rank: int, world: int, align: int = 1) -> list[range]:
    """``rank``'s part of the items of ``ranges`` (in order): a balanced, contiguous split in
    whole batches of ``align`` items, counted from each range's start."""
    units = [range(a, min(a + align, r.stop)) for r in ranges for a in range(r.start, r.stop, max(1, align))]
    want = rank_block(len(units), rank, world)
    out: list[range] = []
    for u in units[want.start:want.stop]:
        if out and out[-1].stop == u.start:
            out[-1] = range(out[-1].start, u.stop)
        else:
            out.append(u)
    return out


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
