"""Square tiles of an image, each with a halo, stacked in one column (a mosaic).

Work that a few regions of the working grid need (the matte's edge) runs on the mosaic of
the tiles that hold them instead of on the whole grid. A tile's halo makes window filters
exact on its core: a box filter of radius r applied k times reads k·r pixels past the core,
so a halo of k·r pixels holds all it reads. Past the image's edge the mosaic holds zeros and
`valid` says so, as a box filter's zero border would.

Tiles are cut at multiples of `tile` from the image's top left; a core is its tile less what
lies past the image's edge, so the cores partition the covered pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tiling:
    shape: tuple[int, int]  # the image's (H, W)
    tile: int
    halo: int
    corners: np.ndarray  # (N, 2): each tile's (top, left)
    source: np.ndarray  # (N·S, S) int64: each mosaic pixel's flat index in the image (0 past it)
    valid: np.ndarray  # (N·S, S) float32: 1.0 on the image's own pixels
    core: np.ndarray  # (N·S, S) bool: the tiles' own pixels (halos and past-the-edge excluded)
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
        flat = (len(corners) * side, side)
        source, core = source.reshape(flat).astype(np.int64), core.reshape(flat)
        core_at = np.flatnonzero(core)
        return cls(
            (height, width),
            tile,
            halo,
            corners,
            source,
            inside.reshape(flat).astype(np.float32),
            core,
            core_at,
            source.reshape(-1)[core_at],
        )

    @property
    def pixels(self) -> int:
        """The mosaic's size in pixels, halos included: what work on it costs."""
        return int(self.source.size)

    def gather(self, image: np.ndarray) -> np.ndarray:
        """(..., H, W) -> (..., N·S, S): every tile with its halo, zero past the image's edge."""
        flat = image.reshape(*image.shape[:-2], -1)
        mosaic: np.ndarray = np.take(flat, self.source, axis=-1)
        mosaic *= self.valid.astype(mosaic.dtype)
        return mosaic

    def scatter(self, mosaic: np.ndarray, into: np.ndarray) -> None:
        """Writes each tile's core of mosaic (..., N·S, S) into its place in into (..., H, W)."""
        flat = into.reshape(*into.shape[:-2], -1)
        flat[..., self.core_source] = mosaic.reshape(*mosaic.shape[:-2], -1)[..., self.core_at]
        if not np.shares_memory(flat, into):
            into[...] = flat.reshape(into.shape)

    def owners(self) -> tuple[np.ndarray, np.ndarray]:
        """For each mosaic pixel, the flat mosaic index of the core pixel that is the same image
        pixel, and 1.0 where one exists (0.0 where no tile's core holds it: index 0 then).
        x.reshape(-1)[index] * exists refreshes every halo from the cores it copies."""
        index_of = np.full(self.shape[0] * self.shape[1], -1, np.int64)
        index_of[self.core_source] = self.core_at
        index = np.where(self.valid > 0, index_of[self.source], -1)
        exists = (index >= 0).astype(np.float32)
        return np.maximum(index, 0), exists
