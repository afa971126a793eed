"""What the mask grid alone allows: every test target's true mask average-pooled onto a grid of
G × G cells (the model predicts masks on such grids), upsampled bilinearly back and thresholded
at 0.5, against the true mask. Mean IoU per size bucket for G = 32, 64, 128 — the gIoU a model
with perfect cell values would reach.

    eval "$(geopix stack env)"
    .venv/bin/python bench/mask_grid_ceiling.py [--shards s3://geopix-data/shards/synthetic] [--split test]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from geopix.config import load_config
from geopix.data.images import decode_targets
from geopix.data.schema import SEG_TASKS
from geopix.data.shard_set import shard_files
from geopix.evaluate.metrics import size_bucket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args()
    cfg = load_config("tiny")
    size = cfg.model.image_size
    fs, files = shard_files(args.shards or cfg.data.shards_uri, args.split)
    ious: dict[tuple[int, str], list[float]] = defaultdict(list)
    for file in files:
        for record in pq.read_table(file, filesystem=fs).to_pylist():
            if record["task"] not in SEG_TASKS:
                continue
            masks, _, _ = decode_targets(record)
            if not len(masks):
                continue
            truth = torch.as_tensor(np.asarray(masks), dtype=torch.float32)[:, None]
            at_input = F.interpolate(truth, size=(size, size), mode="nearest")  # what the model sees
            for grid in args.grids:
                cells = F.adaptive_avg_pool2d(at_input, grid)
                back = F.interpolate(cells, size=truth.shape[-2:], mode="bilinear", align_corners=False) > 0.5
                for t, p in zip(truth[:, 0] > 0.5, back[:, 0], strict=True):
                    iou = (t & p).sum().item() / max((t | p).sum().item(), 1)
                    for bucket in ("all", size_bucket(int(t.sum()), cfg.evaluate)):
                        ious[(grid, bucket)].append(iou)
    print("| grid (cells of the input) | all | small | medium | large |")
    print("|---|---|---|---|---|")
    for grid in args.grids:
        cells = [f"{np.mean(ious[(grid, b)]):.3f}" for b in ("all", "small", "medium", "large")]
        print(f"| {grid} × {grid} ({size // grid} px) | " + " | ".join(cells) + " |")
    print(f"targets: {len(ious[(args.grids[0], 'all')])}")


if __name__ == "__main__":
    main()
