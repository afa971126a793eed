"""The whole GeoPix pipeline as one Ray job, resumable step by step.

    ray job submit --working-dir . -- python flows/full_pipeline.py [--config tiny] [--set key=value] \
        [--name NAME] [--from-step STEP | --only STEP]

source → shard → stage1 → stage2 → evaluate → register → segment. One MLflow parent run per
submission, a child run per step. A step whose outputs exist for the same inputs and config (a
content hash, see geopix/step_runner.py) is skipped, so a failed pipeline resubmitted goes on at the
step that failed (a training step resumes from its last checkpoint) and a finished one skips every
step. `register` gives the stage-2 model the alias `candidate`, and `champion` when
pipeline.gate_metric ≥ pipeline.gate_min. `segment` is the nightly job over pipeline.scenes_uri.
Exit status 0 when every step finished and every scene was segmented, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import mlflow

from geopix import ray_job, storage, tracking
from geopix.config import GeoPixConfig
from geopix.flow import flow_parser, start_flow
from geopix.redaction import redact_text
from geopix.step_runner import Context, Pipeline, Step
from geopix.vocabulary import SegVocabulary

STEPS = ("source", "shard", "stage1", "stage2", "evaluate", "register", "segment")


def marker(prefix: str) -> str:
    """Every stage publishes a prefix with _SUCCESS last: its outputs exist when the marker does."""
    return storage.join_uri(prefix, storage.SUCCESS_MARKER)


def source_step(cfg: GeoPixConfig, name: str) -> Step:
    """Synthetic (pipeline.synthetic): generate chips and scenes under names from the step key.
    Otherwise check that data.source_uri is a readable record source; its content is the key."""
    from geopix.data import source as record_source
    from geopix.data.phrases import TEXT_VERSION
    from geopix.data.synth import generate_source

    d, p = cfg.data, cfg.pipeline

    def inputs(ctx: Context):
        if p.synthetic:
            return with_seg_vocabulary({"synthetic": d.model_dump(include={
                "seed", "chip_size", "train_images", "val_images", "test_images", "test_seed_offset", "scene_size",
                "scene_count"}), "text_version": TEXT_VERSION}, cfg)  # fmt: skip
        return {"source": storage.fingerprint(d.source_uri), "scenes": p.scenes_uri or cfg.segment.incoming_uri}

    def run(ctx: Context) -> dict:
        if not p.synthetic:
            record_source.read_catalog(d.source_uri)  # a clear error now, not in the shard step
            return {"source_uri": d.source_uri, "scenes_uri": p.scenes_uri or cfg.segment.incoming_uri}
        source_uri = f"{d.source_uri.rstrip('/')}-{ctx.key[:12]}"
        scenes_root = storage.join_uri(f"s3://{cfg.storage.buckets.scenes}", "pipelines", name, ctx.key[:12])
        # The scenes to segment under incoming/, each with its ground truth under truth/.
        incoming, truth = storage.join_uri(scenes_root, "incoming"), storage.join_uri(scenes_root, "truth")
        with tracking.step_run("source", params={"synthetic": True, "source_uri": source_uri}) as run:
            stats = generate_source(d, source_uri, seg_vocab=cfg.model.seg_vocabulary, scenes_uri=truth,
                                    incoming_uri=incoming)  # fmt: skip
            mlflow.log_metrics({f"records_{split}": n for split, n in stats["records"].items()} | {"seconds": stats["seconds"]})
            mlflow.log_dict(stats, "synthetic_stats.json")
        return {"source_uri": source_uri, "scenes_uri": incoming, "truth_uri": truth,
                "mlflow_run_id": run.info.run_id}  # fmt: skip

    return Step("source", inputs, run, exists=lambda out: storage.exists(marker(out["source_uri"])))


def with_seg_vocabulary(inputs, cfg: GeoPixConfig):
    """A step's inputs and the seg vocabulary its records are written or checked with; the default
    vocabulary adds nothing, so the keys of pipelines recorded before it was an input stay."""
    vocab = cfg.model.seg_vocabulary
    if vocab == SegVocabulary():
        return inputs
    plain = inputs.model_dump(mode="json") if hasattr(inputs, "model_dump") else inputs
    return {"inputs": plain, "seg_vocabulary": dataclasses.asdict(vocab)}


def shard_step(cfg: GeoPixConfig) -> Step:
    from geopix.data.shard import log_shard_run, shard_sources

    def run(ctx: Context) -> dict:
        out = f"{cfg.data.shards_uri.rstrip('/')}-{ctx.key[:12]}"
        with tracking.step_run("shard", config=cfg) as child:
            result = shard_sources([ctx.outputs["source"]["source_uri"]], out, cfg.data,
                                   seg_vocab=cfg.model.seg_vocabulary, overwrite=True)  # fmt: skip
            log_shard_run(result)
        return {"shards_uri": out, **result.counts, "mlflow_run_id": child.info.run_id}

    return Step("shard", lambda ctx: with_seg_vocabulary(cfg.data, cfg), run,
                exists=lambda out: storage.exists(marker(out["shards_uri"])))


def train_step(cfg: GeoPixConfig, name: str, stage: int) -> Step:
    from geopix.train.run import train_stage

    def run(ctx: Context) -> dict:
        # The run name comes from the key: a killed run is resumed from its last checkpoint by the
        # next submission; --from-step/--only ask for a new run.
        run_name = f"{name}-stage{stage}-{ctx.key[:12]}" + (f"-{ray_job.run_id()}" if ctx.fresh else "")
        init = ctx.outputs["stage1"]["model_uri"] if stage == 2 else None
        result = train_stage(cfg, stage, shards_uri=ctx.outputs["shard"]["shards_uri"], init_model_uri=init,
                             run_name=run_name, register=False)  # fmt: skip
        return result.as_dict()

    return Step(f"stage{stage}", lambda ctx: cfg.section_hash("model", "train"), run,
                exists=lambda out: storage.exists(marker(out["model_uri"])))  # fmt: skip


def evaluate_step(cfg: GeoPixConfig, name: str) -> Step:
    from geopix.evaluate.job import REPORT_DIR, evaluate_model, flat_metrics

    def run(ctx: Context) -> dict:
        result = evaluate_model(cfg, ctx.outputs["stage2"]["model_uri"], shards_uri=ctx.outputs["shard"]["shards_uri"],
                                name=f"{name}-{ctx.key[:12]}")  # fmt: skip
        return {"eval_uri": result.out_uri, "report": storage.join_uri(result.out_uri, REPORT_DIR, "report.md"),
                "metrics": flat_metrics(result.summary), "mlflow_run_id": result.mlflow_run_id}  # fmt: skip

    return Step("evaluate", lambda ctx: cfg.evaluate.model_dump(exclude={"concurrency", "threads_per_actor", "batch_size"}),
                run, exists=lambda out: storage.exists(marker(out["eval_uri"])))  # fmt: skip


def register_step(cfg: GeoPixConfig) -> Step:
    from geopix.train.run import promotion_gate, register_evaluated

    p = cfg.pipeline

    def run(ctx: Context) -> dict:
        gate = promotion_gate(ctx.outputs["evaluate"]["metrics"], p)
        with tracking.step_run("register", params={"gate": gate["rule"]}, config=cfg) as child:
            registered = register_evaluated(cfg, ctx.outputs["stage2"], gate)
        return registered | {"mlflow_run_id": child.info.run_id}

    return Step("register", lambda ctx: (p.gate_metric, p.gate_min, p.gate_max_failed_share, cfg.train.registered_model),
                run, exists=lambda out: tracking.model_version_exists(out["model"]))  # fmt: skip


def segment_step(cfg: GeoPixConfig) -> Step:
    from geopix.infer.nightly import run_nightly

    def run(ctx: Context) -> dict:
        night = run_nightly(cfg, ctx.outputs["register"]["model"], ctx.outputs["source"]["scenes_uri"],
                            overwrite=ctx.fresh)  # fmt: skip
        return {
            "out_uri": night.out, "summary_uri": night.summary_uri, "listed": night.listed,
            "processed": night.processed, "already_done": night.already_done,
            "quarantined": len(night.failed) + night.still_quarantined,
            "scenes": {r.scene_id: r.out_uri or f"failed: {r.reason}: {r.detail}" for r in night.results},
            "mlflow_run_id": night.mlflow_run_id,
        }  # fmt: skip

    return Step("segment", lambda ctx: (cfg.segment, storage.fingerprint(ctx.outputs["source"]["scenes_uri"])), run)


def main(argv: list[str] | None = None) -> int:
    parser = flow_parser(__doc__)
    parser.add_argument("--name", help="pipeline name: its step records live under pipeline.state_uri/<name> "
                                       "(default: the config's name)")  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--from-step", choices=STEPS, help="rerun this step and every later one")
    group.add_argument("--only", choices=STEPS, help="rerun this step only (earlier ones must be current)")
    args = parser.parse_args(argv)
    cfg, job = start_flow(args)
    name = args.name or cfg.name
    pipeline = Pipeline(name, cfg.pipeline.state_uri, STEPS, from_step=args.from_step, only=args.only,
                        lease_ttl_s=cfg.pipeline.lease_ttl_s)
    steps = [source_step(cfg, name), shard_step(cfg), train_step(cfg, name, 1), train_step(cfg, name, 2),
             evaluate_step(cfg, name), register_step(cfg), segment_step(cfg)]  # fmt: skip
    error = None
    with tracking.flow_run("full_pipeline", cfg, run_name=f"{name}-{job}", tags={"geopix.ray_job": job}) as parent:
        try:
            pipeline.run(steps)
        except Exception as exc:  # noqa: BLE001 - reported with the step it stopped at, then re-raised below
            error = exc
        summary = pipeline.summary() | {
            "job": job, "mlflow_run_id": parent.info.run_id,
            "mlflow_ui": tracking.run_url(parent.info.run_id),
            "failed_step": None if error is None else STEPS[len(pipeline.outcomes)],
            "error": None if error is None else redact_text(f"{type(error).__name__}: {error}"),
        }  # fmt: skip
        mlflow.log_dict(summary, "pipeline_summary.json")
        storage.write_bytes(storage.join_uri(pipeline.root, "runs", f"{job}.json"), json.dumps(summary, indent=1).encode())
    print(format_summary(summary), flush=True)
    if error is not None:
        raise error
    segment = next((o.outputs for o in pipeline.outcomes if o.step == "segment"), None)
    return 1 if segment and segment["quarantined"] else 0


def format_summary(summary: dict) -> str:
    lines = [f"PIPELINE {summary['pipeline']} (job {summary['job']}): MLflow {summary['mlflow_ui']}"]
    for step in summary["steps"]:
        shown = {k: v for k, v in step["outputs"].items() if k != "mlflow_run_id" and not isinstance(v, dict)}
        lines.append(f"  {step['step']:<9} {step['status']:<8} {step['seconds']:>7.1f} s  {json.dumps(shown, default=str)}")
        if isinstance(step["outputs"].get("scenes"), dict):
            lines += [f"      {scene}: {where}" for scene, where in step["outputs"]["scenes"].items()]
    for step in summary["not_run"]:
        if step == summary["failed_step"]:
            lines.append(f"  {step:<9} FAILED   {summary['error']}  (resubmit the same command to go on from here)")
        else:
            lines.append(f"  {step:<9} not run")
    lines.append(f"  step records: {summary['state_uri']}/steps/")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
