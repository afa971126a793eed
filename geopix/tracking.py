"""One place for MLflow: a parent run per flow, a child run per step.

Every run is tagged with the git commit and the config hash; params are the config flattened to
dotted keys with secrets redacted (geopix/redaction.py); system metrics (CPU, memory, GPU when present)
are sampled while a run is open.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from geopix import __version__
from geopix.config import GeoPixConfig, TrackingConfig, to_yaml
from geopix.redaction import redact_text, redact_value

MLFLOW_PARAM_LIMIT = 6000

TAG_FLOW = "geopix.flow"
TAG_STEP = "geopix.step"
TAG_COMMIT = "mlflow.source.git.commit"
TAG_DIRTY = "geopix.git_dirty"
TAG_CONFIG_HASH = "geopix.config_hash"
TAG_VERSION = "geopix.version"


def flatten_params(data: Mapping[str, Any] | GeoPixConfig, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``, secrets redacted, values cut to MLflow's limit."""
    if isinstance(data, GeoPixConfig):
        data = data.model_dump()
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        value = redact_value(name, value)
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:MLFLOW_PARAM_LIMIT]
    return flat


def git_state(repo: Path | None = None) -> tuple[str | None, bool]:
    """(commit, dirty) of the checkout GeoPix runs from; ``GEOPIX_GIT_COMMIT`` wins when set."""
    if os.environ.get("GEOPIX_GIT_COMMIT"):
        return os.environ["GEOPIX_GIT_COMMIT"], False
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(status.strip())


def configure(tracking: TrackingConfig) -> str:
    """Point MLflow at the configured server and experiment; returns the tracking URI."""
    uri = tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError(
            "no MLflow tracking URI: set tracking.tracking_uri or MLFLOW_TRACKING_URI "
            '(`eval "$(geopix stack env)"` sets it for the local stack)'
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(tracking.experiment)
    if tracking.system_metrics:
        mlflow.set_system_metrics_sampling_interval(tracking.system_metrics_interval_s)
    return uri


@dataclass(frozen=True)
class ModelRef:
    """A model to run: where its files are, and what to call it in output paths and metadata."""

    uri: str  # model directory or S3 prefix (GeoPixModel.load_pretrained)
    label: str  # "<registered name>-v<version>", or "m-<hash of the URI>" for a bare URI
    registered_name: str | None = None
    version: str | None = None
    run_id: str | None = None  # the MLflow run that produced it, when registered


def resolve_model(model: str) -> ModelRef:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the MLflow registry) or a model
    directory / S3 prefix."""
    import hashlib

    if not model.startswith("models:/"):
        return ModelRef(model, "m-" + hashlib.sha256(model.rstrip("/").encode()).hexdigest()[:10])
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    path = model.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = path.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError) as exc:
        raise ValueError(f"{model}: no such registered model version ({exc})") from None
    return ModelRef(version.source, f"{name}-v{version.version}", name, str(version.version), version.run_id)


def model_version_exists(model: str) -> bool:
    """Whether a ``models:/…`` reference still resolves in the registry."""
    try:
        resolve_model(model)
    except ValueError:
        return False
    return True


def run_url(run_id: str) -> str:
    """The MLflow UI page of a run (the tracking server's address + experiment + run), fit to print:
    credentials in the tracking URI are redacted."""
    run = mlflow.get_run(run_id)
    return redact_text(f"{mlflow.get_tracking_uri().rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}")


def run_tags(config: GeoPixConfig, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    commit, dirty = git_state()
    tags = {TAG_CONFIG_HASH: config.config_hash(), TAG_VERSION: __version__, TAG_DIRTY: str(dirty).lower()}
    if commit:
        tags[TAG_COMMIT] = commit
    return tags | dict(extra or {})


@contextmanager
def flow_run(
    flow: str, config: GeoPixConfig, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """The parent run of one flow: config params, tags, the config itself as an artifact."""
    configure(config.tracking)
    with mlflow.start_run(
        run_name=run_name or flow,
        tags=run_tags(config, {TAG_FLOW: flow, **(tags or {})}),
        log_system_metrics=config.tracking.system_metrics,
    ) as run:
        mlflow.log_params(flatten_params(config))
        mlflow.log_text(to_yaml(config), "config.yaml")
        yield run


@contextmanager
def step_run(
    step: str, params: Mapping[str, Any] | None = None, config: GeoPixConfig | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A child run of the active flow run (or a top-level run when there is none)."""
    parent = mlflow.active_run()
    tags = {}
    if parent is not None:
        tags.update(
            {k: v for k, v in parent.data.tags.items() if k.startswith(("geopix.", "mlflow.source.git"))}
        )
        tags.pop(TAG_FLOW, None)
    tags[TAG_STEP] = step  # after the parent's tags: a step nested in a step is still itself
    if config is not None:
        tags.update(run_tags(config))
    system_metrics = config.tracking.system_metrics if config is not None else None
    with mlflow.start_run(
        run_name=step, nested=parent is not None, tags=tags, log_system_metrics=system_metrics
    ) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        yield run


class MetricsWriter:
    """Logs into an existing run by id from any process (a Ray Train worker has no active run).

    A tracking server that fails (after MLflow's own retries, and one more of ours) never stops
    training: the call is logged as a warning and counted in ``failures``.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.failures = 0

    def _send(self, what: str, call, *args) -> bool:
        import logging
        import time

        for attempt in (1, 2):
            try:
                call(*args)
                return True
            except Exception as error:  # noqa: BLE001 - a tracking outage must not end a training run
                if attempt == 2:
                    self.failures += 1
                    logging.getLogger("geopix.tracking").warning(
                        "MLflow %s for run %s failed twice (%d failures so far): %s",
                        what, self.run_id, self.failures, error,
                    )
                    return False
                time.sleep(1.0)
        return False

    def log(self, metrics: Mapping[str, float], step: int) -> bool:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        return self._send("metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        return self._send("artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tag(self, key: str, value: str) -> bool:
        return self._send("tag", lambda: self.client.set_tag(self.run_id, key, value))

    def close(self) -> None:
        """Nothing buffered: every call above is sent at once."""
