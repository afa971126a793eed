"""The same test cases answered by two evaluated models, side by side: one column per record (a
"segment every X" with several instances, a referring phrase, a grounding, a VQA and a caption
record), one row per model; ground truth outlined in yellow (boxes too), predicted masks filled
magenta, predicted boxes dashed, the answer written under each picture.

    eval "$(geopix stack env)"
    .venv/bin/python bench/before_after.py --before <evaluation URI> --after <evaluation URI> \\
        --labels "before" "after" --out docs/images/eval_tiny_before_after.png [--records ID …] \\
        [--shards-uri <the evaluated shard set>]

Evaluation URIs are what `geopix eval` / bench/learning_bar.py print (…/evals/<name>/<label>).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from geopix import storage
from geopix.config import load_config
from geopix.data import schema
from geopix.evaluate.metrics import answer_box
from geopix.evaluate.report import PREDICTED_COLOUR, TRUTH_COLOUR
from geopix.plotting import pyplot


def read_rows(eval_uri: str) -> dict[str, dict[str, Any]]:
    import pyarrow.dataset as pads

    fs, path = storage.arrow_filesystem(storage.join_uri(eval_uri, "records"))
    return {r["record_id"]: r for r in pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()}


def pick_records(before: dict, after: dict) -> list[str]:
    """One record per kind, the first by id that both evaluations answered."""
    common = sorted(set(before) & set(after))
    kinds = [
        lambda r: r["task"] == "segment" and len(r["targets"] or []) == 3,
        lambda r: r["task"] == "refer" and r["phrase_type"] == "position",
        lambda r: r["task"] == "ground",
        lambda r: r["task"] == "vqa" and (r["template_id"] or "").startswith("vqa.count"),
        lambda r: r["task"] == "caption",
    ]
    picked = []
    for kind in kinds:
        found = next((i for i in common if kind(before[i]) and not before[i].get("error")), None)
        if found:
            picked.append(found)
    return picked


def read_truth(shards_uri: str, record_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, masks, boxes) of each record, from the test shards."""
    from geopix.data.images import TRUTH_COLUMNS, decode_targets, record_image
    from geopix.data.shard_set import read_records

    out = {}
    for row in read_records(shards_uri, "test", record_ids=record_ids, columns=TRUTH_COLUMNS):
        masks, boxes, _ = decode_targets(row)
        out[row["record_id"]] = (record_image(row), masks, boxes)
    return out


def draw(ax, row: dict[str, Any], truth: tuple[np.ndarray, np.ndarray, np.ndarray], with_reference: bool) -> None:
    image, masks, boxes = truth
    shown = image.astype(np.float32) / 255
    for rle in row["predicted_masks"] or []:
        predicted = schema.decode_mask(rle).astype(bool)
        shown[predicted] = 0.45 * shown[predicted] + 0.55 * np.array(PREDICTED_COLOUR)
    ax.imshow(shown, interpolation="nearest")
    if row["task"] in schema.SEG_TASKS:
        for mask in masks:
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.2)
    if row["task"] == "ground":
        height, width = image.shape[:2]
        for box, style in ((boxes[0] if len(boxes) else None, "-"), (answer_box(row["answer"] or "", width, height), "--")):
            if box is not None:
                x1, y1, x2, y2 = box
                ax.plot([x1, x2, x2, x1, x1], [y1, y1, y2, y2, y1], style,
                        color=TRUTH_COLOUR if style == "-" else PREDICTED_COLOUR, linewidth=1.6)
    question = row["instruction"].split("]", 1)[-1].strip()
    score = ""
    if row["task"] in schema.SEG_TASKS and row["targets"]:
        score = f" · gIoU {np.mean([t['iou'] for t in row['targets']]):.2f}, masks {row['masks']}/{len(row['targets'])}"
    elif row["task"] == "ground":
        score = " · hit" if row["grounding_hit"] else " · miss"
    elif row["task"] == "vqa":
        score = " · right" if row["vqa_correct"] else " · wrong"
    seg_run = "[SEG"
    answer = (row["answer"] or "").replace(seg_run, "[S")
    lines = [] if not with_reference else textwrap.wrap(f"{row['task']}: {question}", 44)[:2]
    if with_reference and row["task"] == "vqa":
        lines += textwrap.wrap(f"(reference: {row['reference']})", 44)[:1]
    lines += textwrap.wrap(f"→ {answer}", 44)[:4]
    ax.set_title("\n".join(lines) + score, fontsize=7, loc="left")
    ax.set_axis_off()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--labels", nargs=2, default=["before", "after"])
    parser.add_argument("--records", nargs="*", default=None)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--shards-uri", default=None, help="the evaluated shard set (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("eval_before_after.png"))
    args = parser.parse_args()

    before, after = read_rows(args.before), read_rows(args.after)
    ids = args.records or pick_records(before, after)
    truth = read_truth(args.shards_uri or load_config(args.config).data.shards_uri, ids)
    plt = pyplot()
    fig, axes = plt.subplots(2, len(ids), figsize=(3.6 * len(ids), 9.0), squeeze=False)
    for col, record_id in enumerate(ids):
        for r, (label, rows) in enumerate(zip(args.labels, (before, after), strict=True)):
            draw(axes[r][col], rows[record_id], truth[record_id], with_reference=r == 0)
            if col == 0:
                axes[r][col].text(-0.08, 0.5, label, rotation=90, transform=axes[r][col].transAxes,
                                  va="center", ha="right", fontsize=10)
    fig.suptitle("the same held-out test records: ground truth yellow, prediction magenta", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"{args.out}: records {', '.join(ids)}")


if __name__ == "__main__":
    main()
