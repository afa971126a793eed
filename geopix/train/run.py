"""One training stage as a Ray Train job: checks, tokenizer, TorchTrainer, MLflow, registration.

``train_stage(cfg, 1)`` then ``train_stage(cfg, 2, init_model_uri=stage1.model_uri)`` is the
whole of GEOPIX.md §2. Every stage is a Ray Train run named ``run_name`` under
``train.runs_uri``: running the same name again resumes from its latest checkpoint (Ray Train
finds it; the worker loop restores model, optimizer, scheduler and data position); a run without
a name gets a fresh unique one, so it can never pick up someone else's checkpoint. A name reused
with another config or other inputs is refused (``geopix_run.json`` beside the checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geopix import storage, tracking
from geopix.config import GeoPixConfig, PipelineConfig, to_yaml
from geopix.data.schema import TASKS
from geopix.data.shard_set import ShardError, check_shards, class_names
from geopix.redaction import shareable_env
from geopix.train.rank_reader import is_task
from geopix.vocabulary import SegVocabulary

if TYPE_CHECKING:
    from geopix.model.configuration import GeoPixModelConfig

log = logging.getLogger("geopix.train")
RUN_FILE = "geopix_run.json"  # the run's inputs (a reused name must match them)
DONE_FILE = "geopix_done.json"  # written when the model is published and registered
TOKENIZER_PREFIX = "tokenizer"
# Settings the workers need (S3 endpoint and region, MLflow address, GeoPix and GDAL settings), passed
# through Ray's runtime env. Credentials never are: Ray keeps the runtime env in its job/actor/task
# state (the dashboard shows it), so workers take credentials from the cluster itself (see
# redaction.shareable_env and docs/security.md).
PROPAGATED_ENV_PREFIXES = ("AWS_", "MLFLOW_", "GEOPIX_", "GDAL_", "CPL_")


class TrainError(RuntimeError):
    """A training run that cannot start or did not finish; the message says why."""


@dataclass
class TrainResult:
    stage: int
    run_name: str
    model_uri: str
    mlflow_run_id: str | None
    model_version: str | None
    steps: int
    seconds: float
    resumed_from_step: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------- checks
def check_resources(cfg: GeoPixConfig) -> None:
    """Fail now, not after a scheduling timeout, when the cluster cannot host the workers."""
    import ray

    train = cfg.train
    if not train.require_resources_now:
        return
    have = ray.cluster_resources()
    need = {"CPU": train.num_workers * train.threads_per_worker}
    if train.use_gpu:
        need["GPU"] = train.num_workers
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        detail = ", ".join(f"{k}: needs {n:g}, cluster has {h:g}" for k, (n, h) in short.items())
        raise TrainError(
            f"train.num_workers={train.num_workers} × threads_per_worker={train.threads_per_worker}"
            f"{' with a GPU each' if train.use_gpu else ''} does not fit the cluster ({detail}); "
            "lower num_workers or set train.require_resources_now=false on an autoscaling cluster"
        )


def check_data(
    cfg: GeoPixConfig, shards_uri: str, stage: int, init_model: GeoPixModelConfig | None = None
) -> dict[str, Any]:
    """Readable shards with records of this stage's tasks, whose classes and seg runs fit the model
    trained (``init_model``'s architecture when the run starts from a saved model, else the config's);
    returns the shard set's manifest."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from geopix.data.shard_set import read_manifest

    settings = cfg.train.stage(stage)
    tasks = settings.tasks
    for field, names in (("tasks", tasks or []), ("task_weights", settings.task_weights or {})):
        unknown = sorted(set(names) - set(TASKS))
        if unknown:  # before any I/O: a misspelt task would otherwise read as "no training records"
            raise TrainError(f"train.stage{stage}.{field}: {unknown} are not tasks ({', '.join(TASKS)})")
    fs, files = check_shards(shards_uri, "train")
    rows = 0
    for path in files:
        try:
            column = pq.read_table(path, columns=["task"], filesystem=fs)["task"]
        except Exception as exc:  # noqa: BLE001 - name the shard whatever went wrong
            raise ShardError(f"shard {path} cannot be read: {exc}") from None
        rows += len(column) if not tasks else int(pc.sum(is_task(column, tasks)).as_py() or 0)
    if rows == 0:
        which = f" of tasks {tasks}" if tasks else ""
        raise ShardError(f"no training records{which} in {shards_uri}/train ({len(files)} shards)")
    manifest = read_manifest(shards_uri)
    model = init_model or cfg.model
    whose = "the initial model's" if init_model else "model."
    ids = [c["id"] for c in manifest.get("classes", [])]
    if ids and max(ids) >= model.num_classes:
        raise TrainError(f"{shards_uri}: class id {max(ids)} does not fit {whose}num_classes={model.num_classes}")
    checked = manifest.get("seg_vocabulary")  # absent in shard sets from before it was recorded
    if checked is not None and SegVocabulary(**checked) != model.seg_vocabulary:
        fix = "" if init_model else f"set them to {checked['tokens_per_scale']} × {checked['num_scales']} or "
        raise TrainError(
            f"{shards_uri}: its records answer with the seg run {SegVocabulary(**checked).run}, this model with "
            f"{model.seg_vocabulary.run} ({whose}seg_token_num × num_scales); {fix}shard the source again with "
            "this model's seg tokens"
        )
    return manifest


# ------------------------------------------------------------------------------- tokenizer
def prepare_tokenizer(cfg: GeoPixConfig, shards_uri: str, run_uri: str, init_model_uri: str | None) -> str:
    """The URI of the tokenizer the workers load: the initial model's; a real LLM's with GeoPix's
    tokens added; or (tiny) a BPE trained on the train split's conversations, saved with the run."""
    uri = storage.join_uri(run_uri, TOKENIZER_PREFIX)
    if init_model_uri:
        return init_model_uri  # a model directory: its tokenizer/ is read
    try:
        storage.local_copy(uri)
        return uri  # a resumed run keeps the tokenizer it started with
    except storage.StorageError:
        pass
    from geopix.model.modeling import add_geopix_tokens

    if cfg.model.llm_weights:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(storage.local_copy(cfg.model.llm_weights)), local_files_only=True
        )
        add_geopix_tokens(tokenizer, cfg.model)
    else:
        tokenizer = train_corpus_tokenizer(cfg, shards_uri)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return storage.upload_directory(directory, uri)


def train_corpus_tokenizer(cfg: GeoPixConfig, shards_uri: str):
    import pyarrow.parquet as pq

    from geopix.data.tokenizer import corpus_texts, train_tokenizer

    fs, files = check_shards(shards_uri, "train")

    def records():
        for path in files:
            table = pq.read_table(path, columns=["conversation"], filesystem=fs)
            yield from table.to_pylist()

    return train_tokenizer(
        corpus_texts(records()),
        vocab_size=cfg.train.tokenizer_vocab_size,
        seg_vocab=cfg.model.seg_vocabulary,
    )


# ----------------------------------------------------------------------------------- runs
def run_identity(cfg: GeoPixConfig, stage: int, shards_uri: str, init_model_uri: str | None) -> dict[str, Any]:
    # What shapes the model: a run resumed after a change elsewhere (segmentation, evaluation) is
    # still the same run.
    return {"training_hash": cfg.section_hash("data", "model", "train"), "stage": stage, "shards_uri": shards_uri,
            "init_model_uri": init_model_uri}


def claim_run(run_uri: str, identity: dict[str, Any]) -> bool:
    """Write the run's identity, or check it against the one stored; True when the run exists."""
    path = storage.join_uri(run_uri, RUN_FILE)
    try:
        stored = json.loads(storage.read_bytes(path))
    except (storage.StorageError, FileNotFoundError):
        storage.write_bytes(path, json.dumps(identity, indent=2).encode())
        return False
    if stored != identity:
        diff = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
        raise TrainError(
            f"run {run_uri} exists with other inputs ({diff}: stored vs now); "
            "pick another run name (or none, for a fresh one)"
        )
    return True


def worker_env(cfg: GeoPixConfig) -> dict[str, str]:
    env = shareable_env(os.environ, PROPAGATED_ENV_PREFIXES)
    threads = str(cfg.train.threads_per_worker)
    env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed JIT-compiles a small op on first use; a shared cache makes that once per machine and
    # environment (the build embeds the environment's paths: two checkouts would rebuild each other's).
    import hashlib
    import sys

    per_env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "geopix" / "torch_extensions" / per_env)),
    )
    return env


def train_stage(
    cfg: GeoPixConfig,
    stage: int,
    *,
    shards_uri: str | None = None,
    init_model_uri: str | None = None,
    run_name: str | None = None,
    register: bool = True,
) -> TrainResult:
    """Train one stage on the connected Ray cluster (``ray.init`` is called when not yet)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from geopix import ray_job
    from geopix.model.configuration import saved_model_config
    from geopix.train.loop import train_loop_per_worker

    started = time.perf_counter()
    stage_cfg = cfg.train.stage(stage)  # validates the stage number
    shards_uri = (shards_uri or cfg.data.shards_uri).rstrip("/")
    if stage == 2 and not init_model_uri:
        raise TrainError("stage 2 starts from a stage-1 model: pass init_model_uri")
    if not ray.is_initialized():
        ray.init()
    check_resources(cfg)
    # A run from a saved model trains that model's architecture, whatever the config's model section says.
    init_model = saved_model_config(init_model_uri) if init_model_uri else None
    manifest = check_data(cfg, shards_uri, stage, init_model)
    run_name = run_name or f"stage{stage}-{cfg.config_hash()[:8]}-{ray_job.run_id()}"
    run_uri = storage.join_uri(cfg.train.runs_uri, run_name)
    existed = claim_run(run_uri, run_identity(cfg, stage, shards_uri, init_model_uri))
    done = finished_run(run_uri)
    if done is not None:
        log.info("stage %d: run %s already finished (%s); nothing to do", stage, run_name, done["model_uri"])
        return TrainResult(**done)
    tokenizer_uri = prepare_tokenizer(cfg, shards_uri, run_uri, init_model_uri)
    model_uri = storage.join_uri(cfg.train.models_uri, run_name)
    fs, storage_path = storage.arrow_filesystem(cfg.train.runs_uri)
    global_batch = cfg.train.batch_size * cfg.train.num_workers * cfg.train.grad_accum_steps

    with tracking.step_run(
        f"train-stage{stage}",
        params={
            "stage": stage,
            "run_name": run_name,
            "shards_uri": shards_uri,
            "init_model_uri": init_model_uri or "",
            "world_size": cfg.train.num_workers,
            "zero_stage": cfg.train.zero_stage,
            "global_batch": global_batch,
            "max_steps": stage_cfg.max_steps,
            "lr": stage_cfg.lr,
            "tasks": ",".join(stage_cfg.tasks or ["all"]),
            "task_weights": ",".join(f"{t}={w:g}" for t, w in sorted((stage_cfg.task_weights or {}).items()))
            or "none",
        },
        config=cfg,
    ) as run:
        import mlflow

        mlflow.log_text(to_yaml(cfg), "config.yaml")
        loop = {
            "config": cfg.for_workers(),
            "config_hash": cfg.config_hash(),
            "stage": stage,
            "run_name": run_name,
            "run_uri": run_uri,
            "shards_uri": shards_uri,
            "tokenizer_uri": tokenizer_uri,
            "init_model_uri": init_model_uri,
            "model_uri": model_uri,
            "class_names": class_names(manifest, (init_model or cfg.model).num_classes),
            "mlflow_run_id": run.info.run_id,
        }
        resources = {"CPU": cfg.train.threads_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
        trainer = TorchTrainer(
            train_loop_per_worker=train_loop_per_worker,
            train_loop_config=loop,
            scaling_config=ScalingConfig(
                num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
            ),
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage_path,
                storage_filesystem=fs if storage.is_s3_uri(cfg.train.runs_uri) else None,
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                worker_runtime_env={"env_vars": worker_env(cfg)},
            ),
        )
        log.info(
            "stage %d: run %s (%s), %d workers, ZeRO-%d, global batch %d, %d steps",
            stage, run_name, "resuming" if existed else "fresh", cfg.train.num_workers,
            cfg.train.zero_stage, global_batch, stage_cfg.max_steps,
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; keep the root cause's text
            raise TrainError(f"stage {stage} run {run_name} failed: {_root_cause(exc)}") from exc
        if result.error is not None:
            raise TrainError(f"stage {stage} run {run_name} failed: {_root_cause(result.error)}")
        metrics = result.metrics or {}
        if not storage.list_files(model_uri, storage.SUCCESS_MARKER):
            raise TrainError(f"stage {stage} run {run_name} ended without publishing {model_uri}")
        seconds = time.perf_counter() - started
        mlflow.log_metric("wall_seconds", seconds)
        log_model_and_curves(run.info.run_id, model_uri, stage)
        version = register_model(cfg, run.info.run_id, model_uri, stage) if register else None
    resumed = _resumed_step(run.info.run_id)
    steps = int(metrics.get("step", stage_cfg.max_steps))
    result = TrainResult(stage, run_name, model_uri, run.info.run_id, version, steps, seconds, resumed)
    storage.write_bytes(storage.join_uri(run_uri, DONE_FILE), json.dumps(result.as_dict(), indent=2).encode())
    return result


def finished_run(run_uri: str) -> dict[str, Any] | None:
    """The result a finished run recorded (its model published), or None."""
    try:
        return json.loads(storage.read_bytes(storage.join_uri(run_uri, DONE_FILE)))
    except (storage.StorageError, FileNotFoundError):
        return None


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return " ".join(text[-3:]) if text else type(error).__name__


def _resumed_step(run_id: str) -> int | None:
    """The checkpoint step the run last resumed from (a restarted worker group logs it), or None."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, "resumed_at_step")
    return int(max(history, key=lambda m: m.timestamp).value) if history else None


# --------------------------------------------------------------------- MLflow artifacts, registry
def log_model_and_curves(run_id: str, model_uri: str, stage: int) -> None:
    """The consolidated model directory and a loss-curve picture, into the stage's MLflow run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from geopix.train.figures import loss_curves
    from geopix.train.loop import LOSS_KEYS, TASK_TEXT_KEYS

    local = storage.local_copy(model_uri)
    mlflow.log_artifacts(str(local), "model")
    client = MlflowClient()

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    series = {key: h for key in (*(f"loss/{k}" for k in LOSS_KEYS), "loss/total") if (h := history(key))}
    # One panel, a line per task: which task's answers the stage is (still) learning.
    by_task = {key.removeprefix("text_"): {"text loss (answer-token CE)": h}
               for key in TASK_TEXT_KEYS if (h := history(f"loss/{key}"))}
    with tempfile.TemporaryDirectory() as directory:
        if series:
            path = loss_curves({f"stage {stage}": series}, Path(directory) / f"loss_curves_stage{stage}.png",
                               f"stage {stage} training losses")
            mlflow.log_artifact(str(path))
        if by_task:
            path = loss_curves(by_task, Path(directory) / f"text_loss_by_task_stage{stage}.png",
                               f"stage {stage} text loss per task")
            mlflow.log_artifact(str(path))


def register_model(cfg: GeoPixConfig, run_id: str, model_uri: str, stage: int) -> str:
    """The version of ``train.registered_model`` for this run's consolidated model directory — a new
    one the first time, the same one when asked again — with alias ``candidate`` (the pipeline
    promotes it to ``champion`` after evaluation)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = cfg.train.registered_model
    try:
        client.create_registered_model(name, description="GeoPix models (geopix train)")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    # Idempotent: a registration killed after creating the version, or rerun on purpose, finds it.
    existing = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                if v.source == model_uri]  # fmt: skip
    if existing:
        version = min(existing, key=lambda v: int(v.version))
    else:
        version = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags={"geopix.stage": str(stage), "geopix.model_uri": model_uri}
        )
    client.set_registered_model_alias(name, "candidate", version.version)
    if stage == 1:
        client.set_registered_model_alias(name, "stage1", version.version)
    return str(version.version)


def promotion_gate(metrics: dict[str, float], pipeline: PipelineConfig) -> dict[str, Any]:
    """Whether an evaluated model may become ``champion``: its ``pipeline.gate_metric`` reaches
    ``gate_min`` and at most ``gate_max_failed_share`` of the evaluated records failed (a model whose
    evaluation failed on most records would otherwise pass on the few it answered)."""
    if pipeline.gate_metric not in metrics:
        raise TrainError(f"pipeline.gate_metric {pipeline.gate_metric!r} is not an evaluation metric; "
                         f"have {', '.join(sorted(metrics))}")  # fmt: skip
    value = float(metrics[pipeline.gate_metric])
    records, failed = float(metrics.get("records", 0)), float(metrics.get("failed_records", 0))
    failed_share = failed / records if records else 1.0
    return {
        "value": value, "failed_share": failed_share,
        "passed": value >= pipeline.gate_min and failed_share <= pipeline.gate_max_failed_share,
        "rule": f"{pipeline.gate_metric} >= {pipeline.gate_min} and failed records <= {pipeline.gate_max_failed_share:.0%}",
    }  # fmt: skip


def register_evaluated(cfg: GeoPixConfig, stage2: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
    """Register the evaluated stage-2 model (``stage2``: its training step's outputs) as
    ``candidate``, and as ``champion`` when it passed ``gate`` (:func:`promotion_gate`); the gate's
    figures go to the active MLflow run. The same model again (a rerun after a kill, ``--only
    register``) keeps its version. Returns what the pipeline records of the step."""
    import mlflow

    p = cfg.pipeline
    version = register_model(cfg, stage2["mlflow_run_id"], stage2["model_uri"], 2)
    if gate["passed"]:
        promote(cfg, version, "champion")
    mlflow.log_metrics({"gate_value": gate["value"], "gate_failed_share": gate["failed_share"],
                        "gate_passed": float(gate["passed"])})  # fmt: skip
    return {"model": f"models:/{cfg.train.registered_model}/{version}", "version": version,
            "champion": gate["passed"], "gate_metric": p.gate_metric, "gate_value": gate["value"],
            "gate_min": p.gate_min, "failed_share": gate["failed_share"],
            "gate_max_failed_share": p.gate_max_failed_share}  # fmt: skip


def promote(cfg: GeoPixConfig, version: str, alias: str = "champion") -> None:
    """Point ``alias`` of ``train.registered_model`` at ``version`` (the pipeline's gate decides)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(cfg.train.registered_model, alias, version)
