"""Instances across window seams (geopix/infer/instances.py), without a model: windows answered
from a known instance raster, as a perfect model would, arrive in any order; each object must come
out as one instance, and objects that only touch must stay apart."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from geopix.config import SegmentConfig
from geopix.infer.instances import InstanceStitcher, grid_neighbours
from geopix.infer.scene_reader import Scaling, SceneInfo, plan_windows

SIZE, WINDOW, OVERLAP = 200, 64, 16
GSD = 0.5
MATCH_IOU = SegmentConfig().instance_match_iou


def scene_info(size: int = SIZE) -> SceneInfo:
    transform = from_origin(583_000.0, 4_511_000.0, GSD, GSD)
    return SceneInfo(
        uri="memory://truth", scene_id="truth", width=size, height=size, count=3, dtype="uint8",
        crs=CRS.from_epsg(32618).to_wkt(), transform=tuple(transform)[:6], nodata=0, block_shape=(256, 256),
        bands=(1, 2, 3), scaling=Scaling(), checksum="0",
    )  # fmt: skip


def truth_scene(seed: int = 0) -> tuple[np.ndarray, dict[int, int]]:
    """A [SIZE, SIZE] instance raster (0 background) and each instance's class: rectangles of
    random size anywhere (many across seams), among them pairs of one class that touch."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((SIZE, SIZE), np.uint32)
    classes: dict[int, int] = {}
    next_id = 1
    for _ in range(40):
        h, w = rng.integers(4, 40, size=2)
        y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
        if ids[y : y + h, x : x + w].any():
            continue
        ids[y : y + h, x : x + w] = next_id
        classes[next_id] = int(rng.integers(0, 3))
        next_id += 1
    # Two objects of one class side by side across the seam at column 56 (windows 0–64 and 48–112),
    # touching along a whole edge: one mask each, never joined.
    ids[150:170, 40:60] = 0
    ids[150:170, 60:80] = 0
    ids[150:170, 40:60], ids[150:170, 60:80] = next_id, next_id + 1
    classes[next_id] = classes[next_id + 1] = 1
    return ids, classes


def window_answers(ids: np.ndarray, window, classes: dict[int, int]) -> tuple[np.ndarray, list, np.ndarray]:
    """What a perfect model answers for one window: local ids 1…k, (class, instruction) per id."""
    col, row, width, height = window.read
    crop = np.zeros((height, width), np.uint32)
    inside = ids[row : row + height, col : col + width]
    crop[: inside.shape[0], : inside.shape[1]] = inside
    present = [int(v) for v in np.unique(crop) if v]
    local = np.zeros(crop.shape, np.uint16)
    for k, truth_id in enumerate(present, start=1):
        local[crop == truth_id] = k
    return local, [(classes[t], 0) for t in present], np.where(local > 0, 90, 0).astype(np.uint8)


def stitch(ids, classes, tmp_path, order, answer=window_answers, size=SIZE, overlap=OVERLAP):
    windows = plan_windows(size, size, WINDOW, overlap)
    stitcher = InstanceStitcher(scene_info(size), windows, tmp_path / "provisional.tif", MATCH_IOU)
    most_pending = 0
    for index in order(len(windows)):
        window = windows[index]
        local, instances, confidence = answer(ids, window, classes)
        if instances:
            stitcher.add(window, local, instances, confidence)
        else:
            stitcher.add_empty(window)
        most_pending = max(most_pending, len(stitcher.pending))
    stats = stitcher.finish(tmp_path / "instances.tif", tmp_path / "instances.parquet", ["a", "b", "c"], ["find"])
    with rasterio.open(tmp_path / "instances.tif") as ds:
        final = ds.read(1)
    return final, stats, most_pending, stitcher, windows


def pairs(final: np.ndarray, truth: np.ndarray) -> set[tuple[int, int]]:
    both = (final > 0) | (truth > 0)
    return set(zip(final[both].tolist(), truth[both].tolist(), strict=True))


@pytest.mark.parametrize("arrival", ["row-major", "shuffled", "reversed"])
def test_every_object_is_one_instance_whatever_order_the_windows_arrive_in(tmp_path, arrival):
    truth, classes = truth_scene()
    orders = {
        "row-major": lambda n: range(n),
        "shuffled": lambda n: np.random.default_rng(1).permutation(n).tolist(),
        "reversed": lambda n: range(n - 1, -1, -1),
    }
    final, stats, _, stitcher, windows = stitch(truth, classes, tmp_path, orders[arrival])
    # A bijection between true objects and output instances, pixel for pixel.
    matched = pairs(final, truth)
    assert all(f > 0 and t > 0 for f, t in matched)
    assert len(matched) == len({f for f, _ in matched}) == len({t for _, t in matched}) == len(classes)
    assert stats.instances == len(classes)
    crossing = sum(len({w for w in range(len(windows)) if _keeps(windows[w], truth, t)}) > 1 for t in classes)
    assert crossing >= 10 and stats.across_windows >= crossing  # many objects lie across seams
    assert not stitcher.pending  # everything was let go once its neighbours were in

    table = pq.read_table(tmp_path / "instances.parquet").to_pylist()
    assert sorted(r["instance_id"] for r in table) == list(range(1, len(classes) + 1))
    for r in table:
        assert r["pixels"] == int((final == r["instance_id"]).sum())
        assert r["area_m2"] == pytest.approx(r["pixels"] * GSD * GSD)
        assert r["score"] == pytest.approx(0.9) and r["instructions"] == ["find"]
        truth_id = next(t for f, t in matched if f == r["instance_id"])
        assert r["class_name"] == "abc"[classes[truth_id]]
        assert set(r["windows"]) == {w.index for w in windows if (_seen(w, truth, truth_id))}
    geo = json.loads(pq.read_schema(tmp_path / "instances.parquet").metadata[b"geo"])
    assert CRS.from_user_input(json.dumps(geo["columns"]["geometry"]["crs"])) == CRS.from_epsg(32618)


def _keeps(window, truth, truth_id) -> bool:
    col, row, width, height = window.keep
    return bool((truth[row : row + height, col : col + width] == truth_id).any())


def _seen(window, truth, truth_id) -> bool:
    col, row, width, height = window.read
    return bool((truth[row : row + height, col : col + width] == truth_id).any())


def test_without_overlap_or_with_disagreeing_windows_nothing_is_joined(tmp_path):
    truth, classes = truth_scene()
    # Windows that touch without overlapping have nothing to compare: every seam cuts its objects.
    final, stats, *_ = stitch(truth, classes, tmp_path, lambda n: range(n), overlap=0)
    assert stats.seam_matches == 0 and stats.instances > len(classes)

    # One window calls every object another class: no object is joined through it.
    def other_class_in_window_0(ids, window, classes):
        local, instances, confidence = window_answers(ids, window, classes)
        if window.index == 0:
            instances = [((c + 1) % 3, i) for c, i in instances]
        return local, instances, confidence

    (tmp_path / "b").mkdir()
    final, stats, *_ = stitch(truth, classes, tmp_path / "b", lambda n: range(n), answer=other_class_in_window_0)
    cut = [t for t in classes if _keeps_in(truth, t, 0, 56) and _spills(truth, t, 56)]
    assert cut
    for t in cut:
        assert len({int(v) for v in np.unique(final[truth == t])}) >= 2  # window 0's part is its own instance


def _keeps_in(truth, t, lo, hi) -> bool:
    return bool((truth[:56, lo:hi] == t).any())


def _spills(truth, t, seam) -> bool:
    return bool((truth[:56, seam:] == t).any())


def test_a_shifted_mask_still_joins_and_a_half_mask_does_not(tmp_path):
    ids = np.zeros((SIZE, SIZE), np.uint32)
    ids[10:30, 40:70] = 1  # across the seam at column 56 (windows 0–64 and 48–112), inside the overlap 48–64
    classes = {1: 0}

    def shifted(by):
        def answer(truth, window, classes):
            local, instances, confidence = window_answers(truth, window, classes)
            if window.index == 1:  # the second window sees the object shifted by `by` rows
                local = np.roll(local, by, axis=0)
            return local, instances, confidence

        return answer

    for by, joined in ((2, True), (12, False)):  # IoU in the overlap 18/22 against 8/32
        (tmp_path / str(by)).mkdir()
        _, stats, *_ = stitch(ids, classes, tmp_path / str(by), lambda n: range(n), answer=shifted(by))
        assert (stats.seam_matches == 1) is joined, (by, stats)


def test_pending_windows_stay_within_two_rows_of_the_grid(tmp_path):
    """Memory does not grow with the scene: windows arriving row by row are let go once the row
    below them has passed."""
    size = 600
    ids = np.zeros((size, size), np.uint32)
    for k, y in enumerate(range(5, size - 20, 37)):
        ids[y : y + 15, 20 : size - 20] = k + 1  # long objects across every seam of their rows
    classes = dict.fromkeys(range(1, k + 2), 0)
    _, stats, most_pending, _, windows = stitch(ids, classes, tmp_path, lambda n: range(n), size=size)
    columns = len({w.read[0] for w in windows})
    assert most_pending <= columns + 2
    assert stats.instances == len(classes)  # each long object is one instance over all its windows


def test_grid_neighbours_are_the_eight_around():
    windows = plan_windows(SIZE, SIZE, WINDOW, OVERLAP)  # 4 × 4
    neighbours = grid_neighbours(windows)
    assert sorted(neighbours[0]) == [1, 4, 5] and len(neighbours[5]) == 8 and len(neighbours[15]) == 3


def test_instance_scores_count_objects_across_seams_as_one_only_when_joined(tmp_path):
    from geopix.evaluate.scene_scores import instance_scores

    truth, classes = truth_scene()
    info = scene_info()
    class_of = np.full(truth.max() + 1, 255, np.uint8)
    class_of[list(classes)] = list(classes.values())
    rasters = {"truth.tif": truth, "truth_classes.tif": class_of[truth],  # what the synthetic scenes have
               "mask.tif": np.where(truth > 0, class_of[truth] + 1, 0).astype(np.uint8)}  # a perfect class raster
    for name, data in rasters.items():
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=SIZE, height=SIZE, count=1, dtype=data.dtype,
                           crs=info.crs, transform=rasterio.Affine(*info.transform)) as ds:  # fmt: skip
            ds.write(data[None])
    scores = {}
    for overlap in (OVERLAP, 0):  # joined across seams / nothing to join with
        (tmp_path / str(overlap)).mkdir()
        stitch(truth, classes, tmp_path / str(overlap), lambda n: range(n), overlap=overlap)
        windows = plan_windows(SIZE, SIZE, WINDOW, overlap)
        scores[overlap] = instance_scores(
            str(tmp_path / str(overlap) / "instances.tif"), str(tmp_path / "truth.tif"), windows,
            mask_uri=str(tmp_path / "mask.tif"), truth_classes_uri=str(tmp_path / "truth_classes.tif"),
            class_names=["a", "b", "c"],
        )  # fmt: skip
    joined, cut = scores[OVERLAP], scores[0]
    assert joined["precision"] == joined["recall"] == 1.0 and joined["true"] == len(classes)
    assert sum(c["true"] for c in joined["per_class"].values()) == len(classes)
    assert all(c["precision"] == c["recall"] == 1.0 for c in joined["per_class"].values())
    assert joined["across_seams"] >= 10 and joined["one_instance_share"] == 1.0
    assert cut["across_seams"] >= 5 and cut["across_seams_found_in_every_part"] == cut["across_seams"]
    assert cut["one_instance_share"] == 0.0 and cut["predicted"] > cut["true"] and cut["precision"] < 1.0
