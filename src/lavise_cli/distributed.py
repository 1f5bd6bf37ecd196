"""Running lavise as several processes: ``torchrun`` (torch.distributed) or ``--shard I/N``.

Two ways to split a pass over images (see docs/distributed.md):

- **torchrun**: ``torchrun --nproc_per_node 4 -m lavise_cli train ...``.  Every rank runs the same
  command; :func:`setup` reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, initialises the process
  group (gloo on CPU; NCCL for CUDA tensors plus gloo for the small control messages when CUDA is
  there) and pins ``cuda:LOCAL_RANK``.  Each pass with a store output is shared among the ranks
  (:func:`lavise_cli.passes.runner.run_pass`); rank 0 publishes.  Once a command's passes are done
  (:func:`leave`), the other ranks exit and rank 0 goes on alone (training, methods, printing).
- **--shard I/N**: one process runs only share ``I`` of ``N`` of every pass and leaves its shards
  (:class:`lavise_cli.errors.ShareDone`); the process that completes the last share publishes.

The control messages are Python objects gathered from every rank (``all_gather_object``), so a
rank that fails sends its error instead and every rank stops with it (no hang: each collective has
the process group's timeout, ``LAVISE_DIST_TIMEOUT`` seconds, default 1800).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

from .errors import LaviseError


@dataclass
class Context:
    """This process's part: ``rank`` of ``world``; ``group``: a torch.distributed process group
    (torchrun) rather than ``--shard`` (independent processes that meet only on disk)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False

    @property
    def shared(self) -> bool:
        """True when passes are split (several ranks or shares)."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that prints and writes results (rank 0; every ``--shard`` process)."""
        return self.rank == 0 or not self.group


class RankFailed(LaviseError):
    """Another rank failed: this one stops with its message."""

    exit_code = 1


_ctx = Context()


def current() -> Context:
    return _ctx


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N) for ``--shard``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise LaviseError(f"--shard takes I/N, e.g. 0/4 (share 0 of 4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise LaviseError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def timeout_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get("LAVISE_DIST_TIMEOUT", "1800")))
    except ValueError:
        return 1800.0


def setup(shard: str | None = None) -> Context:
    """Read torchrun's environment (or ``--shard``) and set this process's :class:`Context`."""
    global _ctx
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if shard is not None:
            raise LaviseError("--shard is for processes started without torchrun; under torchrun the ranks "
                              "share every pass already")
        if _ctx.group:
            return _ctx
        import torch
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        if not dist.is_initialized():
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_seconds()))
        _ctx = Context(rank=rank, world=world, local_rank=local, group=True)
        if rank != 0:  # other ranks print nothing but errors
            sys.stdout = open(os.devnull, "w")
        return _ctx
    if shard is not None:
        i, n = parse_shard(shard)
        _ctx = Context(rank=i, world=n)
    else:
        _ctx = Context()
    return _ctx


def device_index() -> int | None:
    """The CUDA device this rank is pinned to (None outside torchrun)."""
    return _ctx.local_rank if _ctx.group else None


def gather(obj: Any) -> list[Any]:
    """``obj`` from every rank (rank order); raises :class:`RankFailed` when a rank sent an error.

    A rank that fails sends ``{"error": message}`` through :func:`fail` instead.
    """
    if not _ctx.group:
        return [obj]
    import torch.distributed as dist

    got: list[Any] = [None] * _ctx.world
    try:
        dist.all_gather_object(got, obj)
    except (RuntimeError, ValueError) as e:  # a rank died or timed out
        raise RankFailed(f"lost contact with the other ranks ({' '.join(str(e).split())[:200]}); "
                         "rerun the command: it resumes from the shards already written") from None
    for r, g in enumerate(got):
        if isinstance(g, dict) and g.get("__failed__"):
            raise RankFailed(f"rank {r} failed: {g['error']}")
    return got


def fail(message: str) -> None:
    """Tell the other ranks that this one failed (at their next collective), then leave the group."""
    if not _ctx.group:
        return
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            got: list[Any] = [None] * _ctx.world
            dist.all_gather_object(got, {"__failed__": True, "error": message})
    except Exception:  # noqa: BLE001 - the others are gone already
        pass
    shutdown()


def shutdown() -> None:
    """``destroy_process_group`` (every exit path of a torchrun rank comes here)."""
    global _ctx
    if _ctx.group:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        _ctx = Context(rank=_ctx.rank, world=1, local_rank=_ctx.local_rank, group=False)


class RankDone(Exception):
    """A rank other than 0 has done its part of the command's passes: it exits quietly (code 0)."""


def leave() -> None:
    """Past a command's shared passes: the other ranks exit (:class:`RankDone`), rank 0 goes on alone.

    Every rank first meets the others, so that a failure anywhere stops every rank.
    """
    global _ctx
    if not _ctx.group:
        return
    gather("leave")
    rank = _ctx.rank
    shutdown()
    if rank != 0:
        raise RankDone()
