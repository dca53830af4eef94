"""Square tiles of an image, each with a halo, laid side by side in one array (a mosaic).

Work that a few regions of the working grid need (the matte's edge) runs on the mosaic of
the tiles that hold them instead of on the whole grid. A tile's halo makes window filters
exact on its core: a box filter of radius r applied k times reads k·r pixels past the core,
so a halo of k·r pixels holds all it reads. Past the image's edge the mosaic holds zeros and
`valid` says so, as a box filter's zero border would.

Tiles are cut at multiples of `tile` from the image's top left; a core is its tile less what
lies past the image's edge, so the cores partition the covered pixels. The mosaic is a near
square grid of tiles, not one column of them: OpenCV's filters pay per row, and a column of
20-pixel rows made them cost five times as much per pixel. Grid places no tile fills hold
zeros and are valid nowhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tiling:
    shape: tuple[int, int]  # the image's (H, W)
    tile: int
    halo: int
    corners: np.ndarray  # (N, 2): each tile's (top, left)
    across: int  # tiles per row of the mosaic, whose side is S = tile + 2·halo
    source: np.ndarray  # (rows·S, across·S) int64: each pixel's flat index in the image (0 past it)
    valid: np.ndarray  # float32, as source: 1.0 on the image's own pixels
    core: np.ndarray  # bool, as source: the tiles' own pixels (halos and past-the-edge excluded)
    core_at: np.ndarray  # the core pixels' flat indices in the mosaic
    core_source: np.ndarray  # ... and in the image

    @classmethod
    def covering(cls, where: np.ndarray, tile: int, halo: int) -> Tiling:
        """The tiles of `tile` pixels that hold a true pixel of where (H, W), in raster order."""
        height, width = where.shape
        down, across = -(-height // tile), -(-width // tile)
        padded = np.zeros((down * tile, across * tile), bool)
        padded[:height, :width] = where
        hit = padded.reshape(down, tile, across, tile).any(axis=(1, 3))
        corners = np.argwhere(hit) * tile
        side = tile + 2 * halo
        steps = np.arange(side) - halo
        rows = corners[:, :1] + steps  # (N, S)
        cols = corners[:, 1:] + steps
        row_in = (rows >= 0) & (rows < height)
        col_in = (cols >= 0) & (cols < width)
        inside = row_in[:, :, None] & col_in[:, None, :]
        source = (
            np.clip(rows, 0, height - 1)[:, :, None] * width
            + np.clip(cols, 0, width - 1)[:, None, :]
        )
        own = (steps >= 0) & (steps < tile)
        core = inside & own[None, :, None] & own[None, None, :]
        count = len(corners)
        across = max(1, math.ceil(math.sqrt(count)))
        source, inside, core = (
            _grid(x, across) for x in (source.astype(np.int64), inside.astype(np.float32), core)
        )
        core_at = np.flatnonzero(core)
        return cls(
            (height, width),
            tile,
            halo,
            corners,
            across,
            source,
            inside,
            core,
            core_at,
            source.reshape(-1)[core_at],
        )

    def block(self, k: int) -> tuple[slice, slice]:
        """Where tile k (corners[k]), halo included, lies in the mosaic."""
        side = self.tile + 2 * self.halo
        row, col = divmod(k, self.across)
        return slice(row * side, (row + 1) * side), slice(col * side, (col + 1) * side)

    @property
    def pixels(self) -> int:
        """The mosaic's size in pixels, halos included: what work on it costs."""
        return int(self.source.size)

    def gather(self, image: np.ndarray) -> np.ndarray:
        """(..., H, W) -> the mosaic: every tile with its halo, zero past the image's edge."""
        flat = image.reshape(*image.shape[:-2], -1)
        mosaic: np.ndarray = np.take(flat, self.source, axis=-1)
        mosaic *= self.valid.astype(mosaic.dtype)
        return mosaic

    def scatter(self, mosaic: np.ndarray, into: np.ndarray) -> None:
        """Writes each tile's core of a mosaic (...) into its place in into (..., H, W), which
        must be contiguous (written through a flat view of it)."""
        flat = into.view()
        flat.shape = (*into.shape[:-2], -1)  # raises rather than writing into a copy
        flat[..., self.core_source] = mosaic.reshape(*mosaic.shape[:-2], -1)[..., self.core_at]

    def owners(self) -> tuple[np.ndarray, np.ndarray]:
        """For each mosaic pixel, the flat mosaic index of the core pixel that is the same image
        pixel, and 1.0 where one exists (0.0 where no tile's core holds it: index 0 then).
        x.reshape(-1)[index] * exists refreshes every halo from the cores it copies."""
        index_of = np.full(self.shape[0] * self.shape[1], -1, np.int64)
        index_of[self.core_source] = self.core_at
        index = np.where(self.valid > 0, index_of[self.source], -1)
        exists = (index >= 0).astype(np.float32)
        return np.maximum(index, 0), exists


def _grid(tiles: np.ndarray, across: int) -> np.ndarray:
    """(N, S, S) tiles as one (rows·S, across·S) array, row by row; zeros fill the last row."""
    count, side = tiles.shape[:2]
    rows = -(-count // across)
    padded = np.zeros((rows * across, side, side), tiles.dtype)
    padded[:count] = tiles
    return (
        padded.reshape(rows, across, side, side)
        .transpose(0, 2, 1, 3)
        .reshape(rows * side, across * side)
    )
