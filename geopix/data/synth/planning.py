"""Planning: where things go (land cover, features, objects) for chips and scenes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from geopix.data.synth.classes import (
    AIRPLANE,
    BUILDING,
    CHIP_SCENE_WEIGHTS,
    CLASSES,
    COURT,
    HALL_ROOFS,
    HELD_OUT_VARIANT_P,
    LAND,
    PAVED,
    PIER,
    POOL,
    ROAD,
    SCENE_TYPES,
    SHIP,
    TANK,
    TRACK,
    VEHICLE,
    WATER,
    Variant,
)
from geopix.data.synth.world import Lot, Obj, Strip, Tree, WaterBody, World


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


def water_fraction(world: World, region: Region, n: int = 12) -> float:
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
    if water_fraction(world, region) < 0.15:
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


def new_world(rng: np.random.Generator, district_size: int, types: np.ndarray) -> World:
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
    world = new_world(rng, size, np.array([[SCENE_TYPES.index(scene)]]))
    placer = Placer(world, rng, Region(0, 0, size, size), held_out, density=(size / 256) ** 2)
    PLANNERS[scene](placer)
    world.finish()
    return world, scene
