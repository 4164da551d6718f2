"""Labelled image grids: a title (prompt, negative prompt, settings), one labelled column per
method and one labelled row per seed. ``python -m nag.demo`` and ``nag compare`` draw them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["make_grid", "GridLayout", "layout", "MIN_CELL", "PAD", "HEADER", "ROW_LABEL"]

#: Cells are upscaled by a whole factor to at least this many pixels wide.
MIN_CELL = 128
#: Padding between cells, height of the column-label strip, width of the row-label strip.
PAD, HEADER, ROW_LABEL = 6, 30, 64
#: Line height of the title.
TITLE_LINE = 18


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


@dataclass(frozen=True)
class GridLayout:
    """Where everything sits in a grid, in pixels."""

    cell: tuple[int, int]
    title_h: int
    size: tuple[int, int]

    def cell_origin(self, column: int, row: int) -> tuple[int, int]:
        """Top-left corner of the cell at ``column``, ``row``."""
        cw, ch = self.cell
        return ROW_LABEL + PAD + column * (cw + PAD), self.title_h + HEADER + row * (ch + PAD)


def cell_size(image_size: tuple[int, int], cell: int | None = None) -> tuple[int, int]:
    """The size an image gets: ``cell`` square when given, else upscaled by a whole factor
    (nearest neighbour keeps the pixels sharp) to at least ``MIN_CELL`` wide."""
    if cell is not None:
        return cell, cell
    w, h = image_size
    factor = max(1, math.ceil(MIN_CELL / w))
    return w * factor, h * factor


def layout(image_size: tuple[int, int], columns: int, rows: int, title: str = "",
           cell: int | None = None) -> GridLayout:
    """The layout :func:`make_grid` uses; wide enough for the title's longest line."""
    from PIL import Image, ImageDraw

    cw, ch = cell_size(image_size, cell)
    lines = title.split("\n") if title else []
    title_h = TITLE_LINE * len(lines) + 6 if lines else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_w = max((int(measure.textlength(line, font=_font(14))) for line in lines), default=0) + 2 * PAD
    width = max(ROW_LABEL + columns * (cw + PAD) + PAD, title_w)
    return GridLayout((cw, ch), title_h, (width, title_h + HEADER + rows * (ch + PAD)))


def make_grid(columns: dict[str, list[Any]], row_labels: Sequence[str] = (), title: str = "",
              cell: int | None = None) -> Any:
    """A labelled grid: one column per entry of ``columns`` (label -> PIL images), one row per sample.

    ``title`` (lines split at ``\\n``) sits above everything, the column labels in a strip below
    it, ``row_labels`` left of the rows.
    """
    from PIL import Image, ImageDraw

    images = list(columns.values())
    grid_layout = layout(images[0][0].size, len(columns), len(images[0]), title, cell)
    grid = Image.new("RGB", grid_layout.size, "white")
    draw = ImageDraw.Draw(grid)
    font, small = _font(14), _font(12)
    for i, line in enumerate(title.split("\n") if title else []):
        draw.text((PAD, 4 + TITLE_LINE * i), line, fill="black", font=font)
    cw, ch = grid_layout.cell
    for c, (label, column) in enumerate(columns.items()):
        x, _ = grid_layout.cell_origin(c, 0)
        draw.text((x + cw // 2, grid_layout.title_h + HEADER // 2), label, fill="black", font=font, anchor="mm")
        for r, image in enumerate(column):
            grid.paste(image.convert("RGB").resize((cw, ch), Image.NEAREST), grid_layout.cell_origin(c, r))
    for r, label in enumerate(row_labels):
        _, y = grid_layout.cell_origin(0, r)
        draw.text((ROW_LABEL // 2, y + ch // 2), label, fill="black", font=small, anchor="mm")
    return grid
