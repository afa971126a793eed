"""The cluster files: the launcher config is valid for the pinned Ray; the KubeRay manifests run our flows on our image."""

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def test_ray_cluster_yaml_passes_rays_schema(repo_root):
    config = yaml.safe_load((repo_root / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does first; raises on a schema violation
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert workers["min_workers"] < workers["max_workers"]
    assert all("cluster/setup.sh" in cmd for cmd in config["setup_commands"][:1])


def test_kuberay_nightly_cronjob_runs_the_nightly_flow(repo_root):
    docs = list(yaml.safe_load_all((repo_root / "cluster/kuberay/nightly-cronjob.yaml").read_text()))
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert "ray job submit" in command and "flows/nightly.py" in command
    assert (repo_root / "flows/nightly.py").exists()
    preset = command.split("--config ")[1].split()[0]
    assert (repo_root / "configs" / f"{preset}.yaml").exists()


def test_kuberay_rayjob_runs_the_full_pipeline_on_the_projects_image(repo_root):
    job = yaml.safe_load((repo_root / "cluster/kuberay/full-pipeline-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith("python flows/full_pipeline.py") and (repo_root / "flows/full_pipeline.py").exists()
    assert (repo_root / "configs" / f"{entrypoint.split('--config ')[1].split()[0]}.yaml").exists()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray_version()
    workers = spec["workerGroupSpecs"][0]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    images = {c["image"] for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}  # fmt: skip
    assert len(images) == 1  # head and workers run one image: cluster/Dockerfile
    dockerfile = (repo_root / "cluster/Dockerfile").read_text()
    assert "bash cluster/setup.sh" in dockerfile  # the same pinned install as every other machine


def ray_version() -> str:
    import ray

    return ray.__version__


def test_every_kuberay_cluster_asks_for_rays_token(repo_root):
    """Dashboards listen on the pod network (0.0.0.0): every Ray cluster we define turns token
    authentication on, and the nightly submitter reads the token of the cluster it submits to."""
    job = yaml.safe_load((repo_root / "cluster/kuberay/full-pipeline-rayjob.yaml").read_text())
    cluster = yaml.safe_load((repo_root / "cluster/kuberay/raycluster.yaml").read_text())
    for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
        assert spec["authOptions"]["mode"] == "token"
        assert spec["rayVersion"] == ray_version()
    docs = list(yaml.safe_load_all((repo_root / "cluster/kuberay/nightly-cronjob.yaml").read_text()))
    cron = next(d for d in docs if d["kind"] == "CronJob")
    [container] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": cluster["spec"]["authOptions"]["secretName"],
                                                                  "key": "auth_token"}  # fmt: skip
    assert "http://geopix-head-svc:8265" in " ".join(container["args"]) and cluster["metadata"]["name"] == "geopix"
    for manifest in (job, cluster):  # no credentials in any manifest: S3 through the service account's role
        assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(manifest) and "serviceAccountName: geopix" in yaml.safe_dump(manifest)
