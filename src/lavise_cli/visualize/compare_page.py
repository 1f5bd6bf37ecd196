"""The pages of `lavise compare groups` and `lavise compare models`, in the report's style.

The groups page shows, per listed filter, its shares, difference and q-value, its words, and the
top qualified images of each group with the filter's region outlined (the region of
:func:`lavise_cli.explain.regions` at the thumbnail's size, drawn into the JPEG: a compare page
lists a few dozen pairs, not a layer's thousands).  The models page is tables: each model's
learned concepts, the shared and own ones, and the matched filters' words side by side.
Everything from the user is HTML-escaped; the page and its image folder replace older ones whole.
"""

from __future__ import annotations

import html
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
import torch.nn.functional as F

from .. import __version__
from ..data.images import read_rgb
from ..store import atomic_write_bytes, folder_lock, writer_tag
from .drawing import highlight, to_pil
from .page import outline_width, resource
from .report import JPEG_QUALITY, pair_regions

EXTRA_CSS = (".grp{margin:4px 0 2px;color:var(--muted);font-size:12px}.fav{color:var(--accent)}"
             ".sig{color:#2e7d32;font-weight:600}.ns{color:var(--muted)}section.dir{margin:0 0 20px}"
             "section.dir>h2{font-size:17px;margin:16px 0 8px}table.list td.n,table.list th.n{text-align:right}"
             "table.list{background:#fff;border:1px solid var(--line)}table.list td,table.list th{padding:3px 10px}")


def _page(title: str, header: str, body: str, thumb: int = 128) -> str:
    e = html.escape
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{e(title)}</title><style>{resource("report.css")}{EXTRA_CSS}'
            f'.t,.t img{{width:{int(thumb)}px;height:{int(thumb)}px}}</style></head><body>'
            f'<header>{header}</header><main>{body}</main></body></html>')


def _settings(rows: list[tuple[str, Any]]) -> str:
    e = html.escape
    return '<table class="settings">' + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>"
                                                for k, v in rows) + "</table>"


def _words(words: list[dict[str, Any]]) -> str:
    e = html.escape
    return "".join(f'<span class="w{" novel" if w["novel"] else ""}">{e(w["word"])}{"*" if w["novel"] else ""}'
                   f' <small>({w["images"]})</small></span>' for w in words) or "<i>no words</i>"


def _swap_folder(tmp: Path, final: Path) -> None:
    """Put ``tmp`` in place of ``final`` (the old folder removed only once the new one is there)."""
    old = None
    with folder_lock(final.parent):
        if final.exists():
            old = final.parent / f".{final.name}.old{writer_tag()}"
            os.replace(final, old)
        os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _highlighted(path: str, region: torch.Tensor, thumb: int) -> Any:
    img = read_rgb(path).float()[None] / 255.0
    img = F.interpolate(img, size=(thumb, thumb), mode="bilinear", align_corners=False, antialias=True)[0]
    return to_pil(highlight(img, region, width=outline_width(thumb)))


def render_group_images(cache: Any, doc: dict[str, Any], folder: Path, thumb: int) -> dict[tuple[int, int], str]:
    """One highlighted JPEG per listed (filter, image) pair in ``folder``: ``{(filter, row): file name}``."""
    pairs = sorted({(int(im["row"]), int(f["filter"]), im["path"]) for f in doc["filters"]
                    for ims in f["images"].values() for im in ims})
    names: dict[tuple[int, int], str] = {}
    if not pairs:
        return names
    for start, reg in pair_regions(cache, [r for r, _, _ in pairs], [u for _, u, _ in pairs], thumb):
        for j in range(len(reg)):
            r, u, path = pairs[start + j]
            name = f"u{u:05d}-r{r:06d}.jpg"
            with open(folder / name, "xb") as fh:
                _highlighted(path, reg[j], thumb).save(fh, format="JPEG", quality=JPEG_QUALITY)
            names[(u, r)] = name
    return names


def groups_html(doc: dict[str, Any], names: dict[tuple[int, int], str], files_url: str, thumb: int) -> str:
    """The groups page as a string (``names``: each pair's image file in ``files_url``)."""
    e = html.escape
    groups = doc["groups"]
    st = doc["settings"]
    rows = [("explainer", doc["explainer"]), ("model", doc["model"]), ("layer", doc["layer"]),
            *[(f"group {n}", f"{g['images']} images ({g['source']})") for n, g in groups.items()],
            ("threshold T", doc["threshold"]), ("qualified", doc["qualified"]),
            ("tests", f"{doc['tests']} (active filters × pairs of groups); {doc['significant']} with q < 0.05"),
            ("words", f"filter attention over the favoured group's qualified images (up to {st['p']}), "
                      f"top {st['s']} per image, ranked by {st['rank']}"),
            ("vocabulary", f"{doc['vocabulary'].get('source')} ({doc['vocabulary'].get('size')} words)"),
            ("target pass", "served from the cache" if doc["pass"]["cached"] else f"ran in {doc['pass']['seconds']} s"),
            ("made", f"{time.strftime('%Y-%m-%d %H:%M')} by lavise-cli {__version__}")]
    header = (f'<h1>Which filters of {e(doc["model"])} {e(doc["layer"])} fire more often on one group</h1>'
              f'<div class="meta">{_settings(rows)}</div>'
              '<p class="legend">share = the group\'s images whose maximum activation of the filter reaches T; '
              'difference = share of the first group − share of the second; p: Fisher\'s exact test (small counts) '
              'or the two-proportion z-test; q: Benjamini–Hochberg over all tests. A difference is an association '
              'in these images, not a cause. Images: each group\'s top qualified images, the filter\'s region '
              'outlined in yellow, the rest dimmed. <span class="novel">word*</span> = not among the explainer\'s '
              'training concepts.</p>')
    sections: dict[tuple[str, str], list[str]] = {}
    for f in doc["filters"]:
        a, b = f["pair"]
        fav = f["favours"]
        other = b if fav == a else a
        u = int(f["filter"])
        q = f["q_value"]
        sig = f'<span class="{"sig" if q < 0.05 else "ns"}">q {q:.3g}</span>'
        shares = " · ".join(f'{e(n)} {f["shares"][n]:.2f} ({f["qualified"][n]}/{groups[n]["images"]})' for n in (a, b))
        strips = []
        for n in (fav, other):
            ims = "".join(f'<span class="t" title="{e(Path(im["path"]).name)}: max {im["max_activation"]:.3g}">'
                          f'<img loading="lazy" src="{files_url}/{e(names[(u, int(im["row"]))])}" alt=""></span>'
                          for im in f["images"].get(n, []) if (u, int(im["row"])) in names)
            strips.append(f'<p class="grp{" fav" if n == fav else ""}">{e(n)}: {f["qualified"][n]} qualified of '
                          f'{groups[n]["images"]}</p><div class="strip">{ims or "<i>none</i>"}</div>')
        card = (f'<section class="card" id="f{u}-{e(a)}-{e(b)}"><h2>filter {u} <span class="rec">{shares}</span>'
                f'<span class="rec">difference {f["difference"]:+.2f}</span> {sig} '
                f'<span class="rec">p {f["p_value"]:.3g} ({e(f["test"])})</span></h2>'
                f'<p class="words">{_words(f["words"])}</p>{"".join(strips)}</section>')
        sections.setdefault((fav, other), []).append(card)
    body = "".join(f'<section class="dir"><h2>More often active on {e(fav)} than on {e(other)}</h2>{"".join(cards)}'
                   "</section>" for (fav, other), cards in sections.items())
    return _page(f"LaViSE · compare groups · {doc['explainer']}", header,
                 body or '<p class="legend">No filter differs between the groups.</p>', thumb)


def write_groups_page(cache: Any, doc: dict[str, Any], out_dir: Path, thumb: int = 128) -> Path:
    """``out_dir/compare-groups.html`` and its images in ``compare-groups_files/`` (replaced whole)."""
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "compare-groups.html"
    final = out_dir / "compare-groups_files"
    tmp = out_dir / f".{final.name}.tmp{writer_tag()}"
    tmp.mkdir()
    try:
        names = render_group_images(cache, doc, tmp, thumb)
        _swap_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(page, groups_html(doc, names, quote(final.name), thumb).encode("utf-8"))
    return page


def models_html(doc: dict[str, Any], max_matches: int = 200) -> str:
    """The models page as a string: concept counts, shared and own concepts, matched filters."""
    e = html.escape
    names = list(doc["models"])
    a, b = names
    ma, mb = doc["models"][a], doc["models"][b]
    head = "".join(f'<th class="n">{e(n)}</th>' for n in names)
    summary_rows = [("model", "model"), ("weights", "weights"), ("layer", "layer"), ("filters", "filters"),
                    ("active filters", "active_filters"), ("learned concepts (distinct top-1 words)", "concepts"),
                    ("named by ≥ 2 filters", "concepts_2plus")]
    summary = ('<table class="list"><tr><th></th>' + head + "</tr>" + "".join(
        f'<tr><th>{e(label)}</th>' + "".join(f'<td class="n">{e(str(doc["models"][n][key]))}</td>' for n in names)
        + "</tr>" for label, key in summary_rows) + "</table>")

    def concept_list(words: list[str]) -> str:
        return ", ".join(f'{e(w)} <small>({ma["words"].get(w, 0)}/{mb["words"].get(w, 0)})</small>'
                         for w in words) or "<i>none</i>"

    lists = (f'<section class="card"><h2>shared concepts <span class="rec">{len(doc["shared"])}</span></h2>'
             f'<p class="words">{concept_list(doc["shared"])}</p></section>'
             + "".join(f'<section class="card"><h2>only in {e(n)} <span class="rec">{len(doc["only"][n])}</span>'
                       f'</h2><p class="words">{concept_list(doc["only"][n])}</p></section>' for n in names))
    matching = doc.get("matching")
    if isinstance(matching, dict):
        rows = "".join(f'<tr><td class="n">{m["a"]}</td><td>{e(", ".join(m["words_a"]) or "inactive")}</td>'
                       f'<td class="n">{m["b"]}</td><td>{e(", ".join(m["words_b"]) or "inactive")}</td>'
                       f'<td class="n">{m["correlation"]:.3f}</td></tr>' for m in doc["matches"][:max_matches])
        matches = (f'<h2>Filters matched across the models</h2><p class="legend">{matching["pairs"]} pairs matched '
                   f'one-to-one (Hungarian) by the correlation of their per-image maximum activations over '
                   f'{matching["images"]} images; mean correlation {matching["mean_correlation"]:.3f}, '
                   f'{matching["pairs_over_0.5"]} pairs above 0.5, {matching["same_top1_word"]} with the same top '
                   f'word. The {min(max_matches, len(doc["matches"]))} best shown.</p>'
                   f'<table class="list"><tr><th class="n">{e(a)}</th><th>words</th><th class="n">{e(b)}</th>'
                   f'<th>words</th><th class="n">correlation</th></tr>{rows}</table>')
    else:
        matches = f'<p class="legend">Filters not matched: {e(str(matching))}.</p>'
    header = (f'<h1>What {e(a)} and {e(b)} learned</h1><div class="meta">' + _settings([
        ("target", f'{doc["target"]} ({doc["target_images"]} images)'),
        ("vocabulary", f'{doc["vocabulary"].get("source")} ({doc["vocabulary"].get("size")} words)'),
        ("words", f'filter attention, top {doc["settings"]["s"]} words per image over the top '
                  f'{doc["settings"]["p"]} images, ranked by {doc["settings"]["rank"]}'),
        ("made", f"{time.strftime('%Y-%m-%d %H:%M')} by lavise-cli {__version__}")]) + f"<div>{summary}</div></div>"
        '<p class="legend">A learned concept is a distinct top-1 word over a model\'s active filters; the numbers in '
        f'brackets are the filters naming it first in {e(a)} / {e(b)}.</p>')
    return _page(f"LaViSE · compare models · {a} vs {b}", header, lists + matches)


def write_models_page(doc: dict[str, Any], out_dir: Path) -> Path:
    """``out_dir/compare-models.html``."""
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "compare-models.html"
    atomic_write_bytes(page, models_html(doc).encode("utf-8"))
    return page


__all__ = ["render_group_images", "groups_html", "write_groups_page", "models_html", "write_models_page"]
