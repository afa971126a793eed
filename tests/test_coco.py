"""COCO instances + refCOCO-style expressions → records, images read from S3."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geopix import storage
from geopix.answer_form import parse_box_text
from geopix.data.coco import CocoImportError, import_coco
from geopix.data.schema import decode_mask, validate_record
from geopix.data.source import iter_records, read_catalog
from tests.records import SEG_VOCAB, png_bytes

PREFIX = "s3://geopix-data/tests/coco"


@pytest.fixture(scope="module")
def coco_files(stack):
    images = [
        {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 8, "file_name": "b.png", "width": 32, "height": 32},
    ]
    for image in images:
        storage.write_bytes(
            f"{PREFIX}/images/{image['file_name']}",
            png_bytes(np.zeros((image["height"], image["width"], 3), np.uint8)),
        )
    rle_mask = np.zeros((32, 32), np.uint8)
    rle_mask[2:6, 3:9] = 1
    from pycocotools import mask as mask_utils

    instances = {
        "images": images,
        "categories": [{"id": 3, "name": "ship"}, {"id": 5, "name": "storage_tank"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "bbox": [10, 5, 10, 8],
                "iscrowd": 0,
                "segmentation": [[10, 5, 20, 5, 20, 13, 10, 13]],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [25, 15, 5, 5],
                "iscrowd": 0,
                "segmentation": [[25, 15, 30, 15, 30, 20, 25, 20]],
            },
            {
                "id": 3,
                "image_id": 8,
                "category_id": 5,
                "bbox": [3, 2, 6, 4],
                "iscrowd": 0,
                "segmentation": {
                    "size": [32, 32],
                    "counts": mask_utils.encode(np.asfortranarray(rle_mask))["counts"].decode(),
                },
            },
            {
                "id": 4,
                "image_id": 8,
                "category_id": 5,
                "bbox": [0, 0, 32, 32],
                "iscrowd": 1,
                "segmentation": {"size": [32, 32], "counts": "PP`0"},
            },
        ],
    }
    refs = [
        {
            "ref_id": 11,
            "ann_id": 2,
            "image_id": 7,
            "split": "testA",
            "sentences": [{"sent": "the small ship on the right"}],
        },
        {"ref_id": 12, "ann_id": 4, "image_id": 8, "split": "train", "sentences": [{"sent": "the crowd"}]},
    ]
    storage.write_bytes(f"{PREFIX}/instances.json", json.dumps(instances).encode())
    storage.write_bytes(f"{PREFIX}/refs.json", json.dumps(refs).encode())
    return instances


def test_import_coco_with_referring_expressions(coco_files):
    stats = import_coco(
        f"{PREFIX}/instances.json", f"{PREFIX}/images", f"{PREFIX}/source", refs_uri=f"{PREFIX}/refs.json", seg_vocab=SEG_VOCAB
    )
    assert stats.images == 2
    assert dict(stats.records) == {"segment": 2, "refer": 1, "ground": 1}
    assert stats.skipped == {
        "crowd annotation": 1,
        "referring expression whose annotation is missing or skipped": 1,
    }

    catalog = read_catalog(f"{PREFIX}/source")
    assert catalog.names == {3: "ship", 5: "storage_tank"}
    records = {r["record_id"]: r for r in iter_records(f"{PREFIX}/source")}
    for record in records.values():
        assert validate_record(record, catalog, SEG_VOCAB) == [], record["record_id"]
        assert record["image_uri"].startswith(f"{PREFIX}/images/")

    ships = records["coco-7-segment-3"]
    assert len(ships["targets"]) == 2 and ships["conversation"][0]["text"].endswith("Segment all ships.")
    first = decode_mask(ships["targets"][0]["mask"])
    assert first.shape == (30, 40) and first[5:13, 10:20].all() and first.sum() == pytest.approx(80, abs=20)
    assert ships["targets"][0]["box"] == [10.0, 5.0, 20.0, 13.0]

    # Every record of a picture says what it holds; a skipped (crowd) annotation leaves it unknown.
    assert {r["record_id"]: r["class_counts"] for r in records.values()} == {
        "coco-7-segment-3": [{"class_id": 3, "count": 2}],
        "coco-7-11-0-refer": [{"class_id": 3, "count": 2}],
        "coco-7-11-0-ground": [{"class_id": 3, "count": 2}],
        "coco-8-segment-5": None,
    }
    refer = records["coco-7-11-0-refer"]
    assert refer["split"] == "test" and refer["targets"][0]["description"] == "the small ship on the right"
    ground = records["coco-7-11-0-ground"]
    assert parse_box_text(ground["conversation"][1]["text"]) == [(62, 50, 75, 67)]
    tank = decode_mask(records["coco-8-segment-5"]["targets"][0]["mask"])
    assert tank[2:6, 3:9].all() and tank.sum() == 24


def test_bad_coco_input_names_the_file(stack, tmp_path):
    with pytest.raises(CocoImportError, match="does not exist"):
        import_coco(f"{PREFIX}/missing.json", f"{PREFIX}/images", str(tmp_path / "out"), seg_vocab=SEG_VOCAB)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    with pytest.raises(CocoImportError, match="broken.json is not valid JSON"):
        import_coco(str(broken), str(tmp_path), str(tmp_path / "out"), seg_vocab=SEG_VOCAB)
    partial = tmp_path / "partial.json"
    partial.write_text('{"images": []}')
    with pytest.raises(CocoImportError, match="key 'annotations' is missing"):
        import_coco(str(partial), str(tmp_path), str(tmp_path / "out"), seg_vocab=SEG_VOCAB)


def test_malformed_entries_name_the_file_the_entry_and_the_field(tmp_path):
    """A category without a name is an error; an image without a width, an annotation without a
    category or an unknown refCOCO split are skipped and counted, the first ones named (file, entry,
    field); an annotation without a bbox takes its mask's box."""
    square = [[2, 2, 10, 2, 10, 10, 2, 10]]
    instances = {
        "images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16},
                   {"id": 2, "file_name": "b.png", "height": 16}],
        "categories": [{"id": 3, "name": "ship"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "segmentation": square},  # no bbox
                        {"id": 11, "image_id": 1, "segmentation": square, "bbox": [2, 2, 8, 8]},
                        {"id": 12, "image_id": 2, "category_id": 3, "segmentation": square, "bbox": [2, 2, 8, 8]}],
    }  # fmt: skip
    refs = [{"ref_id": 5, "ann_id": 10, "image_id": 1, "split": "testD", "sentences": [{"sent": "the ship"}]}]
    path, refs_path = tmp_path / "instances.json", tmp_path / "refs.json"
    path.write_text(json.dumps(instances))
    refs_path.write_text(json.dumps(refs))
    stats = import_coco(str(path), str(tmp_path), str(tmp_path / "out"), refs_uri=str(refs_path), seg_vocab=SEG_VOCAB)
    assert stats.skipped == {"image without 'width'": 1, "annotation without 'category_id'": 1,
                             "referring expression of an unknown split": 1}  # fmt: skip
    assert stats.examples["image without 'width'"] == [f"{path}: images[1] (id 2) has no 'width'"]
    assert stats.examples["annotation without 'category_id'"] == [f"{path}: annotations[1] (id 11) has no 'category_id'"]
    assert "refs[0] (id 5): split 'testD' is none of train, val, test" in stats.examples[
        "referring expression of an unknown split"][0]
    [record] = iter_records(str(tmp_path / "out"))
    assert record["targets"][0]["box"] == [2.0, 2.0, 10.0, 10.0] and stats.boxes_from_masks == 1

    instances["categories"].append({"id": 4})
    path.write_text(json.dumps(instances))
    with pytest.raises(CocoImportError, match=r"instances.json: categories\[1\] \(id 4\) has no 'name'"):
        import_coco(str(path), str(tmp_path), str(tmp_path / "out2"), seg_vocab=SEG_VOCAB)
