"""Heatmap figures (PNG): a filter's top images with its region highlighted, under its words.

The region in each image is exactly the one ``evaluate`` scores (see
:func:`lavise_cli.explain.regions`: the filter's map upsampled bilinearly to the model's input
size, ``>= T_u``, ties counting, with the footprint of the cells at ``T_u``), drawn by
:func:`.drawing.highlight`: kept as it is, the rest of the image dimmed, the region outlined.
Images are decoded and resized by
:mod:`lavise_cli.data.images`, like everywhere else in the pipeline, and the top images and words
come from an ``explanation_doc`` (the same document ``lavise explain --json`` prints), so a
picture always matches its words.  Text layout (wrapping coloured words into a width) lives here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..data.images import View, apply_view_image, read_rgb
from ..explain import regions
from ..store import temp_sibling
from .drawing import DIM, WIDTH, highlight, to_pil

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

