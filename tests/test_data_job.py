"""The data stage as a user runs it: `geopix data synth` then `geopix data shard` against the stack."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from geopix import storage
from geopix.cli import app
from geopix.data.shard_set import read_manifest
from geopix.data.synth import SYNTH_CLASSES
from tests.records import SEG_VOCAB

SOURCE, SHARDS = "s3://geopix-data/tests/job/source", "s3://geopix-data/tests/job/shards"
SETTINGS = "--set data.train_images=24 --set data.val_images=6 --set data.test_images=6 --set data.shard_target_mb=4"


def test_synth_then_shard_through_the_cli(stack, ray_cluster):
    # The commands a user types, run in this process (connected to the stack's Ray as any driver
    # is; a command submitted as a Ray job is test_jobs' subject).
    runner = CliRunner()
    synth = runner.invoke(app, ["data", "synth", *SETTINGS.split(), "--out", SOURCE])
    assert synth.exit_code == 0, synth.output
    shard = runner.invoke(app, ["data", "shard", *SETTINGS.split(), "--source", SOURCE, "--out", SHARDS, "--workers", "2"])
    assert shard.exit_code == 0, shard.output
    logs = synth.output + shard.output

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
    from geopix.data.batches import iter_batches
    from geopix.data.shard_set import shard_dataset
    from geopix.data.source import iter_records
    from geopix.data.tokenizer import corpus_texts, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts(iter_records(SOURCE)), vocab_size=600, seg_vocab=SEG_VOCAB)
    dataset = shard_dataset(SHARDS, "train")
    batch = next(
        iter(
            iter_batches(
                dataset, tokenizer, image_size=128, batch_size=8, max_length=256, augment=True, seed=0, seg_vocab=SEG_VOCAB,
                chat_template=1,
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
