"""The class-wise memory under control: does a trained model's memory change its masks, and does it
read the right class?

Each model answers the held-out test split's referring records (one target each) with the reference
answer forced, so every condition below sees the same seg hidden states and only the memory's read
differs. Its masks are scored under four reads of its memory:

- ``trained``: the class head's own soft prediction (what the model does at inference);
- ``closed``: the gate shut (tanh α = 0): the same model without its memory;
- ``oracle``: the true class's slots;
- ``shuffled``: the slots of another class, drawn at random (a control: a memory that carries
  class context loses here what the oracle gains).

``--baseline`` names memory-free models (K = 0), one per ``--model`` in the same order (the same
seed): they answer the same records (read ``plain``), and the differences of each model's
``trained`` and ``closed`` reads to its baseline say whether the memory-free model gets as far
without a memory as the memory's model gets with it.

For each model it prints gIoU overall, per size bucket (of the target's area at the model's input
size) and per phrase type under each read, the class head's accuracy, the gates tanh(α) per scale
and how large the read is against the features it is added to (‖tanh(α)·read‖ / ‖features‖); with
several models (seeds), the differences to ``trained`` as mean ± spread (half the range). Writes
the same as JSON.

    eval "$(geopix stack env)"
    .venv/bin/python bench/memory_probe.py --model <stage-2 model URI> [--model …] \\
        [--baseline <K = 0 model URI> …] [--json docs/benchmarks/memory_probe.json] [--limit N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from geopix.config import load_config
from geopix.data.batches import iter_batches, to_device
from geopix.data.schema import size_bucket
from geopix.data.shard_set import read_records
from geopix.model import GeoPixModel
from geopix.storage import local_copy

READS = ("trained", "closed", "oracle", "shuffled")
PLAIN = "plain"  # a memory-free model's only read


def refer_records(shards_uri: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    records = read_records(shards_uri, split, tasks=["refer"])
    return records[:limit] if limit else records


@contextlib.contextmanager
def memory_read(model: GeoPixModel, read: str, class_ids: torch.Tensor, seed: int) -> Iterator[list[float]]:
    """The model's memory read as ``read`` says for the targets ``class_ids``; yields a list that
    collects, per call, ‖output − features‖ / ‖features‖ (the read's size against its input)."""
    if read == PLAIN:
        yield []
        return
    memory = model.mask_predictor.memory
    sizes: list[float] = []
    classes = memory.learned.shape[0]
    if read == "oracle":
        forced = torch.nn.functional.one_hot(class_ids, classes).float()
    elif read == "shuffled":
        shift = torch.randint(1, classes, class_ids.shape, generator=torch.Generator().manual_seed(seed))
        forced = torch.nn.functional.one_hot((class_ids + shift) % classes, classes).float()
    else:
        forced = None
    gate = memory.gate.data.clone()
    if read == "closed":
        memory.gate.data.zero_()
    original = memory.forward

    def forward(feats: torch.Tensor, class_probs: torch.Tensor, scale: int) -> torch.Tensor:
        out = original(feats, forced if forced is not None else class_probs, scale)
        sizes.append(float((out - feats).norm() / feats.norm().clamp_min(1e-12)))
        return out

    memory.forward = forward
    try:
        yield sizes
    finally:
        memory.forward = original
        memory.gate.data.copy_(gate)


def probe(model_uri: str, records: list[dict[str, Any]], batch_size: int, baseline: bool = False) -> dict[str, Any]:
    model, tokenizer, _ = GeoPixModel.load_pretrained(local_copy(model_uri))
    memory = model.mask_predictor.memory
    if baseline and memory is not None:
        raise SystemExit(f"{model_uri}: a baseline is a model without memory (memory_len 0)")
    if not baseline and memory is None:
        raise SystemExit(f"{model_uri}: a model without memory (memory_len 0) has nothing to probe")
    reads = (PLAIN,) if baseline else READS
    config = model.config
    batches = iter_batches(records, tokenizer, image_size=config.image_size, batch_size=batch_size,
                           max_length=None, augment=False, seed=0, seg_vocab=config.seg_vocabulary,
                           image_format=model.image_format,
                           chat_template=config.chat_template)  # fmt: skip
    rows: list[dict[str, Any]] = []
    read_sizes: dict[str, list[float]] = defaultdict(list)
    correct = total = 0
    with torch.no_grad():
        for index, batch in enumerate(batches):
            inputs = to_device(batch, torch.device("cpu"), torch.float32)
            inputs = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "seg_positions", "target_sample")}
            truth = batch["target_masks"] > 0.5
            class_ids = batch["class_ids"]
            types = [batch["phrase_types"][int(s)] for s in batch["target_sample"]]
            buckets = [size_bucket(int(m.sum())) for m in truth]
            for read in reads:
                with memory_read(model, read, class_ids, seed=index) as sizes:
                    out = model(**inputs)
                read_sizes[read] += sizes
                predicted = out.mask_logits > 0
                inter = (predicted & truth).flatten(1).sum(1)
                union = (predicted | truth).flatten(1).sum(1)
                iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter, dtype=torch.float))
                rows += [{"read": read, "bucket": b, "phrase_type": t, "iou": float(v)}
                         for b, t, v in zip(buckets, types, iou, strict=True)]  # fmt: skip
                if read == reads[0]:
                    correct += int((out.class_logits.argmax(-1) == class_ids).sum())
                    total += len(class_ids)
    groups: dict[str, dict[str, float]] = {}
    for read in reads:
        mine = [r for r in rows if r["read"] == read]
        group = {"all": statistics.fmean(r["iou"] for r in mine)}
        for key in ("bucket", "phrase_type"):
            for value in sorted({r[key] for r in mine}):
                group[value] = statistics.fmean(r["iou"] for r in mine if r[key] == value)
        groups[read] = group
    return {
        "model_uri": model_uri,
        "targets": total,
        "class_head_accuracy": correct / max(total, 1),
        "gates": [float(torch.tanh(a)) for a in memory.gate.detach()] if memory is not None else [],
        "read_size": {read: statistics.fmean(v) for read, v in read_sizes.items() if v},
        "gIoU": groups,
    }


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def difference_rows(
    results: list[dict[str, Any]],
    others: list[dict[str, Any]],
    reference: str,
    reads: list[tuple[str, str]],
    columns: list[str],
) -> list[str]:
    """One row per (label, read): the read's gIoU minus ``others``' ``reference`` read (same
    position, same seed), mean ± spread over the pairs."""
    lines = ["| read | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, read in reads:
        cells = []
        for c in columns:
            values = [r["gIoU"][read].get(c, 0.0) - o["gIoU"][reference].get(c, 0.0)
                      for r, o in zip(results, others, strict=True)]  # fmt: skip
            mean, half = spread(values)
            cells.append(f"{mean:+.3f} ± {half:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def table(results: list[dict[str, Any]], baselines: list[dict[str, Any]] | None = None) -> str:
    lines = []
    for result in results:
        groups = result["gIoU"]
        columns = list(next(iter(groups.values())))
        gates = ", ".join(f"{g:.2e}" for g in result["gates"])
        head = (f"\n{result['model_uri']}: {result['targets']} targets, class head accuracy "
                f"{result['class_head_accuracy']:.3f}"
                + (f", gates tanh(α) [{gates}], read size {result['read_size'].get('trained', 0):.2e} of the features"
                   if result["gates"] else ", no memory"))  # fmt: skip
        lines += [head, "| read | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]  # fmt: skip
        lines += [f"| {read} | " + " | ".join(f"{groups[read].get(c, float('nan')):.3f}" for c in columns) + " |"
                  for read in groups]  # fmt: skip
    if len(results) > 1:
        columns = list(results[0]["gIoU"]["trained"])
        lines.append("\ndifference to `trained`, mean ± spread over the models")
        lines += difference_rows(results, results, "trained", [(read, read) for read in READS[1:]], columns)
        accuracy = spread([r["class_head_accuracy"] for r in results])
        lines.append(f"\nclass head accuracy {accuracy[0]:.3f} ± {accuracy[1]:.3f}")
    if baselines:
        columns = list(results[0]["gIoU"]["trained"])
        lines.append("\ndifference to the memory-free model of the same seed (`--baseline`), mean ± spread")
        lines += difference_rows(
            results,
            baselines,
            PLAIN,
            [("with its memory (trained)", "trained"), ("its memory shut (closed)", "closed")],
            columns,
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", dest="models", action="append", required=True, help="a saved model (URI)")
    parser.add_argument("--baseline", dest="baselines", action="append", default=[],
                        help="a memory-free model (URI) trained like the --model at the same position")  # fmt: skip
    parser.add_argument("--config", default="tiny", help="whose data.shards_uri holds the test split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="the first N referring records only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if args.baselines and len(args.baselines) != len(args.models):
        parser.error(f"--baseline: one per --model ({len(args.models)}), got {len(args.baselines)}")
    records = refer_records(load_config(args.config).data.shards_uri, args.split, args.limit)
    results, baselines = [], []
    for uri in args.models:
        results.append(probe(uri, records, args.batch_size))
        print(table(results[-1:]), flush=True)
    for uri in args.baselines:
        baselines.append(probe(uri, records, args.batch_size, baseline=True))
        print(table(baselines[-1:]), flush=True)
    if len(results) > 1 or baselines:
        print(table(results, baselines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"records": len(records), "models": results, "baselines": baselines}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
