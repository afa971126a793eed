"""A segmented scene against its ground-truth class raster, block by block (never the whole scene).

Ground truth is a class-id raster on the scene's grid (``background`` where there is no object), as
`geopix data synth` writes ``classes.tif`` next to each synthetic scene. Per class: pixel IoU,
precision and recall of the stitched output (``class id + 1``), over the pixels the output covers
(its nodata excluded).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geopix import storage
from geopix.infer.stitch import NODATA


def scene_scores(
    mask_uri: str, truth_uri: str, class_names: list[str], background: int = 255, block: int = 2048
) -> dict[str, Any]:
    """{class name: {iou, precision, recall, predicted_px, true_px}} for every class present in either."""
    import rasterio
    from rasterio.windows import Window

    n = len(class_names)
    intersection, predicted, true = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    with storage.rasterio_env(), rasterio.open(mask_uri) as out, rasterio.open(truth_uri) as gt:
        if (out.width, out.height, out.transform) != (gt.width, gt.height, gt.transform):
            raise ValueError(f"{mask_uri} and {truth_uri} are not on the same grid")
        for top in range(0, out.height, block):
            for left in range(0, out.width, block):
                win = Window(left, top, min(block, out.width - left), min(block, out.height - top))
                pred, truth = out.read(1, window=win), gt.read(1, window=win)
                valid = pred != NODATA
                pred_class = np.where(valid & (pred > 0), pred.astype(np.int64) - 1, -1)
                true_class = np.where(valid & (truth != background), truth.astype(np.int64), -1)
                for c in range(n):
                    p, t = pred_class == c, true_class == c
                    intersection[c] += int((p & t).sum())
                    predicted[c] += int(p.sum())
                    true[c] += int(t.sum())
    scores = {}
    for c, name in enumerate(class_names):
        if predicted[c] or true[c]:
            union = predicted[c] + true[c] - intersection[c]
            scores[name] = {
                "iou": intersection[c] / union if union else 0.0,
                "precision": intersection[c] / predicted[c] if predicted[c] else 0.0,
                "recall": intersection[c] / true[c] if true[c] else 0.0,
                "predicted_px": int(predicted[c]),
                "true_px": int(true[c]),
            }
    return scores
