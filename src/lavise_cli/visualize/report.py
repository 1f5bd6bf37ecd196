"""The layer report: one static HTML page, one thumbnail per distinct image, regions as data.

Every (filter, image) pair of the page shows the image's one shared JPEG thumbnail with the
filter's region drawn over it by the page itself (a canvas, see ``resources/report/report.js``).
The region is :func:`lavise_cli.explain.regions` sampled at the thumbnail's size: the filter's
map upsampled bilinearly to ``thumb`` px, ``>= T_u`` (ties count); the page receives it as short
run-length text (:func:`.drawing.encode_mask`).  So a layer of 1,280 filters × 15 images costs a
thumbnail per distinct top image and a few dozen bytes per pair, not 19,200 highlighted JPEGs.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.images import read_rgb
from ..explain import filter_regions
from ..store import atomic_write_bytes, folder_lock, writer_tag
from .drawing import encode_masks
from .page import Tile, report_html

JPEG_QUALITY = 85
ROWS_PER_READ = 64  # target-cache rows whose maps are read at once (bounds memory)
PIXELS_PER_BATCH = 1 << 24  # upsampled pixels computed at once (64 MB of float32)


def files_dir_for(out_file: Path) -> Path:
    """The thumbnail folder beside a report page: ``page.html`` -> ``page_files/``."""
    return out_file.parent / f"{out_file.stem}_files"


def thumbnail_name(row: int) -> str:
    """The thumbnail file of target-cache row ``row``."""
    return f"i{row:06d}.jpg"


def report_pairs(doc: dict[str, Any], n_images: int) -> list[tuple[int, int, int, str]]:
    """(row, filter, q, path) of every filter's first ``n_images`` top images, sorted by row."""
    pairs = [(int(t["row"]), int(e["filter"]), q, t["path"])
             for e in doc["filters"] for q, t in enumerate(e["top_images"][:n_images])]
    pairs.sort(key=lambda x: (x[0], x[1], x[2]))
    return pairs


def pair_regions(cache: Any, rows: Sequence[int], filters: Sequence[int], size: int
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """The regions of (row, filter) pairs at ``size`` px, in pieces: ``(start, bool (b, size, size))``.

    Exactly :func:`lavise_cli.explain.regions` of the cached maps.  ``rows`` should be sorted
    (pairs of one row together): the maps are read ``ROWS_PER_READ`` distinct rows at a time and
    only each pair's own filter map is kept.
    """
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    filt_t = torch.as_tensor(list(filters), dtype=torch.long)
    step = max(1, PIXELS_PER_BATCH // (size * size))
    start = 0
    while start < len(rows_t):
        uniq: list[int] = []
        end = start
        while end < len(rows_t) and (len(uniq) < ROWS_PER_READ or int(rows_t[end]) == uniq[-1]):
            if not uniq or int(rows_t[end]) != uniq[-1]:
                uniq.append(int(rows_t[end]))
            end += 1
        maps = cache.maps(uniq)  # (R, d, h, w)
        pos_of = {r: i for i, r in enumerate(uniq)}
        pos = torch.as_tensor([pos_of[r] for r in rows_t[start:end].tolist()], dtype=torch.long)
        fmaps = maps[pos, filt_t[start:end]]  # (b, h, w): each pair's own filter
        del maps
        for s in range(0, end - start, step):
            sel = slice(s, min(s + step, end - start))
            yield start + s, filter_regions(fmaps[sel], cache.threshold[filt_t[start:end][sel]], size)
        start = end


def _write_thumbnail(src: str, dst: Path, thumb: int) -> None:
    try:
        with Image.open(src) as im:
            if im.format == "JPEG":
                im.draft("RGB", (thumb, thumb))  # decode at 1/2, 1/4 or 1/8 scale, still >= thumb a side
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            small = rgb.resize((thumb, thumb), Image.Resampling.BILINEAR)  # antialiased
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        read_rgb(src)  # the same one clear error as any other decode of this image
        raise
    with open(dst, "xb") as fh:  # a plain open: the mode follows the user's umask
        small.save(fh, format="JPEG", quality=JPEG_QUALITY)


def render_thumbnails(session: Any, doc: dict[str, Any], folder: Path, n_images: int, thumb: int,
                      progress: Any = None) -> dict[tuple[int, int], Tile]:
    """One JPEG per distinct image in ``folder`` and every pair's region: ``{(filter, q): Tile}``.

    The thumbnail is the whole image resized to ``thumb`` × ``thumb`` (the same squash as the
    model's input, so the region lines up); the regions are :func:`pair_regions` at ``thumb``.
    """
    folder = Path(folder)
    pairs = report_pairs(doc, n_images)
    paths: dict[int, str] = {}
    for r, _, _, p in pairs:
        paths.setdefault(r, p)
    t_img = progress.add_task("report thumbnails", total=len(paths), unit="img") if progress is not None else None
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        jobs = [pool.submit(_write_thumbnail, p, folder / thumbnail_name(r), thumb) for r, p in paths.items()]
        for job in jobs:
            job.result()  # a bad image raises here (DataError: one clear line)
            if t_img is not None:
                progress.advance(t_img)
    t_reg = progress.add_task("report regions", total=len(pairs), unit="pair") if progress is not None else None
    tiles: dict[tuple[int, int], Tile] = {}
    for start, reg in pair_regions(session.cache, [p[0] for p in pairs], [p[1] for p in pairs], thumb):
        arr = reg.numpy()
        area = np.count_nonzero(arr.reshape(len(arr), -1), axis=1).tolist()
        for k, text in enumerate(encode_masks(arr)):
            r, u, q, _ = pairs[start + k]
            tiles[(u, q)] = Tile(thumbnail_name(r), text, int(area[k]))
        if t_reg is not None:
            progress.advance(t_reg, len(reg))
    return tiles


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
        tiles = render_thumbnails(session, explanation, tmp, n_images, thumb, progress)
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
    page = report_html(explanation, evaluation, tiles, quote(final.name), n_images, thumb,
                       meta=getattr(session, "meta", None))
    atomic_write_bytes(out_file, page.encode("utf-8"))
    return out_file
