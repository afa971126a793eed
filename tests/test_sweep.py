"""flows/tune_memory.py on the local stack: two memory sizes, 0 (the ablation) and 2, under ASHA, trials nested
in MLflow, results and the per-bucket plot in S3; resubmitting resumes the sweep instead of redoing
it, and never unpickles what is stored under sweep.out_uri."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from geopix import storage
from geopix.config import REPO_ROOT
from tests.conftest import SMALL_SHARDS
from tests.test_pipeline import SMALL as PIPELINE_SMALL

SHARDS = SMALL_SHARDS
OUT = "s3://geopix-checkpoints/tests/sweeps"
SMALL = [o for o in PIPELINE_SMALL if not o.startswith(("pipeline.", "tracking.experiment"))] + [
    "train.runs_uri=s3://geopix-checkpoints/tests/sweep/runs",
    "train.models_uri=s3://geopix-checkpoints/tests/sweep/models",
    "train.stage1.max_steps=10", "train.stage2.max_steps=4",
    # One DeepSpeed worker per trial (train.num_workers=1, from the pipeline test's settings): what
    # this test checks is the sweep (Tune, ASHA, MLflow, outputs, resuming); two-worker DeepSpeed
    # is test_train's.
    # Both trials at once: ASHA then decides on what was reported first, which the test reads back.
    "sweep.memory_len=[0,2]", "sweep.eval_limit=12", "sweep.max_concurrent_trials=2", f"sweep.out_uri={OUT}",
    "tracking.experiment=geopix-tests-sweep",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(small_shards) -> str:
    return small_shards


def run_flow(name: str) -> str:
    """flows/tune_memory.py's main in this process (connected to the stack's Ray, as a job driver
    is; submitting flows as Ray jobs is tested in test_jobs and test_pipeline): what it printed."""
    import contextlib
    import io
    import runpy

    flow = runpy.run_path(str(REPO_ROOT / "flows" / "tune_memory.py"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = flow["main"](["--config", "tiny", "--name", name, "--shards", SHARDS, *[a for o in SMALL for a in ("--set", o)]])
    assert code == 0, printed.getvalue()
    return printed.getvalue()


def test_memory_sweep_runs_asha_over_k_and_resumes_without_unpickling(shards, tmp_path):
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    log = run_flow(name)
    assert f"SWEEP {name} (new): 2 trials" in log
    out = storage.join_uri(OUT, name)
    best = json.loads(storage.read_bytes(storage.join_uri(out, "best.json")))
    rows = list(csv_rows(storage.read_bytes(storage.join_uri(out, "results.csv")).decode()))
    assert sorted(int(r["memory_len"]) for r in rows) == [0, 2]
    assert all(r["status"] in ("finished", "stopped by ASHA after stage 1") for r in rows), rows
    # ASHA's rule, checked against what the trials reported: a trial stops after stage 1 exactly
    # when its score is below the median of the stage-1 scores reported before it.
    rows.sort(key=lambda r: float(r["stage1_reported_at"]))
    for i, row in enumerate(rows):
        earlier = sorted(float(r["stage1_seg_cIoU"]) for r in rows[:i])
        stopped = bool(earlier) and float(row["stage1_seg_cIoU"]) < median(earlier)
        assert (row["status"] != "finished") == stopped, rows
    # The best finished trial; on a tie the sweep keeps the smaller memory (trials run at once, so
    # the order they reported in says nothing).
    finished = sorted((r for r in rows if r["status"] == "finished"), key=lambda r: (int(r["memory_dim"]), int(r["memory_len"])))
    assert best["best"]["memory_len"] == int(max(finished, key=lambda r: float(r["seg_cIoU"]))["memory_len"])
    png = storage.read_bytes(storage.join_uri(out, "memory_sweep.png"))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # Trials are MLflow runs nested under the sweep's parent, each with its training and evaluation runs.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("geopix-tests-sweep").experiment_id
    [parent] = client.search_runs([experiment], f"tags.`geopix.flow` = 'tune_memory' and params.sweep_name = '{name}'")
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(t.data.params["memory_len"]) for t in trials) == [0, 2]
    for trial in trials:
        steps = {r.data.tags["geopix.step"] for r in client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{trial.info.run_id}'")}  # fmt: skip
        assert {"train-stage1", "evaluate"} <= steps
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/results.md", "sweep/memory_sweep.png", "sweep/best.json"}  # fmt: skip

    # Someone who can write sweep.out_uri plants pickles where Ray Tune keeps (and Tuner.restore
    # reads) experiment state. The same name again resumes from GeoPix's own records: nothing
    # retrained, nothing unpickled.
    import io

    import torch

    from tests.test_train import PlantedCode

    marker = tmp_path / "planted-code-ran"
    planted = io.BytesIO()
    torch.save(PlantedCode(str(marker)), planted)
    tune_state = [storage.join_uri(out, "tuner.pkl")] + [
        storage.join_uri(out, o) for o in storage.list_objects(out) if o.endswith(".pkl")]  # fmt: skip
    for uri in tune_state:
        storage.write_bytes(uri, planted.getvalue())
    trained = {r["model_uri"] for r in rows}
    again = run_flow(name)
    assert f"SWEEP {name} (resumed): 2 trials" in again
    assert not marker.exists()
    resumed_best = json.loads(storage.read_bytes(storage.join_uri(out, "best.json")))
    when = "stage1_reported_at"  # when this submission's trial reported: now, not then
    assert {k: v for k, v in resumed_best["best"].items() if k != when} == {k: v for k, v in best["best"].items() if k != when}
    rows_again = list(csv_rows(storage.read_bytes(storage.join_uri(out, "results.csv")).decode()))
    assert {r["model_uri"] for r in rows_again} == trained  # the same models: none trained again
    record = json.loads(storage.read_bytes(storage.join_uri(out, "sweep.json")))
    assert len(record["submissions"]) == 2


def csv_rows(text: str):
    import csv
    import io

    return csv.DictReader(io.StringIO(text))


def median(values: list[float]) -> float:
    import numpy as np

    return float(np.nanpercentile(values, 50))
