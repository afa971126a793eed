"""The synthetic generator: determinism, valid records, exact masks, held-out design, scenes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from geopix.answer_form import box_to_text, grounding_answer
from geopix.data import contact_sheet, phrases, schema, synth
from geopix.data.source import iter_records, read_catalog
from tests.records import SEG_VOCAB

CHIP = 256
SEED = 3
OFFSET = 1_000_000


def _generate(out: Path, train=30, val=10, test=20) -> dict:
    return synth.generate_chips(
        str(out), seed=SEED, chip_size=CHIP, train_images=train, val_images=val, test_images=test,
        test_seed_offset=OFFSET, seg_vocab=SEG_VOCAB, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    out = tmp_path_factory.mktemp("synth") / "source"
    stats = _generate(out)
    return out, stats, list(iter_records(str(out)))


def test_same_arguments_give_byte_identical_files(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _generate(first, train=6, val=2, test=3)
    _generate(second, train=6, val=2, test=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert Path("classes.json") in files and any(p.suffix == ".parquet" for p in files)
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # An image depends on its seed and index only, not on what was generated before it.
    records = {r["image_id"]: r for r in iter_records(str(first))}
    alone = synth.make_chip("train", SEED, 4, CHIP)
    assert records[synth.image_id("train", SEED, 4)]["image"] == alone.png()


def test_every_record_is_valid_and_all_tasks_and_phrase_types_occur(source):
    out, stats, records = source
    catalog = read_catalog(str(out))
    assert catalog == synth.SYNTH_CLASSES and len(catalog.names) >= 8
    problems = {r["record_id"]: schema.validate_record(r, catalog, SEG_VOCAB) for r in records}
    assert {k: v for k, v in problems.items() if v} == {}
    assert len({r["record_id"] for r in records}) == len(records)
    assert {r["task"] for r in records} == set(schema.TASKS)
    assert {r["phrase_type"] for r in records} - {None} == set(schema.PHRASE_TYPES)
    for record in records:
        assert record["source"] == "synthetic" and record["image_uri"] is None
        assert (record["phrase_type"] is None) == (record["task"] in ("caption", "vqa"))
        assert (record["phrase_type"] == "all_of_class") == (record["task"] == "segment")
        assert bool(record["targets"]) == (record["task"] in ("segment", "refer", "ground"))
    # Every record of a picture says how many instances of each class it holds: the caption's counts.
    held = {r["image_id"]: r["class_counts"] for r in records if r["task"] == "caption"}
    for record in records:
        assert record["class_counts"] == held[record["image_id"]] and held[record["image_id"]]
        if record["task"] == "caption":
            counts = {catalog.names[c["class_id"]]: c["count"] for c in record["class_counts"]}
            for name, count in counts.items():
                assert phrases._count_phrase(count, name) in record["conversation"][1]["text"], (name, count)
    assert stats["images"] == {"train": 30, "val": 10, "test": 20}
    assert sum(stats["records"].values()) == len(records)
    assert stats["records_per_task"] == dict(Counter(r["task"] for r in records))


def test_splits_use_their_own_seeds_and_templates(source):
    _, _, records = source
    by_split: dict[str, list[dict]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    assert set(by_split) == {"train", "val", "test"}
    assert all(r["image_id"].startswith(f"synth-test-{SEED + OFFSET}-") for r in by_split["test"])
    assert all(r["image_id"].startswith(f"synth-val-{SEED}-") for r in by_split["val"])
    train_images = {r["image"] for r in by_split["train"]}
    assert not train_images & {r["image"] for r in by_split["val"] + by_split["test"]}
    for split, group in by_split.items():
        used = {t for r in group for t in phrases.template_ids(r["template_id"])}
        assert used <= set(phrases.ALL_TEMPLATES), used - set(phrases.ALL_TEMPLATES)
        if split == "test":
            assert used <= phrases.HELD_OUT_TEMPLATE_IDS
        else:
            assert not used & phrases.HELD_OUT_TEMPLATE_IDS


def test_bare_forms_carry_only_the_task_tag_and_its_slot_and_only_in_training(source):
    """The bare training form ("[caption]", "[segment] ships", "[refer] the ship on the left"):
    the tag alone says what to answer; test keeps its held-out sentences."""
    _, _, records = source
    bare_ids = {t.id for group in (phrases.SEGMENT, phrases.REFER, phrases.GROUND, phrases.CAPTION)
                for t in group if t.text in phrases.BARE.values()}  # fmt: skip
    assert len(bare_ids) == 4 and not bare_ids & phrases.HELD_OUT_TEMPLATE_IDS
    bare = [r for r in records if phrases.template_ids(r["template_id"])[0] in bare_ids]
    assert bare and {r["split"] for r in bare} <= {"train", "val"}
    for record in bare:
        user = record["conversation"][0]["text"].split("\n", 1)[1]
        tag = schema.TASK_TAGS[record["task"]]
        if record["task"] == "caption":
            assert user == tag
        else:
            slot = user.removeprefix(tag + " ")
            assert slot and slot[0].islower() and not slot.endswith((".", "?")), user  # a phrase, no sentence


def test_held_out_appearances_occur_only_in_test():
    def variants(split: str, seed: int) -> list[synth.Variant]:
        return [o.variant for i in range(40) for o in synth.make_chip(split, seed, i, CHIP).instances]

    assert not any(v.held_out for v in variants("train", SEED) + variants("val", SEED))
    assert sum(v.held_out for v in variants("test", SEED + OFFSET)) >= 10


def test_masks_are_exactly_the_painted_visible_pixels(source):
    _, _, records = source
    by_image: dict[str, list[dict]] = {}
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)
    for image_id in sorted(by_image)[:12]:
        split, seed, index = image_id.split("-")[1:]
        chip = synth.make_chip(split, int(seed), int(index), CHIP)
        for record in by_image[image_id]:
            masks = [schema.decode_mask(t["mask"]).astype(bool) for t in record["targets"]]
            if masks:
                assert int(np.sum(masks, axis=0).max()) == 1, "targets of one record overlap"
            for target, mask in zip(record["targets"], masks, strict=True):
                uid = target["instance_id"]
                assert np.array_equal(mask, chip.instance_map == uid)
                assert mask.sum() >= synth.MIN_VISIBLE_PX
                rows, cols = np.nonzero(mask)
                assert target["box"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                # Painting the image without this instance changes (nearly) every mask pixel.
                without = synth.render_window(
                    chip.world, 0, 0, CHIP, CHIP, np.random.default_rng([int(seed), synth.SPLIT_STREAMS[split], int(index), 1]),
                    skip_uid=uid,
                )  # fmt: skip
                assert np.array_equal(without.ids == uid, np.zeros_like(mask))
                changed = np.any(without.rgb != chip.image, axis=-1)
                assert changed[mask].mean() > 0.9
                assert (
                    without.ids[~changed & (chip.instance_map != uid)].tolist()
                    == chip.instance_map[~changed & (chip.instance_map != uid)].tolist()
                )
            if record["task"] == "ground":
                (target,) = record["targets"]
                box_text = box_to_text(target["box"], CHIP, CHIP)
                assert record["conversation"][1]["text"] == grounding_answer(SEG_VOCAB.run, box_text)


def test_singular_phrases_pick_out_one_instance(source):
    _, _, records = source
    for record in records:
        if record["task"] not in ("refer", "ground"):
            continue
        split, seed, index = record["image_id"].split("-")[1:]
        chip = synth.make_chip(split, int(seed), int(index), CHIP)
        (target,) = record["targets"]
        same_class = [o for o in chip.instances if o.class_id == target["class_id"]]
        obj = next(o for o in same_class if o.uid == target["instance_id"])
        if record["phrase_type"] == "class":
            assert len(same_class) == 1
        if record["phrase_type"] == "colour":
            assert obj.variant.colour in target["description"]
            assert [o.variant.colour for o in same_class].count(obj.variant.colour) == 1
        if record["phrase_type"] == "size_rank":
            areas = sorted(int((chip.instance_map == o.uid).sum()) for o in same_class)
            mine = int((chip.instance_map == obj.uid).sum())
            bigger = "larg" in target["description"] or "bigg" in target["description"]
            assert mine == (areas[-1] if bigger else areas[0])
            assert (
                areas[-1] >= phrases.SIZE_RATIO * areas[-2]
                if bigger
                else areas[1] >= phrases.SIZE_RATIO * areas[0]
            )


def test_each_size_bucket_holds_a_fifth_of_the_instances():
    buckets: Counter = Counter()
    for index in range(200):
        chip = synth.make_chip("train", 0, index, CHIP)
        areas = np.bincount(chip.instance_map.ravel())
        buckets.update(synth.size_bucket(int(areas[o.uid])) for o in chip.instances)
    total = sum(buckets.values())
    assert total > 600
    for bucket in ("small", "medium", "large"):
        assert buckets[bucket] / total >= 0.2, (bucket, dict(buckets))


def test_scene_is_a_valid_cog_with_aligned_ground_truth(tmp_path):
    import rasterio
    from rasterio.windows import Window
    from rio_cogeo.cogeo import cog_validate

    size, tile = 1024, 512
    meta = synth.generate_scene(str(tmp_path), "scene-a", size, seed=5, tile_size=tile, progress=False)
    folder = tmp_path / "scene-a"
    assert json.loads((folder / "scene.json").read_text())["instance_count"] == meta["instance_count"] > 0
    paths = {name: folder / f"{name}.tif" for name in ("image", "instances", "classes")}
    for path in paths.values():
        valid, errors, _ = cog_validate(str(path), quiet=True)
        assert valid, errors
    with (
        rasterio.open(paths["image"]) as img,
        rasterio.open(paths["instances"]) as ids,
        rasterio.open(paths["classes"]) as cls,
    ):
        assert img.count == 3 and img.dtypes[0] == "uint8" and img.nodata == 0
        assert ids.dtypes[0] == "uint32" and cls.dtypes[0] == "uint8"
        assert img.crs.to_epsg() == ids.crs.to_epsg() == cls.crs.to_epsg() == 32618
        assert img.transform == ids.transform == cls.transform and img.transform.a == 0.5
        assert img.shape == ids.shape == cls.shape == (size, size)
        assert img.overviews(1)
        rgb, instance, klass = img.read(), ids.read(1), cls.read(1)
    assert len(np.unique(instance)) - 1 == meta["instance_count"]
    nodata = (rgb == 0).all(axis=0)
    assert 0 < nodata.mean() < 0.2 and not instance[nodata].any() and (klass[nodata] == 255).all()
    world = synth.plan_scene(5, size)
    class_of = np.array([255] + [o.class_id for o in world.objects], np.uint8)
    assert np.array_equal(klass, class_of[instance])
    # A window straddling four tiles renders the same objects (ids) and the same pixels up to noise.
    x0 = y0 = tile - 100
    again = synth.render_window(world, x0, y0, 200, 200, np.random.default_rng(0))
    window = (slice(y0, y0 + 200), slice(x0, x0 + 200))
    inside = ~nodata[window]
    assert np.array_equal(again.ids[inside], instance[window][inside])
    assert np.abs(again.rgb.astype(int) - np.moveaxis(rgb, 0, -1)[window])[inside].mean() < 4
    # Ground-truth pixels are painted pixels of their object.
    with rasterio.open(paths["image"]) as img:
        assert img.read(window=Window(x0, y0, 200, 200)).shape == (3, 200, 200)
    uid = int(np.bincount(instance.ravel())[1:].argmax()) + 1
    without = synth.render_window(world, 0, 0, size, size, np.random.default_rng(0), skip_uid=uid)
    changed = np.any(
        without.rgb != synth.render_window(world, 0, 0, size, size, np.random.default_rng(0)).rgb, axis=-1
    )
    assert changed[instance == uid].mean() > 0.9


def test_contact_sheet_draws_records(source, tmp_path):
    from PIL import Image

    _, _, records = source
    out = contact_sheet.contact_sheet(records, tmp_path / "sheet.png", n=8, seed=1)
    with Image.open(out) as image:
        assert image.size[0] > 1000 and image.size[1] > 500


def test_drawn_colour_answers_draw_the_asked_object_and_change_nothing_else(tmp_path):
    from geopix.answer_form import colour_answer
    from geopix.evaluate.job import normalise_answer

    def generate(name: str, drawn: bool) -> None:
        synth.generate_chips(
            str(tmp_path / name), seed=SEED, chip_size=CHIP, train_images=12, val_images=0, test_images=8,
            test_seed_offset=OFFSET, seg_vocab=SEG_VOCAB, vqa_colour_drawn=drawn, progress=False,
        )  # fmt: skip

    generate("plain", False)
    generate("drawn", True)
    plain = {r["record_id"]: r for r in iter_records(str(tmp_path / "plain"))}
    drawn = {r["record_id"]: r for r in iter_records(str(tmp_path / "drawn"))}
    assert plain.keys() == drawn.keys()
    catalog = read_catalog(str(tmp_path / "drawn"))
    colour_ids = {i for i, r in plain.items() if r["task"] == "vqa" and r["template_id"].startswith("vqa.colour")}
    assert len(colour_ids) >= 3, "too few colour questions to check"
    for record_id, record in drawn.items():
        if record_id not in colour_ids:
            assert record == plain[record_id], record_id
            continue
        assert schema.validate_record(record, catalog, SEG_VOCAB) == []
        (target,) = record["targets"]
        split, seed, index = record["image_id"].split("-")[1:]
        chip = synth.make_chip(split, int(seed), int(index), CHIP)
        colour = next(o for o in chip.instances if o.uid == target["instance_id"]).variant.colour
        answer, before = record["conversation"][1]["text"], plain[record_id]["conversation"][1]["text"]
        assert answer == colour_answer(colour, SEG_VOCAB.run) and before == colour_answer(colour)
        assert normalise_answer(answer) == normalise_answer(before)  # VQA's exact match is unchanged
        assert target["description"] in record["conversation"][0]["text"] and record["phrase_type"] in schema.PHRASE_TYPES
