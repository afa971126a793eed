"""Instances across window seams on a synthetic scene with ground truth: the same scene segmented
twice in one run, seg runs joined across seams (``segment.instance_match_iou`` as configured) and
not joined (1.0: every window's runs are their own instances, the baseline), each scored against
the scene's true instance raster (geopix.evaluate.scene_scores.instance_scores), and a picture of
one seam region with the instance outlines of both.

    eval "$(geopix stack env)"
    .venv/bin/python bench/seam_instances.py --model s3://geopix-checkpoints/models/<a tiny model> \
        [--size 4096] [--picture docs/images/segment_instances_seam.png] [--json docs/benchmarks/seam_instances.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from segment_throughput import OUT, scene

from geopix import storage
from geopix.config import add_overrides_argument, load_config
from geopix.evaluate.scene_scores import instance_scores
from geopix.infer.scene_reader import open_scene, plan_windows
from geopix.infer.segment import INSTANCES_FILE, MASK_FILE, segment_scenes
from geopix.model.configuration import saved_model_config

NOT_JOINED = 1.0  # IoU > 1 never holds: each seg run stays its own instance


def segment(cfg, model: str, image_uri: str, match_iou: float, label: str):
    seg = cfg.segment.model_copy(update={"instance_match_iou": match_iou})
    started = time.perf_counter()
    [result] = segment_scenes(cfg.model_copy(update={"segment": seg}), model, [image_uri], OUT,
                              scene_ids=[label], overwrite=True)  # fmt: skip
    assert result.status == "done", result
    return result, time.perf_counter() - started


def stitch_truth(info, windows, truth_uri: str, classes_uri: str, match_iou: float, work: Path) -> dict:
    """The stitcher alone at scene scale: every window answered with the true objects it holds (one
    seg run each, as a perfect model would), joined by the same rule, scored as the model's output."""
    import rasterio

    from geopix.infer.instances import InstanceStitcher

    stitcher = InstanceStitcher(info, windows, work / "provisional.tif", match_iou)
    with storage.rasterio_env(), rasterio.open(truth_uri) as gt, rasterio.open(classes_uri) as cl:
        profile = cl.profile | {"driver": "GTiff", "nodata": None}
        with rasterio.open(work / "mask.tif", "w", **profile) as mask:  # the class raster a perfect model gives
            truth_classes = cl.read(1)
            mask.write(np.where(truth_classes == 255, 0, truth_classes + 1).astype(np.uint8)[None])
        for window in windows:
            col, row, width, height = window.read
            rio_window = rasterio.windows.Window(col, row, width, height)
            ids = gt.read(1, window=rio_window, boundless=True, fill_value=0)
            class_ids = cl.read(1, window=rio_window, boundless=True, fill_value=255)
            present = [int(v) for v in np.unique(ids) if v]
            local = np.zeros(ids.shape, np.uint16)
            for k, truth_id in enumerate(present, start=1):
                local[ids == truth_id] = k
            runs = [(int(class_ids[ids == t][0]), 0) for t in present]
            if runs:
                stitcher.add(window, local, runs, np.where(local > 0, 100, 0).astype(np.uint8))
            else:
                stitcher.add_empty(window)
    stats = stitcher.finish(work / "instances.tif", work / "instances.parquet", [], ["truth"])
    scores = instance_scores(str(work / "instances.tif"), truth_uri, windows, mask_uri=str(work / "mask.tif"),
                             truth_classes_uri=classes_uri, class_names=[])  # fmt: skip
    return {"scores": scores, "run": {"instances": stats.instances, "seg_runs": stats.seg_runs,
                                      "seam_matches": stats.seam_matches, "across_windows": stats.across_windows}}  # fmt: skip


def seam_picture(image_uri: str, truth_uri: str, outputs: dict[str, str], windows, path: Path) -> None:
    """The seam region (two windows' width around one vertical seam) that the most output instances
    (of the last output) cross, with the true objects' and each output's instance outlines, one
    colour per instance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from rasterio.windows import Window as RioWindow
    from scipy import ndimage

    size = windows[0].read[2]
    seams = sorted({w.keep[0] for w in windows if w.keep[0] > 0})
    rows = sorted({w.keep[1] for w in windows})
    with storage.rasterio_env(), rasterio.open(list(outputs.values())[-1]) as joined:
        best, where = -1, (seams[0], rows[0])
        for seam in seams:
            for row in rows:
                strip = joined.read(1, window=RioWindow(seam - 2, row, 4, size))
                left, right = set(np.unique(strip[:, :2])) - {0}, set(np.unique(strip[:, 2:])) - {0}
                if len(left & right) > best:
                    best, where = len(left & right), (seam, row)
    seam, row = where
    box = RioWindow(max(seam - size, 0), row, 2 * size, size)
    with storage.rasterio_env():
        with rasterio.open(image_uri) as src:
            image = np.moveaxis(src.read([1, 2, 3], window=box, boundless=True), 0, -1)
        crops = {}
        for name, uri in {"true objects": truth_uri, **outputs}.items():
            with rasterio.open(uri) as ds:
                crops[name] = ds.read(1, window=box, boundless=True)
    fig, axes = plt.subplots(1, len(crops), figsize=(5 * len(crops), 3.0), dpi=110)
    rng = np.random.default_rng(0)
    for ax, (name, ids) in zip(axes, crops.items(), strict=True):
        ax.imshow(image)
        colours = rng.uniform(0.2, 1.0, size=(int(ids.max()) + 1, 3))
        edges = (ids != ndimage.grey_erosion(ids, size=3)) & (ids > 0)
        overlay = np.zeros((*ids.shape, 4))
        overlay[edges, :3] = colours[ids[edges]]
        overlay[edges, 3] = 1.0
        ax.imshow(overlay)
        ax.axvline(seam - box.col_off - 0.5, color="white", linestyle="--", linewidth=1)
        count = len(np.unique(ids[ids > 0]))
        ax.set_title(f"{name}: {count} instances in view", fontsize=10)
        ax.set_axis_off()
    fig.suptitle(f"seam at column {seam} (dashed), rows {row}–{row + size}: one outline colour per instance", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--instruction", default="[segment] Segment all storage tanks.")
    parser.add_argument("--picture", type=Path, default=Path("docs/images/segment_instances_seam.png"))
    parser.add_argument("--json", type=Path, default=None)
    add_overrides_argument(parser)
    args = parser.parse_args()

    import ray

    ray.init(log_to_driver=False)
    cfg = load_config("tiny", [f"segment.instructions=['{args.instruction}']", *args.overrides])
    seg = cfg.segment
    image_uri, classes_uri = scene(args.size)
    truth_uri = image_uri.replace("image.tif", "instances.tif")
    window = seg.window_size or saved_model_config(args.model).image_size
    info = open_scene(image_uri, seg)
    windows = plan_windows(info.width, info.height, window, seg.overlap)
    figures: dict = {"model": args.model, "scene": f"{args.size}²", "windows": len(windows), "window": window,
                     "overlap": seg.overlap, "instruction": args.instruction}  # fmt: skip
    outputs = {}
    class_names = list(saved_model_config(args.model).class_names)
    for name, match_iou in (("not joined", NOT_JOINED), (f"joined (IoU > {seg.instance_match_iou})", seg.instance_match_iou)):
        result, seconds = segment(cfg, args.model, image_uri, match_iou, f"s{args.size}-instances-{match_iou}")
        uri = storage.join_uri(result.out_uri, INSTANCES_FILE)
        outputs[name] = uri
        scores = instance_scores(uri, truth_uri, windows, mask_uri=storage.join_uri(result.out_uri, MASK_FILE),
                                 truth_classes_uri=classes_uri, class_names=class_names)  # fmt: skip
        figures[name] = {
            "scores": scores,
            "run": result.metadata["instances"],
            "instances_s": result.metadata["timings"]["instances_s"],
            "seconds": round(seconds, 1),
        }
    with tempfile.TemporaryDirectory() as tmp:
        figures["truth as answers"] = stitch_truth(info, windows, truth_uri, classes_uri, seg.instance_match_iou, Path(tmp))
    seam_picture(image_uri, truth_uri, outputs, windows, args.picture)
    print(json.dumps(figures, indent=1, default=float))
    print(f"\n{figures['scene']} scene, {len(windows)} windows of {window} px, overlap {seg.overlap}:")
    for name in [*outputs, "truth as answers"]:
        s, run = figures[name]["scores"], figures[name]["run"]
        print(f"  {name:24s} instances {run['instances']:5d} (seg runs {run['seg_runs']}, seam matches {run['seam_matches']}); "
              f"P {s['precision']:.3f} R {s['recall']:.3f} at IoU 0.5; true objects across seams {s['across_seams']}, "
              f"found in every part {s['across_seams_found_in_every_part']}, one instance {s['across_seams_one_instance']} "
              f"= {s['one_instance_share']:.1%}; finishing instances {figures[name].get('instances_s', float('nan')):.1f} s")  # fmt: skip
        for cls, c in s["per_class"].items():
            if c["predicted"]:
                print(f"      {cls:18s} predicted {c['predicted']:4d} true {c['true']:4d} matched {c['matched']:4d}: "
                      f"P {c['precision']:.3f} R {c['recall']:.3f}")  # fmt: skip
    print(f"  picture: {args.picture}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
