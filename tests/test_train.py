"""Two-stage training with DeepSpeed ZeRO on Ray Train (2 workers, gloo) against the local stack:
losses fall, stage 1 feeds stage 2, the model is published, registered and chats; ZeRO-1; a
killed worker resumes from the last checkpoint; a killed run resumes by name; bad inputs fail
fast with their names."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from geopix import storage, tracking
from geopix.config import load_config
from geopix.data.loader import ShardError

SOURCE = "s3://geopix-data/tests/train/source"
SHARDS = "s3://geopix-data/tests/train/shards"
SMALL = [
    "model.image_size=64",
    "data.chip_size=64",
    "model.llm_hidden_size=64",
    "model.llm_num_layers=2",
    "model.llm_intermediate_size=128",
    "model.decoder_dim=32",
    "model.memory_dim=32",
    "train.batch_size=4",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "train.tokenizer_vocab_size=400",
    "train.overlay_samples=3",
    "train.runs_uri=s3://geopix-checkpoints/tests/runs",
    "train.models_uri=s3://geopix-checkpoints/tests/models",
    "train.registered_model=geopix-test",
    f"data.shards_uri={SHARDS}",
    "tracking.experiment=geopix-tests-train",
    "tracking.system_metrics=false",
]


def small_config(*overrides: str):
    return load_config("tiny", [*SMALL, *overrides])


@pytest.fixture(scope="module")
def shards(stack, ray_cluster) -> str:
    from geopix.data.shard import shard_sources
    from geopix.data.synth import generate_chips

    cfg = small_config()
    generate_chips(SOURCE, seed=0, chip_size=64, train_images=40, val_images=4, test_images=4,
                   test_seed_offset=1000, progress=False)
    shard_sources([SOURCE], SHARDS, cfg.data, overwrite=True)
    tracking.configure(cfg.tracking)
    return SHARDS


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def first_and_last(series: list[tuple[int, float]], n: int = 3) -> tuple[float, float]:
    values = [v for _, v in sorted(series)]
    return sum(values[:n]) / n, sum(values[-n:]) / n


@pytest.fixture(scope="module")
def two_stages(shards):
    from geopix.train.run import train_stage

    cfg = small_config("train.stage1.max_steps=30", "train.stage1.warmup_steps=3",
                       "train.stage2.max_steps=10", "train.stage2.warmup_steps=2")
    first = train_stage(cfg, 1)
    second = train_stage(cfg, 2, init_model_uri=first.model_uri)
    return cfg, first, second


def test_two_stages_zero2_losses_fall_and_the_model_chats(two_stages):
    from geopix.model import GeoPixModel

    cfg, first, second = two_stages
    client = MlflowClient()
    run = client.get_run(first.mlflow_run_id)
    errors = {k: v for k, v in run.data.tags.items() if k.startswith("geopix.worker_error")}
    assert first.steps == 30 and second.steps == 10 and first.resumed_from_step is None, errors
    assert run.data.params["world_size"] == "2" and run.data.params["zero_stage"] == "2"
    for key in ("loss/text", "loss/mask_bce", "loss/mask_dice", "loss/class", "lr", "samples_per_s",
                "tokens_per_s"):
        assert len(history(first.mlflow_run_id, key)) == 30, key
    start, end = first_and_last(history(first.mlflow_run_id, "loss/total"))
    assert end < 0.8 * start, (start, end)
    text_start, text_end = first_and_last(history(first.mlflow_run_id, "loss/text"))
    assert text_end < text_start
    lrs = [v for _, v in sorted(history(first.mlflow_run_id, "lr"))]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.2 * max(lrs)  # warm-up, then cosine
    artifacts = {a.path for a in client.list_artifacts(first.mlflow_run_id)}
    assert {"config.yaml", "model", "loss_curves_stage1.png", "train_overlays_stage1.png"} <= artifacts

    # Stage 2 started from stage 1's model and added LoRA; the published model loads and chats.
    model, tokenizer, processor = GeoPixModel.load_pretrained(second.model_uri)
    assert model.lora and model.stage == 2
    assert model.class_names[1] == "ship"  # from the shard set's class catalog
    from geopix.data.loader import iter_batches
    from geopix.train.data import RankReader

    record = next(RankReader(SHARDS, "train", rank=0, world=1, seed=0).epoch_records(0))[1]
    answers = model.chat(processor([record["image"]]), ["[refer] the ship"], tokenizer, max_new_tokens=8)
    assert isinstance(answers[0].text, str) and answers[0].masks.dtype.is_floating_point is False
    batch = next(iter(iter_batches([record], tokenizer, image_size=64, batch_size=1, max_length=None,
                                   augment=False, seed=0)))
    assert model(**batch).mask_logits.shape[-1] == 64

    version = client.get_model_version_by_alias(cfg.train.registered_model, "candidate")
    assert version.version == second.model_version and version.source == second.model_uri
    stage1 = client.get_model_version_by_alias(cfg.train.registered_model, "stage1")
    assert stage1.version == first.model_version


def test_finished_run_is_not_trained_again(two_stages):
    from geopix.train.run import train_stage

    cfg, first, _ = two_stages
    again = train_stage(cfg, 1, run_name=first.run_name)
    assert again.model_uri == first.model_uri and again.mlflow_run_id == first.mlflow_run_id


def test_zero1_trains(shards):
    from geopix.train.run import train_stage

    cfg = small_config("train.zero_stage=1", "train.stage1.max_steps=6", "train.stage1.warmup_steps=2")
    result = train_stage(cfg, 1, register=False)
    assert result.steps == 6 and result.model_version is None
    assert MlflowClient().get_run(result.mlflow_run_id).data.params["zero_stage"] == "1"
    assert storage.list_files(result.model_uri, "_SUCCESS")


def _registered_checkpoints(cfg, run_name: str) -> int:
    """Checkpoints Ray Train has registered for the run (its checkpoint manager's own snapshot)."""
    import json

    uri = storage.join_uri(cfg.train.runs_uri, run_name, "checkpoint_manager_snapshot.json")
    try:
        return len(json.loads(storage.read_bytes(uri)).get("checkpoint_results", []))
    except (storage.StorageError, ValueError):
        return 0


def _kill_a_worker_after_checkpoint(cfg, run_name: str, timeout: float = 300) -> int:
    """Once Ray Train has registered the run's first checkpoint, SIGKILL one of its workers."""
    import os
    import signal

    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout
    while not _registered_checkpoints(cfg, run_name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_name} registered no checkpoint within {timeout} s")
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    pid = int(workers[-1]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_worker_resumes_from_last_checkpoint(shards):
    """FailureConfig restarts the worker group; it resumes at the checkpoint's step, redoing at
    most one checkpoint interval, and still finishes all steps."""
    from geopix.train.run import train_stage

    cfg = small_config("train.stage1.max_steps=25", "train.stage1.warmup_steps=2", "train.max_failures=1")
    name = f"fault-{time.time_ns()}"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train_stage(cfg, 1, run_name=name,
                                                                               register=False)))
    thread.start()
    _kill_a_worker_after_checkpoint(cfg, name)
    thread.join(timeout=600)
    result = outcome["result"]
    assert result.steps == 25
    steps = [s for s, _ in history(result.mlflow_run_id, "loss/total")]
    resumed_at = result.resumed_from_step
    assert resumed_at is not None and resumed_at % cfg.train.checkpoint_every == 0 and 0 < resumed_at < 25
    assert sorted(set(steps)) == list(range(1, 26))  # every step done, the global step went on
    redone = len(steps) - 25  # steps logged twice: done before the failure, redone after it
    assert 0 <= redone <= cfg.train.checkpoint_every


def test_killed_run_resumes_by_name_and_fresh_runs_never_do(shards):
    from geopix.train.run import TrainError, train_stage

    cfg = small_config("train.stage1.max_steps=15", "train.stage1.warmup_steps=2", "train.max_failures=0")
    name = f"byname-{time.time_ns()}"
    errors: list = []

    def first_attempt():
        try:
            train_stage(cfg, 1, run_name=name, register=False)
        except TrainError as error:
            errors.append(error)

    thread = threading.Thread(target=first_attempt)
    thread.start()
    _kill_a_worker_after_checkpoint(cfg, name)
    thread.join(timeout=600)
    assert errors, "the run should fail with no retries left"
    resumed = train_stage(cfg, 1, run_name=name, register=False)
    steps = [s for s, _ in history(resumed.mlflow_run_id, "loss/total")]
    assert resumed.steps == 15 and resumed.resumed_from_step in (5, 10)
    assert steps == list(range(resumed.resumed_from_step + 1, 16))  # this run started at the checkpoint
    fresh = train_stage(cfg, 1, register=False)  # no name: a new run, whatever exists
    fresh_steps = [s for s, _ in history(fresh.mlflow_run_id, "loss/total")]
    assert fresh.run_name != name and fresh.resumed_from_step is None and fresh_steps == list(range(1, 16))
    with pytest.raises(TrainError, match="exists with other inputs"):
        train_stage(small_config("train.stage1.lr=0.5"), 1, run_name=name)


def test_bad_inputs_fail_fast_with_names(shards, tmp_path):
    from geopix.train.run import TrainError, train_stage

    cfg = small_config()
    with pytest.raises(ShardError, match="no shards for split 'train'"):
        train_stage(cfg, 1, shards_uri="s3://geopix-data/tests/train/nothing-here")
    corrupt = "s3://geopix-data/tests/train/corrupt"
    storage.write_bytes(f"{corrupt}/train/shard-00000-0.parquet", b"PAR1 this is not parquet")
    with pytest.raises(ShardError, match="shard-00000-0.parquet is not readable Parquet"):
        train_stage(cfg, 1, shards_uri=corrupt)
    started = time.monotonic()
    with pytest.raises(TrainError, match="does not fit the cluster.*CPU: needs 8"):
        train_stage(small_config("train.num_workers=8"), 1)
    with pytest.raises(TrainError, match="stage 2 starts from a stage-1 model"):
        train_stage(cfg, 2)
    assert time.monotonic() - started < 30
    assert mlflow.active_run() is None
