"""One id per object over the whole scene: window instances matched across the seams.

Every seg run of a window is an instance: the pixels where its mask wins (as in the class raster),
its class and the instruction it answered. Neighbouring windows overlap by ``segment.overlap``
pixels, so an object cut by the seam between two windows is seen by both inside their overlap. Two
instances of overlapping windows are **the same object when they have the same class and their
pixels inside the two windows' overlap have IoU > 0.5** (``segment.instance_match_iou``; strictly
more than half, so an instance matches at most one of the other window's, whose instances are
disjoint).
Matches are joined by union-find: an object over several windows gets one id through any chain of
matches. With ``overlap`` 0 there is nothing to compare, and no instance is joined.

The driver writes each window's keep rectangle with *provisional* ids (one per seg run) into a
tiled GeoTIFF as the window arrives, and keeps the window's own ids (zlib-compressed) only until
all its neighbours have arrived, so memory does not grow with the scene. When the last window is
in, one block pass maps the provisional ids to the final ones (1…N in order of first appearance;
0 = no instance) into ``instances.tif`` (uint32) and traces each instance's polygon for
``instances.parquet``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geopix.infer.scene_reader import SceneInfo, Window
from geopix.infer.stitch import open_scene_raster, raster_blocks

NO_INSTANCE = 0
_PAIR = 1 << 16  # local ids are uint16: (a, b) pairs are coded as a · 2¹⁶ + b


@dataclass
class InstanceStats:
    instances: int = 0  # with at least one pixel in the output
    seg_runs: int = 0  # window instances (provisional ids) before joining
    seam_matches: int = 0  # pairs of window instances joined as one object
    across_windows: int = 0  # output instances joined from more than one window


@dataclass
class _Provisional:
    """What is known of each provisional id (index = id; 0 is no instance)."""

    parent: list[int] = field(default_factory=lambda: [0])
    window: list[int] = field(default_factory=lambda: [-1])
    class_id: list[int] = field(default_factory=lambda: [-1])
    instruction: list[int] = field(default_factory=lambda: [-1])
    pixels: list[int] = field(default_factory=lambda: [0])  # written (keep rectangle) pixels
    confidence: list[float] = field(default_factory=lambda: [0.0])  # their confidence sum (%)

    def add(self, window: int, instances: list[tuple[int, int]]) -> int:
        """New ids for a window's instances; returns the first."""
        first = len(self.parent)
        self.parent += range(first, first + len(instances))
        self.window += [window] * len(instances)
        self.class_id += [int(c) for c, _ in instances]
        self.instruction += [int(i) for _, i in instances]
        self.pixels += [0] * len(instances)
        self.confidence += [0.0] * len(instances)
        return first

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)  # the first-seen id is the root
        return True


def grid_neighbours(windows: list[Window]) -> dict[int, list[int]]:
    """Each window's neighbours on the window grid (the 8 around it): the windows it overlaps."""
    cols = {c: i for i, c in enumerate(sorted({w.read[0] for w in windows}))}
    rows = {r: i for i, r in enumerate(sorted({w.read[1] for w in windows}))}
    at = {(rows[w.read[1]], cols[w.read[0]]): w.index for w in windows}
    neighbours = {}
    for (r, c), index in at.items():
        around = ((r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc)
        neighbours[index] = [at[p] for p in around if p in at]
    return neighbours


class InstanceStitcher:
    """Instances of a scene's windows, joined across seams as the windows arrive (in any order)."""

    def __init__(self, scene: SceneInfo, windows: list[Window], path: str | Path, match_iou: float):
        self.scene, self.path, self.match_iou = scene, Path(path), match_iou
        self.windows = {w.index: w for w in windows}
        self.neighbours = grid_neighbours(windows)
        self.ids = _Provisional()
        self.pending: dict[int, tuple[bytes, tuple[int, int], int] | None] = {}  # arrived, neighbours not all
        self.arrived: set[int] = set()
        self.seam_matches = 0
        self.dataset = open_scene_raster(scene, self.path, 1, "uint32", NO_INSTANCE)

    def add(
        self,
        window: Window,
        instance_ids: np.ndarray,
        instances: list[tuple[int, int]],
        confidence: np.ndarray,
    ) -> None:
        """A window's instances: ``instance_ids`` [S, S] (1 + index into ``instances``, 0 none),
        ``instances`` (class id, instruction index) per seg run, ``confidence`` [S, S] in %."""
        from rasterio.windows import Window as RioWindow

        first = self.ids.add(window.index, instances)
        if instances:
            for other in self.neighbours[window.index]:
                if self.pending.get(other) is not None:
                    self._match(window, instance_ids, first, other)
        rows, cols = window.keep_in_window()
        kept = instance_ids[rows, cols].astype(np.int64)
        provisional = np.where(kept > 0, kept + first - 1, NO_INSTANCE).astype(np.uint32)
        col, row, width, height = window.keep
        self.dataset.write(provisional[None], window=RioWindow(col, row, width, height))
        end = first + len(instances)
        self.ids.pixels[first:end] = np.bincount(kept.ravel(), minlength=len(instances) + 1)[1:].tolist()
        sums = np.bincount(kept.ravel(), weights=confidence[rows, cols].ravel(), minlength=len(instances) + 1)
        self.ids.confidence[first:end] = sums[1:].tolist()
        packed = (
            zlib.compress(np.ascontiguousarray(instance_ids, np.uint16).tobytes(), 1),
            instance_ids.shape,
            first,
        )
        self._arrive(window.index, packed if instances else None)

    def add_empty(self, window: Window) -> None:
        """A window that was not answered (no valid pixel): nothing to write or match."""
        self._arrive(window.index, None)

    def _arrive(self, index: int, packed: tuple[bytes, tuple[int, int], int] | None) -> None:
        self.arrived.add(index)
        self.pending[index] = packed
        for w in (index, *self.neighbours[index]):  # drop what no later window can still need
            if w in self.pending and all(n in self.arrived for n in self.neighbours[w]):
                del self.pending[w]

    def _match(self, window: Window, ids: np.ndarray, first: int, other_index: int) -> None:
        """Join the instances of ``window`` and of the arrived window ``other_index`` that are one object."""
        blob, shape, other_first = self.pending[other_index]
        other = self.windows[other_index]
        (ax, ay, _, _), (bx, by, _, _) = window.read, other.read
        x0, y0 = max(ax, bx), max(ay, by)
        x1 = min(ax + ids.shape[1], bx + shape[1], self.scene.width)
        y1 = min(ay + ids.shape[0], by + shape[0], self.scene.height)
        if x1 <= x0 or y1 <= y0:
            return
        other_ids = np.frombuffer(zlib.decompress(blob), np.uint16).reshape(shape)
        a = ids[y0 - ay : y1 - ay, x0 - ax : x1 - ax].astype(np.int64).ravel()
        b = other_ids[y0 - by : y1 - by, x0 - bx : x1 - bx].astype(np.int64).ravel()
        area_a, area_b = np.bincount(a), np.bincount(b)
        both = (a > 0) & (b > 0)
        codes, intersections = np.unique(a[both] * _PAIR + b[both], return_counts=True)
        for code, inter in zip(codes.tolist(), intersections.tolist(), strict=True):
            i, j = divmod(code, _PAIR)
            pa, pb = first + i - 1, other_first + j - 1
            if self.ids.class_id[pa] != self.ids.class_id[pb]:
                continue
            if inter / (area_a[i] + area_b[j] - inter) > self.match_iou and self.ids.union(pa, pb):
                self.seam_matches += 1

    def close(self) -> None:
        if not self.dataset.closed:
            self.dataset.close()

    def finish(
        self,
        raster_path: str | Path,
        parquet_path: str | Path,
        class_names: list[str],
        instructions: list[str],
        block: int = 2048,
    ) -> InstanceStats:
        """Write ``raster_path`` (the final ids, uint32 tiled GeoTIFF) from the provisional raster,
        block by block, and ``parquet_path`` (GeoParquet: one polygon per instance with its id,
        class, score = mean confidence, pixels, area in m², instructions and windows). Each
        instance's traced pieces are held to the end and unioned there (an instance may span any
        number of blocks): memory of the size of the polygons written, as for the class polygons."""
        import rasterio
        from rasterio.features import shapes
        from rasterio.windows import transform as window_transform
        from shapely import unary_union
        from shapely.geometry import shape

        from geopix.infer.vectorize import area_function, write_geoparquet

        self.close()
        ids = self.ids
        count = len(ids.parent)
        roots = np.array([ids.find(i) for i in range(count)], np.int64)
        pixels = np.bincount(roots, weights=ids.pixels, minlength=count)
        confidence = np.bincount(roots, weights=ids.confidence, minlength=count)
        final_of = np.zeros(count, np.uint32)
        members: dict[int, list[int]] = {}
        for i in range(1, count):  # roots are each group's first-seen id: numbering in order of appearance
            if pixels[roots[i]] > 0:
                members.setdefault(int(roots[i]), []).append(i)
        for number, root in enumerate(members, start=1):
            final_of[members[root]] = number
        pieces: dict[int, list[Any]] = {}
        with rasterio.open(self.path) as src:
            profile = src.profile | {"compress": "deflate"}
            area_of = area_function(src.crs, src.bounds)
            pixel_area = abs(src.transform.determinant)
            with rasterio.open(raster_path, "w", **profile) as dst:
                for win in raster_blocks(src.width, src.height, block):
                    final = final_of[src.read(1, window=win)]
                    dst.write(final[None], window=win)
                    if not final.any():
                        continue
                    wt = window_transform(win, src.transform)
                    traced = shapes(final.astype(np.int32), mask=final > 0, transform=wt, connectivity=4)
                    for geom, value in traced:  # (shapes takes no uint32; ids stay far below 2³¹)
                        pieces.setdefault(int(value), []).append(shape(geom))
            crs = src.crs
        rows = []
        stats = InstanceStats(seg_runs=count - 1, seam_matches=self.seam_matches)
        for number, (root, group) in enumerate(members.items(), start=1):
            geometry = unary_union(pieces[number]) if len(pieces[number]) > 1 else pieces[number][0]
            windows = sorted({ids.window[i] for i in group})
            stats.across_windows += len(windows) > 1
            class_id = ids.class_id[root]
            rows.append({
                "geometry": geometry.wkb,
                "instance_id": number,
                "class_id": class_id,
                "class_name": class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id),
                "score": round(float(confidence[root]) / float(pixels[root]) / 100.0, 4),
                "pixels": int(pixels[root]),
                "area_m2": float(area_of(geometry, pixels[root] * pixel_area)),
                "instructions": [instructions[k] for k in sorted({ids.instruction[i] for i in group})],
                "windows": windows,
            })  # fmt: skip
        stats.instances = len(rows)
        write_geoparquet(rows, parquet_path, crs, instance_columns())
        return stats


def instance_columns() -> list[tuple[str, Any]]:
    """``instances.parquet``'s columns besides the geometry."""
    import pyarrow as pa

    return [("instance_id", pa.int64()), ("class_id", pa.int32()), ("class_name", pa.string()),
            ("score", pa.float32()), ("pixels", pa.int64()), ("area_m2", pa.float64()),
            ("instructions", pa.list_(pa.string())), ("windows", pa.list_(pa.int32()))]  # fmt: skip
