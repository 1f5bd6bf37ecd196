"""What the store's caches were made for, and removing the ones nothing refers to (``lavise store gc``).

A feature cache (``cache/features``) is the pooled features of one reference pass: one model,
layer and dataset index.  It is *unreferenced* when its index was rebuilt or removed (a new
index has a new digest, so the cache can never be hit again), or when no explainer was trained
on it (same model, layer and index).  A target cache (``cache/targets``) is one target pass: it
is unreferenced when the index of its target set was rebuilt or removed, or when no explainer of
its model and layer exists.  Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import LaviseError
from .store import CACHE_KINDS, Entry, Store, dir_size, stable_digest


def index_digest(manifest: dict[str, Any]) -> str:
    """The digest an index is known by in caches and explainers (``DatasetIndex.digest``)."""
    return stable_digest(manifest.get("inputs", {})) + ":" + str(manifest.get("created", ""))


def cache_description(entry: Entry) -> dict[str, Any]:
    """Model, layer and data of a cache entry (features or targets), from its manifest; {} for other kinds."""
    m = entry.manifest
    settings, inputs = m.get("settings", {}), m.get("inputs", {})
    model = settings.get("model") or (inputs.get("model") or {}).get("model")
    if entry.kind == "features":
        data = settings.get("dataset") or inputs.get("dataset")
        split = settings.get("split") or inputs.get("split")
        data = f"{data}/{split}" if data and split else data
    elif entry.kind == "targets":
        data = settings.get("target")
    elif entry.kind == "explainers":
        data = "+".join(settings.get("datasets", [])) or None
    else:
        return {}
    return {"model": model, "layer": settings.get("layer") or inputs.get("layer"), "dataset": data}


@dataclass(frozen=True)
class Unreferenced:
    entry: Entry
    reason: str
    size: int  # bytes on disk, manifest included


GRACE_SECONDS = 3600.0  # a cache this young may belong to a run still under way (a train between its passes)


def _young(entry: Entry, now: float) -> bool:
    import datetime as dt

    try:
        created = dt.datetime.fromisoformat(entry.created).timestamp()
    except ValueError:
        return False
    return now - created < GRACE_SECONDS


def unreferenced(store: Store) -> list[Unreferenced]:
    """Cache entries that nothing in the store refers to, each with why.

    A cache that only lacks an explainer is kept for an hour after it was made: a `train` that is
    still running has made its feature cache but not yet its explainer.
    """
    import time

    now = time.time()
    indexes = {index_digest(e.manifest) for e in store.list("indexes")}
    explainers = [e.manifest.get("inputs", {}) for e in store.list("explainers")]
    found: list[Unreferenced] = []
    for e in store.list("features"):
        inp = e.manifest.get("inputs", {})
        if inp.get("index") not in indexes:
            reason = "its dataset index was rebuilt or removed"
        elif not any(x.get("model") == inp.get("model") and x.get("layer") == inp.get("layer")
                     and inp.get("index") in x.get("datasets", []) for x in explainers):
            if _young(e, now):
                continue
            reason = "no explainer was trained on it"
        else:
            continue
        found.append(Unreferenced(e, reason, dir_size(e.path)))
    for e in store.list("targets"):
        inp = e.manifest.get("inputs", {})
        target_indexes = (inp.get("target") or {}).get("datasets") or []
        if any(d not in indexes for d in target_indexes):
            reason = "the index of its target set was rebuilt or removed"
        elif not any(x.get("model") == inp.get("model") and x.get("layer") == inp.get("layer") for x in explainers):
            if _young(e, now):
                continue
            reason = "no explainer of its model and layer exists"
        else:
            continue
        found.append(Unreferenced(e, reason, dir_size(e.path)))
    return found


def collect_garbage(store: Store, dry_run: bool = False) -> list[Unreferenced]:
    """Remove (unless ``dry_run``) every unreferenced cache entry; returns what was (or would be) removed."""
    found = unreferenced(store)
    if not dry_run:
        for u in found:
            assert u.entry.kind in CACHE_KINDS
            try:
                store.remove(u.entry.kind, u.entry.name)
            except LaviseError:  # removed meanwhile (another gc)
                pass
    return found


def embedding_users(store: Store, name: str) -> list[str]:
    """The indexes and explainers built with the embedding ``name``."""
    users = []
    for e in store.list("indexes"):
        emb = (e.manifest.get("inputs") or {}).get("embedding") or {}
        if isinstance(emb, dict) and emb.get("name") == name:
            users.append(f"the index of {e.name}")
    for e in store.list("explainers"):
        if (e.manifest.get("inputs") or {}).get("embedding") == name:
            users.append(f"the explainer {e.name}")
    return users


def remove_embedding(store: Store, name: str, *, force: bool = False) -> None:
    """Remove the word vectors ``name``; refused (naming them) while an index or an explainer
    built with them is in the store, unless ``force`` (they then fail until rebuilt)."""
    if not force and store.exists("embeddings", name):
        users = embedding_users(store, name)
        if users:
            raise LaviseError(f"the embedding {name} is used by {', '.join(users)}: remove those first, "
                              f"or add --force (they then fail until rebuilt with other word vectors)")
    store.remove("embeddings", name)
