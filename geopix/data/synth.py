"""Synthetic remote-sensing data: instruction chips with exact instance masks, and large COG scenes.

Everything is drawn as a function of *world* pixel coordinates. A :class:`World` holds the
land-cover parameters, linear and areal features (water, roads, paved lots, piers), object
instances and trees; :func:`render_window` paints any window of it. Land-cover texture and
noise come from hashed lattices, and every object is drawn from its own stored parameters, so
two windows that share pixels paint them identically: a chip is one window of a small world,
and a scene is tiled into windows whose objects cross tile borders seamlessly.

Chips are random from ``np.random.default_rng([seed, split stream, image index])``, so each
image is independent of the others and of the order they are generated in. Text for each chip
comes from :mod:`geopix.data.phrases`, computed from what was actually painted.

Instance masks are the pixels an instance painted that no later instance or tree covered
(paint order = layer order); shadows are painted but belong to no mask. A chip instance whose
visible part becomes tiny is not painted at all, so no unlabelled object ever appears.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from geopix import storage
from geopix.data import phrases, schema
from geopix.data.source import SourceWriter
from geopix.vocabulary import SegVocabulary

# ---------------------------------------------------------------------------------------------
# Classes and their appearance variants


@dataclass(frozen=True)
class Variant:
    colour: str  # the word phrases use
    rgb: tuple[int, int, int]
    held_out: bool = False  # drawn only in the test split


@dataclass(frozen=True)
class SynthClass:
    id: int
    name: str
    layer: int  # paint order: higher layers cover lower ones
    variants: tuple[Variant, ...]


def _variants(train: dict[str, tuple[int, int, int]], held_out: dict[str, tuple[int, int, int]]) -> tuple:
    return tuple(Variant(c, rgb) for c, rgb in train.items()) + tuple(
        Variant(c, rgb, held_out=True) for c, rgb in held_out.items()
    )


# Held-out variants recombine colour words that training already uses for other classes.
# Sizes (px, the same at every chip size) are set by the planners; docs/synthetic_data.md lists them.
CLASSES = (
    SynthClass(0, "storage_tank", 5, _variants(
        {"white": (226, 226, 220), "grey": (168, 170, 168)}, {"green": (104, 132, 98)})),
    SynthClass(1, "ship", 6, _variants(
        {"white": (222, 222, 216), "grey": (120, 126, 132), "red": (160, 58, 50), "black": (46, 48, 52)},
        {"blue": (50, 82, 150)})),
    SynthClass(2, "small_vehicle", 3, _variants(
        {"white": (226, 226, 226), "black": (34, 35, 40), "grey": (148, 150, 154), "red": (176, 40, 40),
         "blue": (44, 70, 156)}, {"green": (46, 118, 58)})),
    SynthClass(3, "airplane", 6, _variants(
        {"white": (236, 236, 236), "grey": (166, 168, 172)}, {"red": (186, 58, 52)})),
    SynthClass(4, "building", 4, _variants(
        {"red": (164, 76, 58), "grey": (118, 120, 124), "white": (210, 208, 202), "brown": (116, 88, 66)},
        {"blue": (66, 98, 150)})),
    SynthClass(5, "swimming_pool", 2, _variants(
        {"blue": (56, 126, 198), "turquoise": (64, 186, 196)}, {"green": (78, 148, 108)})),
    SynthClass(6, "tennis_court", 1, _variants(
        {"green": (68, 128, 80), "red": (172, 88, 64)}, {"blue": (58, 98, 160)})),
    SynthClass(7, "ground_track_field", 0, _variants(
        {"red": (168, 80, 62)}, {"blue": (64, 102, 158)})),
)  # fmt: skip
SYNTH_CLASSES = schema.ClassCatalog({c.id: c.name for c in CLASSES})
TANK, SHIP, VEHICLE, AIRPLANE, BUILDING, POOL, COURT, TRACK = range(8)

SCENE_TYPES = ("harbour", "airport", "residential", "industrial", "sports", "rural")
# Chips draw their scene type with these weights (tuned so that every COCO size bucket holds
# well over 20 % of the instances); rural land appears in scenes only.
CHIP_SCENE_WEIGHTS = {"harbour": 0.22, "airport": 0.2, "residential": 0.16, "industrial": 0.22, "sports": 0.2}
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
HALL_ROOFS = ("grey", "white", "red", "blue")  # big flat roofs are sheet metal or membrane
SCENE_STREAM = 7
HELD_OUT_VARIANT_P = 0.4  # how often a test instance takes a held-out appearance

# COCO size buckets on visible mask area (GEOPIX.md §3): the one definition, schema.size_bucket.
size_bucket = schema.size_bucket
MIN_VISIBLE_PX = 12  # a chip instance with fewer visible pixels is not painted
MIN_VISIBLE_FRACTION = 0.3  # ... or with less than this share of its in-chip area visible
NEIGHBOUR_PX = 4  # instances this close count as "next to" each other

# Ground labels: what lies under the objects.
LAND, WATER, ROAD, PAVED, PIER = range(5)
FEATURE_RANK = {WATER: 0, PAVED: 1, ROAD: 2, PIER: 3}  # paint order of features
FEATURE_CELL = 256  # px cells of the feature lookup used while planning


# ---------------------------------------------------------------------------------------------
# Hashed noise: a function of world coordinates, hence seamless across windows


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h + np.uint64(0x9E3779B97F4A7C15)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _hash01(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) floats from integer keys (arrays broadcast against each other)."""
    shape = np.broadcast_shapes(*(np.shape(k) for k in keys))
    with np.errstate(over="ignore"):
        h = np.zeros(shape, dtype=np.uint64)
        for key in keys:
            h = _splitmix(h ^ np.asarray(key, dtype=np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _noise_grid(xs: np.ndarray, ys: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1] on the grid xs (w,) × ys (h,) of increasing pixel-centre coordinates."""
    gx, gy = xs / cell, ys / cell
    fx, fy = np.floor(gx), np.floor(gy)
    ix0, iy0 = int(fx[0]), int(fy[0])
    lattice = _hash01(
        np.arange(ix0, int(fx[-1]) + 2)[None, :], np.arange(iy0, int(fy[-1]) + 2)[:, None], salt
    )
    cx, cy = (fx - ix0).astype(np.intp), (fy - iy0).astype(np.intp)
    tx, ty = _smooth(gx - fx), _smooth(gy - fy)
    rows = lattice[:, cx] * (1 - tx) + lattice[:, cx + 1] * tx
    return rows[cy] * (1 - ty)[:, None] + rows[cy + 1] * ty[:, None]


def _noise_points(x: np.ndarray, y: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """The same noise as :func:`_noise_grid`, at arbitrary points."""
    gx, gy = x / cell, y / cell
    fx, fy = np.floor(gx), np.floor(gy)
    tx, ty = _smooth(gx - fx), _smooth(gy - fy)
    ix, iy = fx.astype(np.int64), fy.astype(np.int64)
    top = _hash01(ix, iy, salt) * (1 - tx) + _hash01(ix + 1, iy, salt) * tx
    bottom = _hash01(ix, iy + 1, salt) * (1 - tx) + _hash01(ix + 1, iy + 1, salt) * tx
    return top * (1 - ty) + bottom * ty


# ---------------------------------------------------------------------------------------------
# World contents


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
            depth[band] += self._wander(lambda c, s: _noise_points(xb, yb, c, s))
        return depth > 0

    def paint(self, canvas: Canvas) -> None:
        win = canvas.window(self.bounds())
        if win is None:
            return
        sy, sx, xs, ys = win
        depth = (
            self.radius
            + self._wander(lambda c, s: _noise_grid(xs[0], ys[:, 0], c, s))
            - np.hypot(xs - self.cx, ys - self.cy)
        )
        water = depth > 0
        beach = (depth <= 0) & (depth > -2.5)
        shallow = np.clip(1 - depth / 25.0, 0, 1)[..., None]
        colour = (
            np.asarray(self.tone, np.float32)
            * (0.92 + 0.05 * _noise_grid(xs[0], ys[:, 0], 7.0, self.salt + 2))[..., None]
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


# ---------------------------------------------------------------------------------------------
# Drawing


@dataclass
class Canvas:
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


def _local(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    dx, dy = xs - obj.cx, ys - obj.cy
    return dx * c + dy * s, -dx * s + dy * c


def _rounded_rect(u, v, half_l, half_w, corner):
    du = np.maximum(np.abs(u) - (half_l - corner), 0)
    dv = np.maximum(np.abs(v) - (half_w - corner), 0)
    return (np.abs(u) <= half_l) & (np.abs(v) <= half_w) & (du * du + dv * dv <= corner * corner)


def _ship_half_width(obj: Obj, u: np.ndarray) -> np.ndarray:
    bow = min(1.3 * obj.width, 0.3 * obj.length)
    taper = np.clip((obj.length / 2 - u) / bow, 0, 1)
    stern = np.clip((u + obj.length / 2) / (0.15 * obj.width) + 0.6, 0, 1)
    return 0.5 * obj.width * np.sqrt(taper) * stern


def _airplane_parts(obj: Obj, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fuselage, wings, engines) masks of an airplane pointing along +u."""
    L, span = obj.length, obj.width
    fw = (
        0.055
        * L
        * np.clip((L / 2 - u) / (0.12 * L), 0, 1) ** 0.5
        * np.clip((u + L / 2) / (0.2 * L) + 0.3, 0, 1)
    )
    fuselage = (np.abs(u) <= L / 2) & (np.abs(v) <= fw)
    sweep = math.tan(math.radians(28))
    av = np.abs(v)

    def wing(root_u: float, half_span: float, chord: float) -> np.ndarray:
        lead = root_u - av * sweep
        c = chord * (1 - 0.6 * av / half_span)
        return (av <= half_span) & (u <= lead) & (u >= lead - c)

    wings = wing(0.1 * L, span / 2, 0.2 * L) | wing(-0.33 * L, 0.18 * span, 0.1 * L)
    ev = 0.34 * span / 2
    eu = 0.1 * L - ev * sweep + 0.03 * L
    engines = ((u - eu) / (0.07 * L)) ** 2 + ((av - ev) / (0.026 * L + 0.5)) ** 2 <= 1
    return fuselage, wings, engines


def _court_lines(u: np.ndarray, v: np.ndarray, half_l: float, half_w: float) -> np.ndarray:
    lu, lw = 0.65 * half_l, 0.6 * half_w
    t = 0.5
    au, av = np.abs(u), np.abs(v)
    inside = (au <= lu + t) & (av <= lw + t)
    return inside & (
        (np.abs(au - lu) < t)
        | (np.abs(av - lw) < t)
        | ((np.abs(av - 0.75 * lw) < t) & (au <= lu))
        | ((np.abs(au - 0.46 * lu) < t) & (av <= 0.75 * lw))
        | ((av < t) & (au <= 0.46 * lu))
    )


def object_mask(obj: Obj, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which local points (u, v) the object covers."""
    half_l, half_w = obj.length / 2, obj.width / 2
    kind = obj.class_id
    if kind == TANK:
        return u * u + v * v <= half_l * half_l
    if kind == SHIP:
        return (np.abs(u) <= half_l) & (np.abs(v) <= _ship_half_width(obj, u))
    if kind == VEHICLE:
        return _rounded_rect(u, v, half_l, half_w, min(1.2, half_w * 0.5))
    if kind == AIRPLANE:
        fuselage, wings, _ = _airplane_parts(obj, u, v)
        return fuselage | wings
    if kind == BUILDING:
        body = (np.abs(u) <= half_l) & (np.abs(v) <= half_w)
        if obj.style & 2:  # an L-shaped wing on one end
            body |= (
                (u >= half_l - 0.45 * obj.length)
                & (u <= half_l)
                & (v >= half_w - 1)
                & (v <= half_w + 0.7 * obj.width)
            )
        return body
    if kind == POOL:
        if obj.style & 1:
            return (u / half_l) ** 2 + (v / half_w) ** 2 <= 1
        return _rounded_rect(u, v, half_l, half_w, 0.35 * obj.width)
    if kind == COURT:
        return (np.abs(u) <= half_l) & (np.abs(v) <= half_w)
    if kind == TRACK:
        du = np.maximum(np.abs(u) - (half_l - half_w), 0)
        return du * du + v * v <= half_w * half_w
    raise ValueError(f"unknown class {kind}")


def _shade(obj: Obj, u: np.ndarray, v: np.ndarray, su: float, sv: float) -> np.ndarray:
    """Colours [h, w, 3] of the object over its local grid; (su, sv) is the shadow direction."""
    base = np.asarray(obj.variant.rgb, np.float32)
    half_l, half_w = obj.length / 2, obj.width / 2
    kind = obj.class_id
    shape = np.broadcast_shapes(u.shape, v.shape)
    factor = np.ones(shape, np.float32)
    colour = np.broadcast_to(base, shape + (3,)).copy()
    if kind == TANK:
        r = half_l
        dist = np.sqrt(u * u + v * v) / r
        factor = 1 - 0.1 * (u * su + v * sv) / r
        rim = dist > 0.88
        factor = np.where(rim, 1.08, factor)
        # the rim wall shades the sun-side edge of the recessed floating roof
        shaded = ~rim & ((u - 0.25 * r * su) ** 2 + (v - 0.25 * r * sv) ** 2 > (0.88 * r) ** 2)
        factor = np.where(shaded, 0.7, factor)
        if r > 9:
            factor = np.where(dist < 0.08, 0.78, factor)
    elif kind == SHIP:
        edge = np.abs(v) > _ship_half_width(obj, u) - 0.9
        factor = np.where(edge, 0.72, 1.0)
        if obj.style == 2:  # small boat: a cabin amidships
            cabin = (u > -0.1 * obj.length) & (u < 0.18 * obj.length) & (np.abs(v) < 0.3 * obj.width)
            colour[cabin] = (230, 230, 226)
        else:
            bridge = (
                (u > -half_l + 0.04 * obj.length)
                & (u < -half_l + 0.17 * obj.length)
                & (np.abs(v) < 0.4 * obj.width)
            )
            if obj.style == 0:  # cargo ship: hatch covers along the deck
                hold = (u > -0.3 * obj.length) & (u < 0.32 * obj.length) & (np.abs(v) < 0.36 * obj.width)
                hatch = hold & (np.mod(u + 0.3 * obj.length, 0.08 * obj.length) < 0.066 * obj.length)
                colour[hatch] = base * 0.62 + np.array([40, 30, 20], np.float32)
            else:  # tanker: a pipe line along the centre
                colour[(np.abs(v) < 0.7) & (u > -0.3 * obj.length) & (u < 0.36 * obj.length)] = (
                    190,
                    186,
                    170,
                )
            colour[bridge] = (232, 232, 226)
            factor = np.where(bridge & (v * sv > 0), 0.85, factor)
    elif kind == VEHICLE:
        glass = ((u > 0.12 * obj.length) & (u < 0.3 * obj.length)) | (
            (u < -0.26 * obj.length) & (u > -0.4 * obj.length)
        )
        colour[glass] = (36, 40, 48)
        factor = np.where(np.abs(v) > half_w - 0.8, 0.85, 1.0)
    elif kind == AIRPLANE:
        fuselage, wings, engines = _airplane_parts(obj, u, v)
        factor = np.where(wings & ~fuselage, 0.93, 1.0)
        colour[engines & wings] = (92, 94, 100)
        colour[fuselage & (u > 0.43 * obj.length) & (u < 0.455 * obj.length)] = (40, 44, 54)
    elif kind == BUILDING:
        wing = (u >= half_l - 0.45 * obj.length) & (v > half_w) if obj.style & 2 else np.zeros(shape, bool)
        if obj.style & 1:  # flat roof: parapet, corrugated sheets, skylight bands, roof units
            inner = (np.abs(u) < half_l - 1.2) & ((np.abs(v) < half_w - 1.2) | wing)
            factor = np.where(inner, 0.95 + 0.04 * np.sin(v * 2.6), 1.12)
            if obj.length > 100:
                bands = int(obj.style >> 2) % 3 + 1
                pitch = obj.length / (bands + 1)
                skylight = (np.abs(np.mod(u + half_l, pitch) - pitch / 2) > pitch / 2 - 2.5) & (
                    np.abs(v) < half_w - 6
                )
                factor = np.where(inner & skylight & (np.abs(u) < half_l - 6), 1.18, factor)
            unit_rng = np.random.default_rng(obj.style)
            for _ in range(int(unit_rng.integers(1, 5))):
                uu = unit_rng.uniform(-0.7, 0.7) * half_l
                vv = unit_rng.uniform(-0.6, 0.6) * half_w
                unit = (np.abs(u - uu) < 2.2) & (np.abs(v - vv) < 1.6)
                factor = np.where(unit, 0.75, factor)
        else:  # gable roof: the half facing the sun is lit, the ridge catches light
            slope = np.where(v > 0, -sv, sv)
            wing_slope = np.where(u > half_l - 0.225 * obj.length, -su, su)
            factor = 1 + 0.2 * np.where(wing, wing_slope, slope)
            factor = factor * (1 + 0.04 * np.sin(u * 2.4))
            factor = np.where(~wing & (np.abs(v) < 0.6), 1.15, factor)
    elif kind == POOL:
        factor = 0.86 + 0.2 * (u / obj.length + 0.5)
        inner = object_mask(replace(obj, length=obj.length - 2.4, width=obj.width - 2.4), u, v)
        colour[~inner] = (226, 224, 214)
        factor = np.where(inner, factor, 1.0)
    elif kind == COURT:
        inner = (np.abs(u) <= 0.65 * half_l) & (np.abs(v) <= 0.6 * half_w)
        factor = np.where(inner, 1.0, 0.8)
        colour[_court_lines(u, v, half_l, half_w)] = (232, 232, 226)
        colour[(np.abs(u) < 0.5) & (np.abs(v) <= 0.66 * half_w)] = (70, 70, 70)
    elif kind == TRACK:
        du = np.maximum(np.abs(u) - (half_l - half_w), 0)
        inner_edge = half_w - np.sqrt(du * du + v * v)
        lane = 0.17 * obj.width
        field_ = inner_edge > lane
        lines = ~field_ & (np.mod(inner_edge, lane / 6) < 0.55)
        colour[field_] = (72, 126, 60)
        factor = np.where(field_, np.where(np.mod(u, 0.14 * obj.length) < 0.07 * obj.length, 0.96, 1.04), 1.0)
        pitch_u, pitch_v = half_l - half_w + 0.55 * (half_w - lane), 0.72 * (half_w - lane)
        pitch = (
            (np.abs(np.abs(u) - pitch_u) < 0.55) & (np.abs(v) <= pitch_v)
            | (np.abs(np.abs(v) - pitch_v) < 0.55) & (np.abs(u) <= pitch_u)
            | (np.abs(u) < 0.55) & (np.abs(v) <= pitch_v)
            | (np.abs(np.hypot(u, v) - 0.14 * obj.width) < 0.55)
        )
        colour[lines | (field_ & pitch)] = (226, 226, 222)
    return colour * np.asarray(factor, np.float32)[..., None]


def _shadow_mask(obj: Obj, xs: np.ndarray, ys: np.ndarray, offset: tuple[float, float]) -> np.ndarray:
    """The object's silhouette swept along ``offset`` (an extruded footprint seen from above)."""
    reach = math.hypot(*offset)
    steps = max(1, min(6, math.ceil(reach / max(1.0, 0.5 * min(obj.length, obj.width)))))
    shadow = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), bool)
    for k in range(1, steps + 1):
        t = k / steps
        shadow |= object_mask(obj, *_local(obj, xs - t * offset[0], ys - t * offset[1]))
    return shadow


def _object_bounds(obj: Obj, offset: tuple[float, float]) -> tuple[float, float, float, float]:
    r = obj.radius + 1
    ox, oy = offset
    return obj.cx - r + min(ox, 0), obj.cy - r + min(oy, 0), obj.cx + r + max(ox, 0), obj.cy + r + max(oy, 0)


def _paint_object(world: World, canvas: Canvas, obj: Obj) -> None:
    offset = world.shadow_offset(obj)
    win = canvas.window(_object_bounds(obj, offset))
    if win is None:
        return
    sy, sx, xs, ys = win
    if obj.height > 0:
        shadow = _shadow_mask(obj, xs, ys, offset)
        canvas.rgb[sy, sx][shadow] *= 0.5
    u, v = _local(obj, xs, ys)
    body = object_mask(obj, u, v)
    if not body.any():
        return
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    su, sv = world.sun[0] * c + world.sun[1] * s, -world.sun[0] * s + world.sun[1] * c
    canvas.rgb[sy, sx][body] = _shade(obj, u, v, su, sv)[body]
    canvas.ids[sy, sx][body] = obj.uid


def _paint_tree(world: World, canvas: Canvas, tree: Tree) -> None:
    ox, oy = world.sun[0] * (tree.r + 2) * world.shadow_k, world.sun[1] * (tree.r + 2) * world.shadow_k
    b = tree.bounds()
    win = canvas.window((b[0] + min(ox, 0), b[1] + min(oy, 0), b[2] + max(ox, 0), b[3] + max(oy, 0)))
    if win is None:
        return
    sy, sx, xs, ys = win
    canvas.rgb[sy, sx][tree.crown(xs - ox, ys - oy)] *= 0.55
    crown = tree.crown(xs, ys)
    lit = 1 - 0.3 * ((xs - tree.cx) * world.sun[0] + (ys - tree.cy) * world.sun[1]) / tree.r
    texture = 0.85 + 0.3 * _noise_grid(xs[0], ys[:, 0], 1.6, int(tree.phase * 1000))
    colour = np.array([44, 70, 38], np.float32) * tree.tone * (lit * texture)[..., None]
    canvas.rgb[sy, sx][crown] = colour[crown]
    canvas.ids[sy, sx][crown] = 0


# Land cover: a jittered-grid Voronoi partition into parcels, each with a cover type.
LAND_CELL = 150.0
COVER_PALETTES = {
    "grass": ((92, 116, 62), (104, 122, 68), (86, 106, 56), (112, 124, 76)),
    "crop": ((118, 134, 72), (150, 146, 92), (172, 160, 112), (98, 120, 62), (138, 120, 86), (126, 140, 84)),
    "soil": ((152, 130, 102), (138, 118, 94), (164, 144, 114)),
    "urban": ((146, 144, 140), (134, 132, 128), (158, 154, 148)),
    "forest": ((56, 80, 46), (48, 70, 42)),
}
COVERS = tuple(COVER_PALETTES)
# Per cover: amplitudes of fine noise (forest: tree crowns), medium noise and crop-row stripes,
# and whether its parcels are bounded by darker hedgerows.
COVER_TEXTURE = {
    "grass": (0.06, 0.12, 0.0, True),
    "crop": (0.05, 0.06, 0.08, True),
    "soil": (0.06, 0.12, 0.0, True),
    "urban": (0.09, 0.07, 0.0, False),
    "forest": (0.45, 0.12, 0.0, False),
}
_TEXTURE = np.array([COVER_TEXTURE[c][:3] for c in COVERS], np.float32)
_HEDGED = np.array([COVER_TEXTURE[c][3] for c in COVERS])
# Which covers each scene type's parcels take (rows follow SCENE_TYPES, columns COVERS).
COVER_WEIGHTS = np.array(
    [
        [0.35, 0.0, 0.25, 0.4, 0.0],  # harbour
        [0.6, 0.0, 0.2, 0.2, 0.0],  # airport
        [0.6, 0.0, 0.1, 0.2, 0.1],  # residential
        [0.15, 0.0, 0.35, 0.5, 0.0],  # industrial
        [0.7, 0.0, 0.05, 0.15, 0.1],  # sports
        [0.15, 0.55, 0.1, 0.0, 0.2],  # rural
    ]
)
COVER_CUMULATIVE = np.cumsum(COVER_WEIGHTS, axis=1) / COVER_WEIGHTS.sum(axis=1, keepdims=True)
_PALETTE = np.array([c for p in COVER_PALETTES.values() for c in p], np.float32)
_PALETTE_SIZE = np.array([len(p) for p in COVER_PALETTES.values()])
_PALETTE_START = np.cumsum(_PALETTE_SIZE) - _PALETTE_SIZE
VORONOI_STEP = 4  # the partition is found on a 4-px lattice, then refined between two candidates


def _land_cover(world: World, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Land-cover colours [h, w, 3] at the pixel centres xs (w,) × ys (h,)."""
    salt = world.salt
    # Parcel seed points of the lattice cells around the window.
    gx = np.arange(math.floor(xs[0] / LAND_CELL) - 2, math.floor(xs[-1] / LAND_CELL) + 3)
    gy = np.arange(math.floor(ys[0] / LAND_CELL) - 2, math.floor(ys[-1] / LAND_CELL) + 3)
    seed_x = (gx[None, :] + 0.1 + 0.8 * _hash01(gx[None, :], gy[:, None], salt, 1)) * LAND_CELL
    seed_y = (gy[:, None] + 0.1 + 0.8 * _hash01(gx[None, :], gy[:, None], salt, 2)) * LAND_CELL
    seed_x, seed_y = seed_x.ravel(), seed_y.ravel()
    nx = len(gx)

    # Two nearest parcel seeds on a coarse, globally aligned lattice...
    step = VORONOI_STEP
    cxs = (np.arange(math.floor(xs[0] / step), math.floor(xs[-1] / step) + 1) + 0.5) * step
    cys = (np.arange(math.floor(ys[0] / step), math.floor(ys[-1] / step) + 1) + 0.5) * step
    col0 = np.floor(cxs / LAND_CELL).astype(np.int64) - gx[0]
    row0 = np.floor(cys / LAND_CELL).astype(np.int64) - gy[0]
    best = np.full((len(cys), len(cxs)), np.inf)
    second = best.copy()
    best_id = np.zeros(best.shape, np.int64)
    second_id = best_id.copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            cell = (row0 + dr)[:, None] * nx + (col0 + dc)[None, :]
            d = (cxs[None, :] - seed_x[cell]) ** 2 + (cys[:, None] - seed_y[cell]) ** 2
            closer = d < best
            runner = ~closer & (d < second)
            second = np.where(closer, best, np.where(runner, d, second))
            second_id = np.where(closer, best_id, np.where(runner, cell, second_id))
            best = np.where(closer, d, best)
            best_id = np.where(closer, cell, best_id)
    # ... decide each pixel between those two.
    ci = (np.floor(ys / step) - math.floor(ys[0] / step)).astype(np.intp)[:, None]
    cj = (np.floor(xs / step) - math.floor(xs[0] / step)).astype(np.intp)[None, :]
    id1, id2 = best_id[ci, cj], second_id[ci, cj]
    d1 = np.sqrt((xs[None, :] - seed_x[id1]) ** 2 + (ys[:, None] - seed_y[id1]) ** 2)
    d2 = np.sqrt((xs[None, :] - seed_x[id2]) ** 2 + (ys[:, None] - seed_y[id2]) ** 2)
    parcel = np.where(d1 <= d2, id1, id2)
    border = np.abs(d1 - d2) < 1.2

    # Parcel attributes: cover type (from the district its seed lies in), colour, texture.
    cell_gx, cell_gy = np.meshgrid(gx, gy)
    cell_gx, cell_gy = cell_gx.ravel(), cell_gy.ravel()
    district = world.district_types[
        np.clip((seed_y // world.district_size).astype(np.intp), 0, world.district_types.shape[0] - 1),
        np.clip((seed_x // world.district_size).astype(np.intp), 0, world.district_types.shape[1] - 1),
    ]
    pick = _hash01(cell_gx, cell_gy, salt, 3)
    cover = (pick[:, None] > COVER_CUMULATIVE[district]).sum(axis=1)
    shade = _PALETTE_START[cover] + (_hash01(cell_gx, cell_gy, salt, 4) * _PALETTE_SIZE[cover]).astype(
        np.intp
    )
    brightness = 0.92 + 0.16 * _hash01(cell_gx, cell_gy, salt, 5)[:, None]
    hue = 0.98 + 0.04 * _hash01(cell_gx[:, None], cell_gy[:, None], salt, np.arange(6, 9))
    colour = _PALETTE[shade] * brightness * hue
    angle = np.pi * _hash01(cell_gx, cell_gy, salt, 9)
    wavenumber = 2 * np.pi / (3.5 + 5 * _hash01(cell_gx, cell_gy, salt, 10))
    kx, ky = (np.cos(angle) * wavenumber).astype(np.float32), (np.sin(angle) * wavenumber).astype(np.float32)

    fine = _noise_grid(xs, ys, 2.2, salt + 10).astype(np.float32) - 0.5
    medium = _noise_grid(xs, ys, 22.0, salt + 11).astype(np.float32) - 0.5
    broad = _noise_grid(xs, ys, 110.0, salt + 12).astype(np.float32) - 0.5
    texture = _TEXTURE[cover[parcel]]
    xs32, ys32 = xs.astype(np.float32)[None, :], ys.astype(np.float32)[:, None]
    stripes = np.sin(xs32 * kx[parcel] + ys32 * ky[parcel])
    factor = (
        1 + 2 * (texture[..., 0] * fine + texture[..., 1] * medium) + texture[..., 2] * stripes + 0.16 * broad
    )
    factor = np.where(border & _HEDGED[cover[parcel]], factor * 0.82, factor)
    return colour.astype(np.float32)[parcel] * factor[..., None]


@dataclass
class Rendered:
    rgb: np.ndarray  # [h, w, 3] uint8
    ids: np.ndarray  # [h, w] int32: uid of the visible instance, 0 none
    ground: np.ndarray  # [h, w] uint8 ground labels


NOISE_SIGMA = 2.5


@dataclass
class SpatialIndex:
    """Bounding boxes of a world's items, to find the few that touch one tile of a large scene."""

    features: np.ndarray
    objects: np.ndarray
    trees: np.ndarray

    @classmethod
    def build(cls, world: World) -> SpatialIndex:
        def boxes(rows):
            return np.array(list(rows), np.float64).reshape(-1, 4)

        return cls(
            boxes(f.bounds() for f in world.features),
            boxes(_object_bounds(o, world.shadow_offset(o)) for o in world.objects),
            boxes(_tree_bounds(world, t) for t in world.trees),
        )

    @staticmethod
    def select(boxes: np.ndarray, items: Sequence, box: Sequence[float]) -> list:
        x0, y0, x1, y1 = box
        hit = (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)
        return [items[i] for i in np.flatnonzero(hit)]


def _tree_bounds(world: World, tree: Tree) -> tuple[float, float, float, float]:
    b = tree.bounds()
    reach = (tree.r + 2) * world.shadow_k
    return b[0] - reach, b[1] - reach, b[2] + reach, b[3] + reach


def render_window(
    world: World,
    x0: int,
    y0: int,
    width: int,
    height: int,
    rng: np.random.Generator,
    index: SpatialIndex | None = None,
    skip_uid: int = 0,
) -> Rendered:
    """Paint the window [x0, x0 + width) × [y0, y0 + height) of ``world`` (``index``: a prebuilt
    :class:`SpatialIndex`, worth it when many windows of one large world are painted).

    A one-pixel halo is painted and blurred with the window so that the blur (the sensor's
    point spread) is the same on both sides of a tile border; the pixel noise is added after.
    ``skip_uid`` leaves one object out (tests use it to see which pixels an object painted).
    """
    halo = 1
    hx0, hy0, w, h = x0 - halo, y0 - halo, width + 2 * halo, height + 2 * halo
    xs = np.arange(hx0, hx0 + w, dtype=np.float64) + 0.5
    ys = np.arange(hy0, hy0 + h, dtype=np.float64) + 0.5
    canvas = Canvas(
        hx0, hy0, _land_cover(world, xs, ys), np.zeros((h, w), np.uint8), np.zeros((h, w), np.int32)
    )
    box = (hx0, hy0, hx0 + w, hy0 + h)
    index = index or SpatialIndex.build(world)
    for feature in index.select(index.features, world.features, box):
        feature.paint(canvas)
    for obj in index.select(index.objects, world.objects, box):
        if obj.uid != skip_uid:
            _paint_object(world, canvas, obj)
    for tree in index.select(index.trees, world.trees, box):
        _paint_tree(world, canvas, tree)

    rgb = canvas.rgb * np.asarray(world.tint, np.float32)
    # A small blur: edges in real imagery are never one pixel sharp.
    rgb = 0.5 * rgb[:, 1:-1] + 0.25 * (rgb[:, :-2] + rgb[:, 2:])
    rgb = 0.5 * rgb[1:-1] + 0.25 * (rgb[:-2] + rgb[2:])
    rgb += NOISE_SIGMA * rng.standard_normal(rgb.shape, dtype=np.float32)
    image = np.clip(np.rint(rgb), 1, 255).astype(np.uint8)  # 0 stays free for nodata
    crop = (slice(halo, halo + height), slice(halo, halo + width))
    return Rendered(image, canvas.ids[crop], canvas.ground[crop])


def _paint_ids(world: World, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids map of a size × size chip, in-chip area of every object): masks only, no colours."""
    canvas = Canvas(
        0,
        0,
        np.zeros((1, 1, 3), np.float32),
        np.zeros((size, size), np.uint8),
        np.zeros((size, size), np.int32),
    )
    full = np.zeros(len(world.objects) + 1, np.int64)
    for obj in world.objects:
        win = canvas.window(_object_bounds(obj, (0.0, 0.0)))
        if win is None:
            continue
        sy, sx, xs, ys = win
        body = object_mask(obj, *_local(obj, xs, ys))
        canvas.ids[sy, sx][body] = obj.uid
        full[obj.uid] = int(body.sum())
    for tree in world.trees:
        win = canvas.window(tree.bounds())
        if win is not None:
            sy, sx, xs, ys = win
            canvas.ids[sy, sx][tree.crown(xs, ys)] = 0
    return canvas.ids, full


# ---------------------------------------------------------------------------------------------
# Planning: where things go


@dataclass
class Region:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def size(self) -> float:
        return min(self.x1 - self.x0, self.y1 - self.y0)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def grid(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs = self.x0 + (np.arange(n) + 0.5) * (self.x1 - self.x0) / n
        ys = self.y0 + (np.arange(n) + 0.5) * (self.y1 - self.y0) / n
        return np.meshgrid(xs, ys)


def _outline(obj: Obj) -> tuple[np.ndarray, np.ndarray]:
    """World points covering the object's bounding rectangle every few pixels, for surface checks
    (closer than the narrowest road or pier is wide, so none slips between them)."""
    spacing = 5.5
    extra = 0.7 * obj.width if obj.class_id == BUILDING and obj.style & 2 else 0.0
    us = np.linspace(-obj.length / 2, obj.length / 2, max(2, math.ceil(obj.length / spacing) + 1))
    vs = np.linspace(
        -obj.width / 2, obj.width / 2 + extra, max(2, math.ceil((obj.width + extra) / spacing) + 1)
    )
    hu, hv = (a.ravel() for a in np.meshgrid(us, vs))
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    return obj.cx + hu * c - hv * s, obj.cy + hu * s + hv * c


class Placer:
    """Places objects in one region of a world: on allowed ground, apart from each other."""

    def __init__(
        self, world: World, rng: np.random.Generator, region: Region, held_out: bool, density: float
    ):
        self.world = world
        self.rng = rng
        self.region = region
        self.held_out = held_out
        self.density = density  # object counts scale with the region's area
        self.occupied: list[tuple[float, float, float, int]] = []

    def chance(self, probability: float) -> int:
        """How many of an occasional item to place: one try per chip-sized area of the region."""
        return int((self.rng.random(max(1, round(self.density))) < probability).sum())

    def count(self, low: int, high: int) -> int:
        return round(int(self.rng.integers(low, high + 1)) * self.density)

    def variant(self, class_id: int, colours: tuple[str, ...] | None = None) -> Variant:
        variants = [v for v in CLASSES[class_id].variants if colours is None or v.colour in colours]
        held = [v for v in variants if v.held_out]
        if self.held_out and held and self.rng.random() < HELD_OUT_VARIANT_P:
            return held[int(self.rng.integers(len(held)))]
        train = [v for v in variants if not v.held_out]
        return train[int(self.rng.integers(len(train)))]

    def make(self, class_id, cx, cy, angle, length, width, height, style=0, colours=None) -> Obj:
        variant = self.variant(class_id, colours)
        return Obj(
            class_id,
            float(cx),
            float(cy),
            float(angle),
            float(length),
            float(width),
            variant,
            float(height),
            int(style),
        )

    def fits(
        self, obj: Obj, allowed: set[int], ignore: frozenset[int] = frozenset(), overlap: float = 0.9
    ) -> bool:
        for ox, oy, orad, oclass in self.occupied:
            if oclass not in ignore and math.hypot(obj.cx - ox, obj.cy - oy) < overlap * (obj.radius + orad):
                return False
        x, y = _outline(obj)
        return bool(np.isin(self.world.surface(x, y), list(allowed)).all())

    def add(
        self, obj: Obj, allowed: set[int], ignore: frozenset[int] = frozenset(), overlap: float = 0.9
    ) -> bool:
        if not self.fits(obj, allowed, ignore, overlap):
            return False
        self.occupied.append((obj.cx, obj.cy, obj.radius, obj.class_id))
        self.world.objects.append(obj)
        return True

    def point(self, margin: float = 0.0) -> tuple[float, float]:
        """A random point at least ``margin`` px inside the region (less in small regions)."""
        r = self.region
        margin = min(margin, 0.45 * r.size)
        return (
            float(self.rng.uniform(r.x0 + margin, r.x1 - margin)),
            float(self.rng.uniform(r.y0 + margin, r.y1 - margin)),
        )

    def scatter(
        self,
        make: Callable[[float, float], Obj],
        allowed: set[int],
        tries: int = 25,
        margin: float = 0.0,
        **kw,
    ) -> Obj | None:
        for _ in range(tries):
            obj = make(*self.point(margin))
            if self.add(obj, allowed, **kw):
                return obj
        return None

    def road(self, angle: float, through: tuple[float, float], half_width: float) -> Strip:
        """A road across the region (clipped to it) at ``angle`` through the point ``through``."""
        c, s = math.cos(angle), math.sin(angle)
        r = self.region
        ts = []
        for origin, direction, low, high in ((through[0], c, r.x0, r.x1), (through[1], s, r.y0, r.y1)):
            if abs(direction) > 1e-9:
                ts += sorted([(low - origin) / direction, (high - origin) / direction])
        t0 = max(ts[0], ts[2]) if len(ts) == 4 else ts[0]
        t1 = min(ts[1], ts[3]) if len(ts) == 4 else ts[1]
        strip = Strip(
            through[0] + t0 * c,
            through[1] + t0 * s,
            through[0] + t1 * c,
            through[1] + t1 * s,
            half_width,
            ROAD,
        )
        self.world.add_feature(strip)
        return strip

    def tree(self, x: float, y: float) -> None:
        if self.world.surface(np.array([x]), np.array([y]))[0] != LAND:
            return
        for ox, oy, orad, _ in self.occupied:
            if math.hypot(x - ox, y - oy) < 0.7 * orad:
                return  # overhanging an object is fine, hiding it is not
        r = float(self.rng.uniform(3, 8))
        self.world.trees.append(
            Tree(x, y, r, float(self.rng.uniform(0, 2 * np.pi)), float(self.rng.uniform(0.85, 1.15)))
        )

    def trees(self, low: int, high: int) -> None:
        for _ in range(self.count(low, high)):
            self.tree(*self.point())

    # -- reusable arrangements -----------------------------------------------------------------

    def cars_on_road(self, road: Strip, n: int) -> None:
        for _ in range(n):
            for _ in range(10):
                side = 1 if self.rng.random() < 0.5 else -1
                x, y = road.point(float(self.rng.uniform(0.03, 0.97)), side * road.half_width * 0.5)
                angle = road.angle + (0 if side > 0 else np.pi)
                car = self.make(VEHICLE, x, y, angle, self.rng.uniform(8, 12), self.rng.uniform(4, 6), 1.5)
                if self.add(car, {ROAD}, overlap=0.8):
                    break

    def car_park(self, cars: int, angle: float | None = None) -> None:
        """A parking lot with ``cars`` cars side by side in its stalls (neighbours may touch)."""
        stalls = max(cars + 2, int(self.rng.integers(6, 14)))
        length, width = stalls * Lot.STALL, 2 * Lot.DEPTH + 10
        angle = float(self.rng.uniform(0, np.pi)) if angle is None else angle
        for _ in range(15):
            cx, cy = self.point(10)
            lot = Lot(cx, cy, angle, length, width, apron=False)
            probe = Obj(VEHICLE, cx, cy, angle, length, width, CLASSES[VEHICLE].variants[0], 0)
            if self.fits(probe, {LAND}, overlap=0.8):
                break
        else:
            return
        self.world.add_feature(lot)
        self.occupied.append((cx, cy, 0.5 * math.hypot(length, width), -1))
        slots = self.rng.permutation(2 * stalls)[:cars]
        for slot in slots:
            row, k = divmod(int(slot), stalls)
            u = -length / 2 + (k + 0.5) * Lot.STALL
            v = (width / 2 - Lot.DEPTH / 2) * (1 if row else -1)
            x, y = lot.world_point(u, v)
            car = self.make(
                VEHICLE,
                x,
                y,
                angle + np.pi / 2 + (np.pi if row else 0),
                self.rng.uniform(8, 11),
                self.rng.uniform(4.5, 5.8),
                1.5,
            )
            self.world.objects.append(car)  # stalls keep cars apart; touching neighbours are wanted

    def tank(self, x: float, y: float, radius: float) -> Obj:
        return self.make(TANK, x, y, 0.0, 2 * radius, 2 * radius, 0.35 * radius + 2)

    def tank_radius(self, weights: tuple[float, float, float] = (0.35, 0.4, 0.25)) -> float:
        """A tank radius from the small, medium or large range (areas either side of 32² and 96²)."""
        kind = self.rng.choice(3, p=weights)
        return float(self.rng.uniform(*((6, 16), (19, 50), (57, 80))[kind]))

    def warehouse(self, x: float, y: float, angle: float) -> Obj:
        length = self.rng.uniform(125, 210)
        style = 1 | (int(self.rng.integers(1, 1 << 20)) << 2)
        return self.make(
            BUILDING,
            x,
            y,
            angle,
            length,
            self.rng.uniform(0.6, 0.85) * length,
            self.rng.uniform(8, 14),
            style,
            HALL_ROOFS,
        )

    def house(self, x: float, y: float, angle: float, large: bool = False) -> Obj:
        """A house (gable roof) or, when ``large``, often a flat-roofed block."""
        length = self.rng.uniform(40, 80) if large else self.rng.uniform(20, 48)
        width = self.rng.uniform(0.55, 0.85) * length
        flat = large and self.rng.random() < 0.6
        wing = self.rng.random() < 0.25
        style = (1 if flat else 0) | (2 if wing else 0) | (int(self.rng.integers(1, 1 << 20)) << 2)
        return self.make(BUILDING, x, y, angle, length, width, self.rng.uniform(4, 8), style)


def _water_fraction(world: World, region: Region, n: int = 12) -> float:
    x, y = region.grid(n)
    return float((world.surface(x, y) == WATER).mean())


def _shore_points(world: World, region: Region, n: int = 24) -> list[tuple[float, float, float]]:
    """(x, y, angle into the water) on the shorelines inside ``region``."""
    x, y = region.grid(n)
    wet = world.surface(x, y) == WATER
    ends = []  # (land x, land y, water x, water y) of grid neighbours on either side of a shore
    for a, b in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(None, -1),), (slice(1, None),)),
    ):
        cross = wet[a] != wet[b]
        first_wet = wet[a][cross]
        xa, ya, xb, yb = x[a][cross], y[a][cross], x[b][cross], y[b][cross]
        ends.append(np.where(first_wet, [xb, yb, xa, ya], [xa, ya, xb, yb]))
    lx, ly, wx, wy = np.concatenate(ends, axis=1)
    if lx.size == 0:
        return []
    for _ in range(8):  # bisect to the shoreline
        mx, my = (lx + wx) / 2, (ly + wy) / 2
        water = world.surface(mx, my) == WATER
        wx, wy = np.where(water, mx, wx), np.where(water, my, wy)
        lx, ly = np.where(water, lx, mx), np.where(water, ly, my)
    into = np.zeros(lx.shape)
    for body in (f for f in world.features if isinstance(f, WaterBody)):
        inside = body.contains(wx, wy)
        into[inside] = np.arctan2(body.cy - ly[inside], body.cx - lx[inside])
    return [(float(a), float(b), float(c)) for a, b, c in zip(lx, ly, into, strict=True)]


def _plan_harbour(p: Placer) -> None:
    world, rng, region = p.world, p.rng, p.region
    if _water_fraction(world, region) < 0.15:
        # A coast: the edge of a large water body whose centre lies outside the region.
        heading = float(rng.uniform(0, 2 * np.pi))
        radius = float(rng.uniform(2.0, 4.0)) * region.size
        reach = float(rng.uniform(-0.15, 0.2)) * region.size  # shoreline's distance past the centre
        cx, cy = region.centre
        tone = ((28, 54, 68), (34, 62, 72), (40, 64, 58))[int(rng.integers(3))]
        world.add_feature(WaterBody(
            cx + math.cos(heading) * (radius + reach), cy + math.sin(heading) * (radius + reach),
            radius, 0.05 * radius, int(rng.integers(1 << 40)), tone,
        ))  # fmt: skip
    shores = _shore_points(world, region)
    if not shores:
        return
    for _ in range(p.count(1, 2)):
        sx, sy, into = shores[int(rng.integers(len(shores)))]
        length, half_width = float(rng.uniform(60, 170)), float(rng.uniform(3, 5.5))
        c, s = math.cos(into), math.sin(into)
        end = (sx + c * length, sy + s * length)
        if world.surface(np.array([end[0]]), np.array([end[1]]))[0] != WATER:
            continue
        pier = Strip(sx - c * 8, sy - s * 8, *end, half_width, PIER)
        world.add_feature(pier)  # nothing lands on it: objects check the ground under them
        for side in (-1, 1):
            if rng.random() > 0.8:
                continue
            # moored along the pier, clear of the shore and not past its end
            ship_len = float(rng.uniform(0.45, 0.95)) * (length - 8)
            ship_w = ship_len / float(rng.uniform(4.3, 5.8))
            along = 8 + 8 + ship_len / 2 + float(rng.uniform(0, length - 8 - ship_len))
            gap = half_width + ship_w / 2 + float(rng.uniform(0.3, 1.5))
            x, y = pier.point(along / pier.length, side * gap)
            angle = pier.angle + (np.pi if rng.random() < 0.5 else 0)
            ship = p.make(SHIP, x, y, angle, ship_len, ship_w, 0.12 * ship_w + 1, style=int(rng.integers(2)))
            if p.add(ship, {WATER}, overlap=0.5) and rng.random() < 0.3:
                # a second ship moored alongside the first: touching hulls
                w2 = ship_w * float(rng.uniform(0.7, 1.0))
                x2, y2 = pier.point(along / pier.length, side * (gap + ship_w / 2 + w2 / 2 + 0.4))
                len2 = ship_len * float(rng.uniform(0.7, 1.0))
                raft = p.make(SHIP, x2, y2, angle, len2, w2, 0.12 * w2 + 1, style=int(rng.integers(2)))
                p.add(raft, {WATER}, ignore=frozenset({SHIP}))
    for _ in range(p.count(1, 3)):
        kind = rng.choice(3, p=(0.2, 0.6, 0.2))
        length = float(rng.uniform(*((14, 40), (80, 200), (240, 290))[kind]))
        width = length / float(rng.uniform(2.8, 3.8) if kind == 0 else rng.uniform(4.3, 5.5))
        style = 2 if kind == 0 else int(rng.integers(2))
        p.scatter(
            lambda x, y, length=length, width=width, style=style: p.make(
                SHIP, x, y, rng.uniform(0, 2 * np.pi), length, width, 0.12 * width + 1, style
            ),
            {WATER},
            tries=40 if kind == 2 else 25,
            margin=0.25 * length if kind == 2 else 0.0,
        )
    for _ in range(p.chance(0.75)):
        p.scatter(
            lambda x, y: p.warehouse(x, y, rng.uniform(0, np.pi)), {LAND}, tries=60, margin=40, overlap=0.75
        )
    for _ in range(p.count(0, 2)):
        radius = p.tank_radius((0.15, 0.35, 0.5))
        p.scatter(lambda x, y, r=radius: p.tank(x, y, r), {LAND}, tries=40, margin=0.6 * radius, overlap=0.8)
    for _ in range(p.count(0, 1)):
        p.scatter(lambda x, y: p.house(x, y, rng.uniform(0, np.pi), large=True), {LAND})
    for _ in range(p.chance(0.25)):
        p.car_park(p.count(1, 3))
    p.trees(0, 8)


def _plan_airport(p: Placer) -> None:
    rng, region = p.rng, p.region
    angle = float(rng.uniform(0, np.pi))
    cx, cy = region.centre
    cx += float(rng.uniform(-0.15, 0.15)) * region.size
    cy += float(rng.uniform(-0.15, 0.15)) * region.size
    p.world.add_feature(
        Lot(
            cx,
            cy,
            angle,
            float(rng.uniform(0.9, 1.3)) * region.size,
            float(rng.uniform(0.6, 0.9)) * region.size,
            apron=True,
        )
    )
    planes = []
    for _ in range(p.count(2, 4)):
        kind = rng.choice(3, p=(0.2, 0.35, 0.45))
        length = float(rng.uniform(*((30, 60), (70, 180), (205, 245))[kind]))
        heading = angle + float(rng.integers(4)) * np.pi / 2 + float(rng.uniform(-0.3, 0.3))
        plane = p.scatter(
            lambda x, y, heading=heading, length=length: p.make(
                AIRPLANE, x, y, heading, length, length * rng.uniform(0.9, 1.05), 0.07 * length
            ),
            {PAVED, LAND},
            tries=40,
            overlap=0.7,
            margin=0.3 * length,
        )
        if plane is not None:
            planes.append(plane)
    for _ in range(p.count(0, 1)):
        # service vehicles next to (and sometimes under the wings of) the airplanes
        if planes:
            plane = planes[int(rng.integers(len(planes)))]
            reach = 0.5 * plane.length
            x, y = plane.cx + rng.uniform(-reach, reach), plane.cy + rng.uniform(-reach, reach)
        else:
            x, y = p.point()
        car = p.make(VEHICLE, x, y, rng.uniform(0, 2 * np.pi), rng.uniform(8, 12), rng.uniform(4, 6), 1.5)
        p.add(car, {PAVED}, ignore=frozenset({AIRPLANE}), overlap=0.8)
    for _ in range(p.chance(0.6)):
        p.scatter(lambda x, y: p.warehouse(x, y, angle), {LAND, PAVED}, tries=40, margin=40, overlap=0.75)
    p.trees(0, 6)


def _plan_residential(p: Placer) -> None:
    rng, region = p.rng, p.region
    angle = float(rng.uniform(0, np.pi))
    cx, cy = region.centre
    roads = [
        p.road(
            angle,
            (cx + rng.uniform(-0.25, 0.25) * region.size, cy + rng.uniform(-0.25, 0.25) * region.size),
            float(rng.uniform(5, 7)),
        )
    ]
    if rng.random() < 0.5:
        roads.append(
            p.road(
                angle + np.pi / 2, (cx + rng.uniform(-0.3, 0.3) * region.size, cy), float(rng.uniform(4, 6))
            )
        )
    for _ in range(p.chance(0.85)):  # a school or apartment block
        p.scatter(lambda x, y: p.warehouse(x, y, angle), {LAND}, tries=60, margin=40, overlap=0.75)
    houses: list[tuple[Obj, Strip, int]] = []
    for road in roads:
        for side in (-1, 1):
            t = float(rng.uniform(0, 20))
            while t < road.length:
                house = p.house(0, 0, road.angle, large=rng.random() < 0.5)
                setback = road.half_width + float(rng.uniform(3, 9)) + house.width / 2
                house.cx, house.cy = road.point((t + house.length / 2) / road.length, side * setback)
                if rng.random() < 0.35 and p.add(house, {LAND}, overlap=0.7):
                    houses.append((house, road, side))
                t += house.length + float(rng.uniform(6, 16))
    for house, road, side in houses:
        if rng.random() < 0.5:
            length, width = float(rng.uniform(8, 20)), float(rng.uniform(5, 12))
            back = side * (house.width / 2 + float(rng.uniform(1.5, 4)) + width / 2)
            c, s = math.cos(road.angle), math.sin(road.angle)
            pool = p.make(
                POOL,
                house.cx - s * back,
                house.cy + c * back,
                road.angle,
                length,
                width,
                0,
                style=int(rng.integers(2)),
            )
            p.add(pool, {LAND}, overlap=0.7)
    for road in roads:
        p.cars_on_road(road, p.count(0, 1))
    p.trees(8, 22)


def _plan_industrial(p: Placer) -> None:
    rng, region = p.rng, p.region
    angle = float(rng.uniform(0, np.pi))
    road = None
    if rng.random() < 0.7:  # along one side, leaving room for the halls
        cx, cy = region.centre
        side = 0.4 * region.size * (1 if rng.random() < 0.5 else -1)
        road = p.road(
            angle, (cx - math.sin(angle) * side, cy + math.cos(angle) * side), float(rng.uniform(5, 8))
        )
    for _ in range(p.count(1, 2)):
        p.scatter(lambda x, y: p.warehouse(x, y, angle), {LAND}, tries=60, margin=40, overlap=0.75)
    for _ in range(max(1, p.count(1, 1))):
        # A tank farm: a grid of tanks of one size range, some touching.
        radius = p.tank_radius((0.15, 0.4, 0.45))
        gap = 0.0 if rng.random() < 0.25 else float(rng.uniform(2, 8))
        pitch = 2 * radius + gap
        cols, rows = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        c, s = math.cos(angle), math.sin(angle)
        offsets = [
            ((j - (cols - 1) / 2) * pitch, (i - (rows - 1) / 2) * pitch)
            for i in range(rows)
            for j in range(cols)
        ]
        best: list[Obj] = []
        for _ in range(12):  # the farm goes where most of its tanks fit
            ox, oy = p.point(0.8 * radius)
            tanks = [
                p.tank(ox + u * c - v * s, oy + u * s + v * c, radius * float(rng.uniform(0.96, 1.0)))
                for u, v in offsets
            ]
            fitting = [t for t in tanks if p.fits(t, {LAND}, overlap=0.75)]
            if len(fitting) > len(best):
                best = fitting
        for tank in best:
            if rng.random() < 0.85:
                p.add(tank, {LAND}, overlap=0.75)
    if road is not None:
        p.cars_on_road(road, p.count(0, 1))
    for _ in range(p.chance(0.4)):
        p.car_park(p.count(1, 3), angle)
    p.trees(0, 6)


def _plan_sports(p: Placer) -> None:
    rng = p.rng
    angle = float(rng.uniform(0, np.pi))
    for _ in range(p.chance(0.9)):
        length = float(rng.uniform(170, 250))
        p.scatter(
            lambda x, y, length=length: p.make(
                TRACK, x, y, angle, length, length * rng.uniform(0.52, 0.6), 0
            ),
            {LAND},
            margin=70,
        )
    courts = p.count(1, 3)
    length = float(rng.uniform(44, 64))
    width = length * 0.5
    for _ in range(15):
        ox, oy = p.point(length / 2)
        gap = 0.0 if rng.random() < 0.5 else float(rng.uniform(2, 5))
        c, s = math.cos(angle), math.sin(angle)
        row = [
            p.make(COURT, ox - s * k * (width + gap), oy + c * k * (width + gap), angle, length, width, 0)
            for k in range(courts)
        ]
        if all(p.fits(court, {LAND}) for court in row):
            for court in row:  # side by side, sharing their long edges when the gap is 0
                p.world.objects.append(court)
                p.occupied.append((court.cx, court.cy, court.radius, COURT))
            break
    for _ in range(p.chance(0.5)):
        p.car_park(p.count(1, 3))
    for _ in range(p.chance(0.4)):  # a public pool
        length = float(rng.uniform(30, 60))
        p.scatter(
            lambda x, y, length=length: p.make(POOL, x, y, angle, length, length * rng.uniform(0.35, 0.5), 0),
            {LAND},
        )
    for _ in range(p.chance(0.4)):  # a sports hall
        p.scatter(lambda x, y: p.warehouse(x, y, angle), {LAND}, tries=40, margin=40, overlap=0.75)
    for _ in range(p.chance(0.3)):  # a club house
        p.scatter(lambda x, y: p.house(x, y, angle, large=True), {LAND})
    p.trees(4, 14)


def _plan_rural(p: Placer) -> None:
    rng = p.rng
    if rng.random() < 0.5:
        angle = float(rng.uniform(0, np.pi))
        road = p.road(angle, p.point(), float(rng.uniform(4, 6)))
        p.cars_on_road(road, p.count(0, 1))
    for _ in range(p.count(0, 3)):
        p.scatter(lambda x, y: p.house(x, y, rng.uniform(0, np.pi)), {LAND})
    p.trees(5, 30)


PLANNERS = {
    "harbour": _plan_harbour,
    "airport": _plan_airport,
    "residential": _plan_residential,
    "industrial": _plan_industrial,
    "sports": _plan_sports,
    "rural": _plan_rural,
}


def _new_world(rng: np.random.Generator, district_size: int, types: np.ndarray) -> World:
    """An empty world with its own land-cover salt, sun direction and sensor tint."""
    sun = float(rng.uniform(0, 2 * np.pi))
    brightness = float(rng.uniform(0.9, 1.08))
    tint = tuple(brightness * float(t) for t in rng.uniform(0.97, 1.03, size=3))
    return World(
        int(rng.integers(1 << 40)), district_size, types,
        (math.cos(sun), math.sin(sun)), float(rng.uniform(0.4, 0.9)), tint,
    )  # fmt: skip


def plan_chip(
    rng: np.random.Generator, size: int, held_out: bool, scene: str | None = None
) -> tuple[World, str]:
    """A size × size world of one scene type (drawn from CHIP_SCENE_WEIGHTS unless given)."""
    if scene is None:
        names = list(CHIP_SCENE_WEIGHTS)
        weights = np.array([CHIP_SCENE_WEIGHTS[n] for n in names])
        scene = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    world = _new_world(rng, size, np.array([[SCENE_TYPES.index(scene)]]))
    placer = Placer(world, rng, Region(0, 0, size, size), held_out, density=(size / 256) ** 2)
    PLANNERS[scene](placer)
    world.finish()
    return world, scene


# ---------------------------------------------------------------------------------------------
# Chips and their records


@dataclass
class Chip:
    image_id: str
    split: str
    scene: str
    world: World
    image: np.ndarray  # [size, size, 3] uint8
    instance_map: np.ndarray  # [size, size] int32: uid of the visible instance, 0 none
    ground: np.ndarray
    instances: list[Obj]  # visible instances, uid order

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def png(self) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.image).save(
            buffer, format="PNG", compress_level=1
        )  # 2x faster than 6, 10 % larger
        return buffer.getvalue()


def image_id(split: str, seed: int, index: int) -> str:
    return f"synth-{split}-{seed}-{index:06d}"


def make_chip(split: str, seed: int, index: int, chip_size: int) -> Chip:
    """Chip ``index`` of ``split`` (for test, ``seed`` is already the test seed)."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index])
    world, scene = plan_chip(rng, chip_size, held_out=split == "test")
    noise_rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index, 1])
    # Instances hidden (by later instances or trees) or cut (by the chip border) down to a sliver
    # are not painted at all: every painted object gets a usable mask.
    ids, full = _paint_ids(world, chip_size)
    visible = np.bincount(ids.ravel(), minlength=len(full))
    world.objects = [
        o for o in world.objects if visible[o.uid] >= max(MIN_VISIBLE_PX, MIN_VISIBLE_FRACTION * full[o.uid])
    ]
    world.finish()
    rendered = render_window(world, 0, 0, chip_size, chip_size, noise_rng)
    present = set(np.unique(rendered.ids).tolist())
    instances = [o for o in world.objects if o.uid in present]
    return Chip(
        image_id(split, seed, index),
        split,
        scene,
        world,
        rendered.rgb,
        rendered.ids,
        rendered.ground,
        instances,
    )


@dataclass(frozen=True)
class InstanceData:
    obj: Obj
    mask: np.ndarray  # [size, size] bool
    facts: phrases.InstanceFacts


def chip_instances(chip: Chip) -> list[InstanceData]:
    """Masks and facts of the chip's visible instances, from the painted pixels."""
    slices = ndimage.find_objects(chip.instance_map)
    uid_class = {o.uid: CLASSES[o.class_id].name for o in chip.instances}
    # distance (px, chessboard) from every pixel to the nearest water or road pixel
    distance_maps = {
        name: ndimage.distance_transform_cdt(chip.ground != label, metric="chessboard")
        for name, label in (("water", WATER), ("road", ROAD))
        if (chip.ground == label).sum() >= 200
    }
    data = []
    for obj in chip.instances:
        sy, sx = slices[obj.uid - 1]
        sub = chip.instance_map[sy, sx] == obj.uid
        rows, cols = np.nonzero(sub)
        # contact: what the instance's outline, grown by a few pixels, reaches
        reach = NEIGHBOUR_PX
        gy = slice(max(0, sy.start - reach), sy.stop + reach)
        gx = slice(max(0, sx.start - reach), sx.stop + reach)
        around = chip.instance_map[gy, gx]
        grown = ndimage.binary_dilation(around == obj.uid, iterations=reach) & (around != obj.uid)
        touching = {uid_class[uid] for uid in np.unique(around[grown]) if uid}
        at_pier = obj.class_id == SHIP and bool((chip.ground[gy, gx][grown] == PIER).any())
        road = float((chip.ground[sy, sx][sub] == ROAD).mean())
        mask = chip.instance_map == obj.uid
        facts = phrases.InstanceFacts(
            class_name=CLASSES[obj.class_id].name,
            colour=obj.variant.colour,
            area=int(sub.sum()),
            centroid=(float(cols.mean() + sx.start + 0.5), float(rows.mean() + sy.start + 0.5)),
            box=(float(sx.start), float(sy.start), float(sx.stop), float(sy.stop)),
            at_pier=at_pier,
            road_fraction=road,
            touching=tuple(sorted(touching - {CLASSES[obj.class_id].name})),
            distance_to=tuple((name, float(d[sy, sx][sub].min())) for name, d in distance_maps.items()),
        )
        data.append(InstanceData(obj, mask, facts))
    return data


def _image_facts(chip: Chip, instances: list[InstanceData]) -> phrases.ImageFacts:
    water = chip.ground == WATER
    total = int(water.sum())
    side = None
    if total:
        half = chip.size // 2
        shares = {
            "left": water[:, :half].sum() / total,
            "right": water[:, half:].sum() / total,
            "top": water[:half].sum() / total,
            "bottom": water[half:].sum() / total,
        }
        best = max(shares, key=shares.get)
        side = best if shares[best] >= 0.75 else None
    return phrases.ImageFacts(
        size=chip.size,
        scene=chip.scene,
        instances=tuple(inst.facts for inst in instances),
        water_fraction=float(water.mean()),
        water_side=side,
        road_fraction=float((chip.ground == ROAD).mean()),
        has_pier=bool((chip.ground == PIER).sum() >= 30),
    )


def chip_records(chip: Chip, seg_vocab: SegVocabulary) -> list[dict[str, Any]]:
    """The instruction records of one chip (see phrases.image_exchanges for the task mix)."""
    instances = chip_instances(chip)
    facts = _image_facts(chip, instances)
    rng = np.random.default_rng([int(chip.world.salt), 3])
    exchanges = phrases.image_exchanges(
        facts, rng, held_out=chip.split == "test", class_names=[c.name for c in CLASSES], seg_vocab=seg_vocab
    )
    png = chip.png()
    rles: dict[int, dict[str, Any]] = {}
    records = []
    for k, ex in enumerate(exchanges):
        targets = []
        for index, description in zip(ex.targets, ex.descriptions, strict=True):
            inst = instances[index]
            if index not in rles:
                rles[index] = schema.encode_mask(inst.mask)
            targets.append(
                {
                    "instance_id": inst.obj.uid,
                    "class_id": inst.obj.class_id,
                    "class_name": CLASSES[inst.obj.class_id].name,
                    "box": list(inst.facts.box),
                    "mask": rles[index],
                    "description": description,
                }
            )
        records.append(
            {
                "record_id": f"{chip.image_id}-{ex.task}-{k}",
                "image_id": chip.image_id,
                "image": png,
                "image_uri": None,
                "width": chip.size,
                "height": chip.size,
                "source": "synthetic",
                "split": chip.split,
                "task": ex.task,
                "phrase_type": ex.phrase_type,
                "template_id": ex.template_id,
                "conversation": [
                    {
                        "role": "user",
                        "text": f"{schema.IMAGE_TOKEN}\n{schema.TASK_TAGS[ex.task]} {ex.prompt}",
                    },
                    {"role": "assistant", "text": ex.answer},
                ],
                "targets": targets,
            }
        )
    return records


@dataclass
class ChipStats:
    images: Counter = field(default_factory=Counter)  # per split
    records: Counter = field(default_factory=Counter)  # per split
    tasks: Counter = field(default_factory=Counter)
    phrase_types: Counter = field(default_factory=Counter)
    classes: Counter = field(default_factory=Counter)  # visible instances per class
    buckets: Counter = field(default_factory=Counter)  # visible instances per size bucket
    scenes: Counter = field(default_factory=Counter)

    def add(self, chip: Chip, records: list[dict[str, Any]]) -> None:
        self.images[chip.split] += 1
        self.records[chip.split] += len(records)
        self.scenes[chip.scene] += 1
        areas = np.bincount(chip.instance_map.ravel())
        for obj in chip.instances:
            self.classes[CLASSES[obj.class_id].name] += 1
            self.buckets[size_bucket(int(areas[obj.uid]))] += 1
        for record in records:
            self.tasks[record["task"]] += 1
            if record["phrase_type"]:
                self.phrase_types[record["phrase_type"]] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": dict(self.images),
            "records": dict(self.records),
            "records_per_task": dict(self.tasks),
            "records_per_phrase_type": dict(self.phrase_types),
            "instances_per_class": {c.name: self.classes[c.name] for c in CLASSES},
            "instances_per_bucket": {b: self.buckets[b] for b in ("small", "medium", "large")},
            "images_per_scene": dict(self.scenes),
        }


def iter_chips(
    *, seed: int, chip_size: int, train_images: int, val_images: int, test_images: int, test_seed_offset: int
) -> Iterator[Chip]:
    """Every chip of a dataset in order: train, val, then test (from its own seed range)."""
    for split, count, split_seed in (
        ("train", train_images, seed),
        ("val", val_images, seed),
        ("test", test_images, seed + test_seed_offset),
    ):
        for index in range(count):
            yield make_chip(split, split_seed, index, chip_size)


def generate_chips(
    out_uri: str,
    *,
    seed: int,
    chip_size: int,
    train_images: int,
    val_images: int,
    test_images: int,
    test_seed_offset: int,
    seg_vocab: SegVocabulary,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic record source (SourceWriter layout) to ``out_uri``, its answers written
    with ``seg_vocab``'s runs; return its statistics."""
    stats = ChipStats()
    total = train_images + val_images + test_images
    started = time.perf_counter()
    chips = iter_chips(
        seed=seed, chip_size=chip_size, train_images=train_images, val_images=val_images,
        test_images=test_images, test_seed_offset=test_seed_offset,
    )  # fmt: skip
    with SourceWriter(out_uri, SYNTH_CLASSES) as writer:
        for chip in tqdm(chips, total=total, disable=not progress, desc="synthetic chips", unit="chip"):
            records = chip_records(chip, seg_vocab)
            for record in records:
                writer.write(record)
            stats.add(chip, records)
    seconds = time.perf_counter() - started
    result = stats.as_dict()
    result.update(seconds=round(seconds, 2), chips_per_s=round(total / seconds, 1) if seconds else None)
    return result


# ---------------------------------------------------------------------------------------------
# Large georeferenced scenes

SCENE_DISTRICT = 512  # px: each district is planned like a chip of one scene type
SCENE_TILE = 1024  # px rendered at once
SCENE_BLOCK = 512  # GeoTIFF block size
DEFAULT_CRS = "EPSG:32618"  # WGS 84 / UTM zone 18N
DEFAULT_ORIGIN = (583_000.0, 4_511_000.0)  # upper-left corner (m), near New York
DEFAULT_GSD = 0.5  # m per pixel


def plan_scene(seed: int, size: int) -> World:
    """A size × size world: global lakes and highways, then districts of mixed scene types."""
    rng = np.random.default_rng([seed, SCENE_STREAM])
    n_districts = math.ceil(size / SCENE_DISTRICT)
    types = np.zeros((n_districts, n_districts), np.intp)
    world = _new_world(rng, SCENE_DISTRICT, types)
    area = (size / 2048) ** 2
    for _ in range(int(rng.poisson(1.2 * area)) + (1 if size >= 1024 else 0)):
        radius = float(rng.uniform(150, 480))
        tone = ((28, 54, 68), (34, 62, 72), (40, 64, 58))[int(rng.integers(3))]
        cx, cy = rng.uniform(0, size, size=2)
        world.add_feature(
            WaterBody(float(cx), float(cy), radius, 0.45 * radius, int(rng.integers(1 << 40)), tone)
        )
    whole = Placer(world, rng, Region(0, 0, size, size), held_out=False, density=1.0)
    for _ in range(max(1, size // 2048)):
        whole.road(float(rng.uniform(0, np.pi)), whole.point(), float(rng.uniform(6, 9)))
    inland = ["airport", "residential", "industrial", "sports", "rural"]
    inland_p = np.array([0.08, 0.3, 0.2, 0.14, 0.28])
    for dy in range(n_districts):
        for dx in range(n_districts):
            drng = np.random.default_rng([seed, SCENE_STREAM, dy, dx])
            region = Region(
                dx * SCENE_DISTRICT,
                dy * SCENE_DISTRICT,
                min(size, (dx + 1) * SCENE_DISTRICT),
                min(size, (dy + 1) * SCENE_DISTRICT),
            )
            wet = _water_fraction(world, region)
            if wet > 0.85:
                scene = "harbour" if drng.random() < 0.3 else "rural"
            elif wet > 0.1:
                scene = "harbour" if drng.random() < 0.8 else "rural"
            else:
                scene = inland[int(drng.choice(len(inland), p=inland_p))]
            types[dy, dx] = SCENE_TYPES.index(scene)
            placer = Placer(world, drng, region, held_out=False, density=(region.size / 256) ** 2)
            PLANNERS[scene](placer)
    world.finish()
    return world


@dataclass(frozen=True)
class Footprint:
    """The imaged area: a convex quadrilateral inside the raster; outside it is nodata."""

    corners: tuple[tuple[float, float], ...]  # clockwise in pixel coordinates (y down)

    @classmethod
    def random(cls, rng: np.random.Generator, size: int) -> Footprint:
        inset = rng.uniform(0.01, 0.05, size=4) * size
        return cls(((inset[0], 0.0), (size, inset[1]), (size - inset[2], size), (0.0, size - inset[3])))

    def inside(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        result = np.ones(np.broadcast_shapes(xs.shape, ys.shape), bool)
        for (ax, ay), (bx, by) in zip(self.corners, self.corners[1:] + self.corners[:1], strict=True):
            result &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
        return result


def _cog_translate(src: Path, dst: Path, *, nodata: int | None, resampling: str) -> None:
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    profile = cog_profiles.get("deflate")
    profile.update(blockxsize=SCENE_BLOCK, blockysize=SCENE_BLOCK, predictor=2)
    cog_translate(
        str(src), str(dst), profile, nodata=nodata, overview_resampling=resampling,
        in_memory=False, quiet=True, config={"GDAL_CACHEMAX": 256, "GDAL_NUM_THREADS": "ALL_CPUS"},
    )  # fmt: skip


SCENE_FILES = {
    "image": "image.tif",
    "instances": "instances.tif",
    "classes": "classes.tif",
    "meta": "scene.json",
}


def generate_scene(
    out_uri: str,
    scene_id: str,
    size: int,
    seed: int,
    *,
    crs: str = DEFAULT_CRS,
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    gsd: float = DEFAULT_GSD,
    tile_size: int = SCENE_TILE,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``<out_uri>/<scene_id>/{image,instances,classes}.tif`` (COGs) and ``scene.json``.

    The image is 3-band uint8 with nodata 0 outside the imaged footprint; ``instances.tif``
    (uint32 instance ids, 0 background) and ``classes.tif`` (uint8 class ids, 255 background)
    share its grid. Tiles of ``tile_size`` are rendered one at a time, so memory stays bounded
    whatever the scene size. Returns what ``scene.json`` holds.
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    started = time.perf_counter()
    world = plan_scene(seed, size)
    index = SpatialIndex.build(world)
    footprint = Footprint.random(np.random.default_rng([seed, SCENE_STREAM, 1]), size)
    transform = from_origin(origin[0], origin[1], gsd, gsd)
    class_of = np.full(len(world.objects) + 1, 255, np.uint8)
    class_of[1:] = [o.class_id for o in world.objects]
    seen = np.zeros(len(world.objects) + 1, bool)
    base = {
        "driver": "GTiff", "width": size, "height": size, "crs": crs, "transform": transform, "tiled": True,
        "blockxsize": SCENE_BLOCK, "blockysize": SCENE_BLOCK, "compress": "deflate", "zlevel": 1, "BIGTIFF": "IF_SAFER",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="geopix-scene-") as tmp:
        raw = {name: Path(tmp, f"raw-{SCENE_FILES[name]}") for name in ("image", "instances", "classes")}
        with (
            rasterio.open(
                raw["image"], "w", **base, count=3, dtype="uint8", nodata=0, photometric="RGB"
            ) as image_ds,
            rasterio.open(raw["instances"], "w", **base, count=1, dtype="uint32") as inst_ds,
            rasterio.open(raw["classes"], "w", **base, count=1, dtype="uint8") as class_ds,
        ):
            tiles = [(ty, tx) for ty in range(0, size, tile_size) for tx in range(0, size, tile_size)]
            for ty, tx in tqdm(tiles, disable=not progress, desc=f"scene {scene_id}", unit="tile"):
                h, w = min(tile_size, size - ty), min(tile_size, size - tx)
                rendered = render_window(
                    world, tx, ty, w, h, np.random.default_rng([seed, SCENE_STREAM, 2, ty, tx]), index
                )
                xs = (np.arange(tx, tx + w) + 0.5)[None, :]
                ys = (np.arange(ty, ty + h) + 0.5)[:, None]
                outside = ~footprint.inside(xs, ys)
                rendered.rgb[outside] = 0
                rendered.ids[outside] = 0
                seen[np.unique(rendered.ids)] = True
                window = Window(tx, ty, w, h)
                image_ds.write(np.moveaxis(rendered.rgb, -1, 0), window=window)
                inst_ds.write(rendered.ids.astype(np.uint32)[None], window=window)
                class_ds.write(class_of[rendered.ids][None], window=window)
        for name, resampling in (("image", "average"), ("instances", "nearest"), ("classes", "nearest")):
            cog = Path(tmp, SCENE_FILES[name])
            _cog_translate(raw[name], cog, nodata=0 if name == "image" else None, resampling=resampling)
            raw[name].unlink()
            storage.upload_file(cog, storage.join_uri(out_uri, scene_id, SCENE_FILES[name]))
    seen[0] = False
    visible_classes = Counter(CLASSES[o.class_id].name for o in world.objects if seen[o.uid])
    meta = {
        "scene_id": scene_id,
        "width": size,
        "height": size,
        "crs": crs,
        "transform": list(transform)[:6],
        "gsd_m": gsd,
        "seed": seed,
        "nodata": 0,
        "footprint_px": [[round(float(v), 2) for v in c] for c in footprint.corners],
        "classes": json.loads(SYNTH_CLASSES.to_json()),
        "class_background": 255,
        "instance_count": int(seen.sum()),
        "instances_per_class": {c.name: visible_classes[c.name] for c in CLASSES},
        "files": {k: v for k, v in SCENE_FILES.items() if k != "meta"},
    }
    storage.write_bytes(
        storage.join_uri(out_uri, scene_id, SCENE_FILES["meta"]), json.dumps(meta, indent=1).encode()
    )
    return meta | {"seconds": round(time.perf_counter() - started, 1)}
