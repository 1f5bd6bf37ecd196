"""The explainer module, its hinge rank loss, and its safetensors artifact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import LaviseError
from .store import current_umask

EXPLAINER_FILE = "explainer.safetensors"


class Explainer(nn.Module):
    """``BN(d) -> Dropout(0.1) -> Linear(d, d) -> ReLU -> BN(d) -> Dropout(0.1) -> Linear(d, e)``.

    ``forward`` returns unit vectors in the embedding space.
    """

    def __init__(self, d: int, e: int, dropout: float = 0.1):
        super().__init__()
        self.d, self.e = d, e
        self.net = nn.Sequential(
            nn.BatchNorm1d(d),
            nn.Dropout(dropout),
            nn.Linear(d, d),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(d),
            nn.Dropout(dropout),
            nn.Linear(d, e),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(z), dim=-1, eps=1e-12)


def hinge_rank_loss(v_hat: torch.Tensor, labels: torch.Tensor, concepts: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """``mean_b sum_{c != t_b} max(0, margin - v_b . v_{t_b} + v_b . v_c)``, all negatives at once.

    ``v_hat`` (B, e) unit vectors, ``labels`` (B,) each pair's concept ``t_b``: indices into
    ``concepts`` (C, e) unit vectors.
    """
    s = v_hat @ concepts.T  # (B, C)
    pos = s.gather(1, labels[:, None])
    loss = (margin - pos + s).clamp_min(0.0)
    loss = loss.masked_fill(F.one_hot(labels, concepts.shape[0]).bool(), 0.0)
    return loss.sum(1).mean()


@dataclass
class LoadedExplainer:
    module: Explainer
    meta: dict[str, Any]
    concept_vectors: torch.Tensor  # (C, e) the training concepts' unit vectors
    path: Path

    @property
    def filters(self) -> int:
        """Filters of the layer this explainer explains (``d``)."""
        return int(self.meta["d"])

    @property
    def concepts(self) -> list[str]:
        return list(self.meta["concepts"])

    @property
    def seen(self) -> list[bool]:
        return list(self.meta["seen"])


JSON_KEYS = "json_keys"  # header entry listing the metadata keys whose values are JSON


def save_explainer(path: Path, module: Explainer, concept_vectors: torch.Tensor, meta: dict[str, Any]) -> None:
    """The explainer alone (never the backbone) with its metadata in the safetensors header."""
    tensors = {f"explainer.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors["concept_vectors"] = concept_vectors.detach().cpu().float().contiguous()
    # Text stays text (readable by any safetensors reader); other values are JSON, and the header
    # names them, so that a text value that looks like JSON (a layer named "3") stays text.
    header = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    header[JSON_KEYS] = json.dumps(sorted(k for k, v in meta.items() if not isinstance(v, str)))
    save_file(tensors, str(path), metadata=header)
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600; the user's umask decides


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata() or {}
    if JSON_KEYS in raw:
        encoded = set(json.loads(raw.pop(JSON_KEYS)))
        return {k: json.loads(v) if k in encoded else v for k, v in raw.items()}
    out: dict[str, Any] = {}  # written before JSON_KEYS existed: decode what parses
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_explainer(path: Path) -> LoadedExplainer:
    path = Path(path)
    if not path.is_file():
        raise LaviseError(f"explainer file {path} does not exist")
    try:
        meta = read_metadata(path)
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:
        raise LaviseError(f"cannot read explainer {path}: {e}") from None
    module = Explainer(int(meta["d"]), int(meta["embedding_dim"]))
    module.load_state_dict({k[len("explainer."):]: v for k, v in tensors.items() if k.startswith("explainer.")})
    module.eval()
    return LoadedExplainer(module=module, meta=meta, concept_vectors=tensors["concept_vectors"], path=path)
