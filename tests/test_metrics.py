"""Evaluation metrics against an independent computation (pycocotools) on random and edge-case
masks and boxes."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from geopix.config import EvalConfig
from geopix.evaluate.metrics import (
    answer_box,
    box_iou,
    grounding_hit,
    mask_iou,
    score_sample,
    size_bucket,
    summarize_scores,
)

CFG = EvalConfig(match_targets=False)  # the k-th mask against the k-th target
MATCHED = EvalConfig()  # several targets: Hungarian pairing (the default)


def rle(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


def coco_area(masks: list[np.ndarray], intersect: bool) -> int:
    return int(coco_mask.area(coco_mask.merge([rle(m) for m in masks], intersect=intersect)))


def random_masks(rng, count: int, size: int = 48) -> list[np.ndarray]:
    """Blobs of random extent and density (some nearly empty, some nearly full)."""
    masks = []
    for _ in range(count):
        mask = np.zeros((size, size), bool)
        x0, y0 = rng.integers(0, size - 2, 2)
        x1, y1 = x0 + rng.integers(1, size - x0), y0 + rng.integers(1, size - y0)
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.uniform(0.3, 1.0)
        masks.append(mask)
    return masks


def test_mask_iou_and_ciou_match_pycocotools():
    rng = np.random.default_rng(0)
    predicted, truths = random_masks(rng, 60), random_masks(rng, 60)
    scores, extra = score_sample(predicted, truths, record_id="r", class_ids=[0] * 60, phrase_type="class",
                                 cfg=CFG)
    assert extra == 0
    for p, t, s in zip(predicted, truths, scores, strict=True):
        expected = coco_mask.iou([rle(p)], [rle(t)], [0])[0][0]
        assert s.iou == pytest.approx(expected, abs=1e-12)
        assert s.intersection == coco_area([p, t], intersect=True)
        assert s.union == coco_area([p, t], intersect=False)
        assert s.area == int(coco_mask.area(rle(t)))
    summary = summarize_scores(scores, CFG)["overall"]
    total_i = sum(coco_area([p, t], True) for p, t in zip(predicted, truths, strict=True))
    total_u = sum(coco_area([p, t], False) for p, t in zip(predicted, truths, strict=True))
    assert summary["cIoU"] == pytest.approx(total_i / total_u)
    ious = [coco_mask.iou([rle(p)], [rle(t)], [0])[0][0] for p, t in zip(predicted, truths, strict=True)]
    assert summary["gIoU"] == pytest.approx(np.mean(ious))
    for t in CFG.iou_thresholds:
        assert summary[f"P@{t:g}"] == pytest.approx(np.mean(np.array(ious) >= t))


def test_edge_cases_are_defined():
    empty, full = np.zeros((8, 8), bool), np.ones((8, 8), bool)
    assert mask_iou(empty, full) == (0, 64, 0.0)  # nothing predicted
    assert mask_iou(full, empty) == (0, 64, 0.0)  # something where there is nothing
    assert mask_iou(empty, empty) == (0, 0, 1.0)  # nothing to find, nothing found
    with pytest.raises(ValueError, match="mask shapes differ"):
        mask_iou(np.zeros((4, 4)), np.zeros((4, 5)))
    # An answer with one seg run for two targets: the second target is a miss, not a crash.
    scores, extra = score_sample([full], [full, full], record_id="r", class_ids=[1, 2], phrase_type=None,
                                 cfg=CFG)
    assert [s.iou for s in scores] == [1.0, 0.0] and [s.predicted for s in scores] == [True, False]
    assert scores[1].union == 64 and extra == 0 and scores[0].phrase_type == "unknown"
    # No seg run at all, and more runs than targets.
    scores, _ = score_sample([], [full], record_id="r", class_ids=[1], phrase_type="class", cfg=CFG)
    assert scores[0].iou == 0.0
    _, extra = score_sample([full, full, empty], [full], record_id="r", class_ids=[1], phrase_type="x",
                            cfg=CFG)
    assert extra == 2
    summary = summarize_scores(scores, CFG)["overall"]
    assert summary["gIoU"] == 0.0 and summary["cIoU"] == 0.0 and summary["answered"] == 0.0
    assert summarize_scores([], CFG)["overall"] == {"targets": 0}


def test_size_buckets_follow_coco_and_are_configurable():
    assert [size_bucket(a, CFG) for a in (0, 1023, 1024, 9215, 9216)] == [
        "small", "small", "medium", "medium", "large"]
    custom = EvalConfig(small_max_area=10, medium_max_area=20)
    assert [size_bucket(a, custom) for a in (9, 10, 19, 20)] == ["small", "medium", "medium", "large"]
    rng = np.random.default_rng(1)
    truths = [np.zeros((128, 128), bool) for _ in range(3)]
    truths[0][:10, :10] = True  # 100 px: small
    truths[1][:40, :40] = True  # 1600 px: medium
    truths[2][:100, :100] = True  # 10000 px: large
    predicted = [t & (rng.random(t.shape) < 0.5) for t in truths]
    scores, _ = score_sample(predicted, truths, record_id="r", class_ids=[0, 1, 1], phrase_type="size rank",
                             cfg=CFG)
    summary = summarize_scores(scores, CFG)
    assert list(summary["by_bucket"]) == ["small", "medium", "large"]
    assert all(v["targets"] == 1 for v in summary["by_bucket"].values())
    assert summary["by_class"]["1"]["targets"] == 2 and summary["by_phrase_type"]["size rank"]["targets"] == 3
    assert summary["by_bucket"]["large"]["gIoU"] == pytest.approx(scores[2].iou)


def random_box(rng) -> list[float]:
    (x1, x2), (y1, y2) = np.sort(rng.uniform(0, 100, 2)), np.sort(rng.uniform(0, 100, 2))
    return [x1, y1, x2, y2]


def test_box_iou_matches_pycocotools():
    rng = np.random.default_rng(2)
    for _ in range(200):
        a, b = random_box(rng), random_box(rng)
        xywh = [[box[0], box[1], box[2] - box[0], box[3] - box[1]] for box in (a, b)]
        expected = coco_mask.iou([xywh[0]], [xywh[1]], [0])[0][0]
        assert box_iou(a, b) == pytest.approx(expected, abs=1e-9)
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_grounding_answers_are_parsed_and_malformed_ones_miss():
    truth = (20.0, 40.0, 120.0, 140.0)  # pixels in a 200 × 200 image
    assert answer_box("It is at {<10><20><60><70>}.", 200, 200) == (20.0, 40.0, 120.0, 140.0)
    assert grounding_hit("It is at {<10><20><60><70>}.", truth, 200, 200, CFG)
    assert grounding_hit("{<12><22><62><72>} and {<90><90><99><99>}", truth, 200, 200, CFG)  # first box
    assert not grounding_hit("{<60><20><70><30>}", truth, 200, 200, CFG)  # elsewhere
    for malformed in ("no box here", "{<10><20><60>}", "{<60><70><10><20>}", "{<10><20><60><170>}", ""):
        assert answer_box(malformed, 200, 200) is None
        assert not grounding_hit(malformed, truth, 200, 200, CFG)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_pairs_masks_with_targets_by_best_total_iou(seed):
    """Several targets: the Hungarian pairing reaches the best total IoU over every permutation
    (computed with pycocotools), and a shuffled perfect answer scores 1 instead of 0."""
    import itertools

    rng = np.random.default_rng(seed)
    predicted, truths = random_masks(rng, 5), random_masks(rng, 4)
    scores, extra = score_sample(predicted, truths, record_id="r", class_ids=[0] * 4, phrase_type="all_of_class",
                                 cfg=MATCHED)
    assert extra == 1
    ious = coco_mask.iou([rle(p) for p in predicted], [rle(t) for t in truths], [0] * 4)  # [pred, truth]
    best = max(sum(ious[perm[k], k] for k in range(4)) for perm in itertools.permutations(range(5), 4))
    assert sum(s.iou for s in scores) == pytest.approx(best, abs=1e-9)

    shuffled = [truths[k] for k in (2, 0, 3, 1)]
    matched, _ = score_sample(shuffled, truths, record_id="r", class_ids=[0] * 4, phrase_type="x", cfg=MATCHED)
    in_order, _ = score_sample(shuffled, truths, record_id="r", class_ids=[0] * 4, phrase_type="x", cfg=CFG)
    assert all(s.iou == 1.0 for s in matched) and [s.mask_index for s in matched] == [1, 3, 0, 2]
    assert sum(s.iou for s in in_order) < 4
    fewer, _ = score_sample(truths[:2], truths, record_id="r", class_ids=[0] * 4, phrase_type="x", cfg=MATCHED)
    assert [s.predicted for s in fewer].count(True) == 2 and sorted(s.iou for s in fewer) == [0, 0, 1, 1]


def test_the_generator_and_the_evaluation_bucket_every_area_alike():
    """One definition (schema.size_bucket): at exactly 32² and 96² px too."""
    from geopix.data import synth

    for area in (0, 1023, 1024, 1025, 9215, 9216, 9217, 10**6):
        assert synth.size_bucket(area) == size_bucket(area, CFG), area
    assert [synth.size_bucket(a) for a in (1023, 1024, 9215, 9216)] == ["small", "medium", "medium", "large"]
