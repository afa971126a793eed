"""Batch segmentation: throughput against a sequential loop and the model-only bound, the
teacher-forced batch mode against token-by-token decoding, peak memory as the scene grows, and
ground-truth IoU on a synthetic scene. One run, every figure a ratio to a baseline of the same run.

    eval "$(geopix stack env)"
    .venv/bin/python bench/segment_throughput.py --model s3://geopix-checkpoints/models/<a tiny model> \
        [--size 4096] [--big 16384] [--memory-window 1024] [--keep-class storage_tank]

1. Synthetic scenes (`geopix data synth`'s scene generator, cached under s3://geopix-scenes/bench/).
2. Model-only bound: the segmenter answering the same windows already in memory, in this process,
   with the threads one actor gets; × the actor count = the most the pipeline could do.
3. Sequential loop: the same windows read one by one from S3 → answered → written to a GeoTIFF,
   in one process. 4. The pipeline (segment_scenes) over the whole scene.
5. Teacher-forced vs generate on the preloaded windows: speed, and the share of windows whose masks
   are identical (those where greedy decoding writes the forced answer form).
6. Peak memory (driver + Ray workers, sampled) segmenting the small and the big scene.
7. Ground-truth IoU of the scene's output per class (with and without --keep-class).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np
import psutil

from geopix import storage
from geopix.config import add_overrides_argument, load_config
from geopix.data import synth
from geopix.evaluate.scene_scores import scene_scores
from geopix.infer.instances import InstanceStitcher
from geopix.infer.scene_reader import open_scene, plan_windows, read_chunk
from geopix.infer.segment import MASK_FILE, WindowSegmenter, segment_scenes
from geopix.infer.stitch import MaskWriter
from geopix.model.configuration import saved_model_config

SCENES = "s3://geopix-scenes/bench"
OUT = "s3://geopix-predictions/bench"


def scene(size: int) -> tuple[str, str]:
    """(image URI, classes URI) of the cached synthetic scene of this size."""
    prefix = f"{SCENES}/s{size}"
    if not storage.list_files(prefix, "scene.json"):
        started = time.perf_counter()
        synth.generate_scene(SCENES, f"s{size}", size, seed=11)
        print(f"generated the {size}² scene in {time.perf_counter() - started:.0f} s")
    return f"{prefix}/image.tif", f"{prefix}/classes.tif"


class PeakMemory:
    """Samples, every 0.5 s, the memory of this process and of every Ray worker process (``ray::…``):
    RSS, and USS (pages private to the process). RSS also counts the pages of Ray's shared object
    store a process has touched, so it grows with the number of blocks read even when nothing is
    kept; USS does not, and is what the flatness target is measured on."""

    def __init__(self):
        self.driver = self.workers = self.total = self.total_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            driver, rss = me.memory_full_info().uss, me.memory_info().rss
            workers = 0
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::"):
                    try:
                        info = p.memory_full_info()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    workers += info.uss
                    rss += info.rss
            self.driver, self.workers = max(self.driver, driver), max(self.workers, workers)
            self.total, self.total_rss = max(self.total, driver + workers), max(self.total_rss, rss)
            time.sleep(0.5)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds else 0.0


def memory_runs(args, cfg) -> dict:
    """Peak memory segmenting the small and the big scene (larger windows, so the big scene takes
    minutes, not hours)."""
    seg = cfg.segment
    memory_cfg = cfg.model_copy(update={"segment": seg.model_copy(update={"window_size": args.memory_window})})
    peaks = {}
    for side in (args.size, args.big):
        uri, _ = scene(side)
        with PeakMemory() as memory:
            started = time.perf_counter()
            [r] = segment_scenes(memory_cfg, args.model, [uri], OUT, scene_ids=[f"s{side}-mem"], overwrite=True)
        assert r.status == "done", r
        peaks[side] = {"total_mb": memory.total / 2**20, "total_rss_mb": memory.total_rss / 2**20,
                       "driver_mb": memory.driver / 2**20, "workers_mb": memory.workers / 2**20,
                       "windows": r.windows, "seconds": time.perf_counter() - started}  # fmt: skip
    return peaks | {"ratio_big_to_small": peaks[args.big]["total_mb"] / peaks[args.size]["total_mb"],
                    "rss_ratio_big_to_small": peaks[args.big]["total_rss_mb"] / peaks[args.size]["total_rss_mb"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--big", type=int, default=16384, help="0 skips the memory comparison")
    parser.add_argument("--memory-window", type=int, default=1024, help="window size of the memory runs")
    parser.add_argument("--instruction", default="[segment] Segment all storage tanks.")
    parser.add_argument("--keep-class", action="append", default=None)
    parser.add_argument("--only-memory", action="store_true", help="only the peak-memory comparison")
    add_overrides_argument(parser)
    args = parser.parse_args()

    import ray

    ray.init(log_to_driver=False)
    cfg = load_config("tiny", [f"segment.instructions=['{args.instruction}']", *args.overrides])
    seg = cfg.segment
    model_cfg = saved_model_config(args.model)
    size = seg.window_size or model_cfg.image_size
    image_uri, classes_uri = scene(args.size)
    info = open_scene(image_uri, seg)
    windows = plan_windows(info.width, info.height, size, seg.overlap)
    if args.only_memory:
        print(json.dumps(memory_runs(args, cfg), indent=1, default=float))
        return
    figures: dict = {"scene": f"{args.size}²", "windows": len(windows), "window": size, "overlap": seg.overlap,
                     "batch_size": seg.batch_size, "actors": seg.concurrency, "threads_per_actor": seg.threads_per_actor}  # fmt: skip

    # Sequential loop over every window (read one → answer → write), which also gives the
    # windows with data for the model-only bound.
    import torch

    torch.set_num_threads(seg.threads_per_actor)
    segmenter = WindowSegmenter(args.model, cfg.for_workers(), seg.threads_per_actor, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        writer = MaskWriter(info, Path(tmp) / "sequential.tif", list(model_cfg.class_names))
        instances = InstanceStitcher(info, windows, Path(tmp) / "sequential-instances.tif", seg.instance_match_iou)
        started = time.perf_counter()
        pending, preload, answered = [], [], 0

        def write(window, answer) -> None:  # what the pipeline's driver does with each window
            writer.write(window, answer.raster)
            instances.add(window, answer.instance_ids, answer.instances, answer.raster[1])

        for window in windows:
            [(w, image, valid)] = list(read_chunk(info, [window]))
            if not valid.any():
                continue
            pending.append((w, image, valid))
            preload.append((image, valid))  # every window with data: the bound runs on the same windows
            if len(pending) == seg.batch_size:
                for (pw, _, _), answer in zip(pending, segmenter.segment([p[1] for p in pending], [p[2] for p in pending]), strict=True):
                    write(pw, answer)
                answered += len(pending)
                pending = []
        if pending:
            for (pw, _, _), answer in zip(pending, segmenter.segment([p[1] for p in pending], [p[2] for p in pending]), strict=True):
                write(pw, answer)
            answered += len(pending)
        writer.close()
        instances.close()
        sequential_s = time.perf_counter() - started
    figures["windows_with_data"] = answered
    figures["sequential_windows_per_s"] = rate(answered, sequential_s)

    def bound(decode: str) -> tuple[float, list]:
        segmenter.cfg = seg.model_copy(update={"decode": decode})
        out, started = [], time.perf_counter()
        for i in range(0, len(preload), seg.batch_size):
            chunk = preload[i : i + seg.batch_size]
            out += segmenter.segment([c[0] for c in chunk], [c[1] for c in chunk])
        return rate(len(preload), time.perf_counter() - started), out

    per_actor, generated = bound("generate")
    figures["model_only_windows_per_s"] = per_actor * seg.concurrency
    forced_rate, forced = bound("teacher_forced")
    same = [bool(np.array_equal(a.raster, b.raster)) for a, b in zip(generated, forced, strict=True)]
    agree = np.mean([(a.raster[0] == b.raster[0]).mean() for a, b in zip(generated, forced, strict=True)])
    figures["teacher_forced"] = {"windows_per_s": forced_rate, "speedup_over_generate": forced_rate / per_actor,
                                 "windows_identical": float(np.mean(same)), "pixel_agreement": float(agree)}  # fmt: skip

    # The pipeline over the whole scene.
    with PeakMemory() as memory:
        started = time.perf_counter()
        [result] = segment_scenes(cfg, args.model, [image_uri], OUT, scene_ids=[f"s{args.size}"], overwrite=True)
        pipeline_s = time.perf_counter() - started
    assert result.status == "done", result
    windows_s = result.metadata["timings"]["windows_s"]
    figures["pipeline"] = {
        "windows_per_s": rate(answered, windows_s), "total_s": pipeline_s, "timings": result.metadata["timings"],
        "vs_model_only": rate(answered, windows_s) / figures["model_only_windows_per_s"],
        "speedup_over_sequential": rate(answered, windows_s) / figures["sequential_windows_per_s"],
        "peak_uss_mb": {"driver": memory.driver / 2**20, "workers": memory.workers / 2**20, "total": memory.total / 2**20},
        "out": result.out_uri,
    }  # fmt: skip
    figures["ground_truth"] = scene_scores(
        storage.join_uri(result.out_uri, MASK_FILE), classes_uri, list(model_cfg.class_names)
    )
    if args.keep_class:
        kept = cfg.model_copy(update={"segment": seg.model_copy(update={"keep_classes": args.keep_class})})
        [filtered] = segment_scenes(kept, args.model, [image_uri], OUT, scene_ids=[f"s{args.size}"], overwrite=True)
        figures["ground_truth_keep_classes"] = scene_scores(
            storage.join_uri(filtered.out_uri, MASK_FILE), classes_uri, list(model_cfg.class_names)
        )

    if args.big:
        figures["memory"] = memory_runs(args, cfg)

    print(json.dumps(figures, indent=1, default=float))
    p = figures["pipeline"]
    print(f"\n{figures['scene']} scene, {answered} windows with data of {len(windows)} ({size} px, overlap {seg.overlap}), "
          f"batch {seg.batch_size}, {seg.concurrency} actor × {seg.threads_per_actor} thread:")  # fmt: skip
    print(f"  model-only bound   {figures['model_only_windows_per_s']:.2f} windows/s")
    print(f"  sequential loop    {figures['sequential_windows_per_s']:.2f} windows/s")
    print(f"  pipeline           {p['windows_per_s']:.2f} windows/s = {p['vs_model_only']:.2f}× the bound, "
          f"{p['speedup_over_sequential']:.2f}× the sequential loop (whole job {p['total_s']:.0f} s)")  # fmt: skip
    tf = figures["teacher_forced"]
    print(f"  teacher-forced     {tf['windows_per_s']:.2f} windows/s = {tf['speedup_over_generate']:.2f}× generate; "
          f"identical masks in {tf['windows_identical']:.0%} of windows, {tf['pixel_agreement']:.2%} of pixels")  # fmt: skip
    if "memory" in figures:
        m = figures["memory"]
        print(f"  peak USS {args.size}² {m[args.size]['total_mb']:.0f} MB vs {args.big}² {m[args.big]['total_mb']:.0f} MB "
              f"= {m['ratio_big_to_small']:.2f}× (window {args.memory_window})")  # fmt: skip
    for name, s in figures["ground_truth"].items():
        print(f"  ground truth {name:14s} IoU {s['iou']:.3f} precision {s['precision']:.3f} recall {s['recall']:.3f}")


if __name__ == "__main__":
    main()
