"""The stitched class raster → polygons (GeoParquet with CRS), block by block.

``rasterio.features.shapes`` traces each block of the raster; a polygon that touches an inner block
edge may continue in the next block, so those are held back and merged with their neighbours of the
same class at the end (only border pieces are ever held, never the scene). Each polygon carries its
class, score (mean confidence of its pixels, 0–1), pixel count and area in m²: planar in the scene's
CRS when that is projected in metres (not Web Mercator), else in a Lambert azimuthal equal-area
projection centred on the scene.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geopix.infer.stitch import NODATA, raster_blocks

GEOMETRY = "geometry"


def _polygon_columns() -> list[tuple[str, Any]]:
    import pyarrow as pa

    return [("class_id", pa.int32()), ("class_name", pa.string()), ("score", pa.float32()),
            ("pixels", pa.int64()), ("area_m2", pa.float64())]  # fmt: skip


@dataclass
class _Piece:
    polygon: Any  # shapely geometry in the scene CRS
    class_id: int
    pixels: int
    confidence_sum: float


@dataclass
class PolygonStats:
    polygons: int = 0
    merged_across_blocks: int = 0
    dropped_small: int = 0
    per_class: dict[str, int] = field(default_factory=dict)


def trace_polygons(
    raster_path: str | Path,
    out_path: str | Path,
    class_names: list[str],
    block: int = 2048,
    min_pixels: int = 4,
) -> PolygonStats:
    """Polygons of every class in ``raster_path`` (the stitched output) into ``out_path`` (GeoParquet)."""
    import rasterio
    from rasterio.features import shapes
    from rasterio.windows import transform as window_transform
    from shapely.geometry import box as shapely_box
    from shapely.geometry import shape

    stats = PolygonStats()
    rows: list[dict[str, Any]] = []
    border: list[_Piece] = []
    with rasterio.open(raster_path) as ds:
        crs, transform = ds.crs, ds.transform
        area_of = area_function(crs, ds.bounds)
        pixel_area = abs(transform.determinant)
        for win in raster_blocks(ds.width, ds.height, block):
            classes, confidence = ds.read(1, window=win), ds.read(2, window=win).astype(np.float64)
            objects = (classes != 0) & (classes != NODATA)
            if not objects.any():
                continue
            wt = window_transform(win, transform)
            inner = shapely_box(*_inner_bounds(win, ds.width, ds.height, wt))
            labels = _component_labels(classes, objects)
            flat = labels.ravel()
            pixels = np.bincount(flat)
            confidence_sums = np.bincount(flat, weights=confidence.ravel())
            class_of = np.zeros(len(pixels), np.int64)
            class_of[flat] = classes.ravel()
            for geom, label in shapes(labels, mask=labels > 0, transform=wt, connectivity=4):
                label = int(label)
                piece = _Piece(
                    shape(geom),
                    int(class_of[label]) - 1,
                    int(pixels[label]),
                    float(confidence_sums[label]),
                )
                if piece.polygon.within(inner):
                    _emit(piece, rows, stats, class_names, area_of, pixel_area, min_pixels)
                else:
                    border.append(piece)
    for piece in _merge(border, stats):
        _emit(piece, rows, stats, class_names, area_of, pixel_area, min_pixels)
    write_geoparquet(rows, out_path, crs, _polygon_columns())
    return stats


def _inner_bounds(win: Any, width: int, height: int, wt: Any) -> tuple[float, float, float, float]:
    """Bounds (scene CRS) of the block shrunk by half a pixel on every side shared with another block,
    so that only pieces touching those shared edges fall outside."""
    left = 0.5 if win.col_off > 0 else -1.0
    top = 0.5 if win.row_off > 0 else -1.0
    right = win.width - (0.5 if win.col_off + win.width < width else -1.0)
    bottom = win.height - (0.5 if win.row_off + win.height < height else -1.0)
    xs, ys = zip(wt * (left, top), wt * (right, bottom), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _component_labels(classes: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Connected components (4-connected) of equal class, numbered from 1; 0 elsewhere."""
    from scipy import ndimage

    labels = np.zeros(classes.shape, np.int32)
    next_label = 1
    for value in np.unique(classes[objects]):
        components, count = ndimage.label(classes == value)
        labels[components > 0] = components[components > 0] + next_label - 1
        next_label += count
    return labels


def _merge(pieces: list[_Piece], stats: PolygonStats) -> list[_Piece]:
    """Union pieces of one class that share an edge (they were cut by block edges)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from shapely import STRtree, unary_union

    merged: list[_Piece] = []
    for class_id in sorted({p.class_id for p in pieces}):
        group = [p for p in pieces if p.class_id == class_id]
        tree = STRtree([p.polygon for p in group])
        pairs = [
            (i, int(j))
            for i, piece in enumerate(group)
            for j in tree.query(piece.polygon, predicate="intersects")
            if int(j) != i and piece.polygon.intersection(group[int(j)].polygon).length > 0  # a shared edge
        ]
        rows, cols = zip(*pairs, strict=True) if pairs else ((), ())
        graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(len(group), len(group)))
        _, cluster_of = connected_components(graph, directed=False)
        clusters: dict[int, list[_Piece]] = {}
        for piece, cluster in zip(group, cluster_of, strict=True):
            clusters.setdefault(int(cluster), []).append(piece)
        for members in clusters.values():
            if len(members) > 1:
                stats.merged_across_blocks += len(members) - 1
            merged.append(
                _Piece(
                    unary_union([m.polygon for m in members]),
                    class_id,
                    sum(m.pixels for m in members),
                    sum(m.confidence_sum for m in members),
                )
            )
    return merged


def _emit(piece, rows, stats, class_names, area_of, pixel_area, min_pixels) -> None:
    if piece.pixels < min_pixels:
        stats.dropped_small += 1
        return
    name = class_names[piece.class_id] if 0 <= piece.class_id < len(class_names) else str(piece.class_id)
    rows.append(
        {
            GEOMETRY: piece.polygon.wkb,
            "class_id": piece.class_id,
            "class_name": name,
            "score": round(piece.confidence_sum / piece.pixels / 100.0, 4),
            "pixels": piece.pixels,
            "area_m2": float(area_of(piece.polygon, piece.pixels * pixel_area)),
        }
    )
    stats.polygons += 1
    stats.per_class[name] = stats.per_class.get(name, 0) + 1


def area_function(crs: Any, bounds: Any):
    """area_of(polygon, planar area in CRS units²) → m²."""
    if crs.is_projected and crs.linear_units_factor[1] > 0 and crs.to_epsg() not in (3857, 900913):
        factor = crs.linear_units_factor[1] ** 2  # CRS units → metres

        return lambda polygon, planar: planar * factor
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds, transform_geom
    from shapely.geometry import mapping, shape

    west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds)
    equal_area = CRS.from_proj4(
        f"+proj=laea +lat_0={(south + north) / 2} +lon_0={(west + east) / 2} +datum=WGS84 +units=m"
    )

    def area_of(polygon, planar):
        return shape(transform_geom(crs, equal_area, mapping(polygon))).area

    return area_of


def write_geoparquet(
    rows: list[dict[str, Any]], path: str | Path, crs: Any, columns: list[tuple[str, Any]]
) -> None:
    """GeoParquet 1.1: ``rows`` (a WKB ``geometry`` and ``columns``, (name, pyarrow type) pairs) with
    the ``geo`` metadata, the CRS as PROJJSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from shapely import from_wkb

    table = pa.Table.from_pylist(rows, schema=pa.schema([(GEOMETRY, pa.binary()), *columns]))
    bbox = [float("inf"), float("inf"), float("-inf"), float("-inf")]
    types = set()
    for wkb in table.column(GEOMETRY).to_pylist():
        geom = from_wkb(wkb)
        types.add(geom.geom_type)
        x0, y0, x1, y1 = geom.bounds
        bbox = [min(bbox[0], x0), min(bbox[1], y0), max(bbox[2], x1), max(bbox[3], y1)]
    geo = {
        "version": "1.1.0",
        "primary_column": GEOMETRY,
        "columns": {
            GEOMETRY: {
                "encoding": "WKB",
                "geometry_types": sorted(types),
                "crs": crs.to_dict(projjson=True),
                **({"bbox": bbox} if rows else {}),
            }
        },
    }
    metadata = dict(table.schema.metadata or {}) | {b"geo": json.dumps(geo).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), str(path))
