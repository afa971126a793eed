"""Scenes from STAC on the local stack: a static catalog in S3 (good items, bad ones, one that
splits its bands), an ItemCollection on disk, and a search of a real STAC API (`rustac serve` on
loopback) — each good item segmented once, each bad one quarantined with its reason, a re-published
item segmented again and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.transform import from_origin

from geopix import storage
from geopix.config import REPO_ROOT, SegmentConfig
from geopix.infer import nightly
from geopix.infer.scene_reader import SceneError, open_scene, plan_windows, read_chunk
from geopix.infer.segment import RUN_FILE
from geopix.infer.stac_scenes import StacSearch, list_stac_scenes, parse_bbox, scene_of_item, stac_source
from tests.test_segment import INSTRUCTION, OVERRIDES, object_states

ROOT = "s3://geopix-scenes/tests/stac"
OUT = "s3://geopix-predictions/tests/stac"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
SIDE = 112  # px: 2 × 2 windows of 64 with overlap 16
UTM = {"crs": "EPSG:32618", "transform": from_origin(583_000, 4_511_000, 0.5, 0.5)}


# ------------------------------------------------------------------------------ helpers
def rgb(seed: int) -> np.ndarray:
    """A [3, SIDE, SIDE] uint8 scene with some structure (bright squares on a noisy ground)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 90, (3, SIDE, SIDE), np.uint8)
    for _ in range(4):
        row, col = rng.integers(0, SIDE - 20, 2)
        image[:, row : row + 16, col : col + 16] = rng.integers(150, 255, (3, 1, 1), np.uint8)
    return image


def write_cog(uri: str, data: np.ndarray, tmp: Path, **profile) -> str:
    """``data`` [C, H, W] as a COG at ``uri`` (s3:// or a local path)."""
    path = tmp / f"{abs(hash(uri))}.tif"
    base = {"driver": "COG", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
            "dtype": data.dtype.name, "blocksize": 256} | UTM  # fmt: skip
    with rasterio.open(path, "w", **(base | profile)) as ds:
        ds.write(data)
    if storage.is_s3_uri(uri):
        storage.upload_file(path, uri)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, uri)
    return uri


def item(item_id: str, assets: dict, collection: str = "tests", when: str = "2026-11-27T10:00:00Z",
         bbox=(-74.0, 40.7, -73.9, 40.8), **properties) -> dict:  # fmt: skip
    west, south, east, north = bbox
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Feature", "stac_version": "1.1.0", "id": item_id, "collection": collection, "bbox": list(bbox),
            "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"datetime": when, **properties},
            "links": [], "assets": assets}  # fmt: skip


def visual(href: str, **extra) -> dict:
    return {"href": href, "type": COG, "roles": ["visual"], **extra}


def put_json(uri: str, content: dict) -> None:
    storage.write_bytes(uri, json.dumps(content, indent=1).encode())


def cfg_with(cfg, **segment):
    return cfg.model_copy(update={"segment": cfg.segment.model_copy(update=segment)})


# ------------------------------------------------------------------------------ no stack needed
def test_stac_arguments_combine_only_one_way():
    assert stac_source(None, None) is None
    assert stac_source("s3://b/catalog.json", None) == "s3://b/catalog.json"
    search = stac_source(None, "http://h", ["s2"], "-74,40.7,-73.9,40.8", "2026-11-01/2026-11-30", 5)
    assert search == StacSearch("http://h", ("s2",), (-74.0, 40.7, -73.9, 40.8), "2026-11-01/2026-11-30", 5)
    for args, message in [
        (("c.json", "http://h", ["s2"]), "not both"),
        (("c.json", None, ["s2"]), "--collection narrow a STAC API search"),
        ((None, None, None, "1,2,3,4"), "--bbox narrow"),
        ((None, "http://h"), "at least one --collection"),
        ((None, "http://h", ["s2"], "1,2,3"), "four numbers"),
        ((None, "http://h", ["s2"], "0,50,1,40"), "south ≤ north"),
        ((None, "http://h", ["s2"], None, None, 0), "--max-items must be at least 1"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            stac_source(*args)
    assert parse_bbox("170,-10,-170,10") == (170.0, -10.0, -170.0, 10.0)  # across the antimeridian
    assert "secret" not in StacSearch("https://reader:secret@stac.example.com", ("s2",)).describe()


def test_asset_rule_keys_then_visual_role_then_band_assets():
    def pick(assets: dict, cfg: SegmentConfig | None = None, **properties):
        chosen = scene_of_item(pystac.Item.from_dict(item("x", assets, **properties)), "s3://b/items/x.json",
                               cfg or SegmentConfig())  # fmt: skip
        return chosen

    both = {"image": visual("./image.tif"), "visual": {"href": "s3://b/v.tif"}}
    assert pick(both).uris == ("s3://b/v.tif",) and pick(both).assets == ("visual",)  # a named key first
    assert pick(both, SegmentConfig(stac_assets=["nothing"])).uris == (
        "s3://b/items/image.tif",
    )  # the visual role
    not_geotiff = {"preview": {"href": "p.png", "type": "image/png", "roles": ["visual"]}}
    bands = {"B04": {"href": "B04.tif", "type": COG, "eo:bands": [{"name": "B04", "common_name": "red"}]},
             "green": {"href": "B03.tif", "type": COG},
             "B02": {"href": "B02.tif", "type": COG, "bands": [{"name": "B02", "eo:common_name": "blue"}]}}  # fmt: skip
    split = pick(not_geotiff | bands)
    assert split.assets == ("B04", "green", "B02") and split.uris[0] == "s3://b/items/B04.tif"
    bad = pick(not_geotiff | {"B04": bands["B04"]})
    assert (bad.reason, bad.uris) == ("no asset", ())
    assert (
        "item x has no asset among ['visual']" in bad.detail
        and "preview (image/png; roles ['visual'])" in bad.detail
    )
    # The version: the assets' file:checksum where given, else `updated` and the hrefs.
    with_sum = {"visual": {"href": "v.tif", "file:checksum": "1220aa"}}
    assert pick(with_sum).version != pick({"visual": {"href": "v.tif", "file:checksum": "1220bb"}}).version
    unsummed = {"visual": {"href": "v.tif"}}
    assert (
        pick(unsummed, updated="2026-11-27T00:00:00Z").version != pick(unsummed, updated="2026-11-28").version
    )


def test_band_files_are_read_as_one_scene_on_one_grid(tmp_path):
    cfg = SegmentConfig(chunk_size=128)
    image = rgb(5)
    single = write_cog(str(tmp_path / "rgb.tif"), image, tmp_path)
    red, green, blue = (
        write_cog(str(tmp_path / f"{c}.tif"), image[i : i + 1], tmp_path) for i, c in enumerate("rgb")
    )
    one, split = open_scene(single, cfg), open_scene((red, green, blue), cfg, "split")
    assert split.band_uris == (red, green, blue) and split.scene_id == "split"
    assert (split.width, split.height, split.crs, split.transform) == (
        one.width,
        one.height,
        one.crs,
        one.transform,
    )
    windows = plan_windows(SIDE, SIDE, 64, 16)
    for (w1, image1, valid1), (w2, image2, valid2) in zip(
        read_chunk(one, windows), read_chunk(split, windows)
    ):
        assert w1 == w2 and (image1 == image2).all() and (valid1 == valid2).all()
    other = write_cog(str(tmp_path / "other-grid.tif"), image[:1, :100, :100], tmp_path)
    with pytest.raises(SceneError, match="band grid mismatch") as failed:
        open_scene((red, other, blue), cfg)
    assert "other-grid.tif differs from" in failed.value.detail and "in size" in failed.value.detail
    with pytest.raises(SceneError, match="missing"):
        open_scene((red, green, str(tmp_path / "no-such-blue.tif")), cfg)


# ------------------------------------------------------------------------------ static catalog in S3
@pytest.fixture(scope="module")
def stac_setup(segment_model, tmp_path_factory):
    cfg, model_dir = segment_model
    cfg = cfg_with(cfg, overlap=16, chunk_size=128)
    storage.remove_prefix(ROOT)
    return cfg, model_dir, tmp_path_factory.mktemp("stac")


def write_catalog(root: str, tmp: Path) -> dict[str, dict]:
    """A catalog with a child collection: its items (id → item dict) are the cases of the test."""
    image = rgb(1)
    write_cog(f"{root}/data/good-1.tif", image, tmp)
    write_cog(f"{root}/data/good-2.tif", rgb(2), tmp)
    for i, colour in enumerate(("red", "green", "blue")):
        write_cog(f"{root}/data/split/{colour}.tif", image[i : i + 1], tmp)
    split = {f"B0{4 - i}": {"href": f"../../data/split/{c}.tif", "type": COG,
                            "eo:bands": [{"name": f"B0{4 - i}", "common_name": c}]}
             for i, c in enumerate(("red", "green", "blue"))}  # fmt: skip
    items = {
        "good-1": item("good-1", {"visual": visual("../../data/good-1.tif"), "thumbnail": {"href": "t.png"}}),
        # no "visual" key: the asset with role visual and a COG media type
        "good-2": item(
            "good-2", {"image": visual(f"{root}/data/good-2.tif", **{"file:checksum": "1220aa01"})}
        ),
        "split": item("split", split),  # band assets B04, B03, B02 found by their common names
        "no-asset": item(
            "no-asset", {"thumbnail": {"href": "t.png", "type": "image/png", "roles": ["thumbnail"]}}
        ),
        "missing": item("missing", {"visual": visual("../../data/not-uploaded.tif")}),
        "elsewhere": item("elsewhere", {"visual": visual("https://example.com/elsewhere.tif")}),
    }
    collection = {"type": "Collection", "stac_version": "1.1.0", "id": "tests", "description": "test scenes",
                  "license": "proprietary", "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                                       "temporal": {"interval": [[None, None]]}},
                  "links": [{"rel": "item", "href": f"./items/{i}.json"} for i in items]}  # fmt: skip
    for item_id, content in items.items():
        put_json(f"{root}/collection/items/{item_id}.json", content)
    put_json(f"{root}/collection/collection.json", collection)
    # The root catalog links the collection and, after it, another item with the id good-1.
    put_json(f"{root}/duplicate/good-1.json", item("good-1", {"visual": visual(f"{root}/data/good-2.tif")}))
    put_json(f"{root}/catalog.json", {
        "type": "Catalog", "stac_version": "1.1.0", "id": "root", "description": "nightly scenes",
        "links": [{"rel": "child", "href": "./collection/collection.json"},
                  {"rel": "item", "href": "./duplicate/good-1.json"}],
    })  # fmt: skip
    return items


BAD_ITEMS = {
    "no-asset": "no asset",
    "missing": "missing",
    "elsewhere": "unsupported URI",
    "good-1": "duplicate scene id",
}


def test_nightly_segments_a_static_catalog_once_and_quarantines_bad_items(stac_setup):
    cfg, model_dir, tmp = stac_setup
    root, out = f"{ROOT}/static", f"{OUT}-static"
    storage.remove_prefix(out)
    items = write_catalog(root, tmp)
    catalog = f"{root}/catalog.json"

    first = nightly.run_nightly(cfg, model_dir, out=out, stac=catalog, log_to_mlflow=False)
    done = {r.scene_id: r for r in first.results if r.status == "done"}
    failed = {(r.scene_id, r.reason): r for r in first.failed}
    assert sorted(done) == ["good-1", "good-2", "split"], [
        (r.scene_id, r.reason, r.detail) for r in first.failed
    ]
    assert sorted(failed) == sorted((i, reason) for i, reason in BAD_ITEMS.items()), first.as_dict()
    assert first.listed == 7 and first.incoming == catalog
    assert "no asset among ['visual']" in failed["no-asset", "no asset"].detail
    assert failed["missing", "missing"].scene_uri == f"{root}/data/not-uploaded.tif"
    assert "listed first" in failed["good-1", "duplicate scene id"].detail
    # Every bad item quarantined with its reason (the duplicate beside good-1, whose outputs stand).
    records = [json.loads(storage.read_bytes(u)) for u in storage.list_files(f"{out}/_quarantine")]
    assert sorted((r["scene_id"], r["reason"]) for r in records) == sorted(BAD_ITEMS.items())
    assert all(r["checksum"] and r["stac_item"]["version"] == r["checksum"] for r in records)

    run = json.loads(storage.read_bytes(f"{done['good-2'].out_uri}/{RUN_FILE}"))
    assert run["source"]["stac_item"] == "good-2" and run["source"]["collection"] == "tests"
    assert run["source"]["assets"] == {"image": f"{root}/data/good-2.tif"}
    assert run["source"]["item_href"] == f"{root}/collection/items/good-2.json"
    # Its output item links back to the item it was read from and keeps the acquisition time.
    output_item = json.loads(storage.read_bytes(f"{done['good-2'].out_uri}/item.json"))
    assert {"rel": "derived_from", "href": run["source"]["item_href"], "type": "application/json"} in output_item["links"]
    assert output_item["properties"]["datetime"] == "2026-11-27T10:00:00Z"
    split = json.loads(storage.read_bytes(f"{done['split'].out_uri}/{RUN_FILE}"))
    assert split["scene"]["band_uris"] == [f"{root}/data/split/{c}.tif" for c in ("red", "green", "blue")]
    # The split item holds good-1's pixels band by band: the same mask, pixel for pixel.
    masks = [storage.read_bytes(f"{done[i].out_uri}/mask.tif") for i in ("good-1", "split")]
    arrays = []
    for k, payload in enumerate(masks):
        (tmp / f"mask-{k}.tif").write_bytes(payload)
        with rasterio.open(tmp / f"mask-{k}.tif") as ds:
            arrays.append(ds.read())
    np.testing.assert_array_equal(arrays[0], arrays[1])

    # A second run does nothing: no object changes but its own run summary.
    before = object_states(out)
    second = nightly.run_nightly(cfg, model_dir, out=out, stac=catalog, log_to_mlflow=False)
    assert (second.processed, len(second.failed), second.already_done, second.still_quarantined) == (
        0,
        0,
        3,
        4,
    )
    after = object_states(out)
    assert set(after) - set(before) == {second.summary_uri.removeprefix("s3://")}
    assert {k: after[k] for k in before} == before

    # good-2 re-published (new checksum) and the missing item fixed (its asset uploaded, the item
    # updated): exactly those two are segmented again.
    put_json(f"{root}/collection/items/good-2.json",
             item("good-2", {"image": visual(f"{root}/data/good-2.tif", **{"file:checksum": "1220aa02"})}))  # fmt: skip
    write_cog(f"{root}/data/not-uploaded.tif", rgb(3), tmp)
    put_json(f"{root}/collection/items/missing.json", items["missing"] | {
        "properties": items["missing"]["properties"] | {"updated": "2026-11-28T08:00:00Z"}})  # fmt: skip
    third = nightly.run_nightly(cfg, model_dir, out=out, stac=catalog, log_to_mlflow=False)
    assert sorted(r.scene_id for r in third.results if r.status == "done") == ["good-2", "missing"], (
        third.as_dict()
    )
    assert (len(third.failed), third.already_done, third.still_quarantined) == (0, 2, 3)
    rerun = json.loads(storage.read_bytes(f"{done['good-2'].out_uri}/{RUN_FILE}"))
    assert rerun["source"]["version"] != run["source"]["version"]
    assert not storage.exists(nightly.quarantine_uri(out, "missing"))  # fixed: its record goes


def test_geopix_segment_reads_an_item_collection_on_disk(stac_setup, tmp_path):
    """`geopix segment --stac` with an ItemCollection file (what a STAC search returns) whose assets
    are local files named relative to it; bad argument combinations are refused before any work."""
    from typer.testing import CliRunner

    from geopix.cli import app

    _, model_dir, _ = stac_setup
    write_cog(str(tmp_path / "scenes" / "ic-1.tif"), rgb(7), tmp_path)
    features = [item("ic-1", {"visual": visual("scenes/ic-1.tif")}),
                item("ic-2", {"visual": visual("scenes/ic-2.tif")})]  # fmt: skip
    collection_file = tmp_path / "search-results.json"
    collection_file.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    overrides = [a for o in [*OVERRIDES, "segment.overlap=16"] for a in ("--set", o)]
    command = ["segment", "--model", model_dir, "--stac", str(collection_file), "--instruction", INSTRUCTION,
               "--out", str(tmp_path / "out"), *overrides]  # fmt: skip
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 1, done.output  # ic-2's file is not there
    assert "ic-1: done, 4 windows" in done.stdout, done.stdout
    assert "ic-2: failed: missing" in done.stdout, done.stdout
    assert list((tmp_path / "out" / "ic-1").rglob("_SUCCESS"))
    for extra, message in [
        (["--scene", "x.tif"], "not both"),
        (["--collection", "s2"], "give --stac-api URL"),
    ]:
        refused = CliRunner().invoke(app, [*command, *extra])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    nothing = CliRunner().invoke(app, ["segment", "--model", model_dir])
    assert nothing.exit_code == 2 and "give the scenes to segment" in nothing.output


# ------------------------------------------------------------------------------ STAC API
@pytest.fixture(scope="module")
def stac_api(stac_setup, tmp_path_factory):
    """`rustac serve` on a free loopback port with one collection of items over COGs in S3 (and one
    item of another collection); stopped at the end. rustac serves what it was started with: the
    items are written first."""
    from geopix.stack import free_ports

    _, _, tmp = stac_setup
    root = f"{ROOT}/api"
    for name, seed in (("inside-1", 11), ("inside-2", 12)):
        write_cog(f"{root}/{name}.tif", rgb(seed), tmp)
    search_box = (-74.05, 40.65, -73.85, 40.85)
    items = [
        item("inside-1", {"visual": visual(f"{root}/inside-1.tif")}, "s2", "2026-11-26T15:30:00Z"),
        item("inside-2", {"visual": visual(f"{root}/inside-2.tif")}, "s2", "2026-11-27T15:30:00Z"),
        item("outside-area", {"visual": visual(f"{root}/inside-1.tif")}, "s2", "2026-11-26T15:30:00Z",
             bbox=(10.0, 50.0, 10.1, 50.1)),
        item("outside-dates", {"visual": visual(f"{root}/inside-1.tif")}, "s2", "2026-10-01T15:30:00Z"),
        item("other-collection", {"visual": visual(f"{root}/inside-1.tif")}, "l8", "2026-11-26T15:30:00Z"),
    ]  # fmt: skip
    data = tmp_path_factory.mktemp("stac-api")
    for collection in ("s2", "l8"):
        (data / f"{collection}.json").write_text(json.dumps({
            "type": "Collection", "stac_version": "1.1.0", "id": collection, "description": collection,
            "license": "proprietary", "links": [],
            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}}}))  # fmt: skip
    (data / "items.ndjson").write_text("".join(json.dumps(i) + "\n" for i in items))
    rustac = shutil.which("rustac", path=os.path.dirname(sys.executable))
    assert rustac, "rustac (the dev extra rustac==0.9.18) is not installed in this environment"
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log = data / "rustac.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen([rustac, "serve", "--addr", f"127.0.0.1:{port}", str(data / "s2.json"),
                                   str(data / "l8.json"), str(data / "items.ndjson")],
                                  stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"rustac serve exited with {server.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"rustac serve not ready at {url} in 30 s: {log.read_text()}"
                    ) from None
                time.sleep(0.05)
        yield url, search_box
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_stac_api_search_selects_by_collection_area_and_dates_and_segments_them(stac_setup, stac_api):
    cfg, model_dir, _ = stac_setup
    url, box = stac_api
    search = StacSearch(url, ("s2",), box, "2026-11-26/2026-11-27")
    scenes = list_stac_scenes(search, cfg.segment)
    assert sorted(s.scene_id for s in scenes) == ["inside-1", "inside-2"]
    assert all(s.collection == "s2" and not s.reason for s in scenes)
    assert len(list_stac_scenes(StacSearch(url, ("s2",), box, "2026-11-26/2026-11-27", max_items=1),
                                cfg.segment)) == 1  # fmt: skip

    # The flow as scheduled: flows/nightly.py with the search on its command line, in this process.
    import contextlib
    import io
    import runpy

    out = f"{OUT}-api"
    storage.remove_prefix(out)
    flow = runpy.run_path(str(REPO_ROOT / "flows" / "nightly.py"))
    overrides = [a for o in [*OVERRIDES, "segment.overlap=16", "segment.chunk_size=128",
                             f"segment.instructions=['{INSTRUCTION}']"] for a in ("--set", o)]  # fmt: skip
    argv = ["--model", model_dir, "--out", out, "--stac-api", url, "--collection", "s2",
            "--bbox", ",".join(map(str, box)), "--datetime", "2026-11-26/2026-11-27", *overrides]  # fmt: skip
    for again in (False, True):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = flow["main"](argv)
        assert code == 0, printed.getvalue()
        expected = "listed 2, done before 2, quarantined before 0" if again else "listed 2, done before 0"
        assert (
            expected in printed.getvalue()
            and f"processed {0 if again else 2}, failed 0" in printed.getvalue()
        )
    ref = nightly.resolve_model(model_dir)
    for scene_id in ("inside-1", "inside-2"):
        prefix = nightly.scene_prefix(out, scene_id, ref, nightly.request_hash(cfg.segment, 64))
        run = json.loads(storage.read_bytes(f"{prefix}/{RUN_FILE}"))
        assert run["source"]["stac_item"] == scene_id and run["source"]["datetime"].startswith("2026-11-2")
    with pytest.raises(SystemExit):  # --incoming and a STAC source together are refused
        flow["main"]([*argv, "--incoming", f"{ROOT}/api"])
