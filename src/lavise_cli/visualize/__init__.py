"""Pictures of what a filter sees: heatmap figures (PNG) and the layer report (static HTML).

Both show a filter's *region* in each of its top images as ``evaluate`` scores it (see
:func:`lavise_cli.explain.regions`: the filter's map upsampled bilinearly, ``>= T_u``, ties
counting): kept as it is, the rest of the image dimmed, the region outlined.

- :mod:`.drawing`: regions to pixels (dim, outline) and to compact data (run lengths);
- :mod:`.figure`: text layout and the heatmap PNG of one filter;
- :mod:`.page`: the report's HTML, from the package's template, style sheet and script;
- :mod:`.report`: the report: one thumbnail per distinct image, every pair's region as data.
"""

from __future__ import annotations

from .drawing import DIM, OUTLINE, WIDTH, decode_mask, encode_mask, encode_masks, highlight, outline, to_pil, to_uint8
from .figure import (
    BACKGROUND,
    CAPTION_LINES,
    FONT_SIZE,
    INK,
    LINE_GAP,
    MUTED,
    NOVEL,
    PAD,
    SHARED,
    TITLE_LINES,
    TITLE_SIZE,
    HeatmapLayout,
    Segment,
    draw_lines,
    font,
    heatmap_layout,
    heatmap_paths,
    load_tiles,
    render_figure,
    render_heatmap,
    save_png,
    word_segments,
    wrap_segments,
)
from .page import RATING_SCALE, Tile, outline_width, per_filter_recall, report_html
from .report import build_report, files_dir_for, pair_regions, render_thumbnails, report_pairs, thumbnail_name

__all__ = ["outline", "highlight", "heatmap_layout", "render_figure", "render_heatmap", "heatmap_paths",
           "build_report", "report_html", "render_thumbnails", "load_tiles", "save_png", "files_dir_for",
           "per_filter_recall", "HeatmapLayout", "encode_mask", "encode_masks", "decode_mask", "pair_regions", "report_pairs",
           "thumbnail_name", "Tile", "outline_width", "to_uint8", "to_pil", "font", "wrap_segments", "draw_lines",
           "word_segments", "Segment", "DIM", "OUTLINE", "WIDTH", "PAD", "RATING_SCALE", "BACKGROUND",
           "CAPTION_LINES", "FONT_SIZE", "INK", "LINE_GAP", "MUTED", "NOVEL", "SHARED", "TITLE_LINES", "TITLE_SIZE"]
