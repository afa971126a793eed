"""`geopix stack up | status | env | down` through the installed CLI, on a stack of its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from geopix.stack import MARKER_ENV, PORT_FIELDS, SERVICES, Stack, free_ports, port_holder
from geopix.storage import boto3_client
from tests.conftest import geopix_cli


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*geopix_cli(), *args], check=False, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"geopix {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def marked_processes(stack_id: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get(MARKER_ENV, "").startswith(f"{stack_id}:"):
                found.append(f"{proc.pid} {proc.info['name']}")
        except psutil.Error:
            continue
    return found


@pytest.fixture
def stack_args(tmp_path):
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    overrides = [f"stack.{k}={v}" for k, v in ports.items()]
    args = ["--state-dir", str(tmp_path / "state")]
    for override in overrides:
        args += ["--set", override]
    yield args, ports, tmp_path / "state"
    # Never leave a stack behind, whatever failed.
    if (tmp_path / "state" / "stack.json").exists():
        cli("stack", "down", "--state-dir", str(tmp_path / "state"), check=False)


def test_port_already_taken_is_named_and_nothing_starts(stack_args):
    args, ports, state_dir = stack_args
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["mlflow_port"]))
        squatter.listen()
        out = cli("stack", "up", *args, check=False)
    assert out.returncode == 2
    assert f"port {ports['mlflow_port']} (mlflow) is already in use by pid {os.getpid()}" in out.stderr
    assert "nothing was started" in out.stderr
    assert not (state_dir / "stack.json").exists()
    assert all(port_holder("127.0.0.1", port) is None for port in ports.values())


def test_up_status_env_half_up_down(stack_args):
    args, ports, state_dir = stack_args
    started = time.monotonic()
    up = cli("stack", "up", *args)
    print(f"cold start: {time.monotonic() - started:.1f} s")
    assert "GeoPix stack is up" in up.stdout

    # All three answer.
    env = json.loads(cli("stack", "env", "--state-dir", str(state_dir), "--format", "json").stdout)
    stack = Stack.at(state_dir)
    buckets = {b["Name"] for b in boto3_client(stack.s3_settings()).list_buckets()["Buckets"]}
    assert set(stack.buckets.all()) <= buckets
    with urllib.request.urlopen(env["MLFLOW_TRACKING_URI"] + "/health", timeout=5) as response:
        assert response.read().strip() == b"OK"
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    jobs = urllib.request.Request(
        env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(jobs, timeout=5) as response:
        assert response.status == 200
    # Token auth is on: no token, no jobs API.
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/", timeout=5)
    assert denied.value.code == 401

    status = json.loads(cli("stack", "status", "--state-dir", str(state_dir), "--json").stdout)
    assert [s["state"] for s in status] == ["running"] * 3
    pids = {s["service"]: s["pid"] for s in status}

    # `up` again is a no-op.
    again = cli("stack", "up", *args)
    assert again.stdout.count("already running") == 3
    assert {
        s["service"]: s["pid"]
        for s in json.loads(cli("stack", "status", "--state-dir", str(state_dir), "--json").stdout)
    } == pids

    # Objects survive down/up (moto is in-memory; the stack saves and restores them): enough of
    # them that a restore can be killed half way, below.
    client = boto3_client(stack.s3_settings())
    client.put_object(Bucket="geopix-data", Key="keep/me.txt", Body=b"still here")
    for i in range(60):
        client.put_object(Bucket="geopix-data", Key=f"many/{i:04d}.txt", Body=f"object {i}".encode())

    # Half up: mlflow's root process dies hard, leaving its worker behind.
    os.kill(pids["mlflow"], signal.SIGKILL)
    psutil.Process(pids["mlflow"]).wait(timeout=10) if psutil.pid_exists(pids["mlflow"]) else None
    half = cli("stack", "status", "--state-dir", str(state_dir), check=False)
    assert half.returncode == 1
    assert "mlflow DOWN" in " ".join(half.stdout.split())
    repaired = cli("stack", "up", *args)
    assert (
        f"mlflow: was started (pid {pids['mlflow']}) but is no longer running; restarting it"
        in repaired.stdout
    )
    status = {
        s["service"]: s
        for s in json.loads(cli("stack", "status", "--state-dir", str(state_dir), "--json").stdout)
    }
    assert all(s["state"] == "running" for s in status.values())
    assert status["s3"]["pid"] == pids["s3"] and status["ray"]["pid"] == pids["ray"]
    assert status["mlflow"]["pid"] != pids["mlflow"]

    # Changing ports of a running stack is refused with the reason.
    moved = cli("stack", "up", "--state-dir", str(state_dir), "--set", "stack.s3_port=1", check=False)
    assert moved.returncode == 2 and "run `geopix stack down` first" in moved.stderr

    stack_id = json.loads((state_dir / "stack.json").read_text())["stack_id"]
    down = cli("stack", "down", "--state-dir", str(state_dir))
    assert "saved 61 objects" in down.stdout
    assert marked_processes(stack_id) == []
    assert {port: port_holder("127.0.0.1", port) for port in ports.values()} == dict.fromkeys(ports.values())
    assert [
        s["state"]
        for s in json.loads(
            cli("stack", "status", "--state-dir", str(state_dir), "--json", check=False).stdout
        )
    ] == ["stopped"] * len(SERVICES)

    # A `stack up` killed while it restores leaves the S3 server with part of the snapshot: the
    # next `down` must not save that part over the whole, and the next `up` finishes the restore.
    saved = sorted(p.relative_to(state_dir / "s3" / "objects") for p in (state_dir / "s3" / "objects").rglob("*") if p.is_file())
    assert len(saved) == 61
    killed = subprocess.Popen([*geopix_cli(), "stack", "up", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    for line in killed.stdout:
        if "restoring 61 objects" in line:  # recorded as running before the first object goes up
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(30)
    assert json.loads((state_dir / "stack.json").read_text())["s3_restore"] == "running"
    half = len(boto3_client(Stack.at(state_dir).s3_settings()).list_objects_v2(Bucket="geopix-data").get("Contents", []))
    assert half < 61
    cli("stack", "down", "--state-dir", str(state_dir))
    after = sorted(p.relative_to(state_dir / "s3" / "objects") for p in (state_dir / "s3" / "objects").rglob("*") if p.is_file())
    assert after == saved  # the whole snapshot, not the part the server held
    cli("stack", "up", *args)
    client = boto3_client(Stack.at(state_dir).s3_settings())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="geopix-data")
    assert sum(len(p.get("Contents", [])) for p in pages) == 61
    assert client.get_object(Bucket="geopix-data", Key="keep/me.txt")["Body"].read() == b"still here"

    # Everything the stack keeps is the user's alone, the token and the state file from their first byte.
    assert state_dir.stat().st_mode & 0o777 == 0o700
    assert (state_dir / "ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    assert (state_dir / "stack.json").stat().st_mode & 0o777 == 0o600
    cli("stack", "down", "--state-dir", str(state_dir))
    assert marked_processes(stack_id) == []


def test_a_non_loopback_host_is_refused_unless_asked_for(stack_args):
    """The S3 server and MLflow have no authentication: listening beyond loopback needs a flag."""
    args, _, state_dir = stack_args
    out = cli("stack", "up", *args, "--set", "stack.host=0.0.0.0", check=False)
    assert out.returncode == 2 and "stack.host=0.0.0.0 is not a loopback address" in out.stderr
    assert "stack.allow_non_loopback=true" in out.stderr and not (state_dir / "stack.json").exists()
    warned = []
    from geopix.config import StackConfig

    Stack(StackConfig(state_dir=state_dir, host="0.0.0.0", allow_non_loopback=True))._check_host(warned.append)
    assert warned and "no authentication" in warned[0]
    Stack(StackConfig(state_dir=state_dir, host="127.0.0.2"))._check_host(warned.append)  # loopback: silent
    assert len(warned) == 1
