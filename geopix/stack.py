"""The embedded stack: a real Ray head, S3-compatible server and MLflow server on loopback.

``geopix stack up`` starts, in order, an S3 server (``moto_server``) with the project's buckets,
an MLflow tracking server (sqlite backend, artifacts in the S3 bucket) and a Ray head with its
dashboard and job server (token auth on). Everything it owns lives under one state directory:
``stack.json`` (the config it was started with and the pids), ``logs/``, the sqlite database,
the Ray token and session files, and the S3 objects saved on ``down``.

``down`` stops only what ``up`` started: each service is launched with a marker in its
environment (``GEOPIX_STACK_SERVICE=<stack id>:<service>``) that every descendant inherits,
even one that starts its own session, so ``down`` finds and stops all of them and no others.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path

import psutil
from tqdm import tqdm

from geopix.config import REPO_ROOT, BucketsConfig, StackConfig
from geopix.storage import S3Settings, boto3_client, write_local_atomic

SERVICES = ("s3", "mlflow", "ray")  # start order; stopped in reverse
STATE_FILE = "stack.json"
# stack.json's record of the S3 restore: "running" from before its first object until its last.
RESTORE_KEY, RESTORE_RUNNING, RESTORE_DONE = "s3_restore", "running", "done"
MARKER_ENV = "GEOPIX_STACK_SERVICE"
# Ray puts unix sockets under its temp dir; their paths must stay under the kernel's 107 bytes.
RAY_TEMP_DIR_MAX_LEN = 40


class StackError(RuntimeError):
    """The stack cannot do what was asked; the message names the service, port or file."""


@dataclass
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    answering: bool
    url: str
    log: Path
    memory_mb: float

    @property
    def state(self) -> str:
        if self.running and self.answering:
            return "running"
        if self.running:
            return "starting"
        return "stopped" if self.pid is None else "DOWN"

    def line(self) -> str:
        where = f"pid {self.pid}" if self.pid else "no pid"
        mem = f"  {self.memory_mb:.0f} MB" if self.running else ""
        extra = "" if self.state in ("running", "stopped") else f"  (log: {self.log})"
        return f"  {self.name:<7}{self.state:<9}{where:<11}{self.url}{mem}{extra}"


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"    | {line}" for line in tail)


def port_holder(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound, else who holds it (as far as this user can see)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return None
        except OSError:
            pass
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline())[:80]})"
    except (psutil.Error, OSError):
        pass
    return "another process"


PORT_FIELDS = (
    "s3_port",
    "mlflow_port",
    "ray_port",
    "ray_dashboard_port",
    "ray_client_port",
    "ray_dashboard_agent_port",
)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports free right now (each socket is held until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def config_on_free_ports(state_dir: Path, **overrides) -> StackConfig:
    """A stack config whose every port is free now: for tests and benchmarks beside a user's stack."""
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    return StackConfig(state_dir=state_dir, **(ports | overrides))


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bytes | None:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


class Stack:
    """The local stack described by ``config``; its state lives in ``config.state_dir``."""

    def __init__(self, config: StackConfig, buckets: BucketsConfig | None = None):
        self.config = config
        self.buckets = buckets or BucketsConfig()
        self.state_dir = Path(config.state_dir).expanduser().absolute()
        self.bin_dir = Path(sys.executable).parent

    # ----------------------------------------------------------------------------- state
    @classmethod
    def at(cls, state_dir: str | Path) -> Stack:
        """The stack recorded in ``state_dir`` with the ports and buckets it was started with."""
        state_dir = Path(state_dir).expanduser().absolute()
        state = cls._read_state_file(state_dir / STATE_FILE)
        if state is None:
            raise StackError(f"no stack has been started with state directory {state_dir} (no {STATE_FILE})")
        config = StackConfig.model_validate(state["config"] | {"state_dir": str(state_dir)})
        return cls(config, BucketsConfig.model_validate(state["buckets"]))

    @staticmethod
    def _read_state_file(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StackError(
                f"stack state file {path} is unreadable ({exc}); remove it and run up again"
            ) from None

    def _state(self) -> dict:
        return self._read_state_file(self.state_dir / STATE_FILE) or {"services": {}}

    def _write_state(self, state: dict) -> None:
        config = self.config.model_dump(mode="json", exclude={"state_dir"})
        config["s3_secret_access_key"] = self.config.s3_secret_access_key.get_secret_value()
        state |= {"config": config, "buckets": self.buckets.model_dump()}
        # It holds the local S3 server's secret: private from its first byte, written whole.
        write_local_atomic(self.state_dir / STATE_FILE, json.dumps(state, indent=2).encode(), mode=0o600)

    def _make_private_dirs(self) -> None:
        """The state directory and what it holds (token, S3 snapshot, MLflow database) are the
        user's alone: 0700, so no file in them is reachable by others whatever its own mode."""
        for directory in (self.state_dir, *(self.state_dir / d for d in ("logs", "s3/spill", "mlflow", "ray"))):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            directory.chmod(0o700)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up`/`down` at a time per state directory."""
        self._make_private_dirs()
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ----------------------------------------------------------------------------- layout
    def log_path(self, service: str) -> Path:
        return self.state_dir / "logs" / f"{service}.log"

    @property
    def ray_token_path(self) -> Path:
        return self.state_dir / "ray" / "auth_token"

    @property
    def ray_temp_dir(self) -> Path:
        preferred = self.state_dir / "ray" / "tmp"
        if len(str(preferred)) <= RAY_TEMP_DIR_MAX_LEN:
            return preferred
        return Path("/tmp") / f"geopix-ray-{sha1(str(self.state_dir).encode()).hexdigest()[:10]}"

    @property
    def s3_snapshot_dir(self) -> Path:
        return self.state_dir / "s3" / "objects"

    @property
    def mlflow_db(self) -> Path:
        return self.state_dir / "mlflow" / "mlflow.db"

    def url(self, service: str) -> str:
        host = self.config.host
        return {
            "s3": f"http://{host}:{self.config.s3_port}",
            "mlflow": f"http://{host}:{self.config.mlflow_port}",
            "ray": f"http://{host}:{self.config.ray_dashboard_port}",
        }[service]

    def ports(self, service: str) -> dict[str, int]:
        c = self.config
        return {
            "s3": {"s3": c.s3_port},
            "mlflow": {"mlflow": c.mlflow_port},
            "ray": {
                "ray gcs": c.ray_port,
                "ray dashboard": c.ray_dashboard_port,
                "ray client": c.ray_client_port,
                "ray dashboard agent": c.ray_dashboard_agent_port,
            },
        }[service]

    def s3_settings(self) -> S3Settings:
        return S3Settings(
            endpoint_url=self.url("s3"),
            region=self.config.region,
            access_key_id=self.config.s3_access_key_id,
            secret_access_key=self.config.s3_secret_access_key.get_secret_value(),
        )

    def client_env(self) -> dict[str, str]:
        """What a client needs to reach this stack: S3, MLflow, Ray (jobs and drivers), GDAL."""
        c = self.config
        s3 = self.url("s3")
        return {
            "GEOPIX_STACK_DIR": str(self.state_dir),
            "AWS_ENDPOINT_URL": s3,
            "AWS_ACCESS_KEY_ID": c.s3_access_key_id,
            "AWS_SECRET_ACCESS_KEY": c.s3_secret_access_key.get_secret_value(),
            "AWS_DEFAULT_REGION": c.region,
            "AWS_REGION": c.region,
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "MLFLOW_S3_ENDPOINT_URL": s3,
            # ray.init() reads RAY_ADDRESS; `ray job` reads RAY_API_SERVER_ADDRESS first.
            "RAY_ADDRESS": f"{c.host}:{c.ray_port}",
            "RAY_API_SERVER_ADDRESS": self.url("ray"),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path),
            # GDAL /vsis3 (rasterio's s3://) reads these.
            "AWS_S3_ENDPOINT": f"{c.host}:{c.s3_port}",
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
        }

    # ----------------------------------------------------------------------------- processes
    def _command(self, service: str) -> list[str]:
        c = self.config
        if service == "s3":
            return [self._bin("moto_server"), "-H", c.host, "-p", str(c.s3_port)]
        if service == "mlflow":
            return [
                self._bin("mlflow"), "server",
                "--backend-store-uri", f"sqlite:///{self.mlflow_db}",
                "--artifacts-destination", f"s3://{self.buckets.mlflow}/artifacts",
                "--host", c.host, "--port", str(c.mlflow_port),
                "--workers", str(c.mlflow_workers),
            ]  # fmt: skip
        cmd = [
            self._bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", c.host, "--port", str(c.ray_port),
            "--include-dashboard", "true", "--dashboard-host", c.host,
            "--dashboard-port", str(c.ray_dashboard_port),
            "--ray-client-server-port", str(c.ray_client_port),
            "--dashboard-agent-listen-port", str(c.ray_dashboard_agent_port),
            "--temp-dir", str(self.ray_temp_dir),
        ]  # fmt: skip
        if c.ray_num_cpus:
            cmd += ["--num-cpus", str(c.ray_num_cpus)]
        if c.ray_object_store_mb:
            cmd += ["--object-store-memory", str(c.ray_object_store_mb * 1024 * 1024)]
        return cmd

    def _bin(self, name: str) -> str:
        local = self.bin_dir / name
        found = str(local) if local.exists() else shutil.which(name)
        if not found:
            raise StackError(
                f"`{name}` is not installed next to {sys.executable} nor on PATH; run cluster/setup.sh"
            )
        return found

    def _service_env(self, service: str, stack_id: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
        env |= self.client_env()
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env[MARKER_ENV] = f"{stack_id}:{service}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        if service == "ray":
            # On SIGTERM Ray drains the node (for Serve proxies) for up to 30 s while any actor
            # lives, e.g. Ray Data's stats actor; a single-node stack has nothing to drain.
            env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
            # Ray Train's controller polls its workers every 2 s by default: a run waits for that
            # tick to start, at each checkpoint and at its end. On one machine 0.5 s costs nothing.
            env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
            # A one-machine stack is never preempted: no watcher actor per training run.
            env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if service == "mlflow":
            # The server's GenAI job runner (a pool of huey consumers, ~1.5 GB) serves nothing GeoPix uses.
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        if service == "s3":
            # Objects over moto's in-memory buffer spill to temp files: keep those in the state dir.
            env["TMPDIR"] = str(self.state_dir / "s3" / "spill")
        return env

    def _root_process(self, record: dict | None) -> psutil.Process | None:
        if not record:
            return None
        try:
            proc = psutil.Process(record["pid"])
            # The same pid with another start time is a different process that reused the pid.
            if abs(proc.create_time() - record["create_time"]) > 1 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def _owned_processes(
        self, service: str, stack_id: str | None, record: dict | None
    ) -> list[psutil.Process]:
        """Every live process this stack started for ``service``: the root, its tree, and marked ones."""
        found: dict[int, psutil.Process] = {}
        root = self._root_process(record)
        if root is not None:
            found[root.pid] = root
            try:
                found.update({p.pid: p for p in root.children(recursive=True)})
            except psutil.Error:
                pass
        if stack_id:
            marker = f"{stack_id}:{service}"
            for proc in psutil.process_iter():
                try:
                    if proc.pid not in found and proc.environ().get(MARKER_ENV) == marker:
                        found[proc.pid] = proc
                except psutil.Error:
                    continue
        return list(found.values())

    def _answering(self, service: str) -> bool:
        if service == "s3":
            return _http_ok(self.url("s3") + "/") is not None
        if service == "mlflow":
            return _http_ok(self.url("mlflow") + "/health") is not None
        try:
            headers = {"Authorization": f"Bearer {self.ray_token_path.read_text().strip()}"}
        except OSError:
            return False
        nodes = _http_ok(self.url("ray") + "/api/v0/nodes", headers)
        if nodes is None or _http_ok(self.url("ray") + "/api/jobs/", headers) is None:
            return False
        try:
            listed = json.loads(nodes)["data"]["result"]["result"]
        except (ValueError, KeyError, TypeError):
            return False
        return any(node.get("state") == "ALIVE" for node in listed)

    # ----------------------------------------------------------------------------- up
    def up(self, echo=print) -> list[ServiceStatus]:
        """Start what is not running; a running, answering stack is left as it is."""
        self._check_host(echo)
        with self._locked():
            state = self._state()
            state.setdefault("stack_id", uuid.uuid4().hex[:12])
            self._refuse_config_change(state)
            records = state.setdefault("services", {})
            to_start = []
            for service in SERVICES:
                record = records.get(service)
                if self._root_process(record) is not None:
                    echo(f"{service}: already running (pid {record['pid']})")
                    continue
                if record:
                    echo(
                        f"{service}: was started (pid {record['pid']}) but is no longer running; restarting it. "
                        f"Last log lines:\n{_log_tail(self.log_path(service), 5)}"
                    )
                    self._stop_processes(service, state.get("stack_id"), record, echo=lambda *_: None)
                    records.pop(service)
                to_start.append(service)
            self._check_ports_free(to_start)
            if "ray" in to_start and not self.ray_token_path.exists():
                write_local_atomic(self.ray_token_path, secrets.token_hex(32).encode(), mode=0o600)
            for service in SERVICES:
                if service in to_start:
                    records[service] = self._start(service, state["stack_id"])
                    self._write_state(state)
                self._wait_answering(service, records[service])
                # A restore that a killed `up` left half done is finished by the next `up`.
                if service == "s3" and (service in to_start or state.get(RESTORE_KEY) == RESTORE_RUNNING):
                    self._create_buckets(echo, state)
            self._write_state(state)
            return self.status()

    def _check_host(self, echo) -> None:
        """The S3 server and MLflow have no authentication: on a non-loopback address anyone who can
        reach it reads and changes every bucket and run. Refused unless asked for explicitly."""
        import ipaddress

        host = self.config.host
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
        if not self.config.allow_non_loopback:
            raise StackError(
                f"stack.host={host} is not a loopback address: the stack's S3 server and MLflow have no "
                "authentication, so anyone who can reach that address could read and change every bucket and "
                "run. Keep 127.0.0.1, or set stack.allow_non_loopback=true on a network you trust"
            )
        echo(f"WARNING: the stack listens on {host}, not loopback: its S3 server and MLflow accept anyone "
             "who can reach it (no authentication); only Ray asks for its token")  # fmt: skip

    def _refuse_config_change(self, state: dict) -> None:
        recorded = state.get("config")
        running = [s for s in SERVICES if self._root_process(state.get("services", {}).get(s))]
        if not recorded or not running:
            return
        current = self.config.model_dump(mode="json", exclude={"state_dir", "s3_secret_access_key"})
        changed = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise StackError(
                f"the stack in {self.state_dir} is running ({', '.join(running)}) with other settings ({diff}); "
                "run `geopix stack down` first to change them"
            )

    def _check_ports_free(self, services: list[str]) -> None:
        taken = []
        for service in services:
            for label, port in self.ports(service).items():
                holder = port_holder(self.config.host, port)
                if holder:
                    taken.append(f"port {port} ({label}) is already in use by {holder}")
        if taken:
            raise StackError(
                "cannot start the stack: "
                + "; ".join(taken)
                + ". Stop that process or choose other ports (e.g. --set stack.s3_port=9200); nothing was started."
            )

    def _start(self, service: str, stack_id: str) -> dict:
        log_path = self.log_path(service)
        command = self._command(service)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._service_env(service, stack_id),
                # Ray runs job drivers in its cwd: the checkout, so `-- python flows/x.py` resolves.
                cwd=REPO_ROOT if service == "ray" else self.state_dir,
                start_new_session=True,
            )
        return {
            "pid": proc.pid,
            "create_time": psutil.Process(proc.pid).create_time(),
            "started_at": time.time(),
        }

    def _wait_answering(self, service: str, record: dict) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if self._answering(service):
                return
            if self._root_process(record) is None:
                raise StackError(
                    f"{service} exited while starting; see {self.log_path(service)}:\n{_log_tail(self.log_path(service))}"
                )
            time.sleep(0.5)
        raise StackError(
            f"{service} did not answer at {self.url(service)} within {self.config.start_timeout_s:.0f} s; "
            f"see {self.log_path(service)}:\n{_log_tail(self.log_path(service))}"
        )

    def _create_buckets(self, echo, state: dict) -> None:
        client = boto3_client(self.s3_settings())
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in self.buckets.all():
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
        if self.config.persist_s3 and self.s3_snapshot_dir.exists():
            # Recorded before the first object goes up: a `down` after a killed restore must not
            # save the half-restored server over the whole snapshot.
            resuming = state.get(RESTORE_KEY) == RESTORE_RUNNING
            state[RESTORE_KEY] = RESTORE_RUNNING
            self._write_state(state)
            self._restore_objects(client, echo, skip_present=resuming)
        state[RESTORE_KEY] = RESTORE_DONE
        self._write_state(state)

    # ----------------------------------------------------------------------------- S3 persistence
    def _restore_objects(self, client, echo, skip_present: bool = False) -> None:
        """Upload the snapshot saved by the last `down`. ``skip_present``: finishing a restore a
        killed `up` began, so objects already there (restored, or written since) are kept."""
        files = [p for p in self.s3_snapshot_dir.rglob("*") if p.is_file()]
        buckets = {p.relative_to(self.s3_snapshot_dir).parts[0] for p in files}
        buckets |= {p.name for p in self.s3_snapshot_dir.iterdir() if p.is_dir()}
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in sorted(buckets - existing):
            client.create_bucket(Bucket=bucket)
        present = set(_object_keys(client, sorted(buckets))) if skip_present else set()
        if files:
            echo(f"s3: {'finishing the restore of' if skip_present else 'restoring'} {len(files)} objects "
                 "saved by the last `down`")  # fmt: skip
        for path in tqdm(files, desc="restore s3 objects", unit="obj", disable=len(files) < 50):
            bucket, *key = path.relative_to(self.s3_snapshot_dir).parts
            if (bucket, "/".join(key)) not in present:
                client.upload_file(str(path), bucket, "/".join(key))

    def _save_objects(self, echo, restored: bool = True) -> None:
        """Copy every bucket to ``s3/objects`` (written aside, then swapped in whole). When the last
        restore did not finish (``restored`` False), the server holds only part of the snapshot: the
        new snapshot is the old one with the server's objects written over it, never the part alone."""
        client = boto3_client(self.s3_settings())
        target = self.s3_snapshot_dir
        staging = target.with_name("objects.saving")
        shutil.rmtree(staging, ignore_errors=True)
        if not restored and target.exists():
            echo("s3: the last restore did not finish; keeping the objects it had not restored yet")
            shutil.copytree(target, staging, copy_function=os.link)
        staging.mkdir(parents=True, exist_ok=True)
        buckets = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        for bucket in buckets:
            (staging / bucket).mkdir(exist_ok=True)
        keys = _object_keys(client, buckets)
        for bucket, key in tqdm(keys, desc="save s3 objects", unit="obj", disable=len(keys) < 50):
            if key.endswith("/"):
                continue
            dest = staging / bucket / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)  # a hard link to the old snapshot's file: replace, never write through
            client.download_file(bucket, key, str(dest))
        old = target.with_name("objects.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        echo(f"s3: saved {len(keys)} objects to {target}")

    # ----------------------------------------------------------------------------- down
    def down(self, echo=print) -> None:
        """Stop every process this stack started, save S3 objects first, leave no port open."""
        with self._locked():
            state = self._read_state_file(self.state_dir / STATE_FILE)
            if state is None:
                echo(f"no stack state in {self.state_dir}: nothing to stop")
                return
            records = state.get("services", {})
            if self.config.persist_s3 and self._root_process(records.get("s3")) and self._answering("s3"):
                self._save_objects(echo, restored=state.get(RESTORE_KEY, RESTORE_DONE) == RESTORE_DONE)
            for service in reversed(SERVICES):
                record = records.get(service)
                if record and self._root_process(record) is None:
                    echo(f"{service}: was not running (pid {record['pid']} had exited)")
                self._stop_processes(service, state.get("stack_id"), record, echo)
                records.pop(service, None)
            state.pop(RESTORE_KEY, None)  # the snapshot is whole again; the next `up` restores it
            self._write_state(state)
            self._wait_ports_released()

    def _stop_processes(self, service: str, stack_id: str | None, record: dict | None, echo) -> None:
        procs = self._owned_processes(service, stack_id, record)
        if not procs:
            return
        root = self._root_process(record)
        # The root first, gracefully: `ray start --block` drains and stops its own children.
        if root is not None:
            try:
                root.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
            psutil.wait_procs([root], timeout=45 if service == "ray" else 15)
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for proc in alive:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        echo(f"{service}: stopped ({len(procs)} process{'es' if len(procs) != 1 else ''})")

    def _wait_ports_released(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            held = {
                port: holder
                for service in SERVICES
                for port in self.ports(service).values()
                if (holder := port_holder(self.config.host, port))
            }
            if not held or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if held:
            raise StackError(
                "stopped the stack, but these ports are still in use by processes it did not start: "
                + ", ".join(f"{port} ({holder})" for port, holder in held.items())
            )

    # ----------------------------------------------------------------------------- status
    def status(self) -> list[ServiceStatus]:
        state = self._state()
        statuses = []
        for service in SERVICES:
            record = state.get("services", {}).get(service)
            root = self._root_process(record)
            pss = 0.0
            if root is not None:
                for proc in self._owned_processes(service, state.get("stack_id"), record):
                    try:  # PSS: shared pages split between the processes that share them
                        pss += proc.memory_full_info().pss / 2**20
                    except psutil.Error:
                        continue
            statuses.append(
                ServiceStatus(
                    name=service,
                    pid=record["pid"] if record else None,
                    running=root is not None,
                    answering=root is not None and self._answering(service),
                    url=self.url(service),
                    log=self.log_path(service),
                    memory_mb=pss,
                )
            )
        return statuses


def _object_keys(client, buckets: list[str]) -> list[tuple[str, str]]:
    """(bucket, key) of every object in these buckets of the stack's S3 server."""
    keys = []
    for bucket in buckets:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [(bucket, obj["Key"]) for obj in page.get("Contents", [])]
    return keys
