"""Closed-form matting (Levin, Lischinski & Weiss 2008) solved without building its matrix.

The matting Laplacian L says "inside every small window, alpha is an affine function of the
colour". He, Sun & Tang ("Fast Matting Using Large Kernel Matting Laplacian Matrices", 2010)
showed that L·p needs only box filters and a 3x3 solve per pixel, so conjugate gradients can
minimise αᵀLα + λ·|α − prior|² over the unknown pixels with memory linear in the image
and no sparse system at all. Box filters and elementwise arithmetic are all it takes, so the
same code runs on numpy arrays (OpenCV's box filter) and on torch tensors (on the worker's
device): `Backend` is the only difference between the two.

Arrays are channel-first: a guide is (3, H, W) in 0..1, a matte (H, W); float32 throughout
except the windows' colour statistics (float64, see Laplacian.of).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from worker.tiling import Tiling

Array = Any  # numpy.ndarray or torch.Tensor; the code below uses only what both provide


class Backend(Protocol):
    def box_sum(self, x: Array, radius: int) -> Array:
        """Sum over the (2r+1)² window around each pixel, zero outside the image."""

    def ones_like(self, x: Array) -> Array: ...

    def stack(self, arrays: list[Array]) -> Array: ...

    def asarray(self, x: np.ndarray, dtype: type = np.float32) -> Array: ...

    def single(self, x: Array) -> Array:
        """x in float32."""

    def to_numpy(self, x: Array) -> np.ndarray: ...


class NumpyBackend:
    def box_sum(self, x: Array, radius: int) -> Array:
        size = (2 * radius + 1, 2 * radius + 1)
        if x.ndim == 2:
            return cv2.boxFilter(x, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
        # Each channel filtered straight into its plane of the result: no stacking copy.
        out = np.empty(x.shape, x.dtype)
        for channel, plane in zip(x, out, strict=True):
            cv2.boxFilter(
                channel, -1, size, dst=plane, normalize=False, borderType=cv2.BORDER_CONSTANT
            )
        return out

    def ones_like(self, x: Array) -> Array:
        return np.ones_like(x)

    def stack(self, arrays: list[Array]) -> Array:
        return np.stack(arrays)

    def asarray(self, x: np.ndarray, dtype: type = np.float32) -> Array:
        return np.ascontiguousarray(x, dtype=dtype)

    def single(self, x: Array) -> Array:
        return x.astype(np.float32)

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)


class TorchBackend:
    """The solve on a torch device (a GPU worker's), in float32 like the numpy path."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def box_sum(self, x: Array, radius: int) -> Array:
        import torch.nn.functional as functional

        batch = x[None] if x.ndim == 3 else x[None, None]
        size = 2 * radius + 1
        summed = functional.avg_pool2d(batch, size, 1, radius, divisor_override=1)
        return summed[0] if x.ndim == 3 else summed[0, 0]

    def ones_like(self, x: Array) -> Array:
        import torch

        return torch.ones_like(x)

    def stack(self, arrays: list[Array]) -> Array:
        import torch

        return torch.stack(arrays)

    def asarray(self, x: np.ndarray, dtype: type = np.float32) -> Array:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).to(self.device)

    def single(self, x: Array) -> Array:
        return x.float()

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x.cpu().numpy())


@dataclass(frozen=True)
class WindowStats:
    """Every window's pixel count, colour mean and covariance for one guide and radius:
    what any Laplacian of that guide needs, whatever its eps, so one set serves several."""

    backend: Backend
    guide: Array  # (3, H, W), float64
    radius: int
    count: Array  # pixels in each window (fewer at the border)
    mean: Array  # (3, H, W) window colour means
    cov: dict[tuple[int, int], Array]  # the 6 entries (i <= j) of each window's Σ
    valid: Array | None = None  # (H, W) 1.0 on the image's own pixels; None: all of them

    @classmethod
    def of(
        cls, guide: np.ndarray, radius: int, backend: Backend, valid: np.ndarray | None = None
    ) -> WindowStats:
        """In float64: in float32, E[I²] − E[I]² loses the small variances of flat windows,
        their inverse turns indefinite and conjugate gradients diverge.

        valid (H, W), 1.0 or 0.0, marks the pixels that are part of the image (default: all);
        the guide must be 0 elsewhere. Windows count only valid pixels, so tiles cut from an
        image and padded past its edge get the statistics the whole image gives them."""
        box = backend.box_sum
        guide = backend.asarray(guide, np.float64)
        if valid is None:
            count = box(backend.ones_like(guide[0]), radius)
        else:
            inside = backend.asarray(valid, np.float64)
            # Padding whose window holds no valid pixel counts one: no 0/0 (a NaN would spread
            # through the box filters' running sums), and no valid pixel ever reads it.
            count = box(inside, radius) + (1.0 - inside)
        mean = box(guide, radius) / count
        cov = {}
        for i in range(3):
            for j in range(i, 3):
                cov[i, j] = box(guide[i] * guide[j], radius) / count - mean[i] * mean[j]
        return cls(backend, guide, radius, count, mean, cov, None if valid is None else inside)

    def crop(self, rows: slice, cols: slice) -> WindowStats:
        """The statistics of the windows centred in rows x cols. Exact for a solve whose
        unknown pixels lie at least 2 * radius inside the crop: a window reaching past the
        crop's edge (whose recomputed sums would be cut short) is never one of theirs."""
        return WindowStats(
            self.backend,
            self.guide[:, rows, cols],
            self.radius,
            self.count[rows, cols],
            self.mean[:, rows, cols],
            {key: value[rows, cols] for key, value in self.cov.items()},
            None if self.valid is None else self.valid[rows, cols],
        )


@dataclass
class Laplacian:
    """L·p for one guide, with every window's colour statistics computed once."""

    backend: Backend
    guide: Array  # (3, H, W)
    radius: int
    count: Array  # pixels in each window (fewer at the border)
    mean: Array  # (3, H, W) window colour means
    # The 6 entries of each window's symmetric (Σ + εU)⁻¹ over its pixel count, and 1 over
    # its pixel count: each fit then multiplies where it would divide. Both are 0 on windows
    # centred off the image (see WindowStats.valid), which are no windows at all.
    inverse: list[Array]
    reciprocal: Array

    @classmethod
    def of(cls, guide: np.ndarray, radius: int, eps: float, backend: Backend) -> Laplacian:
        return cls.from_stats(WindowStats.of(guide, radius, backend), eps)

    @classmethod
    def from_stats(cls, stats: WindowStats, eps: float) -> Laplacian:
        cov = dict(stats.cov)
        for i in range(3):
            cov[i, i] = cov[i, i] + eps
        reciprocal = 1.0 / stats.count
        if stats.valid is not None:
            reciprocal = reciprocal * stats.valid
        single = stats.backend.single
        return cls(
            stats.backend,
            single(stats.guide),
            stats.radius,
            single(stats.count),
            single(stats.mean),
            [single(x * reciprocal) for x in inverse3(cov)],
            single(reciprocal),
        )

    def __call__(self, p: Array) -> Array:
        box, radius = self.backend.box_sum, self.radius
        a, b = self._fit(p)
        return self.count * p - ((box(a, radius) * self.guide).sum(0) + box(b, radius))

    def linear_model(self, p: Array) -> Array:
        """(4, H, W): the window-averaged (a_r, a_g, a_b, b) with p ≈ a · I + b around each
        pixel, which is the guided filter's model of p (He, Sun & Tang, "Guided Image
        Filtering"); evaluated on an upsampled guide it carries p to a higher resolution.
        Off the image (see WindowStats.valid) it is 0."""
        box, radius = self.backend.box_sum, self.radius
        a, b = self._fit(p)
        a = box(a, radius) * self.reciprocal
        return self.backend.stack([a[0], a[1], a[2], box(b, radius) * self.reciprocal])

    def _fit(self, p: Array) -> tuple[Array, Array]:
        """Each window's least-squares (a, b) for p ≈ a · I + b, regularised by eps."""
        box, radius = self.backend.box_sum, self.radius
        sum_p = box(p, radius)
        # The window's count times the covariance of the guide and p.
        spread = box(self.guide * p, radius)
        spread -= self.mean * sum_p
        i00, i01, i02, i11, i12, i22 = self.inverse
        c0, c1, c2 = spread[0], spread[1], spread[2]
        a = self.backend.stack(
            [i00 * c0 + i01 * c1 + i02 * c2, i01 * c0 + i11 * c1 + i12 * c2,
             i02 * c0 + i12 * c1 + i22 * c2]
        )  # fmt: skip
        return a, sum_p * self.reciprocal - (a * self.mean).sum(0)


def inverse3(cov: dict[tuple[int, int], Array]) -> list[Array]:
    """Per-pixel inverse of a symmetric 3x3 matrix by its adjugate."""
    s00, s01, s02 = cov[0, 0], cov[0, 1], cov[0, 2]
    s11, s12, s22 = cov[1, 1], cov[1, 2], cov[2, 2]
    c00 = s11 * s22 - s12 * s12
    c01 = s02 * s12 - s01 * s22
    c02 = s01 * s12 - s02 * s11
    c11 = s00 * s22 - s02 * s02
    c12 = s01 * s02 - s00 * s12
    c22 = s00 * s11 - s01 * s01
    inv_det = 1.0 / (s00 * c00 + s01 * c01 + s02 * c02)
    return [c * inv_det for c in (c00, c01, c02, c11, c12, c22)]


@dataclass(frozen=True)
class Halos:
    """How a mosaic of tiles (worker.tiling.Tiling) keeps its halos equal to the cores that
    hold the same pixels, on the backend: what lets conjugate gradients run on the mosaic."""

    index: Array  # the flat mosaic index of the core pixel each mosaic pixel copies
    exists: Array  # 1.0 where a core holds the pixel, 0.0 where none does (the vector is 0)
    core: Array  # 1.0 on core pixels: each pixel counted once in a dot product

    @classmethod
    def of(cls, tiling: Tiling, backend: Backend) -> Halos:
        index, exists = tiling.owners()
        return cls(
            backend.asarray(index, np.int64),
            backend.asarray(exists),
            backend.asarray(tiling.core.astype(np.float32)),
        )

    def refresh(self, x: Array) -> Array:
        return x.reshape(-1)[self.index].reshape(x.shape) * self.exists


def solve(
    laplacian: Laplacian,
    known: Array,
    prior: Array,
    weight: float,
    iterations: int,
    halos: Halos | None = None,
) -> Array:
    """argmin αᵀLα + weight·|α − prior|² over the pixels where known is 0; the rest keep prior.

    known is 1.0 on pixels whose alpha is given (prior holds their value), 0.0 elsewhere. The
    prior pulls the unknown pixels towards it where the colours say little (L is flat there),
    which is what keeps a matte sane where subject and background colours match.

    With halos, the arrays are a mosaic of tiles whose cores hold every unknown pixel: each
    product with L is exact on the cores and is copied into the halos, where the next product
    reads it, and dot products count the cores only.
    """
    unknown = 1.0 - known
    fixed = known * prior

    def refresh(x: Array) -> Array:
        return x if halos is None else halos.refresh(x)

    def dot(x: Array, y: Array) -> float:
        return float((x * y).sum() if halos is None else (x * y * halos.core).sum())

    def operator(z: Array) -> Array:
        return refresh(unknown * (laplacian(z) + weight * z))

    # Start from the prior: its residual is small wherever it already fits the colours.
    z = unknown * prior
    residual = refresh(unknown * (weight * prior - laplacian(fixed))) - operator(z)
    direction = residual
    rr = dot(residual, residual)
    for _ in range(iterations):
        if rr <= 1e-12:
            break
        ap = operator(direction)
        curvature = dot(direction, ap)
        if curvature <= 0.0:  # rounding made L look indefinite: stop where we are
            break
        step = rr / curvature
        z = z + step * direction
        residual = residual - step * ap
        rr_next = dot(residual, residual)
        direction = residual + (rr_next / rr) * direction
        rr = rr_next
    return fixed + z


def solve_matte(
    stats: WindowStats,
    known: np.ndarray,
    prior: np.ndarray,
    *,
    eps: float,
    weight: float,
    iterations: int,
    tiling: Tiling | None = None,
) -> np.ndarray:
    """solve() for numpy inputs, run on the stats' backend and device; a numpy matte back.
    With tiling, the inputs are its mosaics (stats with its valid) and so is the matte."""
    backend = stats.backend
    laplacian = Laplacian.from_stats(stats, eps)
    halos = None if tiling is None else Halos.of(tiling, backend)
    known_, prior_ = backend.asarray(known), backend.asarray(prior)
    return backend.to_numpy(solve(laplacian, known_, prior_, weight, iterations, halos))
