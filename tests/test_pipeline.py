"""flows/full_pipeline.py on the local stack: every step chained and visible in MLflow, a pipeline
killed mid-training resumed at that step from its checkpoint, a finished one skipped step by step;
and the step machinery (content keys, --from-step, --only) on small steps."""

from __future__ import annotations

import json
import re
import time
import uuid

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from geopix import storage, tracking
from geopix.config import REPO_ROOT, load_config
from geopix.step_runner import SKIPPED_TAG, Context, Pipeline, PipelineError, Step
from tests.test_jobs import job_status, ray_cli, wait_for

STATE = "s3://geopix-checkpoints/tests/pipelines"
STEP_NAMES = ("a", "b", "c")


# --------------------------------------------------------------------------- step machinery
@pytest.fixture
def tracked(stack):
    cfg = load_config("tiny", ["tracking.experiment=geopix-tests-pipeline", "tracking.system_metrics=false"])
    tracking.configure(cfg.tracking)
    return cfg


def counting_steps(settings: dict, calls: list[str], prefix: str) -> list[Step]:
    """Three steps writing one object each; ``settings[name]`` is what shapes a step's output."""

    def make(name: str) -> Step:
        def run(ctx: Context) -> dict:
            calls.append(name)
            uri = storage.join_uri(prefix, f"{name}-{ctx.key}.txt")
            upstream = "".join(o["value"] for o in ctx.outputs.values())
            storage.write_bytes(uri, (upstream + settings[name]).encode())
            return {"uri": uri, "value": settings[name]}

        return Step(name, lambda ctx: settings[name], run, exists=lambda out: storage.exists(out["uri"]))

    return [make(n) for n in STEP_NAMES]


def run_once(name: str, settings: dict, prefix: str, **flags) -> tuple[list[str], list, str]:
    """One submission: the steps that did work, the outcomes, the parent MLflow run's id."""
    calls: list[str] = []
    with mlflow.start_run(run_name=name) as parent:
        outcomes = Pipeline(name, STATE, STEP_NAMES, **flags).run(counting_steps(settings, calls, prefix))
    return calls, outcomes, parent.info.run_id


def test_steps_rerun_only_when_their_inputs_or_outputs_change(tracked):
    name, prefix = f"machinery-{uuid.uuid4().hex[:8]}", f"s3://geopix-data/tests/pipeline/{uuid.uuid4().hex[:8]}"
    settings = {"a": "1", "b": "1", "c": "1"}
    assert run_once(name, settings, prefix)[0] == ["a", "b", "c"]
    calls, outcomes, parent = run_once(name, settings, prefix)
    assert calls == [] and [o.status for o in outcomes] == ["skipped"] * 3
    # The skipped steps are MLflow child runs of their submission, tagged, with their outputs.
    client = MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.data.tags["geopix.step"] for c in children) == sorted(STEP_NAMES)
    assert all(c.data.tags.get(SKIPPED_TAG) == "true" and c.data.params["output.value"] == "1" for c in children)
    settings["b"] = "2"  # b's input changed: b and everything after it
    assert run_once(name, settings, prefix)[0] == ["b", "c"]
    storage.remove_prefix(run_once(name, settings, prefix)[1][2].outputs["uri"])  # c's output deleted
    assert run_once(name, settings, prefix)[0] == ["c"]
    assert run_once(name, settings, prefix, from_step="b")[0] == ["b", "c"]
    calls, outcomes, _ = run_once(name, settings, prefix, only="a")
    assert calls == ["a"] and [o.step for o in outcomes] == ["a"]


def test_a_step_record_cut_short_reruns_the_step_instead_of_breaking_every_run(tracked):
    name, prefix = f"torn-{uuid.uuid4().hex[:8]}", f"s3://geopix-data/tests/pipeline/{uuid.uuid4().hex[:8]}"
    settings = {"a": "1", "b": "1", "c": "1"}
    run_once(name, settings, prefix)
    pipeline = Pipeline(name, STATE, STEP_NAMES)
    storage.write_bytes(pipeline.record_uri("b"), b'{"step": "b", "key": "12')  # a crash mid-write, elsewhere
    assert run_once(name, settings, prefix)[0] == ["b"]  # c's inputs did not change
    assert pipeline.record("b") is not None


def test_two_submissions_at_once_never_run_one_step_twice(tracked):
    """A step runs under its lease: a second submission finds the step held and stops, naming the
    holder; one finding it finished meanwhile skips it."""
    import threading

    from geopix.leases import Lease

    name, prefix = f"twice-{uuid.uuid4().hex[:8]}", f"s3://geopix-data/tests/pipeline/{uuid.uuid4().hex[:8]}"
    settings = {"a": "1", "b": "1", "c": "1"}
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(step: Step) -> Step:  # holds step b until the other submission has tried it
        def run(ctx):
            started.set()
            release.wait(60)
            return step.run(ctx)

        return Step(step.name, step.inputs, run, step.exists)

    first_outcome: dict = {}

    def first():
        with mlflow.start_run(run_name=name):
            steps = counting_steps(settings, calls, prefix)
            first_outcome["outcomes"] = Pipeline(name, STATE, STEP_NAMES).run([steps[0], slow(steps[1]), steps[2]])

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60)
    holder = Lease(Pipeline(name, STATE, STEP_NAMES).lease_uri("b"))
    assert not holder.acquire(renew=False)
    with pytest.raises(PipelineError, match=r"step b of pipeline twice-\w+ is being run by run .*lease"):
        run_once(name, settings, prefix)
    release.set()
    thread.join(60)
    assert [o.status for o in first_outcome["outcomes"]] == ["ran", "ran", "ran"]
    assert calls.count("b") == 1  # the second submission never ran b
    assert run_once(name, settings, prefix)[0] == []  # and once the first is done, everything is current


def test_step_flags_are_checked(tracked):
    name, prefix = f"flags-{uuid.uuid4().hex[:8]}", f"s3://geopix-data/tests/pipeline/{uuid.uuid4().hex[:8]}"
    with pytest.raises(PipelineError, match="'train' is not a step; steps: a, b, c"):
        Pipeline(name, STATE, STEP_NAMES, only="train")
    with pytest.raises(PipelineError, match="step a has no current outputs .* run without --from-step"):
        run_once(name, {"a": "1", "b": "1", "c": "1"}, prefix, only="b")


# --------------------------------------------------------------------------- the whole flow
# Stage 1 runs long enough that the first job is stopped mid-training however slow the machine is
# beside it: the test stops it after a second submission and its first checkpoint (step 5), and
# with 20 steps a loaded machine once finished stage 1 in that window.
STAGE1_STEPS = 100
SMALL = [
    "model.image_size=64", "data.chip_size=64", "model.llm_hidden_size=64", "model.llm_num_layers=2",
    "model.llm_intermediate_size=128", "model.decoder_dim=32", "model.memory_dim=32",
    "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=5", "train.tokenizer_vocab_size=400",
    "train.overlay_samples=2", f"train.stage1.max_steps={STAGE1_STEPS}", "train.stage1.warmup_steps=2",
    "train.stage2.max_steps=5", "train.stage2.warmup_steps=1", "train.max_failures=0",
    # One DeepSpeed worker: what this test checks is the chaining, the job kill and the skips;
    # two-worker DeepSpeed (and its resume after a kill) is test_train's.
    "train.num_workers=1",
    "train.runs_uri=s3://geopix-checkpoints/tests/pipeline/runs",
    "train.models_uri=s3://geopix-checkpoints/tests/pipeline/models",
    "train.registered_model=geopix-test-pipeline",
    "data.train_images=40", "data.val_images=4", "data.test_images=6", "data.scene_size=256",
    "data.source_uri=s3://geopix-data/tests/pipeline/source", "data.shards_uri=s3://geopix-data/tests/pipeline/shards",
    "evaluate.out_uri=s3://geopix-checkpoints/tests/pipeline/evals",
    "segment.out_uri=s3://geopix-predictions/tests/pipeline", "segment.overlap=16", f"pipeline.state_uri={STATE}",
    "pipeline.synthetic=true", "pipeline.gate_min=0.0",
    "tracking.experiment=geopix-tests-pipeline", "tracking.system_metrics=false",
]  # fmt: skip


def submit(repo_root, name: str, *extra: str) -> str:
    sets = [a for o in SMALL for a in ("--set", o)]
    out = ray_cli("job", "submit", "--no-wait", "--working-dir", ".", "--", "python", "flows/full_pipeline.py",
                  "--config", "tiny", "--name", name, *sets, *extra, cwd=repo_root)  # fmt: skip
    return re.search(r"Job '(raysubmit_\w+)' submitted successfully", out).group(1)


def run_in_process(name: str, *extra: str) -> tuple[str, str]:
    """flows/full_pipeline.py's main in this process (already connected to the stack's Ray):
    (its run id, what it printed)."""
    import contextlib
    import io
    import runpy

    flow = runpy.run_path(str(REPO_ROOT / "flows" / "full_pipeline.py"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert flow["main"](["--config", "tiny", "--name", name, *[a for o in SMALL for a in ("--set", o)], *extra]) == 0
    job = re.search(rf"PIPELINE {name} \(job (\S+)\)", printed.getvalue()).group(1)
    return job, printed.getvalue()


def summary_of(name: str, job: str) -> dict:
    return json.loads(storage.read_bytes(storage.join_uri(STATE, name, "runs", f"{job}.json")))


def wait_for_checkpoint(run_uri: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    snapshot = storage.join_uri(run_uri, "checkpoint_manager_snapshot.json")
    while time.monotonic() < deadline:
        try:
            if json.loads(storage.read_bytes(snapshot)).get("checkpoint_results"):
                return
        except (storage.StorageError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint under {run_uri} in {timeout} s")


def test_full_pipeline_killed_mid_training_resumes_there_and_a_finished_one_skips_all(stack, ray_cluster, repo_root):
    name = f"flow-{uuid.uuid4().hex[:8]}"
    first = submit(repo_root, name)
    # Kill the job once stage 1 has a checkpoint: source and shard are recorded, stage 1 is not.
    deadline = time.monotonic() + 600
    while not storage.exists(storage.join_uri(STATE, name, "steps", "shard.json")):
        assert time.monotonic() < deadline and job_status(first) in ("PENDING", "RUNNING"), ray_cli("job", "logs", first, cwd=repo_root)
        time.sleep(1)
    runs = "s3://geopix-checkpoints/tests/pipeline/runs"
    while not storage.list_files(runs, f"{name}-stage1-*"):
        assert time.monotonic() < deadline and job_status(first) in ("PENDING", "RUNNING"), ray_cli("job", "logs", first, cwd=repo_root)
        time.sleep(1)
    # A second submission while the first trains (a scheduler's retry): it stops at stage 1, which
    # the first holds, and names it; it never trains beside it.
    with pytest.raises(PipelineError, match=f"step stage1 of pipeline {name} is being run by run {first}"):
        run_in_process(name)
    wait_for_checkpoint(storage.list_files(runs, f"{name}-stage1-*")[0])
    ray_cli("job", "stop", first, cwd=repo_root)
    assert wait_for(first) == "STOPPED"
    assert not storage.list_files(storage.join_uri(STATE, name, "steps"), "stage1.json")

    second = submit(repo_root, name)
    assert wait_for(second, timeout=1200) == "SUCCEEDED", ray_cli("job", "logs", second, cwd=repo_root)
    summary = summary_of(name, second)
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"source": "skipped", "shard": "skipped", "stage1": "ran", "stage2": "ran",
                      "evaluate": "ran", "register": "ran", "segment": "ran"}  # fmt: skip
    outputs = {s["step"]: s["outputs"] for s in summary["steps"]}
    assert outputs["stage1"]["resumed_from_step"] and 0 < outputs["stage1"]["resumed_from_step"] < STAGE1_STEPS
    assert outputs["stage1"]["steps"] == STAGE1_STEPS and outputs["stage2"]["steps"] == 5
    # Outputs where the summary says: shards, models, the report, the registry, segmented scenes.
    assert storage.list_files(outputs["shard"]["shards_uri"], "manifest.json")
    assert storage.list_files(outputs["evaluate"]["eval_uri"], storage.SUCCESS_MARKER)
    ref = tracking.resolve_model("models:/geopix-test-pipeline@champion")
    assert ref.version == outputs["register"]["version"] and ref.uri == outputs["stage2"]["model_uri"]
    assert outputs["segment"]["processed"] == 1 and outputs["segment"]["quarantined"] == 0
    (scene_out,) = outputs["segment"]["scenes"].values()
    assert storage.list_files(scene_out, storage.SUCCESS_MARKER) and storage.list_files(scene_out, "mask.tif")
    # One parent run per submission, a child per step.
    client = MlflowClient()
    children = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")  # fmt: skip
    assert {c.data.tags["geopix.step"] for c in children} >= {"source", "shard", "train-stage1", "train-stage2",
                                                              "evaluate", "register", "segment"}  # fmt: skip

    # Submitted again (the flow itself, in this process: the job path is the one above): every step
    # skipped, the summary printed.
    third, log = run_in_process(name)
    again = summary_of(name, third)
    assert [s["status"] for s in again["steps"]] == ["skipped"] * 7
    assert {s["step"]: s["outputs"] for s in again["steps"]} == outputs
    assert f"PIPELINE {name}" in log and outputs["evaluate"]["report"] in log

    # --only register with a gate the model cannot pass: registration is idempotent (the same model
    # keeps its version, no second one), the gate says no, champion unchanged.
    fourth, _ = run_in_process(name, "--only", "register", "--set", "pipeline.gate_min=1.5")
    gated = summary_of(name, fourth)
    assert [s["status"] for s in gated["steps"]] == ["skipped"] * 5 + ["ran"] and gated["not_run"] == ["segment"]
    register = gated["steps"][-1]["outputs"]
    assert register["champion"] is False and register["version"] == outputs["register"]["version"]
    versions = MlflowClient().search_model_versions("name = 'geopix-test-pipeline'")
    assert [v.version for v in versions if v.source == outputs["stage2"]["model_uri"]] == [register["version"]]
    assert tracking.resolve_model("models:/geopix-test-pipeline@champion").version == outputs["register"]["version"]


def test_the_promotion_gate_wants_the_metric_and_few_failed_records():
    from geopix.config import PipelineConfig
    from geopix.train.run import TrainError, promotion_gate

    gate = PipelineConfig(gate_metric="seg_cIoU", gate_min=0.3, gate_max_failed_share=0.05)
    assert promotion_gate({"seg_cIoU": 0.5, "records": 100, "failed_records": 5}, gate)["passed"]
    assert not promotion_gate({"seg_cIoU": 0.2, "records": 100, "failed_records": 0}, gate)["passed"]
    # A high score on the few records an evaluation could answer is no reason to promote.
    mostly_failed = promotion_gate({"seg_cIoU": 0.9, "records": 100, "failed_records": 60}, gate)
    assert not mostly_failed["passed"] and mostly_failed["failed_share"] == 0.6
    assert not promotion_gate({"seg_cIoU": 0.9, "records": 0, "failed_records": 0}, gate)["passed"]
    with pytest.raises(TrainError, match="'seg_cIoU' is not an evaluation metric; have records"):
        promotion_gate({"records": 3}, gate)
