"""Pictures of what a filter sees: heatmap figures (PNG) and the layer report (static HTML).

Both show a filter's *region* in each of its top images exactly as ``evaluate`` scores it (see
:func:`lavise_cli.explain.regions`: the filter's map upsampled bilinearly to the model's input
size, ``>= T_u``, ties counting, with the footprint of the cells at ``T_u``).  The region is kept as it is, the rest of the image is dimmed
and the region's outline is drawn.  Images are decoded and resized by
:mod:`lavise_cli.data.images`, like everywhere else in the pipeline, and the top images and words
come from an ``explanation_doc`` (the same document ``lavise explain --json`` prints), so a
picture always matches its words.
"""

from __future__ import annotations

import html
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from . import __version__
from .data.images import View, apply_view_image, read_rgb
from .explain import regions
from .models import one_thread
from .store import atomic_write_bytes, folder_lock, temp_sibling, writer_tag

DIM = 0.35  # pixels outside the region are multiplied by this (toward black)
OUTLINE = (255, 214, 0)  # the region's outline: bright yellow
WIDTH = 2  # outline width in pixels at the model's input resolution
PAD = 10  # gap between tiles and around the figure
TITLE_LINES = 3  # header: filter/method line, then up to two lines of words
CAPTION_LINES = 3  # under each tile: rank and activation, then up to two lines of words
FONT_SIZE = 13
TITLE_SIZE = 16
LINE_GAP = 4
BACKGROUND = (255, 255, 255)
INK = (33, 33, 33)
MUTED = (117, 117, 117)
NOVEL = (194, 24, 140)  # novel words (not among the explainer's training concepts), also marked '*'
SHARED = (21, 101, 192)  # an image's words that are also among its filter's explanation words


# -- pure tensor parts -------------------------------------------------------------------------


def outline(region: torch.Tensor, width: int = WIDTH) -> torch.Tensor:
    """The inner boundary of a boolean region: ``region & ~eroded(region)``, ``width`` pixels thick.

    ``region`` is ``(H, W)`` or ``(B, H, W)`` bool.  Erosion is a min-pool (a max-pool of the
    complement) over a ``(2*width+1)²`` window; the image border is not a boundary (max-pool
    pads with -inf), so a region that runs off the image is not closed along the edge.
    """
    if width <= 0:
        return torch.zeros_like(region, dtype=torch.bool)
    squeeze = region.dim() == 2
    r = region[None] if squeeze else region
    comp = (~r).float()[:, None]  # (B, 1, H, W): 1 outside the region
    near_outside = F.max_pool2d(comp, kernel_size=2 * width + 1, stride=1, padding=width)[:, 0] > 0
    edge = r & near_outside
    return edge[0] if squeeze else edge


def highlight(image: torch.Tensor, region: torch.Tensor, *, dim: float = DIM, width: int = WIDTH,
              color: tuple[int, int, int] = OUTLINE) -> torch.Tensor:
    """The image with everything outside ``region`` dimmed and the region's outline drawn.

    ``image`` float ``(3, H, W)`` or ``(B, 3, H, W)`` in [0, 1]; ``region`` bool ``(H, W)`` or
    ``(B, H, W)``.  Returns a float tensor of the image's shape: inside the region the image is
    unchanged except for the outline pixels (``color``, on the region's inner boundary); outside
    it is ``image * dim``.
    """
    squeeze = image.dim() == 3
    img = image[None] if squeeze else image
    reg = region[None] if region.dim() == 2 else region
    reg = reg.to(torch.bool)
    out = torch.where(reg[:, None], img, img * dim)
    edge = outline(reg, width)
    col = torch.tensor(color, dtype=img.dtype, device=img.device).view(1, 3, 1, 1) / 255.0
    out = torch.where(edge[:, None], col.expand_as(out), out)
    return out[0] if squeeze else out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] ``(3, H, W)`` or ``(B, 3, H, W)`` -> uint8 ``(H, W, 3)`` / ``(B, H, W, 3)``, rounded."""
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).movedim(-3, -1).contiguous()


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x).numpy(), "RGB")


# -- fonts and text ----------------------------------------------------------------------------


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font at ``size`` (a fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, AttributeError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _line_height(f: Any) -> int:
    try:
        ascent, descent = f.getmetrics()
        return int(ascent + descent)
    except AttributeError:
        box = f.getbbox("Ag")
        return int(box[3] - box[1]) + 2


Segment = tuple[str, tuple[int, int, int]]  # (text, colour)


def wrap_segments(segments: Sequence[Segment], f: Any, width: int, max_lines: int, sep: str = "  "
                  ) -> list[list[Segment]]:
    """Coloured words laid out in at most ``max_lines`` lines of ``width`` px; overflow ends in '…'."""
    ell = "…"
    sep_w, ell_w = f.getlength(sep), f.getlength(ell)
    lines: list[list[Segment]] = [[]]
    used = 0.0
    for text, colour in segments:
        if f.getlength(text) > width:  # one word longer than a line: cut it
            while len(text) > 1 and f.getlength(text + ell) > width:
                text = text[:-1]
            text += ell
        w = f.getlength(text)
        add = w + (sep_w if lines[-1] else 0)
        if lines[-1] and used + add > width:
            if len(lines) == max_lines:  # no room left: end the last line with an ellipsis that fits
                line = lines[-1]
                while line and used + sep_w + ell_w > width:
                    t, _ = line.pop()
                    used -= f.getlength(t) + (sep_w if line else 0)
                line.append((ell, MUTED))
                return lines
            lines.append([])
            used, add = 0.0, w
        lines[-1].append((text, colour))
        used += add
    return lines


def draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Sequence[Sequence[Segment]], f: Any,
               line_h: int, sep: str = "  ") -> None:
    x0, y = xy
    sep_w = f.getlength(sep)
    for line in lines:
        x = float(x0)
        for i, (text, colour) in enumerate(line):
            if i:
                draw.text((x, y), sep, fill=MUTED, font=f)
                x += sep_w
            draw.text((x, y), text, fill=colour, font=f)
            x += f.getlength(text)
        y += line_h


def word_segments(words: Iterable[dict[str, Any]]) -> list[Segment]:
    """The filter's words as ``word (images)``; novel ones ``word* (images)`` in the novel colour."""
    return [(f"{w['word']}{'*' if w.get('novel') else ''} ({w['images']})", NOVEL if w.get("novel") else INK)
            for w in words]


# -- the heatmap figure ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapLayout:
    """Where everything of a heatmap figure goes (pixels); ``tiles[i]`` is image i's top-left."""

    width: int
    height: int
    tile: int
    cols: int
    rows: int
    title_h: int
    caption_h: int
    tiles: tuple[tuple[int, int], ...]


def heatmap_layout(n: int, size: int, cols: int | None = None) -> HeatmapLayout:
    """A grid of ``n`` tiles of ``size`` px, ``cols`` per row (default: up to 5), with text space."""
    n = max(1, n)
    cols = max(1, min(cols or 5, n))
    rows = -(-n // cols)
    title_h = TITLE_LINES * (_line_height(font(TITLE_SIZE)) + LINE_GAP) + PAD
    caption_h = CAPTION_LINES * (_line_height(font(FONT_SIZE)) + LINE_GAP) + PAD // 2
    width = cols * size + (cols + 1) * PAD
    height = PAD + title_h + rows * (size + caption_h + PAD)
    tiles = []
    for i in range(n):
        r, c = divmod(i, cols)
        tiles.append((PAD + c * (size + PAD), PAD + title_h + r * (size + caption_h + PAD)))
    return HeatmapLayout(width, height, size, cols, rows, title_h, caption_h, tuple(tiles))


def render_figure(images: torch.Tensor, region_masks: torch.Tensor, *, title: str, words: Sequence[dict[str, Any]],
                  captions: Sequence[tuple[str, Sequence[dict[str, Any]]]], cols: int | None = None,
                  dim: float = DIM, width: int = WIDTH, note: str | None = None) -> Image.Image:
    """Compose a heatmap figure from explicit tensors (no store or session needed).

    ``images`` float ``(n, 3, S, S)`` in [0, 1]; ``region_masks`` bool ``(n, S, S)``; ``title`` the
    header line; ``words`` the filter's explanation words (``explanation_doc`` entries: word,
    images, novel); ``captions`` per image a first line and that image's own words (dicts with
    ``word``, ``novel`` and ``shared`` — shared words are also among the filter's words).
    """
    n, _, size, _ = images.shape
    lay = heatmap_layout(n, size, cols)
    fig = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    f_title, f_text = font(TITLE_SIZE), font(FONT_SIZE)
    lh = _line_height(f_text) + LINE_GAP
    lht = _line_height(f_title) + LINE_GAP
    head = title.split("  ·  ")
    draw_lines(draw, (PAD, PAD), wrap_segments([(head[0], INK)] + [(t, MUTED) for t in head[1:]], f_title,
                                               lay.width - 2 * PAD, 1, sep="  ·  "), f_title, lht, sep="  ·  ")
    segs = word_segments(words) if words else [(note or "no words", MUTED)]
    draw_lines(draw, (PAD, PAD + lht), wrap_segments(segs, f_title, lay.width - 2 * PAD, TITLE_LINES - 1), f_title,
               lht)
    tiles = highlight(images, region_masks, dim=dim, width=width)
    for i, (x, y0) in enumerate(lay.tiles):
        fig.paste(to_pil(tiles[i]), (x, y0))
        head, iw = captions[i] if i < len(captions) else ("", [])
        cy = y0 + size + LINE_GAP
        draw_lines(draw, (x, cy), wrap_segments([(head, MUTED)], f_text, size, 1), f_text, lh)
        isegs = [(f"{w['word']}{'*' if w.get('novel') else ''}",
                  NOVEL if w.get("novel") else (SHARED if w.get("shared") else INK)) for w in iw]
        draw_lines(draw, (x, cy + lh), wrap_segments(isegs, f_text, size, CAPTION_LINES - 1, sep=", "), f_text, lh,
                   sep=", ")
    return fig


# -- from a session ----------------------------------------------------------------------------


def load_tiles(session: Any, rows: Sequence[int], paths: Sequence[str | Path], filters: Sequence[int],
               size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 3, S, S)`` and the filter's regions ``(n, S, S)`` for (row, path, filter) triples.

    ``rows`` are target-cache rows; the regions are :func:`regions` of the cached maps, the very
    regions ``evaluate`` scores; ``S`` is the model's input size.
    """
    size = size or session.size
    uniq, inv = torch.unique(torch.as_tensor(list(rows), dtype=torch.long), return_inverse=True)
    maps = session.cache.maps(uniq)[inv]
    reg = regions(maps, torch.as_tensor(list(filters), dtype=torch.long), session.cache.threshold, size)
    imgs = torch.stack([apply_view_image(read_rgb(p), View(), size) for p in paths]) if len(paths) else \
        torch.zeros(0, 3, size, size)
    return imgs, reg


def _image_word_dicts(img: dict[str, Any], filter_words: set[str], concepts: set[str] | None) -> list[dict[str, Any]]:
    out = []
    for w in img.get("words", []):
        out.append({"word": w, "novel": concepts is not None and w not in concepts, "shared": w in filter_words})
    return out


def _title(doc: dict[str, Any] | None, entry: dict[str, Any]) -> str:
    parts = [f"filter {entry['filter']}"]
    if doc:
        model = str(doc.get("model", ""))
        model = Path(model).name if "/" in model or "\\" in model else model  # a factory file: its name
        parts += [f"{model} {doc.get('layer', '')}".strip(), doc.get("method", "")]
        st = doc.get("settings", {})
        if st:
            parts.append(f"words over top {st.get('p')} images")
    parts.append(f"T = {entry['threshold']:.3g}")
    return "  ·  ".join(p for p in parts if p)


def render_heatmap(session: Any, entry: dict[str, Any], n: int = 5, *, doc: dict[str, Any] | None = None,
                   cols: int | None = None) -> Image.Image:
    """One filter's figure from an ``explanation_doc`` filter entry: its first ``n`` top images.

    The images are exactly ``entry["top_images"][:n]`` (rows of the session's target cache), so
    the picture shows the images ``lavise explain`` named the words from.
    """
    tops = entry["top_images"][:n]
    u = int(entry["filter"])
    if not tops:
        raise ValueError(f"filter {u} has no top images")
    imgs, reg = load_tiles(session, [t["row"] for t in tops], [t["path"] for t in tops], [u] * len(tops))
    concepts = set(session.meta["concepts"]) if getattr(session, "meta", None) else None
    fw = {w["word"] for w in entry["words"]}
    empty = ~reg.flatten(1).any(1)
    captions = [(f"#{q + 1}  max {t['max_activation']:.3g}  " + ("no region" if empty[q] else Path(t["path"]).name),
                 _image_word_dicts(t, fw, concepts)) for q, t in enumerate(tops)]
    note = "inactive: its top 0.5 % never rises above 0" if entry.get("inactive") else None
    return render_figure(imgs, reg, title=_title(doc, entry), words=[] if note else entry["words"],
                         captions=captions, cols=cols, note=note)


def save_png(img: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as fh:  # a plain open: the mode follows the user's umask
            img.save(fh, format="PNG", optimize=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def heatmap_paths(session: Any, doc: dict[str, Any], out_dir: Path, n: int = 5, *, cols: int | None = None,
                  progress: Any = None) -> list[Path]:
    """Render every filter of ``doc`` (an ``explanation_doc``) to ``out_dir/filter-{u:04d}.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = progress.add_task("heatmaps", total=len(doc["filters"]), unit="filter") if progress is not None else None
    paths = []
    for entry in doc["filters"]:
        img = render_heatmap(session, entry, n, doc=doc, cols=cols)
        paths.append(save_png(img, out_dir / f"filter-{int(entry['filter']):04d}.png"))
        if task is not None:
            progress.advance(task)
    return paths


# -- the report --------------------------------------------------------------------------------


def files_dir_for(out_file: Path) -> Path:
    """The thumbnail folder beside a report page: ``page.html`` -> ``page_files/``."""
    return out_file.parent / f"{out_file.stem}_files"


def render_thumbnails(session: Any, doc: dict[str, Any], folder: Path, n_images: int, thumb: int,
                      progress: Any = None, batch: int = 128, quality: int = 85
                      ) -> dict[tuple[int, int], tuple[str, int]]:
    """Highlighted JPEG thumbnails ``f{u:04d}-{q:02d}.jpg`` for every filter's first ``n_images`` images.

    Work is grouped by image: (filter, image) pairs are sorted by target row and handled in
    batches, so each image is decoded once per batch and the cached maps are read shard by shard.
    The region and outline are computed at the model's input size, then the highlighted image is
    resized to ``thumb`` px (the outline is drawn thick enough to survive the resize).  Returns
    ``{(filter, q): (file name, region area in pixels at the input size)}``.
    """
    size = session.size
    width = max(WIDTH, round(1.5 * size / max(thumb, 1)))
    pairs = []  # (row, filter, q, path)
    for e in doc["filters"]:
        for q, t in enumerate(e["top_images"][:n_images]):
            pairs.append((int(t["row"]), int(e["filter"]), q, t["path"]))
    pairs.sort(key=lambda x: (x[0], x[1], x[2]))
    task = progress.add_task("report thumbnails", total=len(pairs), unit="img") if progress is not None else None
    names: dict[tuple[int, int], tuple[str, int]] = {}
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        rows = [c[0] for c in chunk]
        uniq = sorted(set(rows))
        pos = {r: i for i, r in enumerate(uniq)}
        maps = session.cache.maps(uniq)
        first_path = {}
        for r, _, _, p in chunk:
            first_path.setdefault(r, p)
        with one_thread():
            imgs = torch.stack([apply_view_image(read_rgb(first_path[r]), View(), size) for r in uniq])
        idx = torch.tensor([pos[r] for r in rows], dtype=torch.long)
        filt = torch.tensor([c[1] for c in chunk], dtype=torch.long)
        reg = regions(maps[idx], filt, session.cache.threshold, size)
        area = reg.flatten(1).sum(1).tolist()
        hl = highlight(imgs[idx], reg, width=width)
        if thumb != size:
            with one_thread():
                hl = torch.stack([apply_view_image(h, View(), thumb) for h in hl])
        pixels = to_uint8(hl).numpy()
        for k, (_, u, q, _) in enumerate(chunk):
            name = f"f{u:04d}-{q:02d}.jpg"
            Image.fromarray(pixels[k], "RGB").save(folder / name, format="JPEG", quality=quality)
            names[(u, q)] = (name, int(area[k]))
        if task is not None:
            progress.advance(task, len(chunk))
    return names


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


_CSS = """
:root{--ink:#212121;--muted:#757575;--novel:#c2188c;--line:#e0e0e0;--accent:#1565c0}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);margin:0;background:#fafafa}
header{padding:16px 24px;background:#fff;border-bottom:1px solid var(--line)}
h1{font-size:20px;margin:0 0 8px}
.meta{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
th{color:var(--muted);font-weight:normal}
table.recall td.n,table.recall th.n{text-align:right}
.legend{color:var(--muted);font-size:12px;max-width:70em;margin:8px 0 0}
.tools{position:sticky;top:0;z-index:2;display:flex;flex-wrap:wrap;gap:14px;align-items:center;
 padding:8px 24px;background:#fff;border-bottom:1px solid var(--line)}
.tools input[type=search]{width:14em}.tools input[type=number]{width:6em}
#count{color:var(--muted)}
main{padding:12px 24px}
.card{background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px 12px;margin:0 0 12px;
 content-visibility:auto;contain-intrinsic-size:auto 260px}
.card h2{font-size:15px;margin:0 0 4px;display:flex;gap:16px;align-items:baseline}
.rec{font-weight:normal;color:var(--accent);font-size:13px}
.inactive{color:var(--muted);font-weight:normal;font-size:13px}
.words{margin:0 0 8px}
.w{margin-right:12px;white-space:nowrap}.w small{color:var(--muted)}
.novel{color:var(--novel)}
.strip{display:flex;flex-wrap:wrap;gap:4px}
.strip img{display:block;background:#eee;border-radius:3px}
.rate{display:none;border:0;margin:8px 0 0;padding:0;gap:14px;align-items:center}
.rate legend{float:left;margin-right:8px;color:var(--muted)}.rate small{color:var(--muted)}
.instructions{display:none;margin:0;padding:6px 24px;background:#fff8e1;border-bottom:1px solid var(--line)}
body.eval .rate{display:flex}body.eval .instructions{display:block}
body.eval .rec,body.eval .w small{display:none}
.card.rated{border-color:#81c784}
[hidden]{display:none!important}
"""

_JS = r"""
const main = document.getElementById('cards');
const cards = Array.from(main.querySelectorAll('.card'));
const $ = id => document.getElementById(id);
const store = 'lavise-ratings:' + document.body.dataset.key;
function recallOf(c) { return c.dataset.recall === '' ? null : parseFloat(c.dataset.recall); }
function keyOf(c, by) {
  const v = by.startsWith('confidence') ? c.dataset.confidence : c.dataset.recall;
  return v === undefined || v === '' ? null : parseFloat(v);
}
function apply() {
  const by = $('sort').value, word = $('word').value.trim().toLowerCase(), min = $('minrec').value;
  const sorted = cards.slice().sort((a, b) => {
    if (by !== 'filter') {
      const ra = keyOf(a, by), rb = keyOf(b, by);
      if (ra !== rb) {
        if (ra === null) return 1;
        if (rb === null) return -1;
        return by.endsWith('-asc') ? ra - rb : rb - ra;
      }
    }
    return a.dataset.filter - b.dataset.filter;
  });
  let shown = 0;
  for (const c of sorted) {
    const r = recallOf(c);
    const hide = (word && !c.dataset.words.split('|').some(w => w.includes(word))) ||
                 (min !== '' && (r === null || r < parseFloat(min)));
    c.hidden = hide;
    if (!hide) shown++;
    main.appendChild(c);
  }
  $('count').textContent = shown + ' of ' + cards.length + ' filters';
}
function ratings() {
  const out = [];
  for (const c of cards) {
    const r = c.querySelector('.rate input:checked');
    if (r) out.push({filter: +c.dataset.filter, rating: r.value, words: c.dataset.words.split('|').filter(Boolean)});
  }
  return out.sort((a, b) => a.filter - b.filter);
}
function ratingsCSV() {
  const q = s => /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  return 'filter,rating,words\n' + ratings().map(r => [r.filter, r.rating, q(r.words.join('; '))].join(',') + '\n').join('');
}
function downloadCSV() {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([ratingsCSV()], {type: 'text/csv'}));
  a.download = 'ratings-' + document.body.dataset.key.replace(/[^\w.-]+/g, '_') + '.csv';
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
main.addEventListener('change', e => {
  if (!e.target.matches('.rate input')) return;
  e.target.closest('.card').classList.add('rated');
  const saved = {};
  for (const r of ratings()) saved[r.filter] = r.rating;
  try { localStorage.setItem(store, JSON.stringify(saved)); } catch (err) {}
});
try {
  const saved = JSON.parse(localStorage.getItem(store) || '{}');
  for (const c of cards) {
    const v = saved[c.dataset.filter], i = v && c.querySelector('.rate input[value="' + v + '"]');
    if (i) { i.checked = true; c.classList.add('rated'); }
  }
} catch (err) {}
for (const id of ['sort', 'word', 'minrec']) $(id).addEventListener('input', apply);
$('evalmode').addEventListener('change', e => document.body.classList.toggle('eval', e.target.checked));
$('export').addEventListener('click', downloadCSV);
apply();
"""

RATING_SCALE = ((1, "no match"), (2, "weak"), (3, "partly"), (4, "mostly"), (5, "exactly"))


def report_html(doc: dict[str, Any], evaluation: dict[str, Any] | None, thumbs: dict[tuple[int, int], tuple[str, int]],
                files_url: str, n_images: int, thumb: int, *, meta: dict[str, Any] | None = None) -> str:
    """The report page as a string: settings and recall at the top, then one card per filter."""
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
    srows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in settings_rows)
    if evaluation:
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
        recall_html = (f'<table class="recall"><tr><th>method</th>{head}<th class="n">filters</th>'
                       f'<th class="n">pairs</th><th class="n">skipped</th></tr>{"".join(body)}</table>'
                       f'<p class="legend">recall@s: mean over (filter, image) pairs / mean over filters, on '
                       f'{e(str(evaluation.get("target")))}; ground truth: concepts whose mask has IoU &gt; '
                       f'{evaluation.get("iou_threshold", 0.04)} with the region; pairs with none are skipped.</p>')
    else:
        recall_html = ('<p class="legend">Not evaluated (the target set has no labels, or --no-evaluate): '
                       'no recall.</p>')
    cards = []
    for f in doc["filters"]:
        u = int(f["filter"])
        r = recalls.get(u)
        words = "".join(f'<span class="w{" novel" if w["novel"] else ""}">{e(w["word"])}{"*" if w["novel"] else ""}'
                        f' <small>({w["images"]})</small></span>' for w in f["words"])
        imgs = []
        for q, t in enumerate(f["top_images"][:n_images]):
            if (u, q) not in thumbs:
                continue
            name, area = thumbs[(u, q)]
            tip = f"#{q + 1} {Path(t['path']).name}: {', '.join(t.get('words', []))}"
            if not area:
                tip += " (no region: no cell of the map reaches T)"
            imgs.append(f'<img loading="lazy" src="{files_url}/{name}" alt="" title="{e(tip)}">')
        status = ('<span class="inactive">inactive: its top 0.5 % never rises above 0</span>' if f["inactive"]
                  else "")
        rec = f'<span class="rec">{rlabel} {_fmt(r, 2)}</span>' if rkey else ""
        conf = None if f["inactive"] else f.get("confidence")
        if conf is not None:
            rec += f' <span class="rec">confidence {_fmt(conf, 2)}</span>'
        rate = "".join(f'<label><input type="radio" name="r{u}" value="{v}">{v} <small>{e(t)}</small></label>'
                       for v, t in RATING_SCALE)
        cards.append(
            f'<section class="card" id="f{u}" data-filter="{u}" data-recall="{"" if r is None else f"{r:.6g}"}" '
            f'data-confidence="{"" if conf is None else f"{conf:.6g}"}" '
            f'data-words="{e("|".join(w["word"].lower() for w in f["words"]))}">'
            f'<h2>filter {u} {rec}{status}</h2><p class="words">{words or "<i>no words</i>"}</p>'
            f'<div class="strip">{"".join(imgs)}</div>'
            f'<fieldset class="rate"><legend>rating</legend>{rate}</fieldset></section>')
    key = f"{doc.get('explainer')}:{method}:{doc.get('target')}"
    recall_sort = (f'<option value="recall">{rlabel}, high first</option><option value="recall-asc">{rlabel}, '
                   f'low first</option>') if rkey else ""
    recall_sort += ('<option value="confidence">confidence, high first</option>'
                    '<option value="confidence-asc">confidence, low first</option>')
    scale = ", ".join(f"{v} = {t}" for v, t in RATING_SCALE)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>LaViSE · {e(str(doc.get('explainer')))} · {e(method)}</title>
<style>{_CSS}.strip img{{width:{thumb}px;height:{thumb}px}}</style></head>
<body data-key="{e(key)}">
<header><h1>What the filters of {e(str(doc.get('model')))} {e(str(doc.get('layer')))} see</h1>
<div class="meta"><table class="settings">{srows}</table><div>{recall_html}</div></div>
<p class="legend">Each image shows the filter's region: its activation map upsampled bilinearly to the
{e(str(meta.get('preprocess', {}).get('input_size', '')) if meta else '')} px input and kept where it is at
least the filter's threshold T (the 0.995 quantile of its activations over the target set; ties count), together
with the cells of the map that reach T themselves, outlined in yellow; the rest is dimmed. Words are ranked
{"by how specific they are to this filter (their count against their mean count over the layer's filters)"
 if st.get("rank") == "specific" else "by how many top images named them"} (the count of top images naming
each in brackets); confidence = the share of top images naming the top word × how specific that word is;
<span class="novel">word*</span> = novel, not among the explainer's training concepts.</p></header>
<div class="tools"><label>sort <select id="sort"><option value="filter">filter id</option>{recall_sort}</select></label>
<label>word <input id="word" type="search" placeholder="contains…"></label>
<label>min {e(rlabel)} <input id="minrec" type="number" min="0" max="1" step="0.05"{'' if rkey else ' disabled'}></label>
<label><input id="evalmode" type="checkbox"> human evaluation</label>
<button id="export" type="button">download ratings (CSV)</button><span id="count"></span></div>
<p class="instructions">Human evaluation: for each filter, look at the highlighted regions of its {n_images}
images and rate how well the explanation describes what they have in common ({e(scale)}). Scores are hidden
in this mode; ratings are kept in this browser and exported with the button above.</p>
<main id="cards">
{chr(10).join(cards)}
</main>
<script>{_JS}</script>
</body></html>
"""


def build_report(session: Any, explanation: dict[str, Any], evaluation: dict[str, Any] | None, out_file: Path,
                 n_images: int = 15, thumb: int = 128, progress: Any = None) -> Path:
    """Write the report page ``out_file`` and its thumbnails in ``{stem}_files/`` beside it.

    ``explanation`` is an ``explanation_doc``; ``evaluation`` an ``evaluate_methods`` result (or
    None).  The thumbnails are written to a temporary folder that replaces the old one, then the
    page is written atomically, so an interrupted run leaves the previous report intact.
    """
    out_file = Path(out_file).expanduser().resolve()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    final = files_dir_for(out_file)
    tmp = out_file.parent / f".{final.name}.tmp{writer_tag()}"
    tmp.mkdir()
    try:
        thumbs = render_thumbnails(session, explanation, tmp, n_images, thumb, progress)
        old = None
        with folder_lock(out_file.parent):  # a concurrent identical report swaps its folder before or after
            if final.exists():
                old = out_file.parent / f".{final.name}.old{writer_tag()}"
                os.replace(final, old)
            os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    page = report_html(explanation, evaluation, thumbs, quote(final.name), n_images, thumb,
                       meta=getattr(session, "meta", None))
    atomic_write_bytes(out_file, page.encode("utf-8"))
    return out_file


__all__ = ["outline", "highlight", "heatmap_layout", "render_figure", "render_heatmap", "heatmap_paths",
           "build_report", "report_html", "render_thumbnails", "load_tiles", "save_png", "files_dir_for",
           "per_filter_recall", "HeatmapLayout"]
