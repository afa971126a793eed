"""Window answers → one georeferenced raster, written window by window, then a COG.

Per pixel the output holds two bands: the class (0 background, ``class id + 1`` for an object,
``NODATA`` where the source had no data or the scene was padded) and the confidence (the winning
mask's probability in percent, 0–100). Where several masks of one window cover a pixel, the most
probable wins. Each window writes only its keep rectangle (see :mod:`geopix.infer.scene_reader`), so no
pixel is written twice and nothing of the scene is held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geopix.infer.scene_reader import SceneInfo, Window

NODATA = 255
BLOCK = 512
BANDS = ("class", "confidence")


@dataclass
class WindowAnswer:
    """One window's answers to every instruction, as the stitcher takes them."""

    raster: np.ndarray  # [2, S, S] uint8: class + 1 / 0 / NODATA, confidence %
    # [S, S] uint16: 1 + the index (into ``instances``) of the mask that wins the pixel; 0 elsewhere
    instance_ids: np.ndarray
    # (class id, instruction index) per seg run
    instances: list[tuple[int, int]] = field(default_factory=list)


def window_answer(
    masks: np.ndarray,
    mask_probs: np.ndarray,
    class_ids: list[int],
    instructions: list[int],
    valid: np.ndarray,
) -> WindowAnswer:
    """One window's masks ([K, S, S] bool, one per seg run), their probabilities ([K, S, S] float),
    classes and instruction indices → its :class:`WindowAnswer`. Where several masks cover a pixel the
    most probable wins, in the class raster and the instance ids alike."""
    size = valid.shape
    out = np.zeros((2, *size), np.uint8)
    ids = np.zeros(size, np.uint16)
    if len(masks):
        scores = np.where(masks, mask_probs, -1.0)  # a pixel outside every mask stays background
        best = scores.argmax(0)
        best_score = np.take_along_axis(scores, best[None], 0)[0]
        hit = (best_score >= 0) & valid
        out[0][hit] = np.asarray(class_ids, np.uint8)[best[hit]] + 1
        out[1][hit] = np.round(best_score[hit] * 100).astype(np.uint8)
        ids[hit] = best[hit] + 1
    out[:, ~valid] = NODATA
    return WindowAnswer(out, ids, list(zip(class_ids, instructions, strict=True)))


def raster_blocks(width: int, height: int, block: int) -> Iterator[Any]:
    """Row by row, the ``block`` × ``block`` rasterio Windows covering a width × height raster (the
    last row and column cut at its edge): how a whole scene is read without being held."""
    from rasterio.windows import Window as RioWindow

    for top in range(0, height, block):
        for left in range(0, width, block):
            yield RioWindow(left, top, min(block, width - left), min(block, height - top))


def open_scene_raster(scene: SceneInfo, path: str | Path, count: int, dtype: str, nodata: int) -> Any:
    """A tiled GeoTIFF on local disk on the scene's grid, open for writing window by window."""
    import rasterio
    from affine import Affine

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return rasterio.open(
        path, "w", driver="GTiff", width=scene.width, height=scene.height, count=count, dtype=dtype,
        crs=scene.crs, transform=Affine(*scene.transform), nodata=nodata, tiled=True,
        blockxsize=BLOCK, blockysize=BLOCK, compress="deflate", BIGTIFF="IF_SAFER",
    )  # fmt: skip


class MaskWriter:
    """A tiled GeoTIFF on local disk on the scene's grid, filled window by window."""

    def __init__(self, scene: SceneInfo, path: str | Path, class_names: list[str]):
        self.scene, self.path = scene, Path(path)
        self.dataset = open_scene_raster(scene, self.path, 2, "uint8", NODATA)
        # GDAL fills never-written blocks with the nodata value on close, so windows skipped for
        # having no valid pixel need no write.
        self.dataset.update_tags(
            classes=",".join(class_names), class_encoding="0 background, id+1 class, 255 nodata"
        )
        for band, name in enumerate(BANDS, start=1):
            self.dataset.set_band_description(band, name)
        self.windows_written = 0

    def write(self, window: Window, raster: np.ndarray) -> None:
        """``raster`` [2, S, S] is the whole window's answer; only its keep rectangle is written."""
        from rasterio.windows import Window as RioWindow

        rows, cols = window.keep_in_window()
        col, row, width, height = window.keep
        self.dataset.write(raster[:, rows, cols], window=RioWindow(col, row, width, height))
        self.windows_written += 1

    def close(self) -> None:
        if not self.dataset.closed:
            self.dataset.close()


def to_cog(src: str | Path, dst: str | Path, nodata: int = NODATA) -> dict[str, Any]:
    """A valid COG (rio-cogeo, deflate, 512 blocks, mode overviews so classes and instance ids stay
    what they are); returns rio-cogeo's validation result."""
    from rio_cogeo.cogeo import cog_translate, cog_validate
    from rio_cogeo.profiles import cog_profiles

    profile = cog_profiles.get("deflate")
    profile.update(blockxsize=BLOCK, blockysize=BLOCK)
    cog_translate(
        str(src), str(dst), profile, nodata=nodata, overview_resampling="mode", in_memory=False, quiet=True,
        config={"GDAL_CACHEMAX": 128, "GDAL_TIFF_INTERNAL_MASK": True},
    )  # fmt: skip
    valid, errors, warnings = cog_validate(str(dst), quiet=True)
    return {"valid": bool(valid), "errors": errors, "warnings": warnings}
