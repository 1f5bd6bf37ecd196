"""The work folder of a stored pass, split in pieces (:func:`lavise_cli.passes.runner.run_pass`).

Work folder (``StoreOutput``): ``<kind>/.partial-<key>/``, the pass split in **pieces**, each a
contiguous block of items with its own state ``state-p<start>.json`` (``start``, ``stop``,
``next``, ``shards``, ``skipped``, ``done``, ``seconds``), its shards
(``z-p000000120-00003.safetensors``) and its sinks' checkpoint state
(``sink-<i>-p<start>-<checkpoint>.safetensors``); ``state.json`` names the entries (``keys``) for the sweep.
A checkpoint is taken whenever a sink is due (every sink flushes, then the piece's state is
written atomically), so an interrupted piece continues at ``next``.

- **Plan** (under the folder's lock, :meth:`Store.lock` on its name; :meth:`WorkFolder.plan`):
  pieces already done are kept; a piece another live process is running (its own lock
  ``<work>-p<start>`` is held) is left to it; an unfinished piece nobody runs is continued where
  it stopped (one process) or cut there (torchrun ranks, a share it does not fit in); the items no
  piece covers become new pieces: all of them for one process, this share's for ``--shard I/N``, a
  balanced split of them across the ranks of a torchrun job, in whole batches
  (:func:`aligned_block`, :func:`split_ranges`: each batch holds the same items whatever the
  number of processes, so the results do too) (rank 0 plans, every rank takes its pieces' locks,
  then the folder's lock is let go).  So a pass resumes from the shards already written whatever
  the number of processes that wrote them or run it now.
- **Run**: each process runs its pieces holding only their locks, so ranks and shares overlap.
- **Publish** (under the folder's lock, once every piece is done: rank 0 after every rank has
  finished, or whichever process finds the last piece done): each sink's ``Sink.publish``
  gets every piece's final state in item order (:meth:`WorkFolder.sink_state`; merged
  statistics), the pieces' shards are renamed ``<prefix>-NNNNN`` in item order into the entry
  (:meth:`WorkFolder.publish`, :meth:`Store.writing`), and the work folder goes.  A concurrent
  identical pass that finds the entries published uses them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from ..store import Store, atomic_write_json, temp_sibling

if TYPE_CHECKING:
    from .runner import PassResult, Publication

STATE = "state.json"


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


def rank_block(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``n`` items that ``rank`` of ``world`` processes takes."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    return range(n * rank // world, n * (rank + 1) // world)


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


class WorkFolder:
    """The work folder ``<kind>/<work>/`` of a stored pass over ``n`` items that publishes the
    entries ``keys``: its pieces' state files, locks and shards, the plan, the publication."""

    def __init__(self, store: Store, kind: str, work: str, keys: list[str], n: int):
        self.st, self.kind, self.work, self.keys, self.n = store, kind, work, keys, n
        self.path = store.kind_dir(kind) / work

    def state_path(self, start: int) -> Path:
        return self.path / f"state-{piece_tag(start)}.json"

    def pieces(self) -> list[dict[str, Any]]:
        out = []
        for p in self.path.glob("state-p*.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda s: s["start"])

    def lock(self) -> Any:
        """The folder's lock (planning, publishing)."""
        return self.st.lock(self.kind, self.work)

    def piece_lock(self, start: int) -> Any:
        return self.st.lock(self.kind, f"{self.work}-{piece_tag(start)}")

    def busy(self, start: int) -> bool:
        with self.st.try_lock(self.kind, f"{self.work}-{piece_tag(start)}") as free:
            return not free

    def drop_shards(self, start: int, keep: int) -> None:
        """Remove the piece's shard and sink-state files from checkpoint ``keep`` on (written by a
        checkpoint that an interrupt kept from recording them in the piece's state)."""
        for p in list(self.path.rglob(f"*-{piece_tag(start)}-*.safetensors")):
            m = PIECE_SHARD.match(p.name)
            if m and int(m["index"]) >= keep:
                p.unlink(missing_ok=True)

    def sink_state(self, i: int, s: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Sink ``i``'s state at the piece's last recorded checkpoint (None: it kept none)."""
        if s["shards"] < 1:
            return None
        path = self.path / f"sink-{i}-{piece_tag(s['start'])}-{s['shards'] - 1:05d}.safetensors"
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
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads((self.path / STATE).read_text())
        except (OSError, ValueError):
            known = None
        if known != {"keys": self.keys, "items": self.n}:  # none yet, or an older layout: start afresh
            for p in list(self.path.iterdir()):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            atomic_write_json(self.path / STATE, {"keys": self.keys, "items": self.n})  # what the sweep reads
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

    def publish(self, entries: Sequence[Publication], result: PassResult, pieces: list[dict[str, Any]]) -> None:
        """Under the folder's lock, every piece done and the sinks' publications written: each
        entry from its files, the pieces' recorded shards renamed in item order; the folder goes."""
        st, kind = self.st, self.kind
        recorded = {s["start"]: s["shards"] for s in pieces}
        for pub in entries:
            src = self.path / pub.folder
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
        shutil.rmtree(self.path, ignore_errors=True)
