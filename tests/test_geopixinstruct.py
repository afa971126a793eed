"""GeoPixInstruct annotations, written here in the dataset card's exact Parquet schema, with their
images in S3 → records (every kind of damage rejected and counted) → shards → a training step."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from PIL import Image

from geopix import storage, tracking
from geopix.answer_form import box_to_text, parse_box_text
from geopix.config import DataConfig, load_config
from geopix.data.geopixinstruct import (
    GeoPixInstructError,
    annotation_files,
    geopixinstruct_records,
    import_geopixinstruct,
)
from geopix.data.schema import decode_mask, validate_record
from geopix.data.shard import shard_sources
from geopix.data.shard_set import read_manifest
from geopix.data.source import IMPORT_REPORT_FILE, iter_records, read_catalog
from tests.conftest import geopix_cli
from tests.records import SEG_VOCAB

PREFIX = "s3://geopix-data/tests/geopixinstruct"
ANNOTATIONS = f"{PREFIX}/GeoPixInstruct-Anno"
SAMRS = f"{PREFIX}/SAMRS"
HEIGHT, WIDTH = 48, 64  # not square: a mask size written (width, height) is caught

# The card's features (dataset_info), as the Parquet files on the hub hold them.
CARD_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image_path", pa.string()),
    ("instances", pa.list_(pa.struct([
        ("bbox", pa.list_(pa.int64())),
        ("category", pa.string()),
        ("category_id", pa.int64()),
        ("description", pa.string()),
        ("instance_id", pa.string()),
        ("mask", pa.struct([("counts", pa.string()), ("size", pa.list_(pa.int64()))])),
    ]))),
])  # fmt: skip


def rect(x: int, y: int, w: int, h: int, size=(HEIGHT, WIDTH)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def instance(iid: str, category_id: int, category: str, box, description: str = "", *, rle_size=None) -> dict:
    """An instance as the release writes it; ``box`` is [x, y, w, h] (what these files use)."""
    from pycocotools import mask as mask_utils

    x, y, w, h = box
    rle = mask_utils.encode(np.asfortranarray(rect(x, y, w, h, rle_size or (HEIGHT, WIDTH))))
    return {"bbox": [x, y, w, h], "category": category, "category_id": category_id, "description": description,
            "instance_id": iid, "mask": {"counts": rle["counts"].decode(), "size": list(rle["size"])}}  # fmt: skip


def image_bytes(fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_card_file(name: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=CARD_SCHEMA)
    storage.write_bytes(f"{ANNOTATIONS}/data/{name}", storage.parquet_bytes(table))


@pytest.fixture(scope="module")
def release(stack):
    """Two subsets: SIOR_T (train: a good image, a damaged one, a missing one; valid: an image with
    a duplicate instance id) and FAST_T (train: an image path from the authors' machine, an image
    without instances)."""
    storage.write_bytes(f"{SAMRS}/SIOR/JPEGImages/00001.jpg", image_bytes("JPEG", 1))
    storage.write_bytes(f"{SAMRS}/SIOR/JPEGImages/00002.jpg", image_bytes("JPEG", 2))
    storage.write_bytes(f"{SAMRS}/SIOR/JPEGImages/00004.jpg", image_bytes("JPEG", 4))
    storage.write_bytes(f"{SAMRS}/FAST/images/f1.png", image_bytes("PNG", 5))
    storage.write_bytes(f"{SAMRS}/FAST/images/f2.png", image_bytes("PNG", 6))
    write_card_file("train.SIOR_T-00000-of-00001.parquet", [
        {"image_id": "00001", "image_path": "SIOR/JPEGImages/00001.jpg", "instances": [
            instance("1", 0, "airplane", (4, 6, 12, 9), "The airplane on the left."),
            instance("2", 0, "airplane", (40, 8, 14, 10), "the airplane on the right"),
            instance("3", 1, "ship", (20, 30, 20, 6)),
        ]},
        {"image_id": "00002", "image_path": "SIOR/JPEGImages/00002.jpg", "instances": [
            instance("1", 1, "ship", (2, 2, 8, 8), "the ship at the top", rle_size=(WIDTH, HEIGHT)),
            instance("2", 0, "airplane", (50, 10, 30, 10), "the wide airplane"),  # x2 = 80 > 64
            instance("3", 1, "ship", (10, 30, 16, 8), "the ship at the bottom"),
        ]},
        {"image_id": "00003", "image_path": "SIOR/JPEGImages/missing.jpg", "instances": [
            instance("1", 1, "ship", (2, 2, 8, 8), "a ship"),
        ]},
    ])  # fmt: skip
    write_card_file("valid.SIOR_T-00000-of-00001.parquet", [
        {"image_id": "00004", "image_path": "SIOR/JPEGImages/00004.jpg", "instances": [
            instance("7", 0, "airplane", (4, 4, 10, 10), "the upper airplane"),
            instance("7", 0, "airplane", (30, 30, 10, 10), "the lower airplane"),
            instance("8", 1, "ship", (40, 4, 12, 6), "the ship"),
        ]},
    ])  # fmt: skip
    write_card_file("train.FAST_T-00000-of-00001.parquet", [
        {"image_id": "f1", "image_path": "/home/authors/data/FAST/images/f1.png", "instances": [
            instance("11", 2, "Boeing737", (8, 10, 20, 12), "The white Boeing737 near the top."),
        ]},
        {"image_id": "f2", "image_path": "images/f2.png", "instances": []},
    ])  # fmt: skip
    return {"SIOR_T": f"{SAMRS}", "FAST_T": f"{SAMRS}/FAST"}


def images_option(roots: dict[str, str]) -> list[str]:
    return [f"{subset}={root}" for subset, root in roots.items()]


@pytest.fixture(scope="module")
def imported(release):
    out = f"{PREFIX}/source"
    report = import_geopixinstruct(ANNOTATIONS, images_option(release), out, seg_vocab=SEG_VOCAB, val_fraction=0.0)
    return out, report


def test_every_rejection_is_counted_with_its_reason_and_place(imported):
    _, report = imported
    assert report.box_format == "xywh", report.box_format_evidence  # these files write [x, y, w, h]
    assert dict(report.images) == {"SIOR_T.train": 2, "SIOR_T.valid": 1, "FAST_T.train": 2}
    assert dict(report.rejected) == {
        "image not found or unreadable": 1,
        "mask size differs from the image": 1,
        "bbox outside the image": 1,
        "instance_id used twice in one image": 2,
        "segment record of a category with a rejected instance": 1,  # image 00002's ships
    }
    train_file = f"{ANNOTATIONS}/data/train.SIOR_T-00000-of-00001.parquet"
    assert report.examples["mask size differs from the image"] == [
        f"{train_file}: row 1 (image_id '00002'), instances[0]: instance_id '1': mask size [64, 48] (height, width) but the image is 48×64"
    ]
    assert report.examples["bbox outside the image"][0].startswith(f"{train_file}: row 1 (image_id '00002'), instances[1]")
    assert "missing.jpg" in report.examples["image not found or unreadable"][0]
    assert "valid.SIOR_T" in report.examples["instance_id used twice in one image"][0]
    assert dict(report.records) == {"segment": 4, "refer": 5, "ground": 5}
    assert report.instances_without_description == 1 and report.images_found_by_name == 1
    assert report.images_without_instances == 1


def test_records_keep_subset_split_classes_masks_and_boxes(imported, release):
    out, report = imported
    catalog = read_catalog(out)
    assert catalog.names == {0: "airplane", 1: "ship", 2: "Boeing737"}  # the data's own ids
    saved = json.loads(storage.read_bytes(f"{out}/{IMPORT_REPORT_FILE}"))
    assert saved["rejected"] == dict(sorted(report.rejected.items())) and saved["box_format"] == "xywh"
    records = {r["record_id"]: r for r in iter_records(out)}
    assert len(records) == sum(report.records.values())
    for record in records.values():
        assert validate_record(record, catalog, SEG_VOCAB) == [], record["record_id"]
        assert (record["width"], record["height"]) == (WIDTH, HEIGHT)

    planes = records["gpi-SIOR_T-00001-segment-0"]
    assert planes["split"] == "train" and planes["source"] == "geopixinstruct/SIOR_T"
    assert planes["conversation"][1]["text"].startswith("Sure, there are 2 airplanes: ")
    assert [t["box"] for t in planes["targets"]] == [[4.0, 6.0, 16.0, 15.0], [40.0, 8.0, 54.0, 18.0]]
    assert decode_mask(planes["targets"][0]["mask"])[6:15, 4:16].all()
    assert "gpi-SIOR_T-00002-segment-1" not in records  # one of its ships was rejected: the count would lie
    assert records["gpi-SIOR_T-00002-refer-3"]["targets"][0]["description"] == "the ship at the bottom"

    refer = records["gpi-SIOR_T-00001-refer-1"]
    assert "the airplane on the left" in refer["conversation"][0]["text"]  # capital and full stop dropped
    ground = records["gpi-SIOR_T-00001-ground-1"]
    assert parse_box_text(ground["conversation"][1]["text"]) == parse_box_text(box_to_text([4, 6, 16, 15], WIDTH, HEIGHT))
    assert ground["conversation"][1]["text"].startswith(f"Sure, it is {SEG_VOCAB.run} at ")

    assert records["gpi-SIOR_T-00004-segment-1"]["split"] == "test"  # upstream valid
    boeing = records["gpi-FAST_T-f1-refer-11"]
    assert boeing["image_uri"] == f"{SAMRS}/FAST/images/f1.png"
    assert "the white Boeing737 near the top" in boeing["conversation"][0]["text"]


def test_bad_release_files_and_options_are_clear_errors(release, tmp_path):
    with pytest.raises(GeoPixInstructError, match="no Parquet files"):
        annotation_files(str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "SIOR_T.parquet").write_bytes(b"")
    with pytest.raises(GeoPixInstructError, match=r"SIOR_T.parquet: cannot tell split and subset"):
        annotation_files(str(tmp_path))
    with pytest.raises(GeoPixInstructError, match="no image root for subset FAST_T"):
        geopixinstruct_records(ANNOTATIONS, [f"SIOR_T={SAMRS}"], seg_vocab=SEG_VOCAB)
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["x"]}), broken / "data" / "train.SIOR_T-00000-of-00001.parquet")
    records, _, _ = geopixinstruct_records(str(broken), [SAMRS], seg_vocab=SEG_VOCAB, box_format="xyxy")
    with pytest.raises(GeoPixInstructError, match=r"train.SIOR_T-00000-of-00001.parquet: column\(s\) image_path"):
        list(records)


def test_cli_imports_and_prints_the_rejections(release, stack):
    out = f"{PREFIX}/cli-source"
    result = subprocess.run(
        [*geopix_cli(), "data", "import-geopixinstruct", "--annotations", ANNOTATIONS,
         *[a for item in images_option(release) for a in ("--images", item)], "--subset", "SIOR_T", "--out", out],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "imported 3 images" in result.stdout and "boxes read as xywh" in result.stdout
    assert "rejected 2: instance_id used twice in one image" in result.stdout
    assert {r["source"] for r in iter_records(out)} == {"geopixinstruct/SIOR_T"}


def test_imported_release_shards_and_trains(imported, ray_cluster):
    from geopix.train.run import train_stage

    source, report = imported
    shards = f"{PREFIX}/shards"
    result = shard_sources([source], shards, DataConfig(chip_size=64), workers=2, seg_vocab=SEG_VOCAB, overwrite=True)
    assert result.counts["written"] == sum(report.records.values()) and not result.rejects
    manifest = read_manifest(shards)
    assert {c["name"] for c in manifest["classes"]} == {"airplane", "ship", "Boeing737"}
    cfg = load_config("tiny", [
        "model.image_size=64", "model.llm_hidden_size=64", "model.llm_num_layers=2", "model.llm_intermediate_size=128",
        "model.decoder_dim=32", "train.batch_size=2", "train.stage1.max_steps=2", "train.stage1.warmup_steps=1",
        "train.tokenizer_vocab_size=300", "train.log_every=1", "train.runs_uri=s3://geopix-checkpoints/tests/runs",
        "train.models_uri=s3://geopix-checkpoints/tests/models", "tracking.experiment=geopix-tests-geopixinstruct",
        "tracking.system_metrics=false",
    ])  # fmt: skip
    tracking.configure(cfg.tracking)
    trained = train_stage(cfg, 1, shards_uri=shards, register=False)
    losses = MlflowClient().get_metric_history(trained.mlflow_run_id, "loss/total")
    assert trained.steps == 2 and {m.step for m in losses} == {1, 2}
    assert all(np.isfinite(m.value) for m in losses)
