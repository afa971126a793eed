"""World contents: land cover, linear and areal features, object instances and trees."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from geopix.data.synth.classes import (
    BUILDING,
    CLASSES,
    FEATURE_CELL,
    FEATURE_RANK,
    LAND,
    PAVED,
    ROAD,
    WATER,
    Variant,
)
from geopix.data.synth.noise import noise_grid, noise_points


@dataclass
class Canvas:
    """A window being painted: features and objects paint themselves onto it."""

    x0: int
    y0: int
    rgb: np.ndarray  # [h, w, 3] float32
    ground: np.ndarray  # [h, w] uint8
    ids: np.ndarray  # [h, w] int32, 0 = no instance

    def window(self, bounds: Sequence[float]):
        """(row slice, col slice, xs [1, w], ys [h, 1]) of ``bounds`` clipped to the canvas, or None."""
        h, w = self.ids.shape
        j0, j1 = max(self.x0, math.floor(bounds[0])), min(self.x0 + w, math.ceil(bounds[2]))
        i0, i1 = max(self.y0, math.floor(bounds[1])), min(self.y0 + h, math.ceil(bounds[3]))
        if j0 >= j1 or i0 >= i1:
            return None
        xs = (np.arange(j0, j1, dtype=np.float64) + 0.5)[None, :]
        ys = (np.arange(i0, i1, dtype=np.float64) + 0.5)[:, None]
        return slice(i0 - self.y0, i1 - self.y0), slice(j0 - self.x0, j1 - self.x0), xs, ys


@dataclass
class Obj:
    """One object instance; all geometry in world pixels, drawn in its local (u, v) frame."""

    class_id: int
    cx: float
    cy: float
    angle: float  # radians, direction of the long axis (u)
    length: float
    width: float
    variant: Variant
    height: float  # px of shadow per unit of the world's shadow factor
    style: int = 0  # class-specific details fixed at planning (roof form, ship type, ...)
    uid: int = 0  # instance id, 1-based, in paint order

    @property
    def radius(self) -> float:
        extra = 1.5 if self.class_id == BUILDING and self.style & 2 else 1.0
        return 0.5 * math.hypot(self.length, self.width) * extra


@dataclass(frozen=True)
class WaterBody:
    cx: float
    cy: float
    radius: float
    rough: float  # px the shoreline wanders
    salt: int
    tone: tuple[int, int, int]

    label = WATER

    def bounds(self) -> tuple[float, float, float, float]:
        r = self.radius + self.rough + 4
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r

    def _wander(self, noise: Callable[[float, int], np.ndarray]) -> np.ndarray:
        """How far the shoreline lies outside the circle: noise on three scales, bays to ripples."""
        broad, medium = max(40.0, 0.5 * self.radius), max(14.0, 0.15 * self.radius)
        mix = (
            0.55 * noise(broad, self.salt)
            + 0.33 * noise(medium, self.salt + 1)
            + 0.12 * noise(9.0, self.salt + 3)
        )
        return self.rough * (2 * mix - 1)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        depth = self.radius - np.hypot(x - self.cx, y - self.cy)
        # the shoreline wanders at most `rough` px: only points in that band need the noise
        band = np.abs(depth) < self.rough
        if band.any():
            xb, yb = x[band], y[band]
            depth[band] += self._wander(lambda c, s: noise_points(xb, yb, c, s))
        return depth > 0

    def paint(self, canvas: Canvas) -> None:
        win = canvas.window(self.bounds())
        if win is None:
            return
        sy, sx, xs, ys = win
        depth = (
            self.radius
            + self._wander(lambda c, s: noise_grid(xs[0], ys[:, 0], c, s))
            - np.hypot(xs - self.cx, ys - self.cy)
        )
        water = depth > 0
        beach = (depth <= 0) & (depth > -2.5)
        shallow = np.clip(1 - depth / 25.0, 0, 1)[..., None]
        colour = (
            np.asarray(self.tone, np.float32)
            * (0.92 + 0.05 * noise_grid(xs[0], ys[:, 0], 7.0, self.salt + 2))[..., None]
        )
        colour = colour * (1 - 0.45 * shallow) + np.array([96, 118, 104], np.float32) * 0.45 * shallow
        rgb = canvas.rgb[sy, sx]
        rgb[water] = colour[water]
        rgb[beach] = (172, 162, 134)
        canvas.ground[sy, sx][water] = WATER


@dataclass(frozen=True)
class Strip:
    """A straight band from (ax, ay) to (bx, by): a road or a pier."""

    ax: float
    ay: float
    bx: float
    by: float
    half_width: float
    label: int  # ROAD or PIER

    def bounds(self) -> tuple[float, float, float, float]:
        w = self.half_width + 1
        return (
            min(self.ax, self.bx) - w,
            min(self.ay, self.by) - w,
            max(self.ax, self.bx) + w,
            max(self.ay, self.by) + w,
        )

    @property
    def length(self) -> float:
        return math.hypot(self.bx - self.ax, self.by - self.ay)

    @property
    def angle(self) -> float:
        return math.atan2(self.by - self.ay, self.bx - self.ax)

    def _uv(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.ax, y - self.ay
        return dx * c + dy * s, -dx * s + dy * c

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = self._uv(x, y)
        return (np.abs(v) <= self.half_width) & (u >= 0) & (u <= self.length)

    def point(self, t: float, offset: float = 0.0) -> tuple[float, float]:
        """The point a fraction ``t`` along the strip, ``offset`` px to its left."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.ax + t * (self.bx - self.ax) - s * offset, self.ay + t * (self.by - self.ay) + c * offset

    def paint(self, canvas: Canvas) -> None:
        win = canvas.window(self.bounds())
        if win is None:
            return
        sy, sx, xs, ys = win
        u, v = self._uv(xs, ys)
        inside = (np.abs(v) <= self.half_width) & (u >= 0) & (u <= self.length)
        edge = self.half_width - np.abs(v)
        if self.label == ROAD:
            colour = np.empty(u.shape + (3,), np.float32)
            colour[:] = (80, 82, 84)
            if self.half_width >= 5:
                colour[edge < 1.0] = (142, 142, 138)
                colour[(np.abs(v) < 0.6) & (np.mod(u, 16) < 8)] = (206, 202, 180)
        else:
            plank = np.where(np.mod(u, 3.0) < 0.6, 0.9, 1.0)
            colour = np.array([138, 128, 112], np.float32) * np.where(edge < 1.0, 0.72, plank)[..., None]
        canvas.rgb[sy, sx][inside] = colour[inside]
        canvas.ground[sy, sx][inside] = self.label


@dataclass(frozen=True)
class Lot:
    """A paved rectangle: a car park with stall lines or an airport apron."""

    cx: float
    cy: float
    angle: float
    length: float
    width: float
    apron: bool

    label = PAVED
    STALL = 6.0  # px between stall lines
    DEPTH = 12.0  # px from a stall's back line to the aisle

    def bounds(self) -> tuple[float, float, float, float]:
        r = 0.5 * math.hypot(self.length, self.width) + 1
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r

    def _uv(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        return dx * c + dy * s, -dx * s + dy * c

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = self._uv(x, y)
        return (np.abs(u) <= self.length / 2) & (np.abs(v) <= self.width / 2)

    def world_point(self, u: float, v: float) -> tuple[float, float]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.cx + u * c - v * s, self.cy + u * s + v * c

    def paint(self, canvas: Canvas) -> None:
        win = canvas.window(self.bounds())
        if win is None:
            return
        sy, sx, xs, ys = win
        u, v = self._uv(xs, ys)
        inside = (np.abs(u) <= self.length / 2) & (np.abs(v) <= self.width / 2)
        colour = np.empty(u.shape + (3,), np.float32)
        if self.apron:
            joints = (np.mod(u, 24.0) < 0.7) | (np.mod(v, 24.0) < 0.7)
            colour[:] = (170, 170, 164)
            colour[joints] = (150, 150, 146)
            colour[np.abs(np.abs(v) - self.width / 4) < 0.7] = (196, 172, 72)
        else:
            colour[:] = (116, 116, 114)
            row = np.abs(v) - (self.width / 2 - self.DEPTH)
            colour[(row > 0) & (np.mod(u + self.length / 2, self.STALL) < 0.8)] = (206, 206, 200)
        canvas.rgb[sy, sx][inside] = colour[inside]
        canvas.ground[sy, sx][inside] = PAVED


@dataclass(frozen=True)
class Tree:
    cx: float
    cy: float
    r: float
    phase: float
    tone: float

    def bounds(self) -> tuple[float, float, float, float]:
        r = self.r * 1.3
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r

    def crown(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        theta = np.arctan2(dy, dx)
        edge = self.r * (
            1 + 0.12 * np.sin(3 * theta + self.phase) + 0.08 * np.sin(5 * theta + 2 * self.phase)
        )
        return dx * dx + dy * dy <= edge * edge


Feature = WaterBody | Strip | Lot


@dataclass
class World:
    """Everything needed to paint any window: land cover, features, objects, trees, light."""

    salt: int  # keys the hashed land-cover lattices
    district_size: int
    district_types: np.ndarray  # [rows, cols] indices into SCENE_TYPES
    sun: tuple[float, float]  # unit vector along which shadows fall
    shadow_k: float
    tint: tuple[float, float, float]
    features: list[Feature] = field(default_factory=list)
    objects: list[Obj] = field(default_factory=list)
    trees: list[Tree] = field(default_factory=list)

    _cells: dict[tuple[int, int], list[int]] | None = field(default=None, repr=False)

    def add_feature(self, feature: Feature) -> None:
        """Add a feature; features paint water first, then lots, roads and piers."""
        self.features.append(feature)
        self.features.sort(key=lambda f: FEATURE_RANK[f.label])
        self._cells = None

    def _feature_cells(self) -> dict[tuple[int, int], list[int]]:
        """Which features touch each FEATURE_CELL² cell (planning asks about points a lot)."""
        if self._cells is None:
            self._cells = {}
            for k, feature in enumerate(self.features):
                x0, y0, x1, y1 = (math.floor(b / FEATURE_CELL) for b in feature.bounds())
                for cy in range(y0, y1 + 1):
                    for cx in range(x0, x1 + 1):
                        self._cells.setdefault((cx, cy), []).append(k)
        return self._cells

    def surface(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground labels at points, features applied in the order :func:`render_window` paints them."""
        labels = np.full(np.shape(x), LAND, np.uint8)
        if not self.features or labels.size == 0:
            return labels
        cells = self._feature_cells()
        x0, x1 = math.floor(np.min(x) / FEATURE_CELL), math.floor(np.max(x) / FEATURE_CELL)
        y0, y1 = math.floor(np.min(y) / FEATURE_CELL), math.floor(np.max(y) / FEATURE_CELL)
        near = sorted(
            {k for cy in range(y0, y1 + 1) for cx in range(x0, x1 + 1) for k in cells.get((cx, cy), ())}
        )
        for k in near:
            feature = self.features[k]
            labels[feature.contains(x, y)] = feature.label
        return labels

    def shadow_offset(self, obj: Obj) -> tuple[float, float]:
        length = obj.height * self.shadow_k
        return self.sun[0] * length, self.sun[1] * length

    def finish(self) -> None:
        """Put objects in paint order and number them."""
        self.objects.sort(key=lambda o: CLASSES[o.class_id].layer)
        for uid, obj in enumerate(self.objects, start=1):
            obj.uid = uid
