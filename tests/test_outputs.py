"""What GeoPix may replace (geopix/outputs.py): owned output prefixes, refusals, staged switches,
and local writes that are whole or nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from geopix import outputs, storage
from geopix.outputs import OutputExists, OutputRefused, prepare_output

LAYOUT = ("part-*.txt", "report/*")


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_directory_of_yours_is_never_emptied(tmp_path):
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.tex").write_text("years of work")
    for replace in (False, True):
        with pytest.raises(OutputRefused, match=r"holds 1 object\(s\) GeoPix did not write \(notes/thesis.tex\)"):
            prepare_output(str(mine), "widget", LAYOUT, replace=replace)
    assert files_under(mine) == {"notes/thesis.tex": b"years of work"}


def test_roots_home_working_directory_and_inputs_are_refused(tmp_path, monkeypatch, stack):
    monkeypatch.chdir(tmp_path)
    for place, why in [("s3://geopix-data", "bucket root"), ("s3://geopix-data/", "bucket root"), ("/", "filesystem root"),
                       (str(tmp_path), "the working directory"), (str(tmp_path.parent), "the working directory"),
                       (str(Path.home()), "your home directory")]:  # fmt: skip
        with pytest.raises(OutputRefused, match=why):
            prepare_output(place, "widget", LAYOUT, replace=True)
    source = tmp_path / "data" / "source"
    for out, relation in [(source, "is the input"), (source.parent, "holds the input"), (source / "out", "lies inside")]:
        with pytest.raises(OutputRefused, match=relation):
            prepare_output(str(out), "widget", LAYOUT, replace=True, inputs=[str(source)])
    with pytest.raises(OutputRefused, match="lies inside the input s3://geopix-data/tests/outputs/src"):
        prepare_output("s3://geopix-data/tests/outputs/src/out", "widget", LAYOUT, replace=True,
                       inputs=["S3://geopix-data/tests/outputs/src"])  # fmt: skip


def test_only_an_output_of_ours_is_replaced_and_only_its_layout(tmp_path):
    out = tmp_path / "out"
    assert prepare_output(str(out), "widget", LAYOUT, replace=False) == []
    owner = json.loads((out / outputs.OWNER_FILE).read_text())
    assert owner["kind"] == "widget" and owner["geopix_version"]
    (out / "part-0.txt").write_text("a")
    (out / "report").mkdir()
    (out / "report" / "r.md").write_text("b")
    (out / storage.SUCCESS_MARKER).write_text("")
    with pytest.raises(OutputExists, match="already holds a finished widget; pass --overwrite"):
        prepare_output(str(out), "widget", LAYOUT, replace=False)
    with pytest.raises(OutputRefused, match="holds a GeoPix widget, not a gadget"):
        prepare_output(str(out), "gadget", LAYOUT, replace=True)
    (out / "yours.csv").write_text("keep")
    with pytest.raises(OutputRefused, match=r"also holds objects that are not part of one \(yours.csv\)"):
        prepare_output(str(out), "widget", LAYOUT, replace=True)
    assert set(files_under(out)) == {outputs.OWNER_FILE, "part-0.txt", "report/r.md", storage.SUCCESS_MARKER, "yours.csv"}
    (out / "yours.csv").unlink()
    deleted = prepare_output(str(out), "widget", LAYOUT, replace=True)
    assert sorted(deleted) == [storage.SUCCESS_MARKER, "part-0.txt", "report/r.md"]
    assert set(files_under(out)) == {outputs.OWNER_FILE}
    # An unfinished output of ours (a killed run) is cleaned without being asked.
    (out / "part-1.txt").write_text("half")
    assert prepare_output(str(out), "widget", LAYOUT, replace=False) == ["part-1.txt"]


def test_the_same_rules_hold_on_s3(stack):
    prefix = "s3://geopix-data/tests/outputs/foreign"
    storage.write_bytes(f"{prefix}/precious.bin", b"1")
    with pytest.raises(OutputRefused, match="GeoPix did not write"):
        prepare_output(prefix, "widget", LAYOUT, replace=True)
    assert storage.read_bytes(f"{prefix}/precious.bin") == b"1"
    ours = "s3://geopix-data/tests/outputs/ours"
    prepare_output(ours, "widget", LAYOUT, replace=False)
    storage.write_bytes(f"{ours}/part-0.txt", b"x")
    storage.write_bytes(f"{ours}/{storage.SUCCESS_MARKER}", b"")
    assert sorted(prepare_output(ours, "widget", LAYOUT, replace=True)) == [storage.SUCCESS_MARKER, "part-0.txt"]
    assert storage.list_objects(ours) == [outputs.OWNER_FILE]
    with pytest.raises(storage.StorageError, match="refusing to delete everything in s3://geopix-data"):
        storage.remove_prefix("s3://geopix-data/")


def test_staged_publish_never_leaves_the_prefix_without_a_whole_output(tmp_path, stack):
    for prefix in (str(tmp_path / "scene"), "s3://geopix-predictions/tests/outputs/scene"):
        old, new = tmp_path / "old.txt", tmp_path / "new.txt"
        old.write_text("old"), new.write_text("new")
        outputs.publish_staged(prefix, {"mask.txt": old}, outputs.staging_id(), "thing", ("mask.txt",))
        assert storage.read_bytes(storage.join_uri(prefix, "mask.txt")) == b"old"
        # A run killed after staging its outputs: the old ones are still published, untouched.
        stage = outputs.staging_id()
        outputs.stage_output(prefix, {"mask.txt": new}, stage, "thing", ("mask.txt",))
        assert storage.exists(storage.join_uri(prefix, storage.SUCCESS_MARKER))
        assert storage.read_bytes(storage.join_uri(prefix, "mask.txt")) == b"old"
        # A later look at the prefix finishes that switch; the staging copy is gone after it.
        assert outputs.finish_staged_switch(prefix)
        assert storage.read_bytes(storage.join_uri(prefix, "mask.txt")) == b"new"
        assert storage.exists(storage.join_uri(prefix, storage.SUCCESS_MARKER))
        assert not [o for o in storage.list_objects(prefix) if o.startswith(outputs.STAGING_DIR)]
        # A staging attempt killed before its marker is never switched in.
        storage.write_bytes(storage.join_uri(prefix, outputs.STAGING_DIR, "z-half", "mask.txt"), b"half")
        assert not outputs.finish_staged_switch(prefix)
        assert storage.read_bytes(storage.join_uri(prefix, "mask.txt")) == b"new"


def test_remove_record_deletes_only_a_record_it_recognises(tmp_path):
    record = tmp_path / "_quarantine" / "a.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"scene_id": "a", "reason": "unreadable"}))
    imposter = tmp_path / "_quarantine" / "b.json"
    imposter.write_text("a user's file that happens to sit here")
    assert not outputs.remove_record(str(imposter), {"scene_id": "b"})
    assert not outputs.remove_record(str(record), {"scene_id": "other"})
    assert outputs.remove_record(str(record), {"scene_id": "a"})
    assert not record.exists() and imposter.exists()


def test_local_writes_are_whole_or_nothing_and_private_from_the_first_byte(tmp_path):
    path = tmp_path / "steps" / "stage1.json"
    storage.write_bytes(str(path), b'{"old": true}')
    with open(path, "rb") as reader:  # a reader holding the old file ...
        storage.write_bytes(str(path), b'{"new": true}')
        assert reader.read() == b'{"old": true}'  # ... sees it whole: the new one was renamed in
    assert path.read_bytes() == b'{"new": true}'
    old_umask = os.umask(0)
    try:
        secret = tmp_path / "token"
        storage.write_local_atomic(secret, b"s3cr3t", mode=0o600)
        assert secret.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)
    assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]
