"""Memory that does not grow with the data (issue 10, item 3): the parts that changed how they
hold data give the same results as before.

- explain streams the cached maps in blocks of distinct top images: any block size gives the
  vectors of a per-(filter, image) loop over the maps read one by one;
- ``trim_memory`` runs glibc's ``malloc_trim`` where glibc is present.
(The index layout has its own tests in test_index_layout.py; train's per-batch float32
conversion is covered by test_train.py's exact-resume and loss checks.)
"""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lavise_cli.explain import _predicted_vectors, attention_inputs, top_images
from lavise_cli.explainer import Explainer
from lavise_cli.methods import get_method
from lavise_cli.passes.target import SHARD_IMAGES, LayerMaps
from lavise_cli.runtime import trim_memory


def _layer_maps(tmp: Path, n: int, d: int, h: int, w: int) -> LayerMaps:
    """Maps written as the target pass writes them: fp16 shards of SHARD_IMAGES rows."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(n, d, h, w, generator=gen).half()
    for s in range(0, n, SHARD_IMAGES):
        save_file({"maps": maps[s:s + SHARD_IMAGES].contiguous()}, str(tmp / f"maps-{s // SHARD_IMAGES:05d}.safetensors"))
    flat = maps.float().flatten(2)
    return LayerMaps(root=tmp, layer="x", threshold=torch.full((d,), 0.5), img_max=flat.amax(2),
                     img_mean=flat.mean(2), rows=torch.arange(n), shape=(d, h, w), hit=False)


def test_streamed_maps_give_the_vectors_of_a_per_image_loop(tmp_path: Path) -> None:
    n, d, h, w, p = SHARD_IMAGES + 40, 12, 3, 4, 7  # two shards
    cache = _layer_maps(tmp_path, n, d, h, w)
    torch.manual_seed(0)
    g = Explainer(d, 5).eval()
    filt = torch.arange(d)
    top = top_images(cache, p)[filt]
    method = get_method("attention")
    with torch.no_grad():
        ref = torch.stack([torch.stack([g(attention_inputs(cache.maps([int(r)]), torch.tensor([int(u)])).float())[0]
                                        for r in top[j]]) for j, u in enumerate(filt.tolist())])
        row_bytes = d * h * w * 4
        for budget in (row_bytes, 5 * row_bytes, 1 << 30):  # one image a block, a few, all at once
            got = _predicted_vectors(g, cache, filt, top, method, None, budget=budget)
            assert got.shape == (d, p, 5)
            assert torch.allclose(got, ref, atol=1e-6), budget


def test_trim_memory_runs_where_glibc_is() -> None:
    glibc = ctypes.util.find_library("c") is not None and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    if not glibc:
        pytest.skip("no glibc here: trim_memory does nothing")
    assert trim_memory() is True
