"""`geopix eval`: a Ray Data job that answers every record of a split with a saved model and scores it.

    test shards ─▶ read (Ray Data) ─▶ RecordEvaluator actors (model loaded once each, batched chat)
                ─▶ per-record rows (Parquet) ─▶ driver: per-target rows, summary, report, MLflow

Each record is answered from its own user turn, exactly as a user would ask: segmentation and
referring records are scored per target (the k-th seg run against the k-th target), grounding
records by the first box in the answer, captions by corpus BLEU-4/CIDEr, VQA by exact match. A
record that cannot be decoded or answered becomes a row with its ``error`` and is counted, never
dropped. Outputs are published under ``<out>/<name>/`` with ``_SUCCESS`` written last.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geopix import storage
from geopix.answer_form import stated_count
from geopix.config import GeoPixConfig
from geopix.data import schema
from geopix.data.images import decode_targets, record_image
from geopix.evaluate.metrics import BUCKETS, grounding_hit, score_sample, size_bucket, summarize_scores
from geopix.infer.actor import ModelActor
from geopix.outputs import prepare_output
from geopix.vocabulary import ANY_SEG_RUN

log = logging.getLogger(__name__)

RECORDS_DIR = "records"  # per-record rows (Ray Data's Parquet files)
TARGETS_FILE = "targets.parquet"  # per-target rows
SUMMARY_FILE = "summary.json"
REPORT_DIR = "report"
EVAL_KIND = "evaluation"
EVAL_LAYOUT = (f"{RECORDS_DIR}/*.parquet", TARGETS_FILE, SUMMARY_FILE, f"{REPORT_DIR}/*")


class EvalError(RuntimeError):
    """An evaluation that cannot run (no model, no shards, nothing to score)."""


@dataclass
class EvalResult:
    name: str
    model_uri: str
    out_uri: str
    summary: dict[str, Any]
    mlflow_run_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------- actor side
def user_turn(record: dict[str, Any]) -> str:
    turns = record.get("conversation") or []
    for turn in turns:
        if turn["role"] == "user":
            return turn["text"]
    raise ValueError("the conversation has no user turn")


def reference_answer(record: dict[str, Any]) -> str:
    return next((t["text"] for t in record.get("conversation") or [] if t["role"] == "assistant"), "")


def normalise_answer(text: str) -> str:
    """Lower case, seg runs and punctuation removed: what VQA's exact match compares."""
    return " ".join(re.sub(r"[^\w\s]", " ", ANY_SEG_RUN.sub(" ", text).lower()).split())


class RecordEvaluator(ModelActor):
    """A Ray Data actor: the model is loaded once, then each batch of records is answered together."""

    def __init__(self, model_uri: str, config: dict[str, Any], threads: int, device: str):
        super().__init__(model_uri, config, threads, device)
        self.cfg = self.config

    def __call__(self, batch: Any) -> dict[str, list]:
        records = batch.to_pylist()
        rows: list[dict[str, Any] | None] = [None] * len(records)
        ready = []  # (index, image, masks, boxes, class ids, instruction) of the decodable records
        for i, record in enumerate(records):
            try:
                image = record_image(record)
                masks, boxes, class_ids = decode_targets(record)
                ready.append((i, image, masks, boxes, class_ids, user_turn(record)))
            except Exception as exc:  # noqa: BLE001 - one bad record is reported, the rest go on
                rows[i] = _error_row(record, f"{type(exc).__name__}: {exc}")
        started = time.perf_counter()
        answers = self._answer([r[1] for r in ready], [r[5] for r in ready]) if ready else []
        seconds = (time.perf_counter() - started) / max(len(ready), 1)
        for (i, image, masks, boxes, class_ids, instruction), answer in zip(ready, answers, strict=True):
            try:
                rows[i] = self._score(records[i], image, masks, boxes, class_ids, instruction, answer, seconds)
            except Exception as exc:  # noqa: BLE001
                rows[i] = _error_row(records[i], f"{type(exc).__name__}: {exc}")
        return {key: [row[key] for row in rows] for key in ROW_KEYS}

    def _answer(self, images: list[np.ndarray], instructions: list[str]):
        pixels = self.processor(images).to(device=self.device, dtype=self.dtype)
        return self.model.chat(pixels, instructions, self.tokenizer, max_new_tokens=self.cfg.evaluate.max_new_tokens)

    def _score(self, record, image, truths, boxes, class_ids, instruction, answer, seconds) -> dict[str, Any]:
        from PIL import Image

        height, width = image.shape[:2]
        predicted = [
            np.asarray(Image.fromarray(m.numpy().astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST))
            for m in answer.masks
        ]
        task = record.get("task")
        row = _base_row(record) | {
            "instruction": instruction,
            "answer": answer.text,
            "reference": reference_answer(record),
            "masks": len(predicted),
            "predicted_masks": [schema.encode_mask(m.astype(np.uint8)) for m in predicted],
            "predicted_classes": [int(p.argmax()) for p in answer.class_probs],
            "seconds": seconds,
        }
        if task in schema.SEG_TASKS:
            scores, extra = score_sample(
                predicted, truths, record_id=row["record_id"], class_ids=class_ids,
                phrase_type=record.get("phrase_type"), cfg=self.cfg.evaluate,
            )
            row |= {"targets": [s.as_dict() for s in scores], "extra_masks": extra,
                    "stated_count": stated_count(answer.text)}  # fmt: skip
        elif task == "ground" and len(boxes):
            row["grounding_hit"] = grounding_hit(answer.text, boxes[0], width, height, self.cfg.evaluate)
            if len(truths):  # the bucket of the boxed object, as segmentation buckets its targets
                row["size_bucket"] = size_bucket(int(truths[0].sum()), self.cfg.evaluate)
        elif task == "vqa":
            row["vqa_correct"] = normalise_answer(answer.text) == normalise_answer(row["reference"])
        return row


ROW_KEYS = (
    "record_id", "image_id", "task", "phrase_type", "template_id", "instruction", "answer", "reference",
    "masks", "extra_masks", "targets", "predicted_masks", "predicted_classes", "grounding_hit",
    "size_bucket", "vqa_correct", "stated_count", "seconds", "error",
)


def _base_row(record: dict[str, Any]) -> dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row |= {k: record.get(k) for k in ("record_id", "image_id", "task", "phrase_type", "template_id")}
    row |= {"masks": 0, "extra_masks": 0, "targets": [], "predicted_masks": [], "predicted_classes": []}
    return row


def _error_row(record: dict[str, Any], error: str) -> dict[str, Any]:
    return _base_row(record) | {"error": error[:500], "reference": reference_answer(record)}


# ------------------------------------------------------------------------------ driver side
def evaluate_model(
    cfg: GeoPixConfig,
    model_uri: str,
    *,
    shards_uri: str | None = None,
    split: str = "test",
    name: str | None = None,
    limit: int | None = None,
    out_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> EvalResult:
    """Evaluate one saved model on one split of the shards; returns where everything went."""
    import ray
    import ray.data

    from geopix import ray_job, tracking
    from geopix.data.shard_set import ShardError, check_shards, class_names, read_manifest
    from geopix.evaluate.report import write_report
    from geopix.model.configuration import saved_model_config

    started = time.perf_counter()
    shards_uri = (shards_uri or cfg.data.shards_uri).rstrip("/")
    published = (
        storage.list_files(model_uri, storage.SUCCESS_MARKER) if storage.is_s3_uri(model_uri) else Path(model_uri).is_dir()
    )
    if not published:
        raise EvalError(f"no published model at {model_uri} (a model directory, or an S3 prefix with _SUCCESS)")
    fs, files = check_shards(shards_uri, split)  # a finished shard set only (its _SUCCESS)
    try:
        names = class_names(read_manifest(shards_uri), saved_model_config(model_uri).num_classes)
    except ShardError as exc:
        raise EvalError(str(exc)) from None
    name = name or f"eval-{split}-{ray_job.run_id()}"
    out = storage.join_uri(out_uri or cfg.evaluate.out_uri, name)
    if not ray.is_initialized():
        ray.init()
    # An earlier evaluation of the same name is replaced, never mixed into; nothing else is deleted.
    if prepare_output(out, EVAL_KIND, EVAL_LAYOUT, replace=True, inputs=[shards_uri, model_uri]):
        log.info("replaced the earlier evaluation at %s", out)

    ev = cfg.evaluate
    dataset = ray.data.read_parquet(files, filesystem=fs)
    if limit:
        dataset = dataset.limit(limit)
    use_gpu = cfg.train.use_gpu
    answered = dataset.map_batches(
        RecordEvaluator,
        fn_constructor_kwargs={
            "model_uri": model_uri, "config": cfg.for_workers(),
            "threads": ev.threads_per_actor, "device": "cuda" if use_gpu else "cpu",
        },
        batch_size=ev.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=ev.concurrency),
        num_cpus=ev.threads_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    records_uri = storage.join_uri(out, RECORDS_DIR)
    out_fs, records_path = storage.arrow_filesystem(records_uri)
    answered.write_parquet(records_path, filesystem=out_fs if storage.is_s3_uri(records_uri) else None)
    rows = _read_rows(records_uri)
    if not rows:
        raise EvalError(f"split {split!r} of {shards_uri} gave no records to evaluate")
    summary = summarize(rows, cfg, names)
    summary |= {
        "name": name, "model_uri": model_uri, "shards_uri": shards_uri, "split": split,
        "seconds": round(time.perf_counter() - started, 1),
    }
    summary["records_per_s"] = round(summary["records"] / summary["seconds"], 2)
    targets = [t | {"record_id": r["record_id"]} for r in rows for t in (r["targets"] or [])]
    _write_targets(targets, storage.join_uri(out, TARGETS_FILE))
    storage.write_bytes(storage.join_uri(out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    report_dir = write_report(summary, rows, shards_uri, split, storage.join_uri(out, REPORT_DIR), cfg)

    run_id = None
    if log_to_mlflow:
        with tracking.step_run(
            "evaluate", params={"model_uri": model_uri, "shards_uri": shards_uri, "split": split, "name": name},
            config=cfg,
        ) as run:
            import mlflow

            mlflow.log_metrics(flat_metrics(summary))
            mlflow.log_dict(summary, "evaluation/summary.json")
            mlflow.log_artifacts(str(report_dir), "evaluation/report")
            mlflow.set_tag("geopix.eval_uri", out)
            run_id = run.info.run_id
    storage.write_bytes(storage.join_uri(out, storage.SUCCESS_MARKER), b"")
    log.info("evaluation %s: %s", name, headline(summary))
    return EvalResult(name, model_uri, out, summary, run_id)


def _read_rows(records_uri: str) -> list[dict[str, Any]]:
    import pyarrow.dataset as pads

    fs, path = storage.arrow_filesystem(records_uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def _write_targets(targets: list[dict[str, Any]], uri: str) -> None:
    import pyarrow as pa

    storage.write_bytes(uri, storage.parquet_bytes(pa.Table.from_pylist(targets)))


def summarize(rows: list[dict[str, Any]], cfg: GeoPixConfig, class_names: list[str]) -> dict[str, Any]:
    """The summary of per-record rows (from any number of workers)."""
    from geopix.evaluate.captions import caption_scores

    ok = [r for r in rows if not r.get("error")]
    failed = [r for r in rows if r.get("error")]
    seg = [r for r in ok if r["task"] in schema.SEG_TASKS]
    segmentation = summarize_scores([t for r in seg for t in r["targets"]], cfg.evaluate)
    segmentation["extra_masks"] = sum(r["extra_masks"] or 0 for r in seg)
    # Single-target (refer) against all-of-class (segment) answers: the bars differ.
    segmentation["by_task"] = {
        task: summarize_scores([t for r in seg if r["task"] == task for t in r["targets"]], cfg.evaluate)["overall"]
        for task in schema.SEG_TASKS if any(r["task"] == task for r in seg)
    }
    if class_names:
        segmentation["class_names"] = {str(i): n for i, n in enumerate(class_names)}
    ground = [r for r in ok if r["task"] == "ground"]
    vqa = [r for r in ok if r["task"] == "vqa"]
    grounding = _accuracy(ground, "grounding_hit")
    grounding["by_phrase_type"] = {
        p: _accuracy([r for r in ground if r["phrase_type"] == p], "grounding_hit")
        for p in sorted({r["phrase_type"] or "unknown" for r in ground})
    }
    grounding["by_bucket"] = {
        b: _accuracy([r for r in ground if r.get("size_bucket") == b], "grounding_hit")
        for b in BUCKETS if any(r.get("size_bucket") == b for r in ground)
    }
    captions = [r for r in ok if r["task"] == "caption"]
    caption = caption_scores(
        {r["record_id"]: r["answer"] or "" for r in captions}, {r["record_id"]: [r["reference"]] for r in captions}
    )
    tasks: dict[str, int] = {}
    for r in rows:
        tasks[r["task"] or "unknown"] = tasks.get(r["task"] or "unknown", 0) + 1
    return {
        "records": len(rows),
        "failed": len(failed),
        "failures": [{"record_id": r["record_id"], "error": r["error"]} for r in failed[:50]],
        "records_by_task": tasks,
        "segmentation": segmentation,
        "grounding": grounding,
        "captions": caption,
        "vqa": _accuracy(vqa, "vqa_correct") | {"by_kind": {
            kind: _accuracy([r for r in vqa if vqa_kind(r) == kind], "vqa_correct")
            for kind in sorted({vqa_kind(r) for r in vqa})
        }},
        "counting": counting(seg),
    }


def vqa_kind(row: dict[str, Any]) -> str:
    """The question kind of a VQA record (count, presence, colour) from its template id."""
    first = (row.get("template_id") or "").split("+")[0].split(".")
    return first[1] if len(first) > 1 and first[0] == "vqa" else "other"


def counting(seg_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per number of instances an all-of-class answer was asked for: how many answers, the masks
    they gave (mean), the share giving exactly that many masks, and the share whose stated count
    ("Sure, there are 3 …:") is right (of all answers: one stating none is wrong)."""
    by_count: dict[int, list[dict[str, Any]]] = {}
    for r in seg_rows:
        if r["task"] == "segment" and r["targets"]:
            by_count.setdefault(len(r["targets"]), []).append(r)
    return {
        str(n): {
            "answers": len(rows),
            "masks_mean": sum(r["masks"] for r in rows) / len(rows),
            "exact": sum(r["masks"] == n for r in rows) / len(rows),
            "stated_exact": sum(r.get("stated_count") == n for r in rows) / len(rows),
        }
        for n, rows in sorted(by_count.items())
    }


def _accuracy(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return {"records": len(rows), "accuracy": (sum(bool(r[key]) for r in rows) / len(rows)) if rows else None}


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers as MLflow metric names (``seg_cIoU``, ``seg_small_gIoU``, …)."""
    seg = summary["segmentation"]
    out: dict[str, float] = {"records": summary["records"], "failed_records": summary["failed"]}
    for group, prefix in ((seg["overall"], "seg"),) + tuple(
        (seg["by_bucket"][b], f"seg_{b}") for b in BUCKETS if b in seg["by_bucket"]
    ) + tuple((v, f"seg_phrase_{k}") for k, v in seg["by_phrase_type"].items()) + tuple(
        (v, f"seg_task_{k}") for k, v in seg.get("by_task", {}).items()
    ):
        out |= {f"{prefix}_{k.replace('@', '_at_')}": float(v) for k, v in group.items() if isinstance(v, (int, float))}
    if summary["grounding"]["accuracy"] is not None:
        out["grounding_accuracy"] = summary["grounding"]["accuracy"]
    for bucket, group in summary["grounding"].get("by_bucket", {}).items():
        out[f"grounding_{bucket}_accuracy"] = group["accuracy"]
    if summary["vqa"]["accuracy"] is not None:
        out["vqa_accuracy"] = summary["vqa"]["accuracy"]
    for kind, group in summary["vqa"].get("by_kind", {}).items():
        if group["accuracy"] is not None:
            out[f"vqa_{kind}_accuracy"] = group["accuracy"]
    for n, group in summary.get("counting", {}).items():
        out[f"counting_{n}_exact"] = group["exact"]
    out |= {f"caption_{k.replace('-', '')}": v for k, v in summary["captions"].items() if k != "captions"}
    return out


def headline(summary: dict[str, Any]) -> str:
    overall = summary["segmentation"]["overall"]
    if not overall.get("targets"):
        return f"{summary['records']} records, no segmentation targets"
    buckets = ", ".join(
        f"{b} {v['cIoU']:.3f}/{v['gIoU']:.3f}" for b, v in summary["segmentation"]["by_bucket"].items()
    )
    return (
        f"cIoU {overall['cIoU']:.3f}, gIoU {overall['gIoU']:.3f} over {overall['targets']} targets "
        f"(cIoU/gIoU by size: {buckets}); {summary['records']} records, {summary['failed']} failed"
    )


def evaluate_models(
    cfg: GeoPixConfig,
    models: dict[str, str],
    *,
    name: str | None = None,
    out_uri: str | None = None,
    **kwargs: Any,
) -> tuple[dict[str, EvalResult], str | None]:
    """Evaluate several models (label → URI) on the same split; with two or more, also write the
    comparison (differences to the first label) under ``<out>/<name>/comparison/``.

    Returns (results by label, comparison URI or None)."""
    from geopix import ray_job
    from geopix.evaluate.report import write_comparison

    name = name or f"eval-{ray_job.run_id()}"
    if len(models) == 1:
        ((label, uri),) = models.items()
        return {label: evaluate_model(cfg, uri, name=name, out_uri=out_uri, **kwargs)}, None
    base = storage.join_uri(out_uri or cfg.evaluate.out_uri, name)
    results = {
        label: evaluate_model(cfg, uri, name=label, out_uri=base, **kwargs) for label, uri in models.items()
    }
    comparison = storage.join_uri(base, "comparison")
    write_comparison({label: r.summary for label, r in results.items()}, comparison)
    return results, comparison
