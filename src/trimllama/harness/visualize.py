"""Draw which image patches a selection kept, on the tiles as the model saw them.

The flattened image-token axis of one sample is images x tiles x patches; patch 0 of a tile is its
class token, the other (tile_size / patch_size)^2 patches are the tile's pixels in row-major order.
The processor resized and padded each image to a canvas of rows x cols tiles (its aspect ratio id)
and split it into tiles row by row; `render_kept` puts the tiles back in that grid.

    figure = render_kept(inputs, handle.kept[0], processor, num_patches=adapter_for(model).tokens_per_tile(model))
    figure.image.save("kept.png")
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MARGIN = 16  # around the figure and between images
TILE_GAP = 4  # background between neighbouring tiles: the tile borders
TEXT_SIZE = 15
LINE_GAP = 4
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
KEPT_OUTLINE = (0, 225, 235)  # cyan: apart from the testbed's red, green, blue, yellow, purple
DROPPED_BRIGHTNESS = 0.45  # dropped patches: grey at this fraction of their luminance
DISPLAY_TILE_PX = 320  # small tiles are enlarged by an integer factor to at least this size
MIN_WIDTH = 480  # room for the title and legend next to a single small tile


@dataclass
class TileBox:
    """Where one tile is drawn: `box` = (left, top, right, bottom) pixels in the figure."""

    image: int
    tile: int
    row: int
    col: int
    box: tuple[int, int, int, int]


@dataclass
class KeptFigure:
    """The rendered figure and where its tiles are (for checks and for overlays)."""

    image: Image.Image
    tiles: list[TileBox]
    tile_px: int
    patches_per_side: int

    def layout(self) -> dict:
        """JSON-ready: figure size, tile size, patches per tile side, one entry per drawn tile."""
        return dict(
            width=self.image.width,
            height=self.image.height,
            tile_px=self.tile_px,
            patches_per_side=self.patches_per_side,
            tiles=[dict(image=t.image, tile=t.tile, row=t.row, col=t.col, box=list(t.box)) for t in self.tiles],
        )


def tile_grids(aspect_ratio_ids: torch.Tensor, image_processor) -> list[tuple[int, int]]:
    """(rows, cols) of tiles per image from the processor's (images,) aspect ratio ids (1-based, 0 = no image).

    The ids index the image processor's own list of supported (rows, cols) arrangements, taken from the
    module that defines its class (transformers has a PIL and a torchvision Mllama image processor).
    """
    supported_of = getattr(sys.modules[type(image_processor).__module__], "get_all_supported_aspect_ratios", None)
    if supported_of is None:
        raise ValueError(f"{type(image_processor).__name__} is not a Mllama image processor (no supported aspect ratios)")
    supported = supported_of(image_processor.max_image_tiles)
    return [tuple(supported[ratio - 1]) for ratio in aspect_ratio_ids.tolist() if ratio > 0]


def tiles_to_rgb(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """(tiles, 3, H, W) normalised pixel values -> (tiles, H, W, 3) uint8, undoing normalise and rescale."""
    pixels = pixel_values.float().cpu()
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        pixels = pixels * std + mean
    scale = 1.0 / image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
    return (pixels * scale).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def kept_patch_grid(kept: torch.Tensor, images: int, tiles: int, num_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept indices -> ((images, tiles, side, side) bool per pixel patch, (images, tiles) bool per class token)."""
    side = math.isqrt(num_patches - 1)
    if side * side != num_patches - 1:
        raise ValueError(f"{num_patches} tokens per tile is not a class token plus a square grid of patches")
    keep = torch.zeros(images * tiles * num_patches, dtype=torch.bool)
    keep[kept.cpu()] = True
    keep = keep.reshape(images, tiles, num_patches).numpy()
    return keep[..., 1:].reshape(images, tiles, side, side), keep[..., 0]


def render_kept(
    inputs: dict,
    kept: torch.Tensor,
    processor,
    *,
    num_patches: int,
    title: list[str] = (),
    tile_px: int | None = None,
) -> KeptFigure:
    """Draw one sample's images as tiles, kept patches in colour (outlined), dropped patches dimmed.

    Args:
        inputs: the processor's output for one sample: pixel_values (1, images, tiles, 3, H, W),
            aspect_ratio_ids (1, images), aspect_ratio_mask (1, images, tiles).
        kept: 1-D indices into the sample's flattened image-token axis (`handle.kept[0]`).
        processor: the `MllamaProcessor` that made `inputs` (tile grid, normalisation).
        num_patches: image tokens per tile, class token included (`adapter_for(model).tokens_per_tile(model)`).
        title: lines printed above the images (wrapped to the figure width).
        tile_px: displayed tile size in pixels (default: the tile size, enlarged to >= 320 px).
    """
    image_processor = processor.image_processor
    pixel_values = inputs["pixel_values"][0]  # (images, tiles, 3, H, W)
    images, tiles, _, tile_size, _ = pixel_values.shape
    grids = tile_grids(inputs["aspect_ratio_ids"][0], image_processor)
    patch_keep, class_keep = kept_patch_grid(kept, images, tiles, num_patches)
    tile_px = tile_px or tile_size * max(1, math.ceil(DISPLAY_TILE_PX / tile_size))
    font = ImageFont.load_default(size=TEXT_SIZE)

    panels = [_draw_panel(tiles_to_rgb(pixel_values[i], image_processor), patch_keep[i], grid, tile_px) for i, grid in enumerate(grids)]
    captions = [_image_caption(i, grid, patch_keep[i], class_keep[i], num_patches) for i, grid in enumerate(grids)]
    legend = "in colour, outlined in cyan: kept patches;  dimmed grey: dropped patches;  white gaps: tile borders"
    width = max(MIN_WIDTH, 2 * MARGIN + sum(panel.width for panel in panels) + MARGIN * (len(panels) - 1))
    title_lines = [line for text in title for line in _wrap(text, font, width - 2 * MARGIN)]
    caption_lines = [_wrap(text, font, panel.width) for text, panel in zip(captions, panels)]
    legend_lines = _wrap(legend, font, width - 2 * MARGIN)
    line_height = TEXT_SIZE + LINE_GAP
    panels_top = MARGIN + len(title_lines) * line_height + (MARGIN if title_lines else 0)
    captions_top = panels_top + max(panel.height for panel in panels) + LINE_GAP
    legend_top = captions_top + max(len(lines) for lines in caption_lines) * line_height + MARGIN // 2
    height = legend_top + len(legend_lines) * line_height + MARGIN

    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    _draw_lines(draw, title_lines, MARGIN, MARGIN, font)
    boxes, left = [], MARGIN
    for index, (panel, grid, lines) in enumerate(zip(panels, grids, caption_lines)):
        figure.paste(panel, (left, panels_top))
        _draw_lines(draw, lines, left, captions_top, font)
        for tile in range(grid[0] * grid[1]):
            row, col = divmod(tile, grid[1])
            x0, y0 = left + col * (tile_px + TILE_GAP), panels_top + row * (tile_px + TILE_GAP)
            boxes.append(TileBox(index, tile, row, col, (x0, y0, x0 + tile_px, y0 + tile_px)))
        left += panel.width + MARGIN
    _draw_lines(draw, legend_lines, MARGIN, legend_top, font)
    return KeptFigure(figure, boxes, tile_px, patch_keep.shape[-1])


def _draw_panel(rgb: np.ndarray, patch_keep: np.ndarray, grid: tuple[int, int], tile_px: int) -> Image.Image:
    """One image: its rows x cols tiles with TILE_GAP between them. rgb: (tiles, H, W, 3); patch_keep: (tiles, side, side)."""
    rows, cols = grid
    size = (cols * tile_px + (cols - 1) * TILE_GAP, rows * tile_px + (rows - 1) * TILE_GAP)
    panel = Image.new("RGB", size, BACKGROUND)
    for tile in range(rows * cols):
        row, col = divmod(tile, cols)
        panel.paste(_draw_tile(rgb[tile], patch_keep[tile], tile_px), (col * (tile_px + TILE_GAP), row * (tile_px + TILE_GAP)))
    return panel


def _draw_tile(rgb: np.ndarray, keep: np.ndarray, tile_px: int) -> Image.Image:
    """One tile (H, W, 3) with its (side, side) keep grid: dropped patches dimmed, kept regions outlined."""
    side = keep.shape[0]
    patch = rgb.shape[0] // side
    pixel_keep = np.repeat(np.repeat(keep, patch, axis=0), patch, axis=1)[..., None]  # (H, W, 1)
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    dimmed = np.repeat((grey * DROPPED_BRIGHTNESS)[..., None], 3, axis=-1)
    tile = Image.fromarray(np.where(pixel_keep, rgb, dimmed).astype(np.uint8))
    resample = Image.NEAREST if tile_px % rgb.shape[0] == 0 else Image.BILINEAR
    tile = tile.resize((tile_px, tile_px), resample)
    _outline_kept(ImageDraw.Draw(tile), keep, tile_px / side)
    return tile


def _outline_kept(draw: ImageDraw.ImageDraw, keep: np.ndarray, step: float) -> None:
    """Draw the boundary between kept and dropped patches (and the tile edge around kept ones)."""
    width = max(1, round(step / 10))
    padded = np.pad(keep, 1)
    for row, col in zip(*np.nonzero(keep)):
        x0, y0, x1, y1 = col * step, row * step, (col + 1) * step - 1, (row + 1) * step - 1
        r, c = row + 1, col + 1
        if not padded[r - 1, c]:
            draw.line([(x0, y0), (x1, y0)], fill=KEPT_OUTLINE, width=width)
        if not padded[r + 1, c]:
            draw.line([(x0, y1), (x1, y1)], fill=KEPT_OUTLINE, width=width)
        if not padded[r, c - 1]:
            draw.line([(x0, y0), (x0, y1)], fill=KEPT_OUTLINE, width=width)
        if not padded[r, c + 1]:
            draw.line([(x1, y0), (x1, y1)], fill=KEPT_OUTLINE, width=width)


def _image_caption(index: int, grid: tuple[int, int], patch_keep: np.ndarray, class_keep: np.ndarray, num_patches: int) -> str:
    """Kept count and fraction of one image's real tiles, class tokens included."""
    real = grid[0] * grid[1]
    kept = int(patch_keep[:real].sum() + class_keep[:real].sum())
    total = real * num_patches
    return (
        f"image {index + 1} ({grid[0]}x{grid[1]} tiles): kept {kept} of {total} tokens ({kept / total:.1%}); "
        f"class token kept in {int(class_keep[:real].sum())} of {real} tiles"
    )


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], left: int, top: int, font) -> None:
    for number, line in enumerate(lines):
        draw.text((left, top + number * (TEXT_SIZE + LINE_GAP)), line, fill=TEXT, font=font)


__all__ = ["KeptFigure", "TileBox", "kept_patch_grid", "render_kept", "tile_grids", "tiles_to_rgb"]
