"""Where to cut the mask probabilities: segmentation and grounding of saved models on one split
(the validation split by default: a threshold is chosen there, never on the test split), at
several thresholds of the same answers.

Each model answers every segmentation, referring and grounding record of the split once; its mask
probabilities are then cut at every threshold, the boxes stated after the seg runs are redrawn
from the cut masks (as chat does), and the records are scored as `geopix eval` scores them. Text
answers do not depend on the threshold, so captions and VQA are not answered.

    eval "$(geopix stack env)"
    .venv/bin/python bench/mask_threshold.py --models <model URI> … [--split val] \\
        [--thresholds 0.3 0.4 0.5 0.6 0.7] [--json out.json]

Prints, per threshold, the mean over the models of cIoU, gIoU, small-object gIoU, the small
objects' Σ predicted / Σ true area, and grounding Acc@0.5, each with its difference against the
0.5 that GeoPix answers with (paired: the same answers; mean ± spread, half the range, over the
models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from geopix.config import load_config
from geopix.data import schema

FIGURES = (
    ("cIoU", lambda s: s["segmentation"]["overall"]["cIoU"]),
    ("gIoU", lambda s: s["segmentation"]["overall"]["gIoU"]),
    ("small gIoU", lambda s: s["segmentation"]["by_bucket"]["small"]["gIoU"]),
    ("small area ratio", lambda s: s["segmentation"]["by_bucket"]["small"]["area_ratio"]),
    ("grounding", lambda s: s["grounding"]["accuracy"]),
)
TASKS = (*schema.SEG_TASKS, "ground")
ANSWERED_AT = 0.5  # the threshold of ChatAnswer.from_logits (geopix/model/generation.py)


def split_records(shards_uri: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    from geopix.data.shard_set import read_records

    records = read_records(shards_uri, split, tasks=TASKS)
    return records[:limit] if limit else records


def threshold_summaries(
    model_uri: str, records: list[dict[str, Any]], thresholds: list[float], cfg: Any, batch: int, failed: list[str]
) -> dict[float, dict[str, Any]]:
    """Per threshold, the evaluation summary of ``records`` answered once by ``model_uri``; records
    that cannot be decoded are left out and listed in ``failed`` (record id and error)."""
    from geopix.answer_form import boxes_from_masks
    from geopix.data.images import decode_targets, record_image
    from geopix.evaluate.job import RecordEvaluator, summarize, user_turn

    evaluator = RecordEvaluator(model_uri, cfg.for_workers(), cfg.evaluate.threads_per_actor, "cpu")
    run_text = evaluator.tokenizer.decode(evaluator.model.seg_token_ids, skip_special_tokens=False)
    rows: dict[float, list[dict[str, Any]]] = {t: [] for t in thresholds}
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        ready = []  # (record, image, targets) of the decodable records; a bad one is counted, the rest go on
        for record in records[start : start + batch]:
            try:
                ready.append((record, record_image(record), decode_targets(record)))
            except Exception as exc:  # noqa: BLE001
                failed.append(f"{record.get('record_id')}: {type(exc).__name__}: {exc}")
        answers = evaluator._answer([r[1] for r in ready], [user_turn(r[0]) for r in ready]) if ready else []
        for (record, image, (masks, boxes, class_ids)), answer in zip(ready, answers, strict=True):
            for t in thresholds:
                cut = answer.mask_probs > t
                text = boxes_from_masks(answer.text, run_text, cut.numpy())
                rows[t].append(evaluator._score(
                    record, image, masks, boxes, class_ids, user_turn(record),
                    replace(answer, text=text, masks=cut), 0.0,
                ))  # fmt: skip
        done = min(start + batch, len(records))
        print(f"  {model_uri.rsplit('/', 1)[-1]}: {done}/{len(records)} records, "
              f"{time.perf_counter() - started:.0f} s", end="\r", flush=True)  # fmt: skip
    print()
    return {t: summarize(r, cfg, []) for t, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="saved model URIs (one per seed)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--limit", type=int, default=None, help="the first N records of the split only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.config)
    records = split_records(cfg.data.shards_uri, args.split, args.limit)
    print(f"{len(records)} segmentation, referring and grounding records of the {args.split} split")
    per_model = {}
    for uri in args.models:
        thresholds = sorted({*args.thresholds, ANSWERED_AT})
        failed: list[str] = []
        summaries = threshold_summaries(uri, records, thresholds, cfg, args.batch, failed)
        if failed:
            print(f"  {len(failed)} of {len(records)} records could not be decoded, left out: " + "; ".join(failed[:5]))
        per_model[uri] = {"failed": failed, "figures": {
            str(t): {name: read(s) for name, read in FIGURES} for t, s in summaries.items()}}  # fmt: skip

    def stats(values: list[float]) -> str:  # mean ± spread (half the range), as the learning bar
        return f"{statistics.mean(values):+.3f} ± {(max(values) - min(values)) / 2:.3f}"

    thresholds = sorted({float(t) for m in per_model.values() for t in m["figures"]})
    print(f"\n{'threshold':>9} " + " ".join(f"{name:>24}" for name, _ in FIGURES))
    for t in thresholds:
        cells = []
        for name, _ in FIGURES:
            values = [m["figures"][str(t)][name] for m in per_model.values() if str(t) in m["figures"]]
            diffs = [m["figures"][str(t)][name] - m["figures"][str(ANSWERED_AT)][name]
                     for m in per_model.values() if str(t) in m["figures"]]  # fmt: skip
            cells.append(f"{np.mean(values):.3f} ({stats(diffs)})")
        print(f"{t:>9.2f} " + " ".join(f"{c:>24}" for c in cells))
    print(f"(each cell: the mean over the models, then the paired difference against {ANSWERED_AT})")
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "records": len(records), "models": per_model}, indent=2))


if __name__ == "__main__":
    main()
