"""Drawing: any window of a world painted from its stored parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from geopix.data.synth.classes import AIRPLANE, BUILDING, COURT, POOL, SHIP, TANK, TRACK, VEHICLE
from geopix.data.synth.noise import hash01, noise_grid
from geopix.data.synth.world import Canvas, Obj, Tree, World


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
    texture = 0.85 + 0.3 * noise_grid(xs[0], ys[:, 0], 1.6, int(tree.phase * 1000))
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
    seed_x = (gx[None, :] + 0.1 + 0.8 * hash01(gx[None, :], gy[:, None], salt, 1)) * LAND_CELL
    seed_y = (gy[:, None] + 0.1 + 0.8 * hash01(gx[None, :], gy[:, None], salt, 2)) * LAND_CELL
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
    pick = hash01(cell_gx, cell_gy, salt, 3)
    cover = (pick[:, None] > COVER_CUMULATIVE[district]).sum(axis=1)
    shade = _PALETTE_START[cover] + (hash01(cell_gx, cell_gy, salt, 4) * _PALETTE_SIZE[cover]).astype(
        np.intp
    )
    brightness = 0.92 + 0.16 * hash01(cell_gx, cell_gy, salt, 5)[:, None]
    hue = 0.98 + 0.04 * hash01(cell_gx[:, None], cell_gy[:, None], salt, np.arange(6, 9))
    colour = _PALETTE[shade] * brightness * hue
    angle = np.pi * hash01(cell_gx, cell_gy, salt, 9)
    wavenumber = 2 * np.pi / (3.5 + 5 * hash01(cell_gx, cell_gy, salt, 10))
    kx, ky = (np.cos(angle) * wavenumber).astype(np.float32), (np.sin(angle) * wavenumber).astype(np.float32)

    fine = noise_grid(xs, ys, 2.2, salt + 10).astype(np.float32) - 0.5
    medium = noise_grid(xs, ys, 22.0, salt + 11).astype(np.float32) - 0.5
    broad = noise_grid(xs, ys, 110.0, salt + 12).astype(np.float32) - 0.5
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


def paint_ids(world: World, size: int) -> tuple[np.ndarray, np.ndarray]:
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
