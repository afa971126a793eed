"""MLflow through the stack's tracking server: params, metrics, artifacts in S3, child runs."""

from __future__ import annotations

import subprocess
import time

import mlflow
from mlflow.tracking import MlflowClient

from geopix import tracking
from geopix.config import REPO_ROOT, load_config
from geopix.redaction import REDACTED
from geopix.storage import boto3_client

SECRET = "s3cr3t-value-7f1d"


def test_flow_run_logs_params_metrics_artifacts_children(stack):
    config = load_config(
        "tiny",
        [
            f"stack.s3_secret_access_key={SECRET}",
            "tracking.experiment=geopix-tests",
            "tracking.system_metrics_interval_s=1",
        ],
    )
    with tracking.flow_run("unit-flow", config) as parent:
        with tracking.step_run(
            "step-a", params={"db": {"password": SECRET}, "uri": f"postgresql://u:{SECRET}@h/db"}
        ) as child:
            for step in range(5):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            mlflow.log_text("hello artifact", "notes/hello.txt")
            time.sleep(2.5)  # let the system-metrics sampler take a few samples
        mlflow.log_metric("done", 1)

    client = MlflowClient()
    parent_run = client.get_run(parent.info.run_id)
    params = parent_run.data.params
    assert params["train.stage1.lr"] == "0.001" and params["model.vision_encoder"] == "efficientnet_lite0"
    assert params["stack.s3_secret_access_key"] == REDACTED
    assert parent_run.data.tags[tracking.TAG_CONFIG_HASH] == config.config_hash()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], check=False, cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    if head:  # a checkout; the tag must be its commit
        assert parent_run.data.tags[tracking.TAG_COMMIT] == head

    child_run = client.get_run(child.info.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child_run.data.tags[tracking.TAG_STEP] == "step-a"
    assert child_run.data.params["db.password"] == REDACTED
    assert child_run.data.params["uri"] == f"postgresql://u:{REDACTED}@h/db"
    assert [m.value for m in client.get_metric_history(child.info.run_id, "loss")] == [
        1.0,
        0.5,
        1 / 3,
        0.25,
        0.2,
    ]
    assert any(key.startswith("system/") for key in parent_run.data.metrics), parent_run.data.metrics.keys()

    # No secret anywhere in what was logged, the config artifact included.
    every_param = " ".join([*params.values(), *child_run.data.params.values()])
    assert SECRET not in every_param
    config_text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/config.yaml")
    assert SECRET not in config_text
    assert f"s3_secret_access_key: {REDACTED}" in config_text and f"memory_len: {config.model.memory_len}" in config_text

    # Artifacts are proxied by the server into the S3 bucket.
    assert mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/notes/hello.txt") == "hello artifact"
    s3 = boto3_client(stack.s3_settings())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.buckets.mlflow)["Contents"]]
    assert any(child.info.run_id in key and key.endswith("notes/hello.txt") for key in keys), keys


def test_flatten_params_redacts_by_key_and_in_uris():
    flat = tracking.flatten_params(
        {
            "a": {"api_key": "k1", "token": "t1", "n": 3, "none_secret": None},
            "url": "https://user:pw@host/x",
            "list": [1, 2],
        }
    )
    assert flat == {
        "a.api_key": REDACTED,
        "a.token": REDACTED,
        "a.n": "3",
        "a.none_secret": "null",
        "url": f"https://user:{REDACTED}@host/x",
        "list": "[1, 2]",
    }


def test_params_keep_harmless_token_keys_and_the_summary_url_hides_credentials(stack):
    # A tracking URI with credentials in it (basic auth; the local server ignores them).
    with_password = stack.url("mlflow").replace("http://", "http://bob:s3cr3t-pw@")
    config = load_config("tiny", ["tracking.experiment=geopix-tests", "tracking.system_metrics=false",
                                  f"tracking.tracking_uri={with_password}"])  # fmt: skip
    params = tracking.flatten_params(config)
    assert params["model.seg_token_num"] == "3" and params["evaluate.max_new_tokens"] == "80"
    assert params["train.tokenizer_vocab_size"] == "2000"
    assert params["tracking.tracking_uri"] == stack.url("mlflow").replace("http://", f"http://bob:{REDACTED}@")
    try:
        with tracking.flow_run("unit-url", config) as run:
            url = tracking.run_url(run.info.run_id)
    finally:
        mlflow.set_tracking_uri(stack.url("mlflow"))
    assert "s3cr3t" not in url and url.startswith(stack.url("mlflow").replace("http://", f"http://bob:{REDACTED}@"))
