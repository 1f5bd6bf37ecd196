"""Batches of decoded images for the backbone passes, prepared while the backbone runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

T = TypeVar("T")

_END = object()


def image_batches(ds: Dataset, batch_size: int, workers: int, device: torch.device,
                  collate: Callable[[list[Any]], Any]) -> Iterator[Any]:
    """Batches of ``ds`` in order.

    With ``workers > 0`` a DataLoader's worker processes prepare them; with ``workers == 0`` a
    background thread prepares the next batch while the caller runs the current one (decoding,
    resizing and mask work release the GIL), which on a 2-core CPU beats a worker process.
    """
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    return iter(loader) if workers > 0 else prefetched(loader)


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` up to ``depth`` steps ahead in a daemon thread.

    Exceptions of the producer are raised in the consumer; closing the iterator early (a
    ``break``, an exception, Ctrl-C in the consumer) stops the producer at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Raised(e))

    thread = threading.Thread(target=run, name="lavise-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error
