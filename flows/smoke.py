"""Smoke flow: one Ray job that touches every service of the stack.

    ray job submit --working-dir . -- python flows/smoke.py [--config tiny] [--set key=value]

It runs a few Ray tasks, writes a small JSON report to S3 under a prefix unique to the job, and
logs a parent MLflow run with one child run per step. Two submissions never share outputs.
"""

from __future__ import annotations

import json
import os
import socket
import time

import mlflow
import ray

from geopix import storage, tracking
from geopix.flow import flow_parser, start_flow


@ray.remote(num_cpus=0.5)
def square(x: int) -> dict:
    return {"x": x, "square": x * x, "pid": os.getpid(), "host": socket.gethostname()}


def main(argv: list[str] | None = None) -> dict:
    parser = flow_parser(__doc__)
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args(argv)
    config, job_id = start_flow(args)
    out_uri = storage.join_uri(f"s3://{config.storage.buckets.data}", "smoke", job_id, "report.json")

    with tracking.flow_run(
        "smoke", config, run_name=f"smoke-{job_id}", tags={"geopix.ray_job": job_id}
    ) as run:
        with tracking.step_run("ray_tasks", params={"tasks": args.tasks}):
            started = time.perf_counter()
            results = ray.get([square.remote(i) for i in range(args.tasks)])
            for step, result in enumerate(results):
                mlflow.log_metric("square", result["square"], step=step)
            mlflow.log_metric("seconds", time.perf_counter() - started)
        with tracking.step_run("write_report"):
            report = {
                "job_id": job_id,
                "mlflow_run_id": run.info.run_id,
                "sum_of_squares": sum(r["square"] for r in results),
                "worker_pids": sorted({r["pid"] for r in results}),
            }
            storage.write_bytes(out_uri, json.dumps(report, indent=2).encode())
            mlflow.log_dict(report, "report.json")
            mlflow.log_param("report_uri", out_uri)
    print(
        f"SMOKE OK job={job_id} mlflow_run={run.info.run_id} report={out_uri} "
        f"sum_of_squares={report['sum_of_squares']}",
        flush=True,
    )
    return report


if __name__ == "__main__":
    main()
