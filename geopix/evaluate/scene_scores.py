"""A segmented scene against its ground truth, block by block (never the whole scene): classes
(:func:`scene_scores`) and instances (:func:`instance_scores`).

Ground truth is a class-id raster on the scene's grid (``background`` where there is no object), as
`geopix data synth` writes ``classes.tif`` next to each synthetic scene. Per class: pixel IoU,
precision and recall of the stitched output (``class id + 1``), over the pixels the output covers
(its nodata excluded).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from geopix import storage
from geopix.infer.stitch import NODATA, raster_blocks


def scene_scores(
    mask_uri: str, truth_uri: str, class_names: list[str], background: int = 255, block: int = 2048
) -> dict[str, Any]:
    """{class name: {iou, precision, recall, predicted_px, true_px}} for every class present in either."""
    import rasterio

    n = len(class_names)
    intersection, predicted, true = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    with storage.rasterio_env(), rasterio.open(mask_uri) as out, rasterio.open(truth_uri) as gt:
        if (out.width, out.height, out.transform) != (gt.width, gt.height, gt.transform):
            raise ValueError(f"{mask_uri} and {truth_uri} are not on the same grid")
        for win in raster_blocks(out.width, out.height, block):
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


def instance_scores(
    instances_uri: str,
    truth_uri: str,
    windows: list[Any],
    *,
    mask_uri: str,
    truth_classes_uri: str,
    class_names: list[str],
    background: int = 255,
    iou: float = 0.5,
    min_part: int = 16,
    block: int = 2048,
) -> dict[str, Any]:
    """A scene's ``instances.tif`` against a ground-truth instance raster on its grid (0 background,
    as `geopix data synth` writes ``instances.tif``). An output instance's class is the one its
    pixels have in ``mask_uri`` (the scene's class raster); a true object's, the one in
    ``truth_classes_uri`` (``background`` where none).

    - ``precision`` / ``recall``, overall and per class: output instances and true objects of one
      class matched one to one at mask IoU ≥ ``iou`` (over the scene; above 0.5 no instance can
      match two). Per class, so that an instruction about one class is not scored on the others.
    - Seams: a true object *lies across a seam* when at least two windows' keep rectangles
      (``windows``: the scene's plan, geopix.infer.scene_reader) each hold ``min_part`` of its pixels.
      Each such part is *found* when one output instance covers at least half of it; of the objects
      found in every part, ``one_instance_share`` is the share whose parts are all the same instance.
    """
    import rasterio

    predicted, true, pairs, parts = Counter(), Counter(), Counter(), Counter()
    predicted_class, true_class = {}, {}
    with (
        storage.rasterio_env(),
        rasterio.open(instances_uri) as out,
        rasterio.open(truth_uri) as gt,
        rasterio.open(mask_uri) as mask,
        rasterio.open(truth_classes_uri) as gt_classes,
    ):
        if (out.width, out.height, out.transform) != (gt.width, gt.height, gt.transform):
            raise ValueError(f"{instances_uri} and {truth_uri} are not on the same grid")
        keep_col, keep_row = _keep_index(windows, out.width, 0), _keep_index(windows, out.height, 1)
        columns = int(keep_col.max()) + 1
        for win in raster_blocks(out.width, out.height, block):
            pred = out.read(1, window=win).astype(np.int64).ravel()
            truth = gt.read(1, window=win).astype(np.int64).ravel()
            pred_classes = mask.read(1, window=win).astype(np.int64).ravel() - 1
            truth_classes = gt_classes.read(1, window=win).astype(np.int64).ravel()
            for ids, classes, into in ((pred, pred_classes, predicted_class), (truth, truth_classes, true_class)):
                into.update(_counts(ids[ids > 0], classes[ids > 0]).keys())  # one class per instance
            rows, cols = win.toslices()
            keep = (keep_row[rows, None] * columns + keep_col[None, cols]).ravel()
            predicted.update(_counts(pred[pred > 0]))
            true.update(_counts(truth[truth > 0]))
            both = (pred > 0) & (truth > 0)
            pairs.update(_counts(truth[both], pred[both]))
            objects = truth > 0
            parts.update(_counts(truth[objects], keep[objects], pred[objects]))
    matched = set()
    for (t, p), inter in pairs.items():
        if true_class.get(t) == predicted_class.get(p) and inter / (true[t] + predicted[p] - inter) >= iou:
            matched.add((t, p))
    tp = min(len({t for t, _ in matched}), len({p for _, p in matched}))
    per_class = {}
    for c, name in enumerate(class_names):
        n_pred = sum(1 for p in predicted if predicted_class.get(p) == c)
        n_true = sum(1 for t in true if true_class.get(t) == c and c != background)
        hits = len({t for t, _ in matched if true_class.get(t) == c})
        if n_pred or n_true:
            per_class[name] = {"predicted": n_pred, "true": n_true, "matched": hits,
                               "precision": hits / n_pred if n_pred else 0.0, "recall": hits / n_true if n_true else 0.0}  # fmt: skip
    # Per true object and keep rectangle: its pixels there, and the output instances over them.
    per_part: dict[tuple[int, int], Counter] = {}
    for (t, keep, p), count in parts.items():
        per_part.setdefault((t, keep), Counter())[p] += count
    by_object: dict[int, list[Counter]] = {}
    for (t, _), over in per_part.items():
        if sum(over.values()) >= min_part:
            by_object.setdefault(t, []).append(over)
    across = {t: p for t, p in by_object.items() if len(p) > 1}
    found, one = 0, 0
    for over_parts in across.values():
        found_ids = []
        for over in over_parts:
            instance, count = max(((p, c) for p, c in over.items() if p), key=lambda pc: pc[1], default=(0, 0))
            if count * 2 >= sum(over.values()):
                found_ids.append(instance)
        if len(found_ids) == len(over_parts):
            found += 1
            one += len(set(found_ids)) == 1
    return {
        "iou": iou,
        "predicted": len(predicted),
        "true": len(true),
        "matched": tp,
        "precision": tp / len(predicted) if predicted else 0.0,
        "recall": tp / len(true) if true else 0.0,
        "per_class": per_class,
        "across_seams": len(across),
        "across_seams_found_in_every_part": found,
        "across_seams_one_instance": one,
        "one_instance_share": one / found if found else 0.0,
    }


def _counts(*columns: np.ndarray) -> dict[Any, int]:
    """How often each value (one column) or each tuple of values (several) occurs."""
    if len(columns) == 1:
        keys, counts = np.unique(columns[0], return_counts=True)
        return dict(zip(keys.tolist(), counts.tolist(), strict=True))
    keys, counts = np.unique(np.stack(columns, 1), axis=0, return_counts=True)
    return dict(zip(map(tuple, keys.tolist()), counts.tolist(), strict=True))


def _keep_index(windows: list[Any], length: int, axis: int) -> np.ndarray:
    """For each pixel column (axis 0) or row (axis 1) of the scene: which keep span it lies in."""
    spans = sorted({(w.keep[axis], w.keep[axis] + w.keep[axis + 2]) for w in windows})
    index = np.zeros(length, np.int64)
    for number, (start, end) in enumerate(spans):
        index[start:end] = number
    return index
