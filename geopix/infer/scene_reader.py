"""Large scenes in, model windows out: open a scene, plan its windows, read them chunk by chunk.

A scene is any raster GDAL opens (a COG in S3 through ``/vsis3``, with the read settings of
:data:`geopix.storage.GDAL_S3_READ_PRESET`). Windows of the model's input size step over the whole
scene; the last row and column are shifted nowhere: they run past the right/bottom edge and the part
outside the scene is padded as nodata. Each window also owns a *keep* rectangle: the part of it
closer to its own centre than to any neighbour's. Keep rectangles tile the scene exactly, so the
stitcher writes every output pixel once (centre-cropping) and never blends.

Windows are read in block-aligned *chunks* (one ``read`` per chunk, the windows cut from it), so
each COG block is fetched about once whatever the overlap.

A scene is one file (its ``segment.bands`` as R, G, B) or, where a STAC item splits its bands, one
single-band file per colour (R, G, B) on one grid: same size, CRS, transform and data type.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from geopix import storage
from geopix.config import SegmentConfig


class SceneError(RuntimeError):
    """A scene that cannot be segmented; ``reason`` is a short key (for tables and quarantine)."""

    def __init__(self, uri: str, reason: str, detail: str):
        super().__init__(f"{uri}: {reason}: {detail}")
        self.uri, self.reason, self.detail = uri, reason, detail


@dataclass(frozen=True)
class Window:
    """One model input: ``read`` rectangle (may run past the scene edge) and ``keep`` rectangle
    (inside the scene; what the stitcher writes), both as (col, row, width, height) in scene pixels."""

    index: int
    read: tuple[int, int, int, int]
    keep: tuple[int, int, int, int]

    def keep_in_window(self) -> tuple[slice, slice]:
        """Rows and columns of the keep rectangle inside the window's own array."""
        col, row, width, height = self.keep
        return slice(row - self.read[1], row - self.read[1] + height), slice(
            col - self.read[0], col - self.read[0] + width
        )


@dataclass(frozen=True)
class Scaling:
    """How source values become 0–255: ``None`` ranges mean uint8 used as is."""

    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def apply(self, bands: np.ndarray) -> np.ndarray:
        """[C, H, W] source values → [C, H, W] uint8."""
        if self.low is None or self.high is None:
            return bands.astype(np.uint8, copy=False)
        low = np.asarray(self.low, np.float32)[:, None, None]
        span = np.maximum(np.asarray(self.high, np.float32)[:, None, None] - low, 1e-6)
        scaled = (bands.astype(np.float32) - low) / span * 255.0
        return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


@dataclass(frozen=True)
class SceneInfo:
    uri: str
    scene_id: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str  # WKT
    transform: tuple[float, ...]  # affine a, b, c, d, e, f
    nodata: float | None
    block_shape: tuple[int, int]
    bands: tuple[int, ...]  # 1-based source bands used as R, G, B
    scaling: Scaling
    checksum: str  # S3 ETag (or size+mtime hash for local files): identifies the input that was read
    # One file per colour (R, G, B; ``uri`` is the red one) where the scene splits its bands; each
    # file's band 1 is read. Empty for a scene in one file.
    band_uris: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def scene_id_of(uri: str) -> str:
    """``s3://b/incoming/2026-11-27/T18TWL.tif`` → ``T18TWL`` (the file name without extension)."""
    return PurePosixPath(uri.rstrip("/")).name.rsplit(".", 1)[0]


# GDAL's block cache defaults to 5 % of RAM and keeps every block read until it is full, so a
# process reading a whole scene would grow with the scene; each block is read about once here.
GDAL_CACHE_MB = 64


def scene_env(uri: str):
    """storage.rasterio_env for reading ``uri``: a small GDAL block cache, and GDAL's cross-open
    cache off for that one file (a long-lived process — the driver, a Ray worker — must see a
    re-uploaded scene, not its old header; each chunk is one open and one read, so little is lost)."""
    if not storage.is_s3_uri(uri):
        return storage.rasterio_env(GDAL_CACHEMAX=GDAL_CACHE_MB)
    return storage.rasterio_env(
        GDAL_CACHEMAX=GDAL_CACHE_MB, CPL_VSIL_CURL_NON_CACHED="/vsis3/" + uri.removeprefix("s3://")
    )


def input_checksum(uri: str) -> str:
    if storage.is_s3_uri(uri):
        info = storage.s3_filesystem().info(uri)
        return str(info.get("ETag", "")).strip('"') or f"size-{info.get('size')}"
    from pathlib import Path

    stat = Path(uri).stat()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def open_scene(uri: str | tuple[str, ...], cfg: SegmentConfig, scene_id: str | None = None) -> SceneInfo:
    """Check that ``uri`` can be segmented and describe it; :class:`SceneError` says why not.
    ``uri`` is one file, or a tuple of one file per colour (R, G, B) on one grid.
    ``scene_id`` names it in output paths (default: the (red) file name without extension)."""
    if not isinstance(uri, str):
        if len(uri) == 1:
            return open_scene(uri[0], cfg, scene_id)
        return _open_band_files(tuple(uri), cfg, scene_id)
    import rasterio
    from rasterio.errors import RasterioIOError

    given = uri
    try:
        uri = storage.normalize_uri(uri)  # S3://, s3a:// → s3://; gs://, https:// … are refused
    except storage.StorageError as exc:
        raise SceneError(given, "unsupported URI", str(exc)) from None
    try:
        checksum = input_checksum(uri)
    except FileNotFoundError:
        raise SceneError(uri, "missing", "no such object") from None
    except PermissionError as exc:
        settings = storage.S3Settings.from_env()
        key = (settings.access_key_id or "")[:4] + "…" if settings.access_key_id else "no access key"
        raise SceneError(
            uri, "access denied",
            f"{settings.describe()} refused to read it ({exc}) with {key}: check the credentials and their "
            "permission on this key",
        ) from None  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint: one clear line for this scene
        raise SceneError(uri, "unreadable", f"{type(exc).__name__}: {exc}") from None
    try:
        with scene_env(uri), rasterio.open(uri) as ds:
            if ds.crs is None:
                raise SceneError(uri, "no CRS", "the raster has no coordinate reference system")
            if ds.transform.is_identity:
                raise SceneError(uri, "no transform", "the raster has no georeferencing transform")
            bad = [b for b in cfg.bands if not 1 <= b <= ds.count]
            if bad and ds.count != 1:  # two bands are no RGB: which is which must be said, not guessed
                raise SceneError(
                    uri, "bad bands",
                    f"segment.bands {list(cfg.bands)}: band(s) {bad} not in 1..{ds.count} (the scene has {ds.count} "
                    f"band{'s' if ds.count != 1 else ''}); set segment.bands to three of its bands, e.g. "
                    f"{[min(b, ds.count) for b in (1, 2, 3)]}",
                )  # fmt: skip
            bands = tuple(cfg.bands) if not bad else (1, 1, 1)  # one band: grey to R, G and B
            if not _overview_mask(ds).any():
                raise SceneError(uri, "all nodata", "no valid pixel in the scene (checked on its overview)")
            scaling = _scaling(ds, bands, cfg, uri)
            return SceneInfo(
                uri=uri,
                scene_id=scene_id or scene_id_of(uri),
                width=ds.width,
                height=ds.height,
                count=ds.count,
                dtype=ds.dtypes[0],
                crs=ds.crs.to_wkt(),
                transform=tuple(ds.transform)[:6],
                nodata=ds.nodata,
                block_shape=tuple(ds.block_shapes[0]),
                bands=bands,
                scaling=scaling,
                checksum=checksum,
            )
    except SceneError:
        raise
    except RasterioIOError as exc:
        message = gdal_message(exc)
        reason = "access denied" if "403" in message or "Access Denied" in message else "unreadable"
        if "does not exist" in message or "No such file" in message or "404" in message:
            reason = "missing"
        raise SceneError(uri, reason, message) from None
    except Exception as exc:  # noqa: BLE001
        raise SceneError(uri, "unreadable", gdal_message(exc)) from None


def _open_band_files(uris: tuple[str, ...], cfg: SegmentConfig, scene_id: str | None) -> SceneInfo:
    """One scene from one single-band file per colour: each file is checked as a scene of its own
    (missing, no CRS, all nodata …, under its own URI), then the files must share one grid."""
    if len(uris) != 3:
        raise SceneError(
            ", ".join(uris), "bad bands", f"a scene split into band files needs 3 (R, G, B), got {len(uris)}"
        )
    one_band = cfg.model_copy(update={"bands": [1, 1, 1]})  # band 1 of each file
    red, green, blue = (open_scene(u, one_band, scene_id) for u in uris)
    for other in (green, blue):
        differs = [
            name for name, a, b in [("size", (red.width, red.height), (other.width, other.height)),
                                    ("CRS", red.crs, other.crs), ("transform", red.transform, other.transform),
                                    ("data type", red.dtype, other.dtype)] if a != b
        ]  # fmt: skip
        if differs:
            raise SceneError(
                red.uri, "band grid mismatch",
                f"the band files of one scene must share one grid; {other.uri} differs from {red.uri} in "
                f"{', '.join(differs)} ({_grid(other)} against {_grid(red)})",
            )  # fmt: skip
    scaling = Scaling()  # uint8 as is; otherwise each colour stretched by its own file's range
    if red.scaling.low is not None:
        scaling = Scaling(tuple(f.scaling.low[0] for f in (red, green, blue)),
                          tuple(f.scaling.high[0] for f in (red, green, blue)))  # fmt: skip
    checksum = hashlib.sha256("|".join(f.checksum for f in (red, green, blue)).encode()).hexdigest()[:16]
    return replace(red, count=3, bands=(1, 1, 1), scaling=scaling, checksum=checksum,
                   band_uris=(red.uri, green.uri, blue.uri))  # fmt: skip


def _grid(scene: SceneInfo) -> str:
    from rasterio.crs import CRS

    crs = CRS.from_wkt(scene.crs)
    return f"{scene.width}×{scene.height} px, {crs.to_string() or 'custom CRS'}, transform {scene.transform}, {scene.dtype}"


def read_pixels(
    scene: SceneInfo, window: Any = None, out_shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The scene's R, G, B source values [3, H, W] (before scaling) in ``window`` (a rasterio
    Window; None: all) at ``out_shape`` (None: full resolution), and where they are valid [H, W]:
    the file's dataset mask, or every band file's (a pixel lacking one colour has no RGB)."""
    import rasterio

    files = [(u, [1]) for u in scene.band_uris] or [(scene.uri, list(scene.bands))]
    values, valid = [], None
    for uri, bands in files:
        with scene_env(uri), rasterio.open(uri) as ds:
            shape = None if out_shape is None else (len(bands), *out_shape)
            values.append(ds.read(bands, window=window, out_shape=shape))
            mask = ds.dataset_mask(window=window, out_shape=out_shape) > 0  # valid where any band is
        valid = mask if valid is None else valid & mask
    return values[0] if len(values) == 1 else np.concatenate(values), valid


def gdal_message(exc: BaseException) -> str:
    """An exception with the causes rasterio chains to it: GDAL's own words ("TIFFReadEncodedTile()
    failed", "… is not a GeoTIFF") sit in ``__cause__``/``__context__``, while the outer message says
    only "Read failed. See previous exception for details."."""
    parts, seen = [], set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        if text and text not in parts:
            parts.append(text)
        error = error.__cause__ or error.__context__
    head = type(exc).__name__ if not isinstance(exc, OSError) else ""
    return (f"{head}: " if head else "") + " ← ".join(reversed(parts)) if parts else type(exc).__name__


OVERVIEW_SIDE = 512  # px: decimated reads for the validity check and the percentiles


def _overview_shape(ds: Any) -> tuple[int, int]:
    scale = max(ds.width, ds.height) / OVERVIEW_SIDE
    return (max(1, round(ds.height / scale)), max(1, round(ds.width / scale))) if scale > 1 else ds.shape


def _overview_mask(ds: Any) -> np.ndarray:
    valid = ds.dataset_mask(out_shape=_overview_shape(ds)) > 0
    if np.issubdtype(np.dtype(ds.dtypes[0]), np.floating):  # NaN/inf are nodata, declared or not
        valid &= np.isfinite(ds.read(out_shape=(ds.count, *_overview_shape(ds)))).all(0)
    return valid


def _scaling(ds: Any, bands: tuple[int, ...], cfg: SegmentConfig, uri: str) -> Scaling:
    if ds.dtypes[0] == "uint8" and cfg.fixed_range is None:
        return Scaling()
    if cfg.fixed_range is not None:
        low, high = cfg.fixed_range
        return Scaling((low,) * len(bands), (high,) * len(bands))
    # Percentiles from a small decimated read: GDAL serves it from the smallest overview.
    values = ds.read(list(bands), out_shape=(len(bands), *_overview_shape(ds)), masked=True)
    lows, highs = [], []
    for band in values:
        valid = band.compressed()
        valid = valid[np.isfinite(valid)] if np.issubdtype(valid.dtype, np.floating) else valid
        if valid.size == 0:
            raise SceneError(uri, "all nodata", "no valid pixel in the scene")
        low, high = np.percentile(valid.astype(np.float64), cfg.percentiles)
        lows.append(float(low))
        highs.append(float(high if high > low else low + 1))
    return Scaling(tuple(lows), tuple(highs))


def plan_windows(width: int, height: int, size: int, overlap: int) -> list[Window]:
    """Windows of ``size`` covering ``width`` × ``height`` with ``overlap``; keep rectangles tile it."""
    if not 0 <= overlap < size:
        raise ValueError(f"segment.overlap must be in [0, window size {size}), got {overlap}")
    step = size - overlap
    cols = _starts(width, size, step)
    rows = _starts(height, size, step)
    windows = []
    for r, row in enumerate(rows):
        top, bottom = _keep_span(rows, r, size, height)
        for c, col in enumerate(cols):
            left, right = _keep_span(cols, c, size, width)
            windows.append(
                Window(len(windows), (col, row, size, size), (left, top, right - left, bottom - top))
            )
    return windows


def _starts(length: int, size: int, step: int) -> list[int]:
    """Window offsets along one axis: 0, step, 2·step … until the end is covered."""
    return [i * step for i in range(max(1, math.ceil(max(length - size, 0) / step) + 1))]


def _keep_span(starts: list[int], i: int, size: int, length: int) -> tuple[int, int]:
    """The pixels along one axis that window ``i`` owns: from the midpoint of the overlap with its
    predecessor to the midpoint of the overlap with its successor (the scene edges at the ends)."""
    begin = 0 if i == 0 else (starts[i] + starts[i - 1] + size) // 2
    end = length if i == len(starts) - 1 else (starts[i + 1] + starts[i] + size) // 2
    return begin, min(end, length)


def plan_chunks(windows: list[Window], chunk_size: int) -> list[list[Window]]:
    """Windows grouped by the chunk of the scene (``chunk_size`` squares) their keep origin lies in,
    in row-major chunk order."""
    groups: dict[tuple[int, int], list[Window]] = {}
    for window in windows:
        key = (window.keep[1] // chunk_size, window.keep[0] // chunk_size)
        groups.setdefault(key, []).append(window)
    return [groups[key] for key in sorted(groups)]


def read_chunk(scene: SceneInfo, windows: list[Window]) -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
    """(window, RGB uint8 [S, S, 3], valid bool [S, S]) for each window of one chunk: one read of the
    rectangle covering them (clipped to the scene), padded as nodata beyond the edges."""
    from rasterio.windows import Window as RioWindow

    left = min(w.read[0] for w in windows)
    top = min(w.read[1] for w in windows)
    right = max(w.read[0] + w.read[2] for w in windows)
    bottom = max(w.read[1] + w.read[3] for w in windows)
    inside_r, inside_b = min(right, scene.width), min(bottom, scene.height)
    data, valid = read_pixels(scene, RioWindow(left, top, inside_r - left, inside_b - top))
    if np.issubdtype(data.dtype, np.floating):  # NaN/inf are nodata, declared or not
        valid &= np.isfinite(data).all(0)
    rgb = np.zeros((3, bottom - top, right - left), np.uint8)
    ok = np.zeros((bottom - top, right - left), bool)
    rgb[:, : data.shape[1], : data.shape[2]] = scene.scaling.apply(data)
    ok[: valid.shape[0], : valid.shape[1]] = valid
    rgb[:, ~ok] = 0
    for window in windows:
        col, row, width, height = window.read
        ys, xs = slice(row - top, row - top + height), slice(col - left, col - left + width)
        yield window, np.ascontiguousarray(rgb[:, ys, xs].transpose(1, 2, 0)), ok[ys, xs]
