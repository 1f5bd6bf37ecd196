"""Generic fetching: resumable, verified HTTP downloads and safe archive extraction.

Nothing in this package knows lavise's datasets; :mod:`lavise_cli.download` uses it for the
official sources, word vectors and weights.
"""

from __future__ import annotations

from .archives import extract, is_archive
from .http import USER_AGENT, fetch, human_size, network_reason, part_path, verify

__all__ = ["USER_AGENT", "extract", "fetch", "human_size", "is_archive", "network_reason", "part_path", "verify"]
