"""The memory-size sweep: does the class-wise memory help, and at which K? (Ray Tune + ASHA)

Trials are the grid ``sweep.memory_len`` × ``sweep.memory_dim`` (K = 0 is the ablation). A trial is
a Tune function that trains stage 1 on Ray Train (its own DeepSpeed worker group), evaluates it on
``sweep.split`` and reports — ASHA's one rung — then, unless ASHA stopped it, trains stage 2 and
reports again. Each trial is an MLflow run nested under the sweep's parent run, its training and
evaluation runs nested under it.

Resubmitting a sweep of the same name resumes it from GeoPix's own records, never from Ray Tune's
experiment state: that state is pickled (``Tuner.restore`` unpickles it), and whoever can write
``sweep.out_uri`` could plant code in it. Each submission runs a fresh Tune experiment under
``<name>/tune/<submission>/`` and never reads another's. The work itself resumes: a trial's training
runs are named after the sweep and the trial, so a finished stage is not trained again and an
interrupted one resumes from its last checkpoint (loaded without unpickling code:
train/checkpoints.py); an evaluation already published for the same model is reused. With one trial at a time (the default) ASHA sees the same reports in the same order and
makes the same decisions.

Results: a table (Markdown + CSV), the best config (JSON) and a plot of the metric against K per
size bucket, under ``<sweep.out_uri>/<name>/`` and in MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geopix import storage
from geopix.config import GeoPixConfig

log = logging.getLogger(__name__)

BUCKETS = ("overall", "small", "medium", "large")
RESULT_FILES = ("results.md", "results.csv", "best.json", "memory_sweep.png")
SWEEP_RECORD = "sweep.json"  # the grid and every submission of this sweep (plain JSON)
TUNE_DIR = "tune"  # <name>/tune/<submission>/: each submission's own Ray Tune experiment


def bucket_metric(bucket: str, kind: str) -> str:
    """The evaluation's metric name for a size bucket (``seg_cIoU``, ``seg_small_gIoU``, …)."""
    return f"seg_{kind}" if bucket == "overall" else f"seg_{bucket}_{kind}"


def trial_label(memory_len: int, memory_dim: int) -> str:
    return f"k{memory_len}-d{memory_dim}"


def memory_trial(params: dict[str, Any]) -> None:
    """One trial (runs in a Tune actor): stage 1 → evaluate → report → stage 2 → evaluate → report."""
    import mlflow
    from ray import tune

    from geopix import tracking
    from geopix.evaluate.job import evaluate_model, flat_metrics
    from geopix.train.run import train_stage

    k, d = int(params["memory_len"]), int(params["memory_dim"])
    base = json.loads(json.dumps(params["config"]))
    base["model"] |= {"memory_len": k, "memory_dim": d}
    cfg = GeoPixConfig.model_validate(base)
    sweep, label = params["sweep"], trial_label(k, d)
    tracking.configure(cfg.tracking)
    with mlflow.start_run(run_name=label, parent_run_id=params["parent_run_id"],
                          tags={tracking.TAG_STEP: "trial", "geopix.sweep": sweep}):  # fmt: skip
        mlflow.log_params({"memory_len": k, "memory_dim": d})
        model_uri = None
        for stage in (1, 2):
            trained = train_stage(cfg, stage, shards_uri=params["shards_uri"], init_model_uri=model_uri,
                                  run_name=f"{sweep}-{label}-stage{stage}", register=False)  # fmt: skip
            model_uri = trained.model_uri
            evals, eval_name = storage.join_uri(cfg.sweep.out_uri, sweep, "evals"), f"{label}-stage{stage}"
            summary, eval_uri = published_evaluation(storage.join_uri(evals, eval_name), model_uri)
            if summary is None:
                evaluation = evaluate_model(cfg, model_uri, shards_uri=params["shards_uri"], split=cfg.sweep.split,
                                            limit=cfg.sweep.eval_limit, name=eval_name, out_uri=evals)  # fmt: skip
                summary, eval_uri = evaluation.summary, evaluation.out_uri
            metrics = flat_metrics(summary)
            mlflow.log_metrics({k_: v for k_, v in metrics.items() if k_.startswith("seg_")}, step=stage)
            tune.report({**metrics, "stage": stage, "train_seconds": trained.seconds, "model_uri": model_uri,
                         "eval_uri": eval_uri})  # fmt: skip


def published_evaluation(eval_uri: str, model_uri: str) -> tuple[dict[str, Any] | None, str]:
    """The summary of a finished evaluation of ``model_uri`` at ``eval_uri`` (a resumed sweep's
    trial reuses it), or None."""
    from geopix.evaluate.job import SUMMARY_FILE

    if not storage.is_finished(eval_uri):
        return None, eval_uri
    try:
        summary = json.loads(storage.read_bytes(storage.join_uri(eval_uri, SUMMARY_FILE)))
    except (storage.StorageError, ValueError):
        return None, eval_uri
    return (summary if summary.get("model_uri") == model_uri else None), eval_uri


@dataclass
class SweepResult:
    name: str
    out_uri: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    resumed: bool  # an earlier submission of this sweep's trials was found and built on


def sweep_memory(cfg: GeoPixConfig, shards_uri: str, name: str, parent_run_id: str) -> SweepResult:
    """Run (or resume) the sweep ``name``; write its table, best config and plot."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from geopix import ray_job

    sw = cfg.sweep
    out = storage.join_uri(sw.out_uri, name)
    record_uri = storage.join_uri(out, SWEEP_RECORD)
    grid_spec = {"memory_len": sw.memory_len, "memory_dim": sw.memory_dim or [cfg.model.memory_dim],
                 "shards_uri": shards_uri, "training_hash": cfg.section_hash("data", "model", "train")}  # fmt: skip
    record = _read_record(record_uri)
    resumed = record is not None
    if resumed and record.get("grid") != grid_spec:
        raise ValueError(f"sweep {name} at {out} was started with {record.get('grid')}, not {grid_spec}; "
                         "give this sweep another --name")  # fmt: skip
    submission = ray_job.run_id()
    record = {"name": name, "grid": grid_spec, "submissions": [*(record or {}).get("submissions", []), submission]}
    storage.write_bytes(record_uri, json.dumps(record, indent=1).encode())
    if resumed:
        log.info("sweep %s: resuming from its trials' training runs and evaluations under %s", name, out)
    # A fresh Tune experiment per submission, never restored (module docstring).
    fs, root = storage.arrow_filesystem(storage.join_uri(out, TUNE_DIR))
    # The trial only coordinates: its Train workers and evaluation actors claim the CPUs/GPUs.
    # (Tune refuses an all-zero request, so it asks for a little memory instead.)
    trainable = tune.with_resources(memory_trial, {"CPU": 0, "memory": 256 * 2**20})
    tuner = tune.Tuner(
        trainable,
        param_space={
            "config": cfg.for_workers(), "shards_uri": shards_uri, "sweep": name,
            "parent_run_id": parent_run_id, "memory_len": tune.grid_search(grid_spec["memory_len"]),
            "memory_dim": tune.grid_search(grid_spec["memory_dim"]),
        },
        tune_config=tune.TuneConfig(
            metric=sw.metric, mode="max", max_concurrent_trials=sw.max_concurrent_trials,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=2, grace_period=1,
                                    reduction_factor=sw.reduction_factor),
        ),
        run_config=tune.RunConfig(name=submission, storage_path=root, storage_filesystem=fs),
    )  # fmt: skip
    with credentials_out_of_tunes_reach():
        grid = tuner.fit()
    rows = [_row(result, sw.metric) for result in grid]
    rows.sort(key=lambda r: (r["memory_dim"], r["memory_len"]))
    finished = [r for r in rows if r["stage"] == 2 and r.get(sw.metric) is not None]
    best = max(finished, key=lambda r: r[sw.metric], default=None)  # a tie: the first, the smaller memory
    write_results(rows, best, sw.metric, out)
    return SweepResult(name, out, rows, best, resumed)


@contextmanager
def credentials_out_of_tunes_reach() -> Iterator[None]:
    """Ray Tune copies ``AWS_ACCESS_KEY_ID``/``SECRET``/``SESSION_TOKEN`` from the driver's environment
    into every trial actor's runtime env, which Ray's state API shows to anyone with dashboard
    access. While Tune creates its trials they are out of this process's environment: trials take
    credentials from the cluster, as training workers do (docs/security.md). The driver's own S3
    access during the fit goes through the filesystem built before it."""
    import os

    from geopix.redaction import CREDENTIAL_ENV_VARS

    held = {k: os.environ.pop(k) for k in sorted(CREDENTIAL_ENV_VARS) if k.startswith("AWS_") and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(held)


def _read_record(uri: str) -> dict[str, Any] | None:
    try:
        record = json.loads(storage.read_bytes(uri))
    except (storage.StorageError, FileNotFoundError):
        return None
    except ValueError as exc:
        raise ValueError(f"{uri} is not a sweep record GeoPix wrote ({exc}); give this sweep another --name") from None
    return record if isinstance(record, dict) else None


def _row(result, metric: str) -> dict[str, Any]:
    params, last = result.config, result.metrics or {}
    stage = int(last.get("stage", 0))
    if result.error is not None:
        status = f"error: {str(result.error).strip().splitlines()[-1][:200]}"
    else:
        status = "finished" if stage == 2 else "stopped by ASHA after stage 1" if stage == 1 else "not run"
    row = {"memory_len": int(params["memory_len"]), "memory_dim": int(params["memory_dim"]), "stage": stage,
           "status": status, "train_seconds": last.get("train_seconds"), "model_uri": last.get("model_uri"),
           "eval_uri": last.get("eval_uri")}  # fmt: skip
    for bucket in BUCKETS:
        for kind in ("cIoU", "gIoU"):
            row[bucket_metric(bucket, kind)] = last.get(bucket_metric(bucket, kind))
    row[metric] = last.get(metric)
    # The rung ASHA decided on: each trial's stage-1 score and when it was reported.
    history = result.metrics_dataframe
    first = history[history["stage"] == 1] if history is not None and "stage" in history else None
    row["stage1_" + metric] = float(first[metric].iloc[0]) if first is not None and len(first) else None
    row["stage1_reported_at"] = float(first["timestamp"].iloc[0]) if first is not None and len(first) else None
    return row


def results_table(rows: list[dict[str, Any]], metric: str) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "–" if value is None else str(value)

    head = ["K", "dim", "stage", *(f"{b} c/gIoU" for b in BUCKETS), metric, "status"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        pairs = [f"{cell(r[bucket_metric(b, 'cIoU')])} / {cell(r[bucket_metric(b, 'gIoU')])}" for b in BUCKETS]
        lines.append("| " + " | ".join([str(r["memory_len"]), str(r["memory_dim"]), str(r["stage"]), *pairs,
                                         cell(r[metric]), r["status"]]) + " |")  # fmt: skip
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], best: dict[str, Any] | None, metric: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        (local / "results.md").write_text(results_table(rows, metric) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["memory_len"])
        writer.writeheader()
        writer.writerows(rows)
        (local / "results.csv").write_text(buffer.getvalue())
        (local / "best.json").write_text(json.dumps({"metric": metric, "best": best}, indent=1, default=str))
        sweep_plot(rows, local / "memory_sweep.png")
        for file in RESULT_FILES:
            storage.write_bytes(storage.join_uri(out, file), (local / file).read_bytes())
        storage.write_bytes(storage.join_uri(out, storage.SUCCESS_MARKER), b"")
        import mlflow

        if mlflow.active_run() is not None:  # the flow's parent run
            mlflow.log_artifacts(str(local), "sweep")


def sweep_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """cIoU and gIoU against K, one line per size bucket (and memory dim); filled markers are
    stage-2 results, hollow ones trials ASHA stopped after stage 1."""
    from geopix.plotting import pyplot

    plt = pyplot()

    colours = {"overall": "black", "small": "tab:red", "medium": "tab:orange", "large": "tab:blue"}
    dims = sorted({r["memory_dim"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("cIoU", "gIoU"), strict=True):
        for dim, style in zip(dims, ("-", "--", ":", "-."), strict=False):
            trials = [r for r in rows if r["memory_dim"] == dim and r[bucket_metric("overall", kind)] is not None]
            ks = [r["memory_len"] for r in trials]
            for bucket in BUCKETS:
                values = [r[bucket_metric(bucket, kind)] for r in trials]
                label = bucket if len(dims) == 1 else f"{bucket}, dim {dim}"
                ax.plot(ks, values, style, color=colours[bucket], label=label, linewidth=2 if bucket == "overall" else 1.3)
                for r, v in zip(trials, values, strict=True):
                    if v is not None:
                        ax.plot(r["memory_len"], v, "o", color=colours[bucket],
                                markerfacecolor=colours[bucket] if r["stage"] == 2 else "white")  # fmt: skip
        ax.set_xlabel("memory size K (0 = no memory)")
        ax.set_title(f"{kind} on the validation split by size bucket")
        ax.set_xticks(sorted({r["memory_len"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("IoU")
    axes[1].legend(loc="best", fontsize=8, title="filled: after stage 2; hollow: stopped after stage 1",
                   title_fontsize=7)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
