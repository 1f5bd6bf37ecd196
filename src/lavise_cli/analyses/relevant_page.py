"""The `relevant --out` page: per class its relevant filters' heatmaps on the class's own images,
with the ablation tables; static HTML and PNGs (drawn by :mod:`lavise_cli.visualize`)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..store import atomic_write_bytes
from ..visualize import load_tiles, render_figure, save_png

MIN_TILE = 112  # small inputs (MNIST's 28 px) are drawn larger
MAX_FILTERS = 12  # heatmaps per class


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def _row(name: str, a: dict[str, Any]) -> str:
    r = a["random"]
    return (f"<tr><td>{html.escape(name)}</td><td>{a['images']}</td><td>{a['removed']}</td><td>{_pct(a['baseline'])}"
            f"</td><td>{_pct(a['selected'])}</td><td>{_pct(r['mean'])} ± {100 * r['std']:.1f}</td></tr>")


def write_page(result: Any, folder: Path, input_size: int, *, n_images: int = 5, progress: Any = None) -> Path:
    """``folder/index.html`` and one PNG per (class, filter): the filter's region in its top
    ``n_images`` images of that class (regions as ``heatmap`` draws them)."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = result.cache
    labels = result.labels
    size = max(MIN_TILE, input_size)
    ses = SimpleNamespace(cache=cache, size=size)
    row_of = {int(img): r for r, img in enumerate(cache.rows.tolist())}
    todo = [(c, name, u) for c, name in enumerate(labels.classes)
            for u in result.selections[name].filters[:MAX_FILTERS]]
    task = progress.add_task("relevant heatmaps", total=len(todo), unit="filter") if progress is not None else None
    pictures: dict[str, list[tuple[int, str]]] = {}
    for c, name, u in todo:
        imgs_of = [i for i in torch.nonzero(labels.member[:, c]).squeeze(1).tolist() if i in row_of]
        rows = torch.tensor([row_of[i] for i in imgs_of], dtype=torch.long)
        order = cache.img_max[rows, u].argsort(descending=True, stable=True)[:n_images]
        top = rows[order].tolist()
        paths = [labels.target.paths[int(cache.rows[r])] for r in top]
        imgs, reg = load_tiles(ses, top, paths, [u] * len(top), size=size)
        words = result.words.get(u, [])
        captions = [(f"max {float(cache.img_max[r, u]):.3g}", []) for r in top]
        sel = result.selections[name]
        w = sel.weights[sel.filters.index(u)]
        fig = render_figure(imgs, reg, title=f"filter {u}  ·  class {name}  ·  weight {w:.3g}  ·  "
                                             f"T = {float(cache.threshold[u]):.3g}",
                            words=words, captions=captions, note=None if words else "no words (no --explainer)")
        png = f"class-{c:03d}-filter-{u:04d}.png"
        save_png(fig, folder / png)
        pictures.setdefault(name, []).append((u, png))
        if task is not None:
            progress.advance(task)
    doc = result.as_dict()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>relevant filters · {html.escape(doc['layer'])}"
             "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%;margin:4px 0}</style></head><body>",
             f"<h1>Relevant filters of {html.escape(doc['model'])} · {html.escape(doc['layer'])}</h1>",
             f"<p>{doc['images']} images of {html.escape(doc['target'])}, labels: {html.escape(doc['labels'])}, "
             f"{html.escape(doc['pool'])}-pooled responses; accuracy: {html.escape(doc['settings']['accuracy'])}; "
             "random: mean ± sd of 5 seeded draws of as many filters.</p>",
             "<table><tr><th>set</th><th>images</th><th>removed</th><th>nothing removed</th><th>selected removed</th>"
             "<th>random removed</th></tr>", _row("union", doc["union"]["ablation"])]
    parts += [_row(f"class {n}", c["ablation"]) for n, c in doc["classes"].items()]
    parts.append("</table>")
    if doc["sweep"]:
        parts.append("<h2>Sweep</h2><table><tr><th>setting</th><th>removed</th><th>nothing removed</th>"
                     "<th>selected removed</th><th>random removed</th></tr>")
        for r in doc["sweep"]:
            k = "sparsity" if "sparsity" in r else "per_class"
            parts.append(f"<tr><td>{'μ' if k == 'sparsity' else 'K'} = {r[k]:g}</td><td>{r['removed']}</td>"
                         f"<td>{_pct(r['baseline'])}</td><td>{_pct(r['selected'])}</td><td>{_pct(r['random']['mean'])}"
                         f" ± {100 * r['random']['std']:.1f}</td></tr>")
        parts.append("</table>")
    for name, c in doc["classes"].items():
        parts.append(f"<h2>class {html.escape(name)}</h2><p>{len(c['filters'])} relevant filters: "
                     + ", ".join(f"{u} ({w:.3g})" for u, w in zip(c["filters"], c["weights"])) + "</p>")
        for u, png in pictures.get(name, []):
            parts.append(f"<div><img src='{html.escape(png)}' alt='filter {u}'></div>")
    parts.append("</body></html>")
    page = folder / "index.html"
    atomic_write_bytes(page, "\n".join(parts).encode("utf-8"))
    return page
