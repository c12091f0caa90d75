"""Grid images as A1111 draws them (modules/images.py): the plain grid, its annotated form (axis labels,
struck-through inactive prompt parts, margins), and SD upscale's overlapping tiles and their blend.

Sizes follow A1111 exactly: a grid is cols × rows cells of the largest cell size; the annotated grid adds
a left pad of 3/4 of a cell when any row has a label, a top pad from the label heights, and margins between
cells. The label font is A1111's (Roboto, from the `font-roboto` package) when installed, else Pillow's own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

# A1111's options grid_background_color, grid_text_active_color, grid_text_inactive_color.
BACKGROUND, TEXT_ACTIVE, TEXT_INACTIVE = "#ffffff", "#000000", "#999999"


def image_grid(images: list[Image.Image], batch_size: int = 1, rows: int | None = None) -> Image.Image:
    """Cells left to right, top to bottom; `rows` None: A1111's default (n_rows -1: round(sqrt(n)))."""
    if rows is None:
        rows = round(math.sqrt(len(images)))
    rows = max(1, min(rows, len(images)))
    cols = math.ceil(len(images) / rows)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), ImageColor.getcolor(BACKGROUND, "RGB"))
    for i, im in enumerate(images):
        # A smaller cell is centred in its slot.
        dx = (w - im.width) // 2
        dy = (h - im.height) // 2
        grid.paste(im, (i % cols * w + dx, i // cols * h + dy))
    return grid


@dataclass
class Label:
    """One line of a grid annotation (A1111's GridAnnotation); inactive lines are grey and struck through."""
    text: str = ""
    is_active: bool = True
    size: tuple[int, int] = (0, 0)
    allowed_width: int = 0


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont:
    try:
        import font_roboto  # A1111's grid font
        return ImageFont.truetype(font_roboto.Roboto, size)
    except (ImportError, AttributeError, OSError):
        return ImageFont.load_default(size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=fnt) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def draw_grid_annotations(im: Image.Image, width: int, height: int, hor: list[list[Label]],
                          ver: list[list[Label]], margin: int = 0) -> Image.Image:
    """Column labels above and row labels left of a grid of width × height cells, `margin` px apart."""
    fontsize = (width + height) // 25
    spacing = fontsize // 2
    fnt = font(max(1, fontsize))
    pad_left = 0 if sum(len(line.text) for lines in ver for line in lines) == 0 else width * 3 // 4
    cols, rows = im.width // width, im.height // height
    if cols != len(hor) or rows != len(ver):
        raise ValueError(f"grid of {cols}x{rows} cells has {len(hor)} column and {len(ver)} row labels")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for texts, allowed in zip(hor + ver, [width] * len(hor) + [pad_left] * len(ver)):
        wrapped = [Label(t, line.is_active) for line in texts for t in _wrap(measure, line.text, fnt, allowed)]
        texts[:] = wrapped
        for line in texts:
            box = measure.multiline_textbbox((0, 0), line.text, font=fnt)
            line.size = (box[2] - box[0], box[3] - box[1])
            line.allowed_width = allowed
    hor_heights = [sum(line.size[1] + spacing for line in lines) - spacing for lines in hor]
    ver_heights = [sum(line.size[1] + spacing for line in lines) - spacing * len(lines) for lines in ver]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + spacing * 2

    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)),
                       ImageColor.getcolor(BACKGROUND, "RGB"))
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    draw = ImageDraw.Draw(result)
    active, inactive = ImageColor.getcolor(TEXT_ACTIVE, "RGB"), ImageColor.getcolor(TEXT_INACTIVE, "RGB")

    def texts_at(x: float, y: float, lines: list[Label]) -> None:
        for line in lines:
            size, f = fontsize, fnt
            while size > 1 and draw.multiline_textbbox((0, 0), line.text, font=f)[2] > line.allowed_width:
                size -= 1  # a word wider than its column shrinks until it fits
                f = font(size)
            draw.multiline_text((x, y + line.size[1] / 2), line.text, font=f, anchor="mm", align="center",
                                fill=active if line.is_active else inactive)
            if not line.is_active:
                half_w, half_h = line.size[0] // 2, line.size[1] // 2
                draw.line((x - half_w, y + half_h, x + half_w, y + half_h), fill=inactive, width=4)
            y += line.size[1] + spacing

    for col in range(cols):
        texts_at(pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_heights[col] / 2, hor[col])
    for row in range(rows):
        texts_at(pad_left / 2, pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2, ver[row])
    return result


def draw_prompt_matrix(im: Image.Image, width: int, height: int, parts: list[str], margin: int = 0) -> Image.Image:
    """Prompt matrix labels: the first half of the optional parts across, the rest down; each label lists
    every part of its half, active where that column's (row's) combination includes it."""
    options = parts[1:]
    boundary = math.ceil(len(options) / 2)
    across, down = options[:boundary], options[boundary:]
    hor = [[Label(x, pos & (1 << i) != 0) for i, x in enumerate(across)] for pos in range(1 << len(across))]
    ver = [[Label(x, pos & (1 << i) != 0) for i, x in enumerate(down)] for pos in range(1 << len(down))]
    return draw_grid_annotations(im, width, height, hor, ver, margin)


# ---------------------------------------------------------------------------------------------------
# SD upscale tiles

@dataclass
class Tile:
    x: int
    image: Image.Image


@dataclass
class TileRow:
    y: int
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class TileGrid:
    rows: list[TileRow]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int

    @property
    def count(self) -> int:
        return sum(len(r.tiles) for r in self.rows)


def tile_layout(w: int, h: int, tile_w: int, tile_h: int, overlap: int) -> tuple[list[int], list[int]]:
    """Tile origins (xs, ys) covering a w × h image as A1111's split_grid places them: evenly spread, the
    last one flush with the far edge (negative where the image is smaller than a tile)."""
    def axis(size: int, tile: int) -> list[int]:
        count = max(1, math.ceil((size - overlap) / (tile - overlap)))
        step = (size - tile) / (count - 1) if count > 1 else 0
        out = []
        for i in range(count):
            pos = int(i * step)
            out.append(size - tile if pos + tile >= size else pos)
        return out
    return axis(w, tile_w), axis(h, tile_h)


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    xs, ys = tile_layout(image.width, image.height, tile_w, tile_h, overlap)
    rows = [TileRow(y, [Tile(x, image.crop((x, y, x + tile_w, y + tile_h))) for x in xs]) for y in ys]
    return TileGrid(rows, tile_w, tile_h, image.width, image.height, overlap)


def _ramp(length: int, across: int, vertical: bool) -> Image.Image:
    # A1111's blend mask: 0 … 255·(overlap-1)/overlap over the overlap, truncated to 8 bits.
    r = (np.arange(length, dtype=np.float32) * 255 / length).astype(np.uint8)
    r = r.reshape((length, 1)).repeat(across, axis=1) if vertical else r.reshape((1, length)).repeat(across, axis=0)
    return Image.fromarray(r, "L")


def combine_grid(grid: TileGrid) -> Image.Image:
    """The tiles pasted back, each blended into its left (and each row into the one above) over the
    overlap with a linear ramp."""
    ov = grid.overlap
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for row in grid.rows:
        line = Image.new("RGB", (grid.image_w, grid.tile_h))
        for tile in row.tiles:
            if tile.x == 0 or ov == 0:
                line.paste(tile.image, (tile.x, 0))
                continue
            line.paste(tile.image.crop((0, 0, ov, grid.tile_h)), (tile.x, 0), mask=_ramp(ov, grid.tile_h, False))
            line.paste(tile.image.crop((ov, 0, grid.tile_w, grid.tile_h)), (tile.x + ov, 0))
        if row.y == 0 or ov == 0:
            combined.paste(line, (0, row.y))
            continue
        combined.paste(line.crop((0, 0, line.width, ov)), (0, row.y), mask=_ramp(ov, grid.image_w, True))
        combined.paste(line.crop((0, ov, line.width, grid.tile_h)), (0, row.y + ov))
    return combined
