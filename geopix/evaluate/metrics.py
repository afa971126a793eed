"""Segmentation and grounding metrics (GEOPIX.md §4).

Per target we keep the intersection and union of the predicted and ground-truth masks; every
summary is computed from those rows, so the same numbers come out of one process or of many
(rows from Ray Data workers are simply concatenated):

- gIoU: mean of per-target IoU; cIoU: Σ intersection / Σ union;
- precision@t: share of targets with IoU ≥ t (t = 0.5 … 0.9);
- all of them overall and per size bucket (ground-truth area; COCO thresholds by default), per
  class and per phrase type;
- grounding accuracy: share of answers whose first ``{<x1><y1><x2><y2>}`` box (integers 0–100 of
  the image size) has IoU ≥ 0.5 with the ground-truth box.

Several targets (e.g. "each ship") are paired with the answer's masks by the assignment that
maximises the summed IoU (``evaluate.match_targets``; the order in which an answer lists instances
is not determined by the image). Definitions for the edge cases: a target the answer gave no mask
for (no seg run, a malformed one, fewer runs than targets) is scored with an empty prediction (IoU 0, its whole area in the union);
a target with an empty ground truth and an empty prediction has IoU 1 (nothing to find, nothing
found) and adds 0 to both sums of cIoU; an empty ground truth with a non-empty prediction has
IoU 0. Masks beyond the number of targets are counted as ``extra_masks``, not scored. An answer
without a parsable box is a grounding miss.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from geopix.answer_form import box_iou, parse_box_text
from geopix.config import EvalConfig
from geopix.data import schema

BUCKETS = ("small", "medium", "large")


@dataclass
class TargetScore:
    """One ground-truth target against the mask the answer gave for it."""

    record_id: str
    target: int  # index of the target in its record
    class_id: int
    phrase_type: str
    area: int  # ground-truth pixels
    bucket: str
    intersection: int
    union: int
    iou: float
    predicted: bool  # the answer had a mask for this target
    predicted_area: int = 0  # pixels of that mask
    mask_index: int = -1  # which of the answer's masks was paired with this target (−1: none)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_bucket(area: int, cfg: EvalConfig) -> str:
    """The target's bucket with the evaluation's bounds (schema.size_bucket: the one definition)."""
    return schema.size_bucket(area, cfg.small_max_area, cfg.medium_max_area)


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int, float]:
    """(intersection, union, IoU) of two boolean masks of one shape (edge cases: module docstring)."""
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: predicted {predicted.shape}, ground truth {truth.shape}")
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    intersection = int(np.logical_and(predicted, truth).sum())
    union = int(np.logical_or(predicted, truth).sum())
    return intersection, union, 1.0 if union == 0 else intersection / union


def score_sample(
    predicted: Sequence[np.ndarray] | np.ndarray,
    truths: Sequence[np.ndarray] | np.ndarray,
    *,
    record_id: str,
    class_ids: Sequence[int],
    phrase_type: str | None,
    cfg: EvalConfig,
) -> tuple[list[TargetScore], int]:
    """Score the answer's masks against the targets: in order (the k-th seg run is the k-th target),
    or, with ``cfg.match_targets`` and several targets, by the assignment of masks to targets that
    maximises the total IoU (Hungarian); a target left without a mask is a miss.

    Returns (one score per target, number of extra masks)."""
    truths = [np.asarray(t, dtype=bool) for t in truths]
    predicted = [np.asarray(m, dtype=bool) for m in predicted]
    assigned = match_masks(predicted, truths) if cfg.match_targets else dict(enumerate(range(len(predicted))))
    scores = []
    for k, truth in enumerate(truths):
        has_mask = k in assigned and assigned[k] < len(predicted)
        mask = predicted[assigned[k]] if has_mask else np.zeros_like(truth)
        intersection, union, iou = mask_iou(mask, truth)
        area = int(truth.sum())
        scores.append(
            TargetScore(
                record_id=record_id,
                target=k,
                class_id=int(class_ids[k]),
                phrase_type=phrase_type or "unknown",
                area=area,
                bucket=size_bucket(area, cfg),
                intersection=intersection,
                union=union,
                iou=iou,
                predicted=has_mask,
                predicted_area=int(mask.sum()),
                mask_index=assigned[k] if has_mask else -1,
            )
        )
    return scores, max(len(predicted) - len(truths), 0)


def match_masks(predicted: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict[int, int]:
    """target index → predicted index, maximising the summed IoU (Hungarian; order decides ties)."""
    if len(truths) < 2 or len(predicted) < 2:
        return {k: k for k in range(min(len(truths), len(predicted)))}
    from scipy.optimize import linear_sum_assignment

    ious = np.array([[mask_iou(p, t)[2] for p in predicted] for t in truths])  # [targets, masks]
    rows, cols = linear_sum_assignment(-ious)
    return dict(zip(rows.tolist(), cols.tolist(), strict=True))


def summarize_scores(scores: Iterable[TargetScore | Mapping[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """Overall, per-bucket, per-class and per-phrase-type gIoU, cIoU and precision@t."""
    rows = [s.as_dict() if isinstance(s, TargetScore) else dict(s) for s in scores]
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {
        "bucket": defaultdict(list),
        "class_id": defaultdict(list),
        "phrase_type": defaultdict(list),
    }
    for row in rows:
        for key, by_value in groups.items():
            by_value[str(row[key])].append(row)
    return {
        "overall": _summary(rows, cfg),
        "by_bucket": {b: _summary(groups["bucket"][b], cfg) for b in BUCKETS if b in groups["bucket"]},
        "by_class": {k: _summary(v, cfg) for k, v in sorted(groups["class_id"].items(), key=lambda i: int(i[0]))},
        "by_phrase_type": {k: _summary(v, cfg) for k, v in sorted(groups["phrase_type"].items())},
    }


OUTCOMES = ("no mask", "empty mask", "wrong place", "partial", "hit")


def outcome(row: Mapping[str, Any]) -> str:
    """What happened to one target: the answer gave it no mask (too few seg runs), an empty mask, a
    mask that misses it entirely (IoU 0), a partial one (IoU < 0.5), or a hit (IoU ≥ 0.5)."""
    if not row["predicted"]:
        return "no mask"
    if not row.get("predicted_area", 1) and row["area"]:
        return "empty mask"
    if row["iou"] == 0:
        return "wrong place"
    return "partial" if row["iou"] < 0.5 else "hit"


def _summary(rows: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    if not rows:
        return {"targets": 0}
    ious = np.array([r["iou"] for r in rows], dtype=np.float64)
    union = sum(r["union"] for r in rows)
    out = {
        "targets": len(rows),
        "gIoU": float(ious.mean()),
        "cIoU": 1.0 if union == 0 else sum(r["intersection"] for r in rows) / union,
        "answered": sum(bool(r["predicted"]) for r in rows) / len(rows),
    }
    for t in cfg.iou_thresholds:
        out[f"P@{t:g}"] = float((ious >= t).mean())
    counts = Counter(outcome(r) for r in rows)
    out["outcomes"] = {name: counts.get(name, 0) / len(rows) for name in OUTCOMES}
    predicted = sum(r.get("predicted_area", 0) for r in rows if r["predicted"])
    truth = sum(r["area"] for r in rows if r["predicted"])
    out["area_ratio"] = predicted / truth if truth else None  # Σ predicted / Σ true area, answered targets
    return out


# ---------------------------------------------------------------------------------- grounding
def answer_box(text: str, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The first well-formed box of an answer in pixels, or None (no box, or x2 < x1 / y2 < y1)."""
    boxes = parse_box_text(text)
    if not boxes:
        return None
    x1, y1, x2, y2 = boxes[0]
    if x2 < x1 or y2 < y1 or max(boxes[0]) > 100:
        return None
    return (x1 / 100 * width, y1 / 100 * height, x2 / 100 * width, y2 / 100 * height)


def grounding_hit(text: str, truth_box: Sequence[float], width: int, height: int, cfg: EvalConfig) -> bool:
    box = answer_box(text, width, height)
    return box is not None and box_iou(box, truth_box) >= cfg.grounding_iou
