"""The data stage as a user runs it: synth then shard, submitted as one Ray job to the stack."""

from __future__ import annotations

import io
import re

import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from geopix import storage
from geopix.data.shard import read_manifest
from geopix.data.synth import SYNTH_CLASSES
from tests.test_jobs import ray_cli, wait_for

SOURCE, SHARDS = "s3://geopix-data/tests/job/source", "s3://geopix-data/tests/job/shards"
SETTINGS = "--set data.train_images=24 --set data.val_images=6 --set data.test_images=6 --set data.shard_target_mb=0.5"


def test_synth_and_shard_as_a_ray_job(stack, ray_cluster, repo_root):
    entrypoint = (
        f"geopix data synth {SETTINGS} --out {SOURCE} && "
        f"geopix data shard {SETTINGS} --source {SOURCE} --out {SHARDS} --workers 2"
    )
    submitted = ray_cli("job", "submit", "--no-wait", "--", "bash", "-c", entrypoint, cwd=repo_root)
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", submitted).group(1)
    status = wait_for(job_id, timeout=600)
    logs = ray_cli("job", "logs", job_id, cwd=repo_root)
    assert status == "SUCCEEDED", logs[-3000:]

    manifest = read_manifest(SHARDS)
    counts = manifest["counts"]
    assert counts["read"] == counts["written"] + counts["rejected"] and counts["rejected"] == 0
    assert f"read {counts['read']} = written {counts['written']} + rejected 0" in logs
    assert {c["name"] for c in manifest["classes"]} == set(SYNTH_CLASSES.names.values())
    assert {s: manifest["splits"][s]["images"] for s in ("train", "val", "test")} == {
        "train": 24,
        "val": 6,
        "test": 6,
    }
    assert set(manifest["splits"]["train"]["tasks"]) == {"segment", "refer", "caption", "vqa", "ground"}

    # Split hygiene, read back from the shards themselves.
    images, templates = {}, {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            table = pq.read_table(
                io.BytesIO(storage.read_bytes(f"{SHARDS}/{shard['path']}")),
                columns=["image_id", "template_id"],
            )
            for row in table.to_pylist():
                assert images.setdefault(row["image_id"], split) == split
                if row["template_id"]:
                    templates.setdefault(split, set()).add(row["template_id"])
    assert templates["test"] and not templates["test"] & (templates["train"] | templates["val"])

    # The training loader streams what sharding wrote.
    from geopix.data.loader import iter_batches, shard_dataset
    from geopix.data.source import iter_records
    from geopix.data.tokenizer import corpus_texts, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts(iter_records(SOURCE)), vocab_size=600)
    dataset = shard_dataset(SHARDS, "train")
    batch = next(
        iter(
            iter_batches(
                dataset, tokenizer, image_size=128, batch_size=8, max_length=256, augment=True, seed=0
            )
        )
    )
    assert batch["pixel_values"].shape == (8, 3, 128, 128)
    assert batch["target_masks"].shape[0] == int(batch["target_counts"].sum())

    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("geopix-tiny").experiment_id],
        filter_string="tags.`geopix.flow` = 'shard'",
    )[0]
    assert run.data.metrics["records_written"] == counts["written"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"manifest.json", "rejects.csv", "class_and_task_counts.png"} <= artifacts
