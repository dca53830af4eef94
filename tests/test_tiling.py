"""Tiling: the tiles that hold some pixels, with halos, as one mosaic and back."""

from __future__ import annotations

import cv2
import numpy as np

from worker.tiling import Tiling


def ring(height: int = 70, width: int = 90) -> np.ndarray:
    """A circle's outline that runs off the image's right and bottom edges."""
    where = np.zeros((height, width), np.uint8)
    cv2.circle(where, (width - 20, height - 15), 30, 1, thickness=2)
    return where.astype(bool)


def test_the_tiles_cover_every_marked_pixel_and_leave_empty_tiles_out() -> None:
    where = ring()
    tiling = Tiling.covering(where, 16, 2)
    covered = np.zeros(where.shape, bool)
    covered.reshape(-1)[tiling.source[tiling.core]] = True
    assert covered[where].all()
    assert len(tiling.corners) < (-(-70 // 16)) * (-(-90 // 16))  # the top-left tiles are empty


def test_the_cores_hold_each_covered_pixel_once() -> None:
    tiling = Tiling.covering(ring(), 16, 2)
    held = tiling.source[tiling.core]
    assert len(held) == len(np.unique(held))


def test_a_mosaic_holds_each_tile_with_its_halo_and_zeros_past_the_edge() -> None:
    image = np.arange(70 * 90, dtype=np.float32).reshape(70, 90) + 1
    tiling = Tiling.covering(ring(), 16, 2)
    mosaic = tiling.gather(image)
    assert tiling.across > 1  # a grid of tiles, not one column
    for k, (top, left) in enumerate(tiling.corners):
        tile = mosaic[tiling.block(k)]
        padded = np.pad(image, 2)[top : top + 20, left : left + 20]
        assert np.array_equal(tile[: padded.shape[0], : padded.shape[1]], padded)
        assert not tile[padded.shape[0] :].any() and not tile[:, padded.shape[1] :].any()
    # Grid places past the last tile hold nothing.
    assert np.count_nonzero(mosaic) == sum(
        np.count_nonzero(mosaic[tiling.block(k)]) for k in range(len(tiling.corners))
    )


def test_scattering_a_mosaic_writes_only_the_cores_back() -> None:
    image = np.random.default_rng(0).random((3, 70, 90)).astype(np.float32)
    where = ring()
    tiling = Tiling.covering(where, 16, 2)
    into = np.zeros_like(image)
    tiling.scatter(tiling.gather(image) * 2, into)
    assert np.array_equal(into[:, where], 2 * image[:, where])
    written = into[0] != 0
    assert written.sum() == tiling.core.sum()


def test_a_box_filter_on_the_mosaic_is_exact_on_the_cores_within_its_halo() -> None:
    image = np.random.default_rng(1).random((70, 90)).astype(np.float32)
    tiling = Tiling.covering(ring(), 16, 2)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)

    whole = box(box(image))  # reads two pixels past each one: the halo
    on_tiles = np.zeros_like(image)
    # Sums centred past the image's edge are no sums of the whole image's: valid drops them.
    tiling.scatter(box(box(tiling.gather(image)) * tiling.valid), on_tiles)
    cores = on_tiles != 0
    assert np.allclose(on_tiles[cores], whole[cores], atol=1e-5)
    # With one pixel of halo, two boxes read past it: the cores' edges go wrong.
    short = Tiling.covering(ring(), 16, 1)
    wrong = np.zeros_like(image)
    short.scatter(box(box(short.gather(image)) * short.valid), wrong)
    assert not np.allclose(wrong[cores], whole[cores], atol=1e-5)


def test_refreshing_the_halos_copies_them_from_the_cores_that_hold_their_pixels() -> None:
    image = np.random.default_rng(2).random((70, 90)).astype(np.float32)
    where = ring()
    tiling = Tiling.covering(where, 16, 2)
    held = np.zeros_like(image)
    tiling.scatter(tiling.gather(image), held)  # the image where a core holds it, else 0
    stale = np.where(tiling.core, tiling.gather(image), -1.0)  # halos overwritten
    index, exists = tiling.owners()
    refreshed = stale.reshape(-1)[index].reshape(stale.shape) * exists
    assert np.array_equal(refreshed, tiling.gather(held))


def test_nothing_marked_gives_an_empty_mosaic() -> None:
    tiling = Tiling.covering(np.zeros((40, 50), bool), 16, 2)
    assert tiling.pixels == 0
    into = np.ones((40, 50), np.float32)
    tiling.scatter(tiling.gather(into), into)
    assert (into == 1).all()
