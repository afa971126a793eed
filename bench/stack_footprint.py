"""Footprint of the embedded stack: cold start time, idle memory, stop time, venv size.

    .venv/bin/python bench/stack_footprint.py [--settle 15]

The baseline, run first in the same script on the same machine, is a bare Ray head started the
same way (dashboard and job server on, token auth) without the S3 and MLflow servers: the
figures for the full stack are printed next to it and as ratios. Memory is PSS (shared pages
split between the processes sharing them), summed over every process a service owns.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from geopix.config import BucketsConfig
from geopix.stack import SERVICES, Stack, config_on_free_ports


def new_stack(root: Path, name: str) -> Stack:
    return Stack(config_on_free_ports(root / name, persist_s3=False), BucketsConfig())


def memory_mb(stack: Stack) -> dict[str, float]:
    return {status.name: status.memory_mb for status in stack.status() if status.running}


def bare_ray_head(stack: Stack, settle: float) -> tuple[float, float, float]:
    """Start only the Ray service of ``stack``: (start seconds, idle MB, stop seconds)."""
    for directory in ("logs", "ray"):
        (stack.state_dir / directory).mkdir(parents=True, exist_ok=True)
    stack.ray_token_path.write_text(uuid.uuid4().hex)
    stack_id = uuid.uuid4().hex[:12]
    started = time.perf_counter()
    record = stack._start("ray", stack_id)
    stack._wait_answering("ray", record)
    start_s = time.perf_counter() - started
    state = {"stack_id": stack_id, "services": {"ray": record}}
    stack._write_state(state)
    time.sleep(settle)
    idle = memory_mb(stack).get("ray", 0.0)
    started = time.perf_counter()
    stack.down(echo=lambda *_: None)
    return start_s, idle, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settle", type=float, default=15.0, help="seconds to wait before reading idle memory"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="geopix-bench-") as tmp:
        root = Path(tmp)
        base_start, base_mem, base_stop = bare_ray_head(new_stack(root, "baseline"), args.settle)

        stack = new_stack(root, "stack")
        started = time.perf_counter()
        stack.up(echo=lambda *_: None)
        stack_start = time.perf_counter() - started
        time.sleep(args.settle)
        per_service = memory_mb(stack)
        started = time.perf_counter()
        stack.down(echo=lambda *_: None)
        stack_stop = time.perf_counter() - started

    venv = Path(sys.executable).parent.parent
    venv_size = subprocess.run(
        ["du", "-sh", str(venv)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    stack_mem = sum(per_service.values())
    print(f"{'':28}{'bare Ray head':>15}{'GeoPix stack':>15}{'ratio':>8}")
    print(f"{'cold start (s)':28}{base_start:>15.1f}{stack_start:>15.1f}{stack_start / base_start:>8.2f}")
    print(f"{'idle memory, PSS (MB)':28}{base_mem:>15.0f}{stack_mem:>15.0f}{stack_mem / base_mem:>8.2f}")
    print(f"{'stop (s)':28}{base_stop:>15.1f}{stack_stop:>15.1f}{stack_stop / base_stop:>8.2f}")
    print("idle memory by service (MB): " + ", ".join(f"{s} {per_service.get(s, 0):.0f}" for s in SERVICES))
    print(f"venv size: {venv_size} ({venv})")


if __name__ == "__main__":
    main()
