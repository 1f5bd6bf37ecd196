"""The report page's HTML: the package's template, style sheet and script, filled in.

``resources/report/report.html`` is a :class:`string.Template`; its style sheet
(``report.css``) and script (``report.js``) are inlined into it, so the page needs no network
and no file but its thumbnails.  Everything that comes from the user (explainer, model, layer
and dataset names, file names, words) is HTML-escaped before it goes in.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from .. import __version__
from .drawing import DIM, OUTLINE

RATING_SCALE = ((1, "no match"), (2, "weak"), (3, "partly"), (4, "mostly"), (5, "exactly"))


@dataclass(frozen=True)
class Tile:
    """One (filter, image) pair of the page: its thumbnail file and the filter's region in it."""

    file: str  # the image's thumbnail, in the files folder (shared by every filter that shows it)
    mask: str  # the region at the thumbnail's size, as :func:`.drawing.encode_mask` text
    area: int  # region pixels at the thumbnail's size (0: nothing highlighted)


@lru_cache(maxsize=None)
def resource(name: str) -> str:
    """A file of ``resources/report/`` as text."""
    return resources.files("lavise_cli").joinpath("resources", "report", name).read_text(encoding="utf-8")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _nan_none(x: Any) -> Any:
    return None if isinstance(x, float) and x != x else x


def per_filter_recall(evaluation: dict[str, Any] | None, method: str) -> tuple[str | None, dict[int, float | None]]:
    """(``recall@s`` key shown, {filter: recall}) from an ``evaluate_methods`` result (smallest ``s``)."""
    if not evaluation or method not in evaluation.get("per_filter", {}):
        return None, {}
    pf = evaluation["per_filter"][method]
    cuts = sorted(int(k.split("@")[1]) for k in pf if k.startswith("recall@"))
    if not cuts:
        return None, {}
    key = f"recall@{cuts[0]}"
    return key, {int(u): _nan_none(v) for u, v in zip(pf["filters"], pf[key])}


def outline_width(thumb: int) -> int:
    """Outline pixels at a thumbnail of ``thumb`` px: 1 up to 119 px, 2 at 128, 3 at 200 ..."""
    return max(1, round(thumb / 80))


def _recall_table(evaluation: dict[str, Any] | None) -> str:
    e = html.escape
    if not evaluation:
        return '<p class="legend">Not evaluated (the target set has no labels, or --no-evaluate): no recall.</p>'
    cuts = evaluation.get("recall", [])
    head = "".join(f'<th class="n">R@{c}</th>' for c in cuts)
    body = []
    for m, r in evaluation.get("methods", {}).items():
        subs = [(m, r)] + [(f"{m} ({s} concepts)", r[s]) for s in ("seen", "unseen") if s in r]
        for label, rr in subs:
            cells = "".join(f'<td class="n">{_fmt(_nan_none(rr[f"recall@{c}"]["pair_mean"]))} / '
                            f'{_fmt(_nan_none(rr[f"recall@{c}"]["filter_mean"]))}</td>' for c in cuts)
            body.append(f'<tr><td>{e(label)}</td>{cells}<td class="n">{rr["filters"]}</td>'
                        f'<td class="n">{rr["pairs"]}</td><td class="n">{rr["skipped"]}</td></tr>')
    return (f'<table class="recall"><tr><th>method</th>{head}<th class="n">filters</th>'
            f'<th class="n">pairs</th><th class="n">skipped</th></tr>{"".join(body)}</table>'
            f'<p class="legend">recall@s: mean over (filter, image) pairs / mean over filters, on '
            f'{e(str(evaluation.get("target")))}; ground truth: concepts whose mask has IoU &gt; '
            f'{e(str(evaluation.get("iou_threshold", 0.04)))} with the region; pairs with none are skipped.</p>')


def _card(f: dict[str, Any], tiles: dict[tuple[int, int], Tile], files_url: str, n_images: int,
          rkey: str | None, rlabel: str, recall: float | None) -> str:
    e = html.escape
    u = int(f["filter"])
    words = "".join(f'<span class="w{" novel" if w["novel"] else ""}">{e(w["word"])}{"*" if w["novel"] else ""}'
                    f' <small>({w["images"]})</small></span>' for w in f["words"])
    imgs = []
    for q, t in enumerate(f["top_images"][:n_images]):
        tile = tiles.get((u, q))
        if tile is None:
            continue
        tip = f"#{q + 1} {Path(t['path']).name}: {', '.join(t.get('words', []))}"
        if not tile.area:
            tip += " (no region: no cell of the map reaches T)"
        imgs.append(f'<span class="t" title="{e(tip)}" data-m="{e(tile.mask)}">'
                    f'<img loading="lazy" src="{files_url}/{e(tile.file)}" alt=""></span>')
    status = '<span class="inactive">inactive: its top 0.5 % never rises above 0</span>' if f["inactive"] else ""
    rec = f'<span class="rec">{e(rlabel)} {_fmt(recall, 2)}</span>' if rkey else ""
    conf = None if f["inactive"] else f.get("confidence")
    if conf is not None:
        rec += f' <span class="rec">confidence {_fmt(conf, 2)}</span>'
    rate = "".join(f'<label><input type="radio" name="r{u}" value="{v}">{v} <small>{e(t)}</small></label>'
                   for v, t in RATING_SCALE)
    return (f'<section class="card" id="f{u}" data-filter="{u}" data-recall="{"" if recall is None else f"{recall:.6g}"}" '
            f'data-confidence="{"" if conf is None else f"{conf:.6g}"}" '
            f'data-words="{e("|".join(w["word"].lower() for w in f["words"]))}">'
            f'<h2>filter {u} {rec}{status}</h2><p class="words">{words or "<i>no words</i>"}</p>'
            f'<div class="strip">{"".join(imgs)}</div>'
            f'<fieldset class="rate"><legend>rating</legend>{rate}</fieldset></section>')


def report_html(doc: dict[str, Any], evaluation: dict[str, Any] | None, tiles: dict[tuple[int, int], Tile],
                files_url: str, n_images: int, thumb: int, *, meta: dict[str, Any] | None = None) -> str:
    """The report page as a string: settings and recall at the top, then one card per filter.

    ``tiles`` maps (filter, position among its top images) to its :class:`Tile`; ``files_url``
    is the (percent-encoded) folder of the thumbnails relative to the page.
    """
    e = html.escape
    method = doc["method"]
    rkey, recalls = per_filter_recall(evaluation, method)
    rlabel = rkey.replace("recall@", "R@") if rkey else "recall"
    st = doc.get("settings", {})
    voc = doc.get("vocabulary", {})
    settings_rows = [
        ("explainer", doc.get("explainer")), ("model", doc.get("model")), ("layer", doc.get("layer")),
        ("method", method), ("target", f"{doc.get('target')} ({doc.get('target_images')} images)"),
        ("vocabulary", f"{voc.get('source')} ({voc.get('size')} words)"),
        ("words", f"top {st.get('s')} per image over the top {st.get('p')} images; {st.get('k')} shown"),
        ("word search", f"retrieval {st.get('retrieval', 'cosine')}, ranked by {st.get('rank', 'count')}"),
        ("images shown", f"{n_images} per filter"), ("filters", str(len(doc["filters"]))),
    ]
    if meta:
        settings_rows.insert(3, ("weights", meta.get("weights")))
        if meta.get("datasets"):
            settings_rows.append(("trained on", ", ".join(meta["datasets"])))
    settings_rows.append(("made", f"{time.strftime('%Y-%m-%d %H:%M')} by lavise-cli {__version__}"))
    recall_sort = (f'<option value="recall">{e(rlabel)}, high first</option><option value="recall-asc">{e(rlabel)}, '
                   f'low first</option>') if rkey else ""
    recall_sort += ('<option value="confidence">confidence, high first</option>'
                    '<option value="confidence-asc">confidence, low first</option>')
    ranked = ("by how specific they are to this filter (their count against their mean count over the layer's "
              "filters)" if st.get("rank") == "specific" else "by how many top images named them")
    cards = [_card(f, tiles, files_url, n_images, rkey, rlabel, recalls.get(int(f["filter"]))) for f in doc["filters"]]
    return Template(resource("report.html")).substitute(
        explainer=e(str(doc.get("explainer"))), method=e(method), model=e(str(doc.get("model"))),
        layer=e(str(doc.get("layer"))), key=e(f"{doc.get('explainer')}:{method}:{doc.get('target')}"),
        thumb=int(thumb), outline_width=outline_width(thumb), dim=DIM, outline_color=",".join(map(str, OUTLINE)),
        input_size=e(f"{size} px ") if (size := (meta or {}).get("preprocess", {}).get("input_size")) else "",
        settings_rows="".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in settings_rows),
        recall_html=_recall_table(evaluation), recall_sort=recall_sort, recall_label=e(rlabel),
        minrec_disabled="" if rkey else " disabled", n_images=int(n_images), ranked=e(ranked),
        scale=e(", ".join(f"{v} = {t}" for v, t in RATING_SCALE)), cards="\n".join(cards),
        css=resource("report.css"), js=resource("report.js"),
    )
