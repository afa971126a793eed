"""Sharding on the local stack: Ray Data with 2 workers, reading and writing S3."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from geopix import storage
from geopix.config import DataConfig
from geopix.data.schema import validate_record
from geopix.data.shard import assign_split, shard_sources
from geopix.data.shard_set import ShardError, read_manifest, read_records
from geopix.data.source import SourceWriter
from geopix.outputs import OWNER_FILE
from tests.records import CATALOG, SEG_VOCAB, make_record

DATA = DataConfig(shard_target_mb=0.05, train_fraction=0.6, val_fraction=0.2)


def planted_bad_records() -> dict[str, dict]:
    """One record per kind of damage, keyed by the field its reason must name."""
    bad_rle = make_record(900)
    bad_rle["targets"][0]["mask"] = {"size": [64, 64], "counts": "zzzz"}
    outside = make_record(901)
    outside["targets"][0]["box"] = [50.0, 50.0, 80.0, 70.0]
    unknown = make_record(902)
    unknown["targets"][0]["class_id"] = 42
    missing = make_record(903)
    missing["image"], missing["image_uri"] = None, "s3://geopix-data/tests/shard/no-such-image.png"
    truncated = make_record(904)
    truncated["image"] = truncated["image"][: len(truncated["image"]) // 2]
    miscounted = make_record(905)  # its target's class is not among the classes the picture holds
    miscounted["class_counts"] = [{"class_id": miscounted["targets"][0]["class_id"] + 1, "count": 1}]
    return {
        "targets[0].mask": bad_rle,
        "targets[0].box": outside,
        "targets[0].class_id": unknown,
        "image_uri": missing,
        "image": truncated,
        "class_counts": miscounted,
    }


def write_source(uri: str, records) -> None:
    with SourceWriter(uri, CATALOG, rows_per_part=64) as writer:  # 3 parts: 3 files read side by side
        for record in records:
            writer.write(record)


@pytest.fixture(scope="module")
def source(stack, ray_cluster):
    good = [make_record(i, class_id=i % 3, task="refer" if i % 2 else "segment") for i in range(120)]
    for record in good[::4]:  # some pictures say every class they hold; the rest leave it unknown
        record["class_counts"] = [{"class_id": record["targets"][0]["class_id"], "count": len(record["targets"])}]
    # An image given by URI (fetched and embedded by sharding), and one pre-assigned to test.
    by_uri = make_record(500)
    storage.write_bytes("s3://geopix-data/tests/shard/images/500.png", by_uri["image"])
    by_uri["image"], by_uri["image_uri"] = None, "s3://geopix-data/tests/shard/images/500.png"
    pinned = make_record(501, split="test")
    # The same image with two different pre-assigned splits: both records are rejected.
    torn = [make_record(502, split="train"), make_record(502, split="val", task="segment")]
    bad = planted_bad_records()
    uri = "s3://geopix-data/tests/shard/source"
    write_source(uri, [*good, by_uri, pinned, *torn, *bad.values()])
    return {"uri": uri, "good": good, "bad": bad, "total": len(good) + 2 + len(torn) + len(bad)}


def test_shard_reconciles_and_reports_every_reject(source):
    result = shard_sources([source["uri"]], "s3://geopix-data/tests/shard/out", DATA, workers=2, seg_vocab=SEG_VOCAB)
    counts = result.counts
    assert counts["read"] == source["total"]
    assert counts["read"] == counts["written"] + counts["rejected"]
    assert counts["written"] == len(source["good"]) + 2
    assert 1 <= result.validation_workers <= 2  # at most `workers` tasks at once; small inputs may reuse one

    reasons = {r["record_id"]: r["reason"] for r in result.rejects}
    for field, record in source["bad"].items():
        assert reasons[record["record_id"]].startswith(field), (field, reasons[record["record_id"]])
    assert "do not decode as an image" in reasons["rec-00904-refer"]
    assert "cannot read s3://geopix-data/tests/shard/no-such-image.png" in reasons["rec-00903-refer"]
    assert "several splits (train, val)" in reasons["rec-00502-refer"]
    assert "several splits (train, val)" in reasons["rec-00502-segment"]

    # The rejects table in S3 says the same.
    rejects = pq.read_table(
        io.BytesIO(storage.read_bytes("s3://geopix-data/tests/shard/out/rejects/rejects.parquet"))
    )
    assert dict(zip(rejects["record_id"].to_pylist(), rejects["reason"].to_pylist(), strict=True)) == reasons

    manifest = read_manifest("s3://geopix-data/tests/shard/out")
    assert manifest["schema_version"] == 1 and manifest["counts"] == counts
    splits = manifest["splits"]
    assert sum(s["records"] for s in splits.values()) == counts["written"]
    assert sum(sh["rows"] for s in splits.values() for sh in s["shards"]) == counts["written"]
    assert len(splits["train"]["shards"]) >= 2, "the small target size must cut train into several shards"

    # Every shard holds valid records of its split, images embedded; no image in two splits.
    split_of_image: dict[str, str] = {}
    for split, info in splits.items():
        for shard in info["shards"]:
            table = pq.read_table(
                io.BytesIO(storage.read_bytes(f"s3://geopix-data/tests/shard/out/{shard['path']}"))
            )
            assert table.num_rows == shard["rows"]
            for row in table.to_pylist():
                assert row["split"] == split and row["image"]
                index = int(row["record_id"].split("-")[1])
                counted = index < 120 and index % 4 == 0
                assert (row["class_counts"] is not None) == counted, row["record_id"]
                assert validate_record(row, CATALOG, SEG_VOCAB) == []
                assert split_of_image.setdefault(row["image_id"], split) == split
    assert split_of_image["img-00501"] == "test"
    assert split_of_image["img-00500"] == assign_split("img-00500", DATA)


def test_read_records_reads_one_split_by_task_and_record_id(source):
    out = "s3://geopix-data/tests/shard/out"  # the first test's shard set, whatever it now holds
    shards = read_manifest(out)["splits"]["train"]["shards"]
    every = [
        row for shard in shards
        for row in pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{shard['path']}"))).to_pylist()
    ]
    by_id = {r["record_id"]: r for r in every}
    refer = sorted(i for i, r in by_id.items() if r["task"] == "refer")
    assert refer and len(refer) < len(every), "the split must hold refer records and others"

    assert [r["record_id"] for r in read_records(out, "train")] == sorted(by_id)
    assert [r["record_id"] for r in read_records(out, "train", tasks=["refer"])] == refer
    other_task = next(i for i in sorted(by_id) if by_id[i]["task"] != "refer")
    picked = [refer[-1], other_task, refer[0], "rec-no-such-record"]
    rows = read_records(out, "train", tasks=["refer"], record_ids=picked, columns=["record_id", "targets"])
    assert [r["record_id"] for r in rows] == sorted({refer[0], refer[-1]})  # both filters hold
    assert all(set(r) == {"record_id", "targets"} and r["targets"] == by_id[r["record_id"]]["targets"] for r in rows)
    with pytest.raises(ShardError, match="no finished shard set"):
        read_records("s3://geopix-data/tests/shard/no-such-set", "train")


def test_overwrite_replaces_a_shard_set_with_byte_identical_shards_for_the_same_input(source):
    out = "s3://geopix-data/tests/shard/out"  # the first test's shard set
    before = {o: storage.read_bytes(f"{out}/{o}") for o in storage.list_objects(out) if o != OWNER_FILE}
    again = shard_sources([source["uri"]], out, DATA, workers=2, overwrite=True, seg_vocab=SEG_VOCAB)
    after = {o: storage.read_bytes(f"{out}/{o}") for o in storage.list_objects(out) if o != OWNER_FILE}
    shards = [s["path"] for info in again.manifest["splits"].values() for s in info["shards"]]
    assert {"manifest.json", storage.SUCCESS_MARKER, *shards} <= set(after)
    assert after == before  # the same sources and config: the same bytes, manifest included


def test_overwrite_with_other_records_publishes_the_new_shards(source):
    """Overwriting with different content: the rewritten files keep their names but not their
    ETags, so nothing read after the write may come from a listing made before it."""
    first = "s3://geopix-data/tests/shard/changed-source-a"
    second = "s3://geopix-data/tests/shard/changed-source-b"
    write_source(first, [make_record(i, class_id=i % 3) for i in range(80)])
    write_source(second, [make_record(i, class_id=(i + 1) % 3) for i in range(80)])
    out = "s3://geopix-data/tests/shard/changed-out"
    shard_sources([first], out, DATA, workers=2, seg_vocab=SEG_VOCAB)
    storage.list_files(f"{out}/train", "*.parquet")  # a listing of the old files, as the CLI makes
    again = shard_sources([second], out, DATA, workers=2, overwrite=True, seg_vocab=SEG_VOCAB)
    for split, info in again.manifest["splits"].items():
        for shard in info["shards"]:
            payload = storage.read_bytes(f"{out}/{shard['path']}")
            assert len(payload) == shard["bytes"], (split, shard["path"])
    # The published shards hold the second source's records (the class ids moved by one).
    rows = [r for info in again.manifest["splits"].values() for s in info["shards"]
            for r in pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{s['path']}"))).to_pylist()]
    want = {r["record_id"]: r["targets"][0]["class_id"] for r in (make_record(i, class_id=(i + 1) % 3) for i in range(80))}
    assert len(rows) == 80 and {r["record_id"]: r["targets"][0]["class_id"] for r in rows} == want


def test_existing_output_and_missing_source_are_clear_errors(source):
    out = "s3://geopix-data/tests/shard/out"  # the first test's finished shard set
    with pytest.raises(ShardError, match="already holds a finished shard set; pass --overwrite"):
        shard_sources([source["uri"]], out, DATA, seg_vocab=SEG_VOCAB)
    with pytest.raises(ShardError, match="source s3://geopix-data/tests/shard/nothing-here does not exist"):
        shard_sources(["s3://geopix-data/tests/shard/nothing-here"], "s3://geopix-data/tests/shard/x", DATA, seg_vocab=SEG_VOCAB)
    with pytest.raises(storage.StorageError, match="bucket 'no-bucket'"):
        shard_sources([source["uri"]], "s3://no-bucket/out", DATA, seg_vocab=SEG_VOCAB)


def test_nothing_geopix_did_not_write_is_ever_deleted(source, tmp_path, monkeypatch):
    """Refused, before any source is read or anything removed: a directory of yours (with or
    without --overwrite, with a missing source too), a bucket root, the working directory, a prefix
    that is, holds or lies inside a source, and a shard set of ours holding a file of yours."""
    yours = tmp_path / "yours"
    (yours / "photos").mkdir(parents=True)
    (yours / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 memories")
    for sources in ([source["uri"]], [str(tmp_path / "no-such-source")]):
        for overwrite in (False, True):
            with pytest.raises(ShardError, match=r"GeoPix did not write \(photos/holiday.jpg\)|does not exist"):
                shard_sources(sources, str(yours), DATA, overwrite=overwrite, seg_vocab=SEG_VOCAB)
    assert (yours / "photos" / "holiday.jpg").read_bytes() == b"\xff\xd8 memories"
    monkeypatch.chdir(tmp_path)
    for out, why in [("s3://geopix-data", "bucket root"), (str(tmp_path), "the working directory"),
                     (source["uri"], "is the input"), ("s3://geopix-data/tests/shard", "holds the input"),
                     (source["uri"] + "/shards", "lies inside the input")]:  # fmt: skip
        with pytest.raises(ShardError, match=why):
            shard_sources([source["uri"]], out, DATA, overwrite=True, seg_vocab=SEG_VOCAB)
    # A file of yours put into a shard set of ours: --overwrite refuses to replace the set.
    storage.write_bytes("s3://geopix-data/tests/shard/out/notes.txt", b"mine")
    with pytest.raises(ShardError, match=r"not part of one \(notes.txt\)"):
        shard_sources([source["uri"]], "s3://geopix-data/tests/shard/out", DATA, overwrite=True, seg_vocab=SEG_VOCAB)
    assert storage.read_bytes("s3://geopix-data/tests/shard/out/notes.txt") == b"mine"
    assert storage.exists(f"s3://geopix-data/tests/shard/out/{storage.SUCCESS_MARKER}")  # the set untouched


def test_a_source_is_read_only_once_finished(source):
    half = "s3://geopix-data/tests/shard/half-written"
    for part in storage.list_objects(source["uri"]):
        if part != storage.SUCCESS_MARKER:  # everything but the marker its writer writes last
            storage.copy(f"{source['uri']}/{part}", f"{half}/{part}")
    with pytest.raises(ShardError, match="half-written is unfinished: no _SUCCESS"):
        shard_sources([half], "s3://geopix-data/tests/shard/from-half", DATA, seg_vocab=SEG_VOCAB)
    assert not storage.list_objects("s3://geopix-data/tests/shard/from-half")


def test_split_assignment_is_by_image_id_only():
    assert {assign_split(f"img-{i}", DATA) for i in range(200)} == {"train", "val", "test"}
    assert assign_split("img-7", DATA) == assign_split("img-7", DATA)
