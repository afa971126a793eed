"""The cluster launcher config is valid for the pinned Ray."""

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
