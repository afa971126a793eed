"""flows/tune_memory.py as a Ray job on the local stack: three memory sizes including 0 under ASHA,
trials nested in MLflow, results and the per-bucket plot in S3; resubmitting restores the sweep
instead of redoing it."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from mlflow.tracking import MlflowClient

from geopix import storage
from tests.test_jobs import ray_cli, wait_for
from tests.test_pipeline import SMALL as PIPELINE_SMALL

SOURCE = "s3://geopix-data/tests/sweep/source"
SHARDS = "s3://geopix-data/tests/sweep/shards"
OUT = "s3://geopix-checkpoints/tests/sweeps"
SMALL = [o for o in PIPELINE_SMALL if not o.startswith(("pipeline.", "tracking.experiment"))] + [
    "train.runs_uri=s3://geopix-checkpoints/tests/sweep/runs",
    "train.models_uri=s3://geopix-checkpoints/tests/sweep/models",
    "train.stage1.max_steps=10", "train.stage2.max_steps=4",
    "sweep.memory_len=[0,2,4]", "sweep.eval_limit=12", f"sweep.out_uri={OUT}",
    "tracking.experiment=geopix-tests-sweep",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(stack, ray_cluster) -> str:
    from geopix.config import load_config
    from geopix.data.shard import shard_sources
    from geopix.data.synth import generate_chips

    cfg = load_config("tiny", SMALL)
    generate_chips(SOURCE, seed=3, chip_size=64, train_images=30, val_images=6, test_images=2,
                   test_seed_offset=1000, progress=False)  # fmt: skip
    shard_sources([SOURCE], SHARDS, cfg.data, overwrite=True)
    return SHARDS


def submit(repo_root, name: str) -> str:
    sets = [a for o in SMALL for a in ("--set", o)]
    out = ray_cli("job", "submit", "--no-wait", "--working-dir", ".", "--", "python", "flows/tune_memory.py",
                  "--config", "tiny", "--name", name, "--shards", SHARDS, *sets, cwd=repo_root)  # fmt: skip
    return re.search(r"Job '(raysubmit_\w+)' submitted successfully", out).group(1)


def test_memory_sweep_runs_asha_over_k_and_restores(shards, repo_root):
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    job = submit(repo_root, name)
    assert wait_for(job, timeout=1500) == "SUCCEEDED", ray_cli("job", "logs", job, cwd=repo_root)
    log = ray_cli("job", "logs", job, cwd=repo_root)
    assert f"SWEEP {name} (new): 3 trials" in log
    out = storage.join_uri(OUT, name)
    best = json.loads(storage.read_bytes(storage.join_uri(out, "best.json")))
    rows = list(csv_rows(storage.read_bytes(storage.join_uri(out, "results.csv")).decode()))
    assert sorted(int(r["memory_len"]) for r in rows) == [0, 2, 4]
    assert all(r["status"] in ("finished", "stopped by ASHA after stage 1") for r in rows), rows
    # ASHA's rule, checked against what the trials reported: a trial stops after stage 1 exactly
    # when its score is below the median of the stage-1 scores reported before it.
    rows.sort(key=lambda r: float(r["stage1_reported_at"]))
    for i, row in enumerate(rows):
        earlier = sorted(float(r["stage1_seg_cIoU"]) for r in rows[:i])
        stopped = bool(earlier) and float(row["stage1_seg_cIoU"]) < median(earlier)
        assert (row["status"] != "finished") == stopped, rows
    finished = [r for r in rows if r["status"] == "finished"]
    assert best["best"]["memory_len"] == int(max(finished, key=lambda r: float(r["seg_cIoU"]))["memory_len"])
    png = storage.read_bytes(storage.join_uri(out, "memory_sweep.png"))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # Trials are MLflow runs nested under the sweep's parent, each with its training and evaluation runs.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("geopix-tests-sweep").experiment_id
    [parent] = client.search_runs([experiment], f"tags.`geopix.flow` = 'tune_memory' and params.sweep_name = '{name}'")
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(t.data.params["memory_len"]) for t in trials) == [0, 2, 4]
    for trial in trials:
        steps = {r.data.tags["geopix.step"] for r in client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{trial.info.run_id}'")}  # fmt: skip
        assert {"train-stage1", "evaluate"} <= steps
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/results.md", "sweep/memory_sweep.png", "sweep/best.json"}  # fmt: skip

    again = submit(repo_root, name)  # the same name: restored, nothing retrained
    assert wait_for(again, timeout=600) == "SUCCEEDED", ray_cli("job", "logs", again, cwd=repo_root)
    assert f"SWEEP {name} (restored): 3 trials" in ray_cli("job", "logs", again, cwd=repo_root)
    assert json.loads(storage.read_bytes(storage.join_uri(out, "best.json"))) == best


def csv_rows(text: str):
    import csv
    import io

    return csv.DictReader(io.StringIO(text))


def median(values: list[float]) -> float:
    import numpy as np

    return float(np.nanpercentile(values, 50))
