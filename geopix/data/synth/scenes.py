"""Large georeferenced scenes (COG + ground truth)."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from geopix import storage
from geopix.data.synth.classes import CLASSES, SCENE_STREAM, SCENE_TYPES, SYNTH_CLASSES
from geopix.data.synth.drawing import SpatialIndex, render_window
from geopix.data.synth.planning import PLANNERS, Placer, Region, new_world, water_fraction
from geopix.data.synth.world import WaterBody, World

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
    world = new_world(rng, SCENE_DISTRICT, types)
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
            wet = water_fraction(world, region)
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
