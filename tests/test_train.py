"""Two-stage training with DeepSpeed ZeRO on Ray Train (2 workers, gloo) against the local stack:
losses fall, stage 1 feeds stage 2, the model is published, registered and chats; a killed worker
resumes from the last checkpoint; a killed ZeRO-1 run resumes by name, never from a checkpoint
planted to run code; bad inputs fail fast with their names; no secret reaches Ray's metadata."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from geopix import storage, tracking
from geopix.config import ConfigError, load_config
from geopix.data import schema
from geopix.data.shard_set import ShardError
from tests.conftest import SMALL_SHARDS
from tests.records import SEG_VOCAB

SHARDS = SMALL_SHARDS
SMALL = [
    "model.image_size=64",
    "data.chip_size=64",
    "model.llm_hidden_size=64",
    "model.llm_num_layers=2",
    "model.llm_intermediate_size=128",
    "model.decoder_dim=32",
    "model.memory_dim=32",
    "model.memory_len=8",  # the tiny preset has none; training still learns one into use under ZeRO
    "train.batch_size=4",
    # The mechanics tests train stage 1 on the seg tasks, whatever the preset: 30 steps of all five
    # tasks' text (long captions among them) do not bring the total loss down by a fifth.
    "train.stage1.tasks=[segment,refer]",
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
def shards(small_shards) -> str:
    tracking.configure(small_config().tracking)
    return small_shards


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def first_and_last(series: list[tuple[int, float]], n: int = 3) -> tuple[float, float]:
    values = [v for _, v in sorted(series)]
    return sum(values[:n]) / n, sum(values[-n:]) / n


@pytest.fixture(scope="module")
def two_stages(shards):
    """Stage 1 (30 steps) with one of its workers killed after the first checkpoint (FailureConfig
    restarts the worker group, which resumes there), then stage 2 from stage 1's model."""
    from geopix.train.run import train_stage

    cfg = small_config("train.stage1.max_steps=30", "train.stage1.warmup_steps=3", "train.checkpoint_every=10",
                       "train.max_failures=1", "train.stage2.max_steps=10", "train.stage2.warmup_steps=2")  # fmt: skip
    name = f"two-stages-{time.time_ns()}"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(first=train_stage(cfg, 1, run_name=name)))
    thread.start()
    _kill_a_worker_after_checkpoint(cfg, name)
    thread.join(timeout=600)
    first = outcome["first"]
    second = train_stage(cfg, 2, init_model_uri=first.model_uri)
    return cfg, first, second


def test_two_stages_zero2_losses_fall_and_the_model_chats(two_stages):
    from geopix.model import GeoPixModel

    cfg, first, second = two_stages
    client = MlflowClient()
    run = client.get_run(first.mlflow_run_id)
    errors = {k: v for k, v in run.data.tags.items() if k.startswith("geopix.worker_error")}
    assert first.steps == 30 and second.steps == 10, errors
    assert run.data.params["world_size"] == "2" and run.data.params["zero_stage"] == "2"
    for key in ("loss/text", "loss/mask_bce", "loss/mask_dice", "loss/class", "lr", "samples_per_s",
                "tokens_per_s"):
        assert {s for s, _ in history(first.mlflow_run_id, key)} == set(range(1, 31)), key
    start, end = first_and_last(history(first.mlflow_run_id, "loss/total"))
    assert end < 0.8 * start, (start, end)
    text_start, text_end = first_and_last(history(first.mlflow_run_id, "loss/text"))
    assert text_end < text_start
    # The memory starts as the identity (output projection 0) and is learned into use under ZeRO.
    read_in = [v for _, v in sorted(history(first.mlflow_run_id, "memory/out_proj_norm_0"))]
    assert cfg.model.memory_len > 0 and read_in and read_in[-1] > 0.01, read_in
    # The preset's vision feature cache hits in the real loop: a picture's records share its turn
    # within an epoch (0.38 at the end here: 10-step epochs, each drawing new turns, and the
    # restarted worker's cache starts empty). test_loader checks the per-image draw itself.
    hit_rate = [v for _, v in sorted(history(first.mlflow_run_id, "feature_cache/hit_rate"))]
    assert cfg.train.vision_feature_cache_mb > 0 and cfg.train.augment_per_image and hit_rate[-1] > 0.1, hit_rate
    lrs = [v for _, v in sorted(dict(history(first.mlflow_run_id, "lr")).items())]  # a redone step once
    assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.2 * max(lrs)  # warm-up, then cosine
    artifacts = {a.path for a in client.list_artifacts(first.mlflow_run_id)}
    assert {"config.yaml", "model", "loss_curves_stage1.png", "train_overlays_stage1.png",
            "text_loss_by_task_stage1.png"} <= artifacts
    # The text loss per task: a curve for each task the stage trained on, none for the others.
    stage_tasks = set(cfg.train.stage1.tasks or schema.TASKS)
    curves = {t for t in schema.TASKS if history(first.mlflow_run_id, f"loss/text_{t}")}
    assert "segment" in curves and curves <= stage_tasks, (curves, stage_tasks)

    # Stage 2 started from stage 1's model and added LoRA; the published model loads and chats.
    model, tokenizer, processor = GeoPixModel.load_pretrained(storage.local_copy(second.model_uri))
    assert model.lora and model.stage == 2
    assert model.class_names[1] == "ship"  # from the shard set's class catalog
    from geopix.data.batches import iter_batches
    from geopix.train.rank_reader import RankReader

    record = next(r for _, r in RankReader(SHARDS, "train", rank=0, world=1, seed=0).epoch_records(0)
                  if r["task"] == "refer")  # fmt: skip
    assert record["image_id"]  # the workers draw a picture's turn by it (train.augment_per_image)
    # Augmentation leaves relation phrases alone and the image class map trains on complete answers by it.
    assert record["phrase_type"]
    answers = model.chat(processor([record["image"]]), ["[refer] the ship"], tokenizer, max_new_tokens=8)
    assert isinstance(answers[0].text, str) and answers[0].masks.dtype.is_floating_point is False
    batch = next(iter(iter_batches([record], tokenizer, image_size=64, batch_size=1, max_length=None,
                                   augment=False, seed=0, seg_vocab=SEG_VOCAB,
                                   chat_template=model.config.chat_template)))
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


def test_task_weights_repeat_and_thin_a_tasks_records_per_epoch(shards):
    """train.stageN.task_weights: 2 shows each record twice an epoch, 0.5 a seeded half that
    changes with the epoch; other tasks and runs without weights keep their order; resumable."""
    from collections import Counter

    from geopix.train.rank_reader import RankReader

    def epoch(reader, number, skip=0):
        return [r["record_id"] for _, r in reader.epoch_records(number, skip)]

    plain = RankReader(SHARDS, "train", rank=0, world=1, seed=0)
    weights = {"vqa": 2.0, "caption": 0.5}
    weighted = RankReader(SHARDS, "train", rank=0, world=1, seed=0, task_weights=weights)
    task = {r["record_id"]: r["task"] for _, r in plain.epoch_records(0)}
    base, seen = Counter(task.values()), Counter(epoch(weighted, 0))
    assert {i: n for i, n in seen.items() if task[i] == "vqa"} == {i: 2 for i, t in task.items() if t == "vqa"}
    captions = [{i for i in epoch(weighted, e) if task[i] == "caption"} for e in (0, 1)]
    assert all(0 < len(c) < base["caption"] for c in captions) and captions[0] != captions[1]
    assert max(n for i, n in seen.items() if task[i] == "caption") == 1
    others = [i for i in epoch(plain, 0) if task[i] not in weights]
    assert [i for i in epoch(weighted, 0) if task[i] not in weights] != others  # the mix moved them ...
    assert {i: n for i, n in seen.items() if task[i] not in weights} == dict.fromkeys(others, 1)  # ... once each
    assert epoch(RankReader(SHARDS, "train", rank=0, world=1, seed=0, task_weights={}), 0) == epoch(plain, 0)
    # A position is still (epoch, rows): skipping the first rows resumes the same sequence.
    full = epoch(weighted, 1)
    assert epoch(weighted, 1, skip=17) == full[17:]
    from geopix.train.run import TrainError, check_data

    with pytest.raises(TrainError, match=r"train.stage1.task_weights: \['segmnet'\] are not tasks"):
        check_data(small_config("train.stage1.task_weights.segmnet=2"), SHARDS, 1)
    # The stage's task list is checked the same way, before any shard is read (here: none exist).
    with pytest.raises(TrainError, match=r"train.stage2.tasks: \['vqq'\] are not tasks"):
        check_data(small_config("train.stage2.tasks=[vqa,vqq]"), "s3://geopix-data/no-shards-here", 2)
    with pytest.raises(ConfigError, match="vqa: inf is not a finite number > 0"):
        small_config("train.stage1.task_weights.vqa=.inf")


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


def test_killed_worker_resumes_from_last_checkpoint(two_stages):
    """FailureConfig restarted stage 1's worker group: it resumed at the checkpoint's step, redoing
    at most one checkpoint interval, and still finished all steps."""
    cfg, first, _ = two_stages
    steps = [s for s, _ in history(first.mlflow_run_id, "loss/total")]
    resumed_at = first.resumed_from_step
    assert resumed_at is not None and resumed_at % cfg.train.checkpoint_every == 0 and 0 < resumed_at < 30
    assert sorted(set(steps)) == list(range(1, 31))  # every step done, the global step went on
    redone = len(steps) - 30  # steps logged twice: done before the failure, redone after it
    assert 0 <= redone <= cfg.train.checkpoint_every


class PlantedCode:
    """Pickles to ``os.system("touch <marker>")``: what a checkpoint planted by someone who can
    write the checkpoints prefix would run on every worker that loads it with a full unpickler."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_killed_run_resumes_by_name_never_from_a_planted_checkpoint_and_fresh_runs_never_do(shards, tmp_path):
    """ZeRO-1 here (ZeRO-2 resumes in the tests above): a run killed with no retries left resumes
    when the same name is given again; a checkpoint file whose pickle would run code is refused and
    runs nothing; a run without a name never picks up anyone's checkpoint."""
    import io

    import torch

    from geopix.train.run import TrainError, train_stage

    cfg = small_config("train.zero_stage=1", "train.stage1.max_steps=15", "train.stage1.warmup_steps=2",
                       "train.max_failures=0")  # fmt: skip
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

    # Someone who can write the checkpoints prefix replaces the model states of every checkpoint.
    run_uri = storage.join_uri(cfg.train.runs_uri, name)
    states = [storage.join_uri(run_uri, u) for u in storage.list_objects(run_uri) if u.endswith("mp_rank_00_model_states.pt")]
    genuine = {uri: storage.read_bytes(uri) for uri in states}
    marker = tmp_path / "planted-code-ran"
    planted = io.BytesIO()
    torch.save({"module": PlantedCode(str(marker))}, planted)
    for uri in states:
        storage.write_bytes(uri, planted.getvalue())
    with pytest.raises(TrainError, match="mp_rank_00_model_states.pt was refused.*Nothing of it was run"):
        train_stage(cfg, 1, run_name=name, register=False)
    assert not marker.exists()

    for uri, payload in genuine.items():  # the genuine checkpoints back: the run resumes
        storage.write_bytes(uri, payload)
    resumed = train_stage(cfg, 1, run_name=name, register=False)
    steps = [s for s, _ in history(resumed.mlflow_run_id, "loss/total")]
    assert resumed.steps == 15 and resumed.resumed_from_step in (5, 10)
    assert steps == list(range(resumed.resumed_from_step + 1, 16))  # this run started at the checkpoint
    assert MlflowClient().get_run(resumed.mlflow_run_id).data.params["zero_stage"] == "1"
    assert storage.list_files(resumed.model_uri, "_SUCCESS") and resumed.model_version is None

    fresh = train_stage(cfg, 1, register=False)  # no name: a new run, whatever exists
    fresh_steps = [s for s, _ in history(fresh.mlflow_run_id, "loss/total")]
    assert fresh.run_name != name and fresh.resumed_from_step is None and fresh_steps == list(range(1, 16))
    with pytest.raises(TrainError, match="exists with other inputs"):
        train_stage(small_config("train.stage1.lr=0.5"), 1, run_name=name)


def test_bad_inputs_fail_fast_with_names(shards, tmp_path):
    from geopix.train.run import TrainError, train_stage

    cfg = small_config()
    with pytest.raises(ShardError, match="nothing-here holds no finished shard set"):
        train_stage(cfg, 1, shards_uri="s3://geopix-data/tests/train/nothing-here")
    storage.write_bytes(f"s3://geopix-data/tests/train/no-train/{storage.SUCCESS_MARKER}", b"")
    with pytest.raises(ShardError, match="no shards for split 'train'"):
        train_stage(cfg, 1, shards_uri="s3://geopix-data/tests/train/no-train")
    corrupt = "s3://geopix-data/tests/train/corrupt"
    storage.write_bytes(f"{corrupt}/train/shard-00000-0.parquet", b"PAR1 this is not parquet")
    with pytest.raises(ShardError, match="holds no finished shard set"):  # a shard set is read once finished
        train_stage(cfg, 1, shards_uri=corrupt)
    storage.write_bytes(f"{corrupt}/{storage.SUCCESS_MARKER}", b"")
    with pytest.raises(ShardError, match="shard-00000-0.parquet is not readable Parquet"):
        train_stage(cfg, 1, shards_uri=corrupt)
    started = time.monotonic()
    with pytest.raises(TrainError, match="does not fit the cluster.*CPU: needs 8"):
        train_stage(small_config("train.num_workers=8"), 1)
    with pytest.raises(TrainError, match="stage 2 starts from a stage-1 model"):
        train_stage(cfg, 2)
    assert time.monotonic() - started < 30
    assert mlflow.active_run() is None


def test_no_secret_value_reaches_rays_job_actor_or_task_state(stack, two_stages):
    """Ray keeps every actor's and task's runtime env and the jobs' metadata, and its dashboard hands
    them to anyone with dashboard access: the S3 secret this process holds must appear in none."""
    import json
    import os
    import urllib.request

    secret = stack.config.s3_secret_access_key.get_secret_value()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret  # the driver has it; the workers ran with it
    token = stack.ray_token_path.read_text().strip()
    seen = {}
    for path in ("/api/v0/actors?detail=1&limit=10000", "/api/v0/tasks?detail=1&limit=10000",
                 "/api/v0/jobs?detail=1&limit=10000", "/api/jobs/"):  # fmt: skip
        request = urllib.request.Request(stack.url("ray") + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            seen[path] = response.read().decode()
        leaked = [line for line in seen[path].replace("}, {", "}\n{").splitlines() if secret in line]
        assert not leaked, (path, [line[:300] for line in leaked[:3]])
    actors = json.loads(seen["/api/v0/actors?detail=1&limit=10000"])["data"]["result"]["result"]
    workers = [a for a in actors if a.get("class_name") == "RayTrainWorker"]
    assert workers and all("AWS_ENDPOINT_URL" in json.dumps(a.get("runtime_env_info") or a) for a in workers[:1])
