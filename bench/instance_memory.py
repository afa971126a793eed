"""Peak memory of the instance layer alone as the scene grows: the driver's InstanceStitcher fed every
window of a small and a big scene (1024-px windows, overlap 64, three 100² instances per window),
then finished (final ids, polygons), each size in a fresh process so that neither inherits the
other's allocations. Prints both peaks (RSS over the process's start) and their ratio; no stack needed.

    .venv/bin/python bench/instance_memory.py [--small 4096] [--big 16384]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def peak_of_one_scene(size: int, window: int) -> dict:
    import numpy as np
    import psutil
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from geopix.infer.instances import InstanceStitcher
    from geopix.infer.scene_reader import GDAL_CACHE_MB, Scaling, SceneInfo, plan_windows

    scene = SceneInfo("bench", "bench", size, size, 3, "uint8", CRS.from_epsg(32618).to_wkt(),
                      tuple(from_origin(583_000, 4_511_000, 0.5, 0.5))[:6], 0, (512, 512), (1, 2, 3),
                      Scaling(), "0")  # fmt: skip
    windows = plan_windows(size, size, window, 64)
    process = psutil.Process()
    base, peak, stop = process.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):  # as segment_scenes
        stitcher = InstanceStitcher(scene, windows, Path(tmp) / "provisional.tif", 0.5)
        for w in windows:
            ids = np.zeros((window, window), np.uint16)
            for k in range(1, 4):
                y, x = rng.integers(0, window - 100, size=2)
                ids[y : y + 100, x : x + 100] = k
            stitcher.add(w, ids, [(0, 0)] * 3, np.where(ids > 0, 80, 0).astype(np.uint8))
        stats = stitcher.finish(Path(tmp) / "instances.tif", Path(tmp) / "instances.parquet", ["a"], ["bench"])
    stop.set()
    sampler.join()
    return {"size": size, "windows": len(windows), "instances": stats.instances,
            "peak_mb": (peak[0] - base) / 2**20, "seconds": time.perf_counter() - started}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=4096)
    parser.add_argument("--big", type=int, default=16384)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(peak_of_one_scene(args.one, args.window)))
        return
    runs = {}
    for size in (args.small, args.big):
        child = subprocess.run([sys.executable, __file__, "--one", str(size), "--window", str(args.window)],
                               check=True, capture_output=True, text=True)  # fmt: skip
        runs[size] = json.loads(child.stdout.strip().splitlines()[-1])
    ratio = runs[args.big]["peak_mb"] / runs[args.small]["peak_mb"]
    print(json.dumps({"runs": runs, "ratio_big_to_small": ratio}, indent=1))
    for r in runs.values():
        print(f"  {r['size']}² ({r['windows']} windows, {r['instances']} instances): peak {r['peak_mb']:.0f} MB "
              f"in {r['seconds']:.1f} s")  # fmt: skip
    print(f"  big / small: {ratio:.2f}×")


if __name__ == "__main__":
    main()
