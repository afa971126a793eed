"""Hashed noise: a function of world coordinates, hence seamless across windows."""

from __future__ import annotations

import numpy as np


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h + np.uint64(0x9E3779B97F4A7C15)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash01(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) floats from integer keys (arrays broadcast against each other)."""
    shape = np.broadcast_shapes(*(np.shape(k) for k in keys))
    with np.errstate(over="ignore"):
        h = np.zeros(shape, dtype=np.uint64)
        for key in keys:
            h = _splitmix(h ^ np.asarray(key, dtype=np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def noise_grid(xs: np.ndarray, ys: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1] on the grid xs (w,) × ys (h,) of increasing pixel-centre coordinates."""
    gx, gy = xs / cell, ys / cell
    fx, fy = np.floor(gx), np.floor(gy)
    ix0, iy0 = int(fx[0]), int(fy[0])
    lattice = hash01(
        np.arange(ix0, int(fx[-1]) + 2)[None, :], np.arange(iy0, int(fy[-1]) + 2)[:, None], salt
    )
    cx, cy = (fx - ix0).astype(np.intp), (fy - iy0).astype(np.intp)
    tx, ty = _smooth(gx - fx), _smooth(gy - fy)
    rows = lattice[:, cx] * (1 - tx) + lattice[:, cx + 1] * tx
    return rows[cy] * (1 - ty)[:, None] + rows[cy + 1] * ty[:, None]


def noise_points(x: np.ndarray, y: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """The same noise as :func:`noise_grid`, at arbitrary points."""
    gx, gy = x / cell, y / cell
    fx, fy = np.floor(gx), np.floor(gy)
    tx, ty = _smooth(gx - fx), _smooth(gy - fy)
    ix, iy = fx.astype(np.int64), fy.astype(np.int64)
    top = hash01(ix, iy, salt) * (1 - tx) + hash01(ix + 1, iy, salt) * tx
    bottom = hash01(ix, iy + 1, salt) * (1 - tx) + hash01(ix + 1, iy + 1, salt) * tx
    return top * (1 - ty) + bottom * ty
