"""Batch segmentation of large scenes on the local stack: window planning, stitching that adds
nothing to what the model gives window by window, georeferenced COG + GeoParquet outputs published
atomically, bad scenes reported one by one, and the nightly job's idempotency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geopix import storage
from geopix.config import REPO_ROOT, load_config
from geopix.data import synth
from geopix.data.tokenizer import corpus_texts, train_tokenizer
from geopix.infer import nightly
from geopix.infer.scene_reader import open_scene, plan_chunks, plan_windows, read_chunk
from geopix.infer.segment import (
    INSTANCE_POLYGONS_FILE,
    INSTANCES_FILE,
    MASK_FILE,
    POLYGONS_FILE,
    RUN_FILE,
    SCENE_OUTPUT_KIND,
    SCENE_OUTPUT_LAYOUT,
    WindowSegmenter,
    segment_scenes,
)
from geopix.infer.stitch import NODATA
from geopix.outputs import OWNER_FILE, prepare_output
from tests.records import SEG_VOCAB
from tests.test_evaluate import eval_records, fitted_model
from tests.test_model import SMALL

SCENES = "s3://geopix-scenes/tests/segment"
OUT = "s3://geopix-predictions/tests/segment"
INSTRUCTION = "[refer] the storage_tank"
OVERRIDES = [
    *SMALL,
    "segment.overlap=16",
    "segment.chunk_size=128",
    "segment.batch_size=1",  # the reference below answers windows one by one: same arithmetic
    "segment.max_new_tokens=16",
    "segment.polygon_block=256",  # several polygon blocks on a 512-px scene: merging is exercised
    "tracking.experiment=geopix-tests-segment",
    "tracking.system_metrics=false",
]


# --------------------------------------------------------------------------------- planning
@pytest.mark.parametrize(
    "width,height,size,overlap", [(512, 512, 64, 16), (500, 333, 64, 16), (64, 64, 64, 0), (40, 30, 64, 16),
                                  (1000, 130, 256, 64), (257, 256, 256, 0)],
)  # fmt: skip
def test_windows_cover_the_scene_and_keep_rectangles_tile_it(width, height, size, overlap):
    windows = plan_windows(width, height, size, overlap)
    owner = np.zeros((height, width), np.int32)
    for w in windows:
        col, row, kw, kh = w.keep
        rc, rr, rw, rh = w.read
        assert (rw, rh) == (size, size)
        assert rc <= col and rr <= row and col + kw <= rc + rw and row + kh <= rr + rh  # keep ⊂ read
        owner[row : row + kh, col : col + kw] += 1
    assert (owner == 1).all()  # every pixel written exactly once, right and bottom edges included
    assert max(w.read[0] + w.read[2] for w in windows) >= width
    chunks = plan_chunks(windows, 128)
    assert sorted(w.index for c in chunks for w in c) == list(range(len(windows)))


def test_overlap_must_be_smaller_than_the_window():
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(100, 100, 64, 64)


# ------------------------------------------------------------------------------ fixtures
def put_geotiff(uri: str, data: np.ndarray, tmp: Path, **profile) -> str:
    path = tmp / Path(uri).name
    base = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
            "dtype": data.dtype.name, "tiled": True, "blockxsize": 256, "blockysize": 256}  # fmt: skip
    with rasterio.open(path, "w", **(base | profile)) as ds:
        ds.write(data)
    storage.s3_filesystem().put(str(path), uri)
    return uri


def segment_config():
    """The config the segmentation tests run with: the tiny preset, 64-px windows, one instruction."""
    return load_config("tiny", OVERRIDES + [f"segment.instructions=['{INSTRUCTION}']"])


def fit_segment_model(cfg, root: Path) -> str:
    """The tiny model fitted to the evaluation records, saved under ``root``; its directory.
    Built once per session by conftest's ``segment_model`` (this module's and tests/test_stac.py's)."""
    torch.set_num_threads(1)
    good, broken, caption = eval_records()
    tokenizer = train_tokenizer(corpus_texts([*good, broken, caption]), vocab_size=300, seg_vocab=SEG_VOCAB)
    model = fitted_model(cfg, good, tokenizer)
    model.class_names = ["storage_tank", "ship", "small_vehicle"]
    return str(model.save(root / "model", tokenizer))


@pytest.fixture(scope="module")
def setup(segment_model, tmp_path_factory):
    torch.set_num_threads(1)
    cfg, model_dir = segment_model
    root = tmp_path_factory.mktemp("segment")
    storage.remove_prefix(SCENES)
    storage.remove_prefix(OUT)
    meta = synth.generate_scene(f"{SCENES}/good", "scene-a", 512, seed=3, progress=False)
    return cfg, model_dir, f"{SCENES}/good/scene-a/image.tif", meta, root


# ------------------------------------------------------------------------------ end to end
def test_scene_is_stitched_exactly_and_published_with_georeferenced_outputs(setup):
    cfg, model_dir, scene_uri, meta, root = setup
    [result] = segment_scenes(cfg, model_dir, [scene_uri], OUT, progress=False)
    assert result.status == "done", result
    prefix = result.out_uri
    assert storage.list_files(prefix, storage.SUCCESS_MARKER)
    run = json.loads(storage.read_bytes(f"{prefix}/{RUN_FILE}"))
    assert run["cog"]["valid"] and run["windows"] == result.windows > 100

    local = root / "mask.tif"
    local.write_bytes(storage.read_bytes(f"{prefix}/{MASK_FILE}"))
    from rio_cogeo.cogeo import cog_validate

    assert cog_validate(str(local), quiet=True)[0]
    assert_valid_cog(local)
    with storage.rasterio_env(), rasterio.open(scene_uri) as src, rasterio.open(local) as out:
        assert (out.width, out.height, out.crs, out.transform) == (
            src.width,
            src.height,
            src.crs,
            src.transform,
        )
        assert out.nodata == NODATA and (out.overviews(1) or max(out.shape) <= 512)  # one block needs none
        stitched, source_valid = out.read(), src.dataset_mask() > 0
    assert ((stitched[0] == NODATA) == ~source_valid).all()  # nodata exactly where the source had none
    assert ((stitched[0] != 0) & (stitched[0] != NODATA)).sum() > 0  # the model did answer with masks

    # The same windows answered one by one, outside the pipeline: identical keep rectangles.
    scene = open_scene(scene_uri, cfg.segment)
    segmenter = WindowSegmenter(model_dir, cfg.model_dump(mode="json"), threads=1, device="cpu")
    windows = plan_windows(scene.width, scene.height, 64, cfg.segment.overlap)
    tallies = np.zeros(2, np.int64)
    instances = read_output_raster(prefix, INSTANCES_FILE, root)
    for window, image, valid in read_chunk(scene, windows):
        rows, cols = window.keep_in_window()
        col, row, width, height = window.keep
        expected, local = np.full((2, 64, 64), NODATA, np.uint8), np.zeros((64, 64), np.uint16)
        if valid.any():
            answered, counts = segmenter.answer([image], [valid])
            expected, local, tallies = answered[0].raster, answered[0].instance_ids, tallies + counts[0]
        np.testing.assert_array_equal(stitched[:, row : row + height, col : col + width], expected[:, rows, cols],
                                      err_msg=f"window {window.index}")  # fmt: skip
        # Instance ids exactly where the window's seg runs won, one scene id per seg run.
        ids, runs = instances[row : row + height, col : col + width], local[rows, cols]
        assert ((ids > 0) == (runs > 0)).all(), window.index
        assert len(set(zip(runs[runs > 0].tolist(), ids[runs > 0].tolist(), strict=True))) == len(np.unique(runs[runs > 0]))
    # Stated counts against masks drawn, summed over the scene's windows as the pipeline did.
    assert run["answers"] == {"stating_a_count": tallies[0], "masks_differ_from_stated_count": tallies[1]}
    assert 0 <= tallies[1] <= tallies[0] <= run["windows"]

    # Polygons: GeoParquet with the scene's CRS, and they rasterise back onto the raster.
    table = pq.read_table(storage.join_uri(prefix, POLYGONS_FILE).removeprefix("s3://"),
                          filesystem=storage.arrow_filesystem(prefix)[0])  # fmt: skip
    geo = json.loads(table.schema.metadata[b"geo"])
    assert rasterio.crs.CRS.from_user_input(
        json.dumps(geo["columns"]["geometry"]["crs"])
    ) == rasterio.crs.CRS.from_string(meta["crs"])
    from rasterio.features import rasterize
    from shapely import from_wkb

    polygons = table.to_pylist()
    assert polygons and all(p["pixels"] >= cfg.segment.min_polygon_pixels for p in polygons)
    burned = rasterize(((from_wkb(p["geometry"]), p["class_id"] + 1) for p in polygons),
                       out_shape=stitched[0].shape, transform=out.transform, fill=0, dtype="uint8")  # fmt: skip
    objects = (stitched[0] != 0) & (stitched[0] != NODATA)
    agree = (burned == np.where(objects, stitched[0], 0)).mean()
    assert agree > 0.995, agree  # only components under min_polygon_pixels are left out
    for p in polygons:  # UTM, 0.5 m pixels: area = pixels × 0.25 m²
        assert p["area_m2"] == pytest.approx(p["pixels"] * 0.25, rel=1e-6)
        assert 0 <= p["score"] <= 1
    assert run["polygons"]["merged_across_blocks"] >= 0

    check_instance_outputs(prefix, root, run, stitched[0], meta)
    assert result.instances == run["instances"]["instances"]
    check_stac_outputs(prefix, OUT, meta, Path(model_dir))

    # Published once: a second call skips it; --overwrite redoes it.
    [again] = segment_scenes(cfg, model_dir, [scene_uri], OUT, progress=False)
    assert again.status == "skipped" and again.out_uri == prefix


def assert_valid_cog(path: Path) -> None:
    """rio-cogeo's own command line says the file is a valid COG."""
    rio = str(Path(sys.executable).parent / "rio")
    validate = subprocess.run([rio, "cogeo", "validate", str(path)], check=False, capture_output=True, text=True)
    assert validate.returncode == 0 and "is a valid cloud optimized GeoTIFF" in validate.stdout, validate


def read_output_raster(prefix: str, name: str, root: Path) -> np.ndarray:
    local = root / name
    local.write_bytes(storage.read_bytes(f"{prefix}/{name}"))
    with rasterio.open(local) as ds:
        return ds.read(1)


def check_instance_outputs(prefix: str, root: Path, run: dict, classes: np.ndarray, meta: dict) -> None:
    """instances.tif and instances.parquet, read by clients GeoPix did not write: rio-cogeo's CLI,
    rasterio and GeoPandas."""
    import geopandas

    local = root / INSTANCES_FILE
    assert_valid_cog(local)
    with rasterio.open(local) as ds:
        assert ds.dtypes[0] == "uint32" and ds.nodata == 0 and ds.crs == rasterio.crs.CRS.from_string(meta["crs"])
        ids = ds.read(1)
    objects = (classes != 0) & (classes != NODATA)
    assert ((ids > 0) == objects).all()  # every object pixel belongs to one instance, and only those

    (root / INSTANCE_POLYGONS_FILE).write_bytes(storage.read_bytes(f"{prefix}/{INSTANCE_POLYGONS_FILE}"))
    frame = geopandas.read_parquet(root / INSTANCE_POLYGONS_FILE)
    assert frame.crs == meta["crs"] and frame.geometry.is_valid.all()
    numbers, pixels = np.unique(ids[ids > 0], return_counts=True)
    assert sorted(frame.instance_id) == numbers.tolist() == list(range(1, len(numbers) + 1))
    assert len(frame) == run["instances"]["instances"] > 0
    assert run["instances"]["seg_runs"] >= len(frame)
    for item in frame.itertuples():
        assert item.pixels == pixels[item.instance_id - 1]
        assert abs(item.geometry.area - item.pixels * 0.25) <= 0.01 * item.pixels * 0.25  # UTM, 0.5 m pixels
        assert item.area_m2 == pytest.approx(item.pixels * 0.25, rel=0.01)
        assert set(np.unique(classes[ids == item.instance_id])) == {item.class_id + 1}
        assert list(item.instructions) == [INSTRUCTION] and len(item.windows) >= 1


def check_stac_outputs(prefix: str, out: str, meta: dict, model_dir: Path) -> None:
    """The scene's item.json and <out>/catalog.json validate with pystac (STAC 1.1 core schemas,
    offline), the item's assets are the published files and its footprint is the scene's."""
    import pystac
    from rasterio.warp import transform_bounds

    item = pystac.Item.from_dict(json.loads(storage.read_bytes(f"{prefix}/item.json")))
    assert item.validate()
    published = set(storage.list_objects(prefix))
    assert {a.href.removeprefix("./") for a in item.assets.values()} <= published
    assert {"mask", "instances", "polygons", "instance_polygons", "preview", "run"} <= set(item.assets)
    assert item.properties["geopix:model"] == str(model_dir) and item.properties["geopix:instructions"] == [INSTRUCTION]
    left, top = meta["transform"][2], meta["transform"][5]
    right, bottom = left + meta["width"] * meta["transform"][0], top + meta["height"] * meta["transform"][4]
    expected = transform_bounds(meta["crs"], "EPSG:4326", left, bottom, right, top)
    assert item.bbox == pytest.approx(list(expected), abs=1e-6)

    catalog = pystac.Catalog.from_dict(json.loads(storage.read_bytes(f"{out}/catalog.json")))
    assert catalog.validate()
    linked = {out + "/" + link.href.removeprefix("./") for link in catalog.links if link.rel == "item"}
    assert f"{prefix}/item.json" in linked and all(storage.exists(uri) for uri in linked)


# ------------------------------------------------------------------------------ bad inputs
def bad_scenes(scene_uri: str, tmp: Path, prefix: str) -> dict[str, str]:
    """One scene per bad-input case (key → URI); the expected outcome is in BAD_INPUTS."""
    good = storage.read_bytes(scene_uri)
    uris = {}
    uris["truncated"] = f"{prefix}/truncated.tif"
    storage.write_bytes(uris["truncated"], good[: len(good) * 6 // 10])
    uris["corrupt"] = f"{prefix}/corrupt.tif"
    storage.write_bytes(
        uris["corrupt"], b"II*\x00" + bytes(np.random.default_rng(0).integers(0, 255, 5000, np.uint8))
    )
    rgb = np.random.default_rng(1).integers(1, 255, (3, 200, 200), np.uint8)
    uris["no_crs"] = put_geotiff(f"{prefix}/no_crs.tif", rgb, tmp)
    utm = {"crs": "EPSG:32618", "transform": from_origin(583_000, 4_511_000, 0.5, 0.5)}
    uris["all_nodata"] = put_geotiff(
        f"{prefix}/all_nodata.tif", np.zeros((3, 300, 300), np.uint8), tmp, nodata=0, **utm
    )
    # uint16, 4 bands (B, G, R, NIR), Web Mercator at ~40.7° N: stretched, and areas in an equal-area CRS.
    with storage.rasterio_env(), rasterio.open(scene_uri) as ds:
        rgb16 = ds.read(window=rasterio.windows.Window(0, 0, 256, 256)).astype(np.uint16) * 40 + 300
    nir = np.full((1, 256, 256), 900, np.uint16)
    uris["uint16_4band_3857"] = put_geotiff(
        f"{prefix}/uint16_4band_3857.tif", np.concatenate([rgb16[::-1], nir]), tmp, nodata=0,
        crs="EPSG:3857", transform=from_origin(-8_236_000, 4_970_000, 0.66, 0.66),
    )  # fmt: skip
    with storage.rasterio_env(), rasterio.open(scene_uri) as ds:
        small = ds.read(window=rasterio.windows.Window(200, 200, 40, 30))
    uris["smaller_than_window"] = put_geotiff(
        f"{prefix}/smaller_than_window.tif", small, tmp, nodata=0, **utm
    )
    uris["missing"] = f"{prefix}/missing.tif"
    # Two bands are no RGB; which band is which must be said (segment.bands), not guessed.
    uris["two_bands"] = put_geotiff(f"{prefix}/two_bands.tif", small[:2], tmp, nodata=0, **utm)
    # float32 with NaN where there is no data, and no nodata declared: NaN is nodata.
    values = np.random.default_rng(3).uniform(100, 900, (3, 160, 160)).astype(np.float32)
    values[:, :, :60] = np.nan
    uris["float_nan"] = put_geotiff(f"{prefix}/float_nan.tif", values, tmp, **utm)
    # Spellings of S3 users paste, and a scheme GeoPix does not read.
    put_geotiff(f"{prefix}/upper_scheme.tif", small, tmp, nodata=0, **utm)
    uris["upper_scheme"] = f"{prefix}/upper_scheme.tif".replace("s3://", "S3://")
    put_geotiff(f"{prefix}/s3a_scheme.tif", small, tmp, nodata=0, **utm)
    uris["s3a_scheme"] = f"{prefix}/s3a_scheme.tif".replace("s3://", "s3a://")
    uris["gs_scheme"] = "gs://geopix-scenes/tests/gs_scheme.tif"
    return uris


# case → (expected status, expected reason for failures)
BAD_INPUTS = {
    "truncated": ("failed", "unreadable"),
    "corrupt": ("failed", "unreadable"),
    "no_crs": ("failed", "no CRS"),
    "all_nodata": ("failed", "all nodata"),
    "uint16_4band_3857": ("done", None),
    "smaller_than_window": ("done", None),
    "missing": ("failed", "missing"),
    "two_bands": ("failed", "bad bands"),
    "float_nan": ("done", None),
    "upper_scheme": ("done", None),
    "s3a_scheme": ("done", None),
    "gs_scheme": ("failed", "unsupported URI"),
}


def test_bad_scenes_fail_one_by_one_and_publish_nothing(setup, tmp_path):
    cfg, model_dir, scene_uri, _, _ = setup
    cases = bad_scenes(scene_uri, tmp_path, f"{SCENES}/bad")
    cfg = cfg.model_copy(update={"segment": cfg.segment.model_copy(update={"bands": [3, 2, 1]})})
    uris = [*cases.values(), scene_uri]
    results = segment_scenes(cfg, model_dir, uris, f"{OUT}-bad", progress=False)
    by_case = dict(zip([*cases, "good"], results, strict=True))
    for case, result in by_case.items():  # the bad-input table (pytest -s shows it)
        print(f"{case:22s} {result.status:7s} {result.reason or '':12s} {(result.detail or '')[:90]}")
    assert by_case["good"].status == "done"
    for case, (status, reason) in BAD_INPUTS.items():
        result = by_case[case]
        assert (result.status, result.reason) == (status, reason), (case, result)
        if status == "failed":
            assert result.detail and result.out_uri is None
            assert not [f for f in storage.s3_filesystem().find(f"{OUT}-bad".removeprefix("s3://"))
                        if f"/{Path(str(result.scene_uri)).stem}/" in f], case  # fmt: skip
    # GDAL's own words survive: not just "Read failed. See previous exception for details."
    assert "TIFF" in by_case["truncated"].detail or "tile" in by_case["truncated"].detail.lower(), by_case["truncated"]
    assert "set segment.bands to three of its bands" in by_case["two_bands"].detail
    assert by_case["upper_scheme"].out_uri.startswith(f"{OUT}-bad/upper_scheme/")
    floats = json.loads(storage.read_bytes(f"{by_case['float_nan'].out_uri}/{RUN_FILE}"))
    low, high = floats["scene"]["scaling"]["low"], floats["scene"]["scaling"]["high"]
    assert all(100 <= v <= 900 for v in [*low, *high]), (low, high)  # NaN took no part in the stretch
    with storage.rasterio_env(), rasterio.open(f"{by_case['float_nan'].out_uri}/{MASK_FILE}") as mask:
        classes = mask.read(1)
    assert (classes[:, :60] == NODATA).all() and (classes[:, 60:] != NODATA).all()
    small = json.loads(storage.read_bytes(f"{by_case['smaller_than_window'].out_uri}/{RUN_FILE}"))
    assert small["windows"] == 1 and (small["scene"]["width"], small["scene"]["height"]) == (40, 30)
    web = json.loads(storage.read_bytes(f"{by_case['uint16_4band_3857'].out_uri}/{RUN_FILE}"))
    assert web["scene"]["dtype"] == "uint16" and web["scene"]["scaling"]["low"] is not None
    table = pq.read_table(f"{by_case['uint16_4band_3857'].out_uri}/{POLYGONS_FILE}".removeprefix("s3://"),
                          filesystem=storage.arrow_filesystem(OUT)[0]).to_pylist()  # fmt: skip
    for polygon in table:  # Web Mercator inflates areas by 1/cos²(latitude): equal-area m² are smaller
        planar = polygon["pixels"] * 0.66 * 0.66
        assert polygon["area_m2"] == pytest.approx(planar * np.cos(np.radians(40.7)) ** 2, rel=0.02)


# ------------------------------------------------------------------------------ nightly
def object_states(prefix: str) -> dict[str, str]:
    """key → ETag + LastModified of everything under ``prefix``."""
    fs = storage.s3_filesystem()
    fs.invalidate_cache()
    return {
        k: f"{v['ETag']}@{v['LastModified']}"
        for k, v in fs.find(prefix.removeprefix("s3://"), detail=True).items()
    }


def nightly_cli(cfg_overrides: list[str], model_dir: str, incoming: str, out: str, *extra: str):
    command = [sys.executable, "flows/nightly.py", "--model", model_dir, "--incoming", incoming, "--out", out,
               *[a for o in cfg_overrides for a in ("--set", o)], *extra]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT
    )


def crop_scene(scene_uri: str, size: int, uri: str) -> str:
    """The top-left ``size``² of a scene, georeferenced like it, as a GeoTIFF at ``uri``."""
    with storage.rasterio_env(), rasterio.open(scene_uri) as ds:
        profile, data = ds.profile, ds.read(window=rasterio.windows.Window(0, 0, size, size))
    return put_geotiff(uri, data, Path(tempfile.mkdtemp()), crs=profile["crs"], transform=profile["transform"],
                       nodata=profile["nodata"])  # fmt: skip


def nightly_main(cfg_overrides: list[str], model_dir: str, incoming: str, out: str) -> str:
    """flows/nightly.py's main in this process (connected to the stack's Ray): what it printed."""
    import contextlib
    import io
    import runpy

    flow = runpy.run_path(str(REPO_ROOT / "flows" / "nightly.py"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = flow["main"](["--model", model_dir, "--incoming", incoming, "--out", out,
                             *[a for o in cfg_overrides for a in ("--set", o)]])  # fmt: skip
    assert code == 0, printed.getvalue()
    return printed.getvalue()


def test_nightly_is_idempotent_quarantines_and_survives_a_kill(setup):
    cfg, model_dir, scene_uri, _, _ = setup
    incoming, out = f"{SCENES}/incoming", f"{OUT}-nightly"
    storage.remove_prefix(incoming)
    storage.remove_prefix(out)
    fs = storage.s3_filesystem()
    crop = crop_scene(scene_uri, 208, f"{SCENES}/crop-208.tif")  # 4 × 4 windows
    for name in ("a", "b"):
        fs.copy(crop.removeprefix("s3://"), f"{incoming}/2026-11-27/{name}.tif".removeprefix("s3://"))
    storage.write_bytes(f"{incoming}/2026-11-27/broken.tif", b"not a tiff")
    overrides = [*OVERRIDES, f"segment.instructions=['{INSTRUCTION}']"]

    # A run killed while it segments leaves nothing visible (and its leases to the next run at
    # once: its process is gone); the rerun completes.
    killed = nightly_cli(overrides, model_dir, incoming, out)
    assert killed.stdout is not None
    for line in killed.stdout:
        if "window" in line and "segment" in line:  # the progress bar: windows are being answered
            break
    killed.kill()
    killed.wait()
    # As if a kill had also hit an upload: half of scene a's outputs staged, no marker, no _SUCCESS.
    prefix_a = nightly.scene_prefix(out, "a", nightly.resolve_model(model_dir),
                                    nightly.request_hash(cfg.segment, 64))  # fmt: skip
    prepare_output(prefix_a, SCENE_OUTPUT_KIND, SCENE_OUTPUT_LAYOUT, replace=False)
    storage.write_bytes(f"{prefix_a}/_staging/20261127T000000-1-abcdef/{MASK_FILE}", b"half")

    first = nightly.run_nightly(cfg, model_dir, incoming, out, log_to_mlflow=True)
    assert (first.listed, first.processed, len(first.failed)) == (3, 2, 1)
    assert first.failed[0].scene_id == "broken" and first.failed[0].reason == "unreadable"
    quarantine = json.loads(storage.read_bytes(nightly.quarantine_uri(out, "broken")))
    assert quarantine["reason"] == "unreadable" and quarantine["checksum"]
    published = storage.list_objects(prefix_a)  # the half-staged attempt is gone with the switch
    assert published == sorted([*SCENE_OUTPUT_LAYOUT, storage.SUCCESS_MARKER, OWNER_FILE])
    assert storage.read_bytes(f"{prefix_a}/{MASK_FILE}") != b"half"
    summary = json.loads(storage.read_bytes(first.summary_uri))
    assert summary["processed"] == 2 and summary["failed"] == 1 and summary["mlflow_run_id"]

    # Second run (the flow's main, in this process): nothing processed, no object changed; only its
    # own run summary is new.
    before = object_states(out)
    output = nightly_main(overrides, model_dir, incoming, out)
    assert "listed 3, done before 2, quarantined before 1, in progress elsewhere 0, processed 0, failed 0" in output, output
    after = object_states(out)
    new = set(after) - set(before)
    assert len(new) == 1 and "/_runs/" in new.pop()
    assert {k: after[k] for k in before} == before

    # A fixed re-upload of the quarantined scene is retried; --overwrite redoes everything.
    fs.copy(crop.removeprefix("s3://"), f"{incoming}/2026-11-27/broken.tif".removeprefix("s3://"))
    third = nightly.run_nightly(cfg, model_dir, incoming, out, log_to_mlflow=False)
    assert (third.processed, len(third.failed), third.already_done) == (1, 0, 2)
    assert not storage.list_files(f"{out}/_quarantine")


def test_two_nightly_runs_at_once_never_segment_a_scene_twice(setup):
    """A scheduler's retry beside a running job: the two runs split the scenes between them by
    lease; every scene is segmented once, and neither deletes or rewrites what the other wrote."""
    import threading

    cfg, model_dir, scene_uri, _, _ = setup
    incoming, out = f"{SCENES}/incoming-twice", f"{OUT}-twice"
    for name in ("p", "q", "r"):
        crop_scene(scene_uri, 112, f"{incoming}/{name}.tif")
    results: dict[str, nightly.NightlyResult] = {}
    barrier = threading.Barrier(2)

    def run(label: str) -> None:
        barrier.wait()
        results[label] = nightly.run_nightly(cfg, model_dir, incoming, out, log_to_mlflow=False)

    threads = [threading.Thread(target=run, args=(label,)) for label in ("A", "B")]
    [t.start() for t in threads]
    [t.join(600) for t in threads]
    done = [r.scene_id for night in results.values() for r in night.results if r.status == "done"]
    assert sorted(done) == ["p", "q", "r"], {k: v.as_dict() for k, v in results.items()}  # each exactly once
    for night in results.values():  # every scene is done by this run, before it, or by the other
        assert night.processed + night.already_done + night.in_progress == 3 and not night.failed
    ref = nightly.resolve_model(model_dir)
    for name in ("p", "q", "r"):
        prefix = nightly.scene_prefix(out, name, ref, nightly.request_hash(cfg.segment, 64))
        assert storage.list_objects(prefix) == sorted([*SCENE_OUTPUT_LAYOUT, storage.SUCCESS_MARKER, OWNER_FILE])
    assert not storage.list_objects(f"{out}/_leases")  # every lease released


@pytest.mark.parametrize(("forced", "expected"), [
    ("Sure, there are 3 storage tanks: {seg}.", [1, 1]),  # says 3, draws 1
    ("Sure, there is one storage tank: {seg}.", [1, 0]),
    ("Sure, it is {seg}.", [0, 0]),  # states no count
])  # fmt: skip
def test_answers_whose_masks_differ_from_their_stated_count_are_counted(setup, forced, expected):
    cfg, model_dir, scene_uri, _, _ = setup
    segment = cfg.segment.model_copy(update={"decode": "teacher_forced", "forced_answer": forced})
    config = cfg.model_copy(update={"segment": segment}).model_dump(mode="json")
    segmenter = WindowSegmenter(model_dir, config, threads=1, device="cpu")
    scene = open_scene(scene_uri, segment)
    windows = [w for w in read_chunk(scene, plan_windows(scene.width, scene.height, 64, segment.overlap)[:3])]
    answers, counts = segmenter.answer([w[1] for w in windows], [w[2] for w in windows])
    assert len(answers) == 3 and counts.tolist() == [expected] * 3


def test_a_model_that_raises_fails_its_scenes_one_by_one_with_the_cause(setup, tmp_path):
    """A model that raises on its windows (here: a processor config with four channel means) fails
    each scene with reason `model error` and the model's own error, counted and quarantined for this
    model; the rest of the run goes on."""
    import shutil

    cfg, model_dir, scene_uri, _, _ = setup
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    processor = broken / "processor" / "processor_config.json"
    processor.write_text(json.dumps(json.loads(processor.read_text()) | {"image_mean": [0.5, 0.5, 0.5, 0.5]}))
    incoming, out = f"{SCENES}/incoming-model-error", f"{OUT}-model-error"
    for name in ("m1", "m2"):
        crop_scene(scene_uri, 100, f"{incoming}/{name}.tif")
    night = nightly.run_nightly(cfg, str(broken), incoming, out, log_to_mlflow=False)
    assert sorted(r.scene_id for r in night.failed) == ["m1", "m2"] and night.processed == 0
    for scene in night.failed:
        assert scene.reason == "model error" and "the model failed on window" in scene.detail, scene
        assert "shape" in scene.detail  # the model's own error, not a generic one
        record = json.loads(storage.read_bytes(nightly.quarantine_uri(out, scene.scene_id)))
        assert record["reason"] == "model error" and record["model"] == nightly.resolve_model(str(broken)).label
    # Held back for this model only: the working model retries the scenes at once.
    fixed = nightly.run_nightly(cfg, model_dir, incoming, out, log_to_mlflow=False)
    assert fixed.processed == 2 and fixed.still_quarantined == 0
    assert not storage.list_files(f"{out}/_quarantine")


def test_scene_scores_against_ground_truth(setup, tmp_path):
    """The windowed ground-truth comparison: the truth itself scores 1; one class erased scores 0
    recall for it and leaves the others at 1."""
    from geopix.evaluate.scene_scores import scene_scores

    _, _, scene_uri, meta, _ = setup
    truth_uri = scene_uri.replace("image.tif", "classes.tif")
    with storage.rasterio_env(), rasterio.open(truth_uri) as gt, rasterio.open(scene_uri) as src:
        truth, profile, valid = gt.read(1), gt.profile, src.dataset_mask() > 0
    as_output = np.where(truth == 255, 0, truth.astype(np.int64) + 1).astype(np.uint8)
    as_output[~valid] = NODATA
    names = [c["name"] for c in sorted(meta["classes"], key=lambda c: c["id"])]
    profile.update(nodata=NODATA, driver="GTiff")
    perfect, erased = tmp_path / "perfect.tif", tmp_path / "erased.tif"
    with rasterio.open(perfect, "w", **profile) as ds:
        ds.write(as_output[None])
    present = sorted({int(v) for v in np.unique(truth[valid]) if v != 255})
    gone = present[0]
    with rasterio.open(erased, "w", **profile) as ds:
        ds.write(np.where(as_output == gone + 1, 0, as_output).astype(np.uint8)[None])
    scores = scene_scores(str(perfect), truth_uri, names)
    assert {names[c] for c in present} <= set(scores)
    assert all(s["iou"] == 1.0 for s in scores.values())
    partial = scene_scores(str(erased), truth_uri, names)
    assert partial[names[gone]]["recall"] == 0.0
    assert all(partial[names[c]]["iou"] == 1.0 for c in present if c != gone)


@pytest.fixture
def s3_with_auth(tmp_path):
    """A second S3 server that checks credentials (moto's IAM auth after its first 5 requests):
    a bucket with one scene, and the access key of a user allowed to read it."""
    import socket
    import time

    import boto3

    from geopix.stack import free_ports

    [port] = free_ports(1)
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="5")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        anyone = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
        iam = boto3.client("iam", **anyone)
        iam.create_user(UserName="reader")  # 1
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(  # 2
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))  # fmt: skip
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # 3
        s3 = boto3.client("s3", **anyone)
        s3.create_bucket(Bucket="secure")  # 4
        rgb = np.random.default_rng(2).integers(1, 255, (3, 128, 128), np.uint8)
        path = tmp_path / "scene.tif"
        with rasterio.open(path, "w", driver="GTiff", count=3, height=128, width=128, dtype="uint8",
                           crs="EPSG:32618", transform=from_origin(583_000, 4_511_000, 0.5, 0.5)) as ds:  # fmt: skip
            ds.write(rgb)
        s3.put_object(Bucket="secure", Key="scene.tif", Body=path.read_bytes())  # 5: auth from here on
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.terminate()
        server.wait()


def test_wrong_credentials_fail_the_scene_with_a_clear_reason(setup, s3_with_auth, monkeypatch, tmp_path):
    cfg, model_dir, _, _, _ = setup
    endpoint, key_id, secret = s3_with_auth
    for name in ("GEOPIX_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert open_scene("s3://secure/scene.tif", cfg.segment).width == 128  # the right key reads it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    [result] = segment_scenes(cfg, model_dir, ["s3://secure/scene.tif"], str(tmp_path / "out"), progress=False)
    assert (result.status, result.reason) == ("failed", "access denied"), result
    assert "scene.tif" in str(result.scene_uri) and result.detail
    assert not (tmp_path / "out").exists()


def test_geopix_segment_cli(setup):
    """`geopix segment` as typed (in this process: the console script itself is test_cli's)."""
    from typer.testing import CliRunner

    from geopix.cli import app

    _, model_dir, scene_uri, _, _ = setup
    out = f"{OUT}-cli"
    crop = crop_scene(scene_uri, 256, f"{SCENES}/crop-256.tif")
    overrides = [a for o in [*OVERRIDES, "segment.overlap=0"] for a in ("--set", o)]
    command = ["segment", "--model", model_dir, "--scene", crop, "--scene-id", "cli-scene",
               "--instruction", INSTRUCTION, "--out", out, *overrides]  # fmt: skip
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 0, done.output
    assert "cli-scene: done, 16 windows" in done.stdout, done.stdout  # 256² in 64-px windows, no overlap
    [prefix] = [line.split("→ ")[1].strip() for line in done.stdout.splitlines() if "cli-scene: done" in line]
    assert prefix.startswith(f"{out}/cli-scene/m-") and storage.list_files(prefix, storage.SUCCESS_MARKER)
    bad = CliRunner().invoke(app, [*command, "--keep-class", "lighthouse"])
    assert bad.exit_code == 2 and "keep_classes ['lighthouse']" in bad.output, bad.output
