"""Where an evaluation's gIoU goes: per-target rows (targets.parquet of `geopix eval`) broken down by
phrase type, by class (with median true area), by the number of instances an all-of-class answer
should list (and how many masks it gave), and single-target vs all-of-class.

    eval "$(geopix stack env)"
    .venv/bin/python bench/eval_breakdown.py s3://geopix-checkpoints/evals/<bench>/<run>
"""

from __future__ import annotations

import argparse
import json

import pyarrow.parquet as pq

from geopix import storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_uri")
    args = parser.parse_args()
    fs, path = storage.arrow_filesystem(args.eval_uri)
    t = pq.read_table(f"{path}/targets.parquet", filesystem=fs).to_pandas()
    summary = json.loads(storage.read_bytes(storage.join_uri(args.eval_uri, "summary.json")))
    names = summary["segmentation"].get("class_names", {})
    single = t[t.phrase_type != "all_of_class"]
    every = t[t.phrase_type == "all_of_class"]
    print(f"targets {len(t)}: single-target phrases {len(single)} gIoU {single.iou.mean():.3f}, "
          f"all-of-class {len(every)} ({len(every) / len(t):.0%}) gIoU {every.iou.mean():.3f}")  # fmt: skip
    print("\n| class | targets | median true area (px) | gIoU | given a mask |\n|---|---|---|---|---|")
    for class_id, g in t.groupby("class_id"):
        name = names.get(str(class_id), class_id)
        print(f"| {name} | {len(g)} | {g.area.median():.0f} | {g.iou.mean():.3f} | {g.predicted.mean():.2f} |")
    per_record = every.groupby("record_id").agg(n=("iou", "size"), masks=("predicted", "sum"), giou=("iou", "mean"))
    print("\n| instances asked for | answers | masks given (mean) | gIoU |\n|---|---|---|---|")
    for n, g in per_record.groupby("n"):
        print(f"| {n} | {len(g)} | {g.masks.mean():.2f} | {g.giou.mean():.3f} |")


if __name__ == "__main__":
    main()
