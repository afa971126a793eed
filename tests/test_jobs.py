"""`ray job submit` against the stack, exactly as the README writes it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from geopix import storage

RAY = str(Path(sys.executable).parent / "ray")


def ray_cli(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        [RAY, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert out.returncode == 0, f"ray {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def job_status(job_id: str) -> str:
    """The job's status from the job server's REST API (with the stack's token)."""
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(
        f"{os.environ['RAY_API_SERVER_ADDRESS']}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["status"]


def wait_for(job_id: str, timeout: float = 300) -> str:
    """Poll until the job ends; its final status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_smoke_flow_submitted_twice_runs_as_two_jobs(stack, repo_root):
    # Two submissions in flight at once: one uploads the checkout as its working dir, the other
    # relies on the stack running job drivers from the checkout.
    submitted = [
        ray_cli(
            "job",
            "submit",
            "--no-wait",
            "--working-dir",
            ".",
            "--",
            "python",
            "flows/smoke.py",
            cwd=repo_root,
        ),
        ray_cli(
            "job", "submit", "--no-wait", "--", "python", "flows/smoke.py", "--tasks", "4", cwd=repo_root
        ),
    ]
    job_ids = [re.search(r"Job '(raysubmit_\w+)' submitted successfully", out).group(1) for out in submitted]
    assert job_ids[0] != job_ids[1]
    statuses = [wait_for(job_id) for job_id in job_ids]
    logs = [ray_cli("job", "logs", job_id, cwd=repo_root) for job_id in job_ids]
    assert statuses == ["SUCCEEDED", "SUCCEEDED"], logs

    client = MlflowClient()
    run_ids = set()
    for job_id, log, tasks in zip(job_ids, logs, (8, 4), strict=True):
        line = re.search(r"SMOKE OK job=(\S+) mlflow_run=(\w+) report=(\S+) sum_of_squares=(\d+)", log)
        assert line, log
        assert line.group(1) == job_id
        assert int(line.group(4)) == sum(i * i for i in range(tasks))
        report = json.loads(storage.read_bytes(line.group(3)))
        assert report["job_id"] == job_id and report["mlflow_run_id"] == line.group(2)
        run = client.get_run(line.group(2))
        assert run.info.status == "FINISHED" and run.data.tags["geopix.ray_job"] == job_id
        children = client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
        assert sorted(c.data.tags["geopix.step"] for c in children) == ["ray_tasks", "write_report"]
        run_ids.add(run.info.run_id)
    assert len(run_ids) == 2
