"""Every way GeoPix reaches S3, against the stack's real S3 server."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_translate, cog_validate
from rio_cogeo.profiles import cog_profiles

from geopix import storage
from geopix.storage import S3Settings, StorageError


def test_s3fs_round_trip(stack):
    fs = storage.s3_filesystem()
    uri = "s3://geopix-data/tests/s3fs/hello.bin"
    payload = bytes(range(256)) * 100
    with fs.open(uri, "wb") as fh:
        fh.write(payload)
    with fs.open(uri, "rb") as fh:
        assert fh.read() == payload
    assert storage.read_bytes(uri) == payload


def test_pyarrow_parquet_round_trip(stack):
    table = pa.table({"image_id": [f"img-{i}" for i in range(50)], "area": np.arange(50, dtype="float32")})
    fs, path = storage.arrow_filesystem("s3://geopix-data/tests/arrow/part-0.parquet")
    assert path == "geopix-data/tests/arrow/part-0.parquet"
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # Written by pyarrow, visible to s3fs: the two agree on the endpoint.
    assert storage.s3_filesystem().exists("s3://geopix-data/tests/arrow/part-0.parquet")


def test_rasterio_reads_a_cog_window_from_s3(stack, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(3, 512, 512), dtype=np.uint8)
    src_path, cog_path = tmp_path / "src.tif", tmp_path / "cog.tif"
    profile = {
        "driver": "GTiff",
        "width": 512,
        "height": 512,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32618",
        "transform": from_origin(500000, 4100000, 10, 10),
    }
    with rasterio.open(src_path, "w", **profile) as dst:
        dst.write(data)
    cog_translate(
        src_path, cog_path, cog_profiles.get("deflate") | {"blockxsize": 256, "blockysize": 256}, quiet=True
    )
    uri = "s3://geopix-scenes/tests/cog.tif"
    storage.write_bytes(uri, cog_path.read_bytes())

    with storage.rasterio_env():
        assert cog_validate(uri, quiet=True)[0]
        with rasterio.open(uri) as src:
            assert src.crs.to_epsg() == 32618
            assert src.transform == profile["transform"]
            assert src.overviews(1), "a COG from rio-cogeo carries overviews"
            window = src.read(window=Window(300, 100, 64, 80))
    np.testing.assert_array_equal(window, data[:, 100:180, 300:364])


def test_missing_bucket_is_named(stack):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' .* does not exist at http://127.0.0.1"):
        storage.write_bytes("s3://no-such-bucket/x.json", b"{}")
    with pytest.raises(StorageError, match="object s3://geopix-data/tests/absent.json does not exist"):
        storage.read_bytes("s3://geopix-data/tests/absent.json")


def test_unreachable_endpoint_is_named(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would only delay the same answer
    dead = S3Settings(endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        storage.require_bucket("s3://geopix-data/x", dead)


def test_settings_fall_back_to_aws_without_an_endpoint():
    aws = S3Settings.from_env({"AWS_DEFAULT_REGION": "eu-west-1"})
    assert aws.endpoint_url is None and aws.region == "eu-west-1"
    assert "AWS_S3_ENDPOINT" not in storage.gdal_options(aws)
    local = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9100"}, region="us-west-2")
    options = storage.gdal_options(local)
    assert options["AWS_S3_ENDPOINT"] == "127.0.0.1:9100" and options["AWS_HTTPS"] == "NO"
    assert local.region == "us-west-2"


def test_local_paths_work_like_s3(tmp_path):
    target = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(target, b"local")
    assert storage.read_bytes(target) == b"local"
    fs, path = storage.arrow_filesystem(target)
    assert fs.get_file_info(path).size == 5
    assert storage.join_uri("s3://b/p/", "x", "/y") == "s3://b/p/x/y"


def test_local_copy_by_several_processes_at_once(stack, tmp_path):
    """Ray Train workers on one machine fetch the same model prefix at the same moment."""
    from concurrent.futures import ProcessPoolExecutor

    prefix = "s3://geopix-data/tests/local_copy/model"
    files = {f"part-{i}.bin": bytes([i]) * (200_000 + i) for i in range(6)}
    for name, payload in files.items():
        storage.write_bytes(f"{prefix}/{name}", payload)
    storage.write_bytes(f"{prefix}/{storage.SUCCESS_MARKER}", b"")
    with ProcessPoolExecutor(4) as pool:
        targets = list(pool.map(storage.local_copy, [prefix] * 8, [tmp_path] * 8))
    assert len(set(targets)) == 1
    for name, payload in files.items():
        assert (targets[0] / name).read_bytes() == payload
    assert not [p.name for p in targets[0].iterdir() if ".partial" in p.name]


def test_fingerprint_changes_with_content(stack, tmp_path):
    prefix = "s3://geopix-data/tests/fingerprint"
    storage.remove_prefix(prefix)
    with pytest.raises(StorageError, match="nothing under"):
        storage.fingerprint(prefix)
    storage.write_bytes(f"{prefix}/a.txt", b"one")
    first = storage.fingerprint(prefix)
    assert storage.fingerprint(prefix) == first
    storage.write_bytes(f"{prefix}/a.txt", b"two")
    second = storage.fingerprint(prefix)
    storage.write_bytes(f"{prefix}/b/c.txt", b"new file")
    assert len({first, second, storage.fingerprint(prefix)}) == 3
    (tmp_path / "x.txt").write_text("local")
    assert storage.fingerprint(str(tmp_path)) == storage.fingerprint(str(tmp_path))


def test_uri_spellings_of_s3_are_read_as_s3_and_others_are_refused():
    assert storage.normalize_uri("S3://b/k.tif") == "s3://b/k.tif"
    assert storage.normalize_uri("s3a://b/k.tif") == storage.normalize_uri("s3n://b/k.tif") == "s3://b/k.tif"
    assert storage.normalize_uri("file:///tmp/x.tif") == "/tmp/x.tif"
    assert storage.normalize_uri("relative/dir") == "relative/dir"
    for uri in ("gs://b/k.tif", "https://example.org/k.tif", "az://c/k"):
        with pytest.raises(StorageError, match="unsupported URI scheme"):
            storage.normalize_uri(uri)


def test_an_object_replaced_while_it_is_read_is_read_whole(stack):
    """Ray rewrites its run state in place while GeoPix polls it: every read returns one version
    whole (old or new), never a failed or mixed read."""
    import threading

    uri = "s3://geopix-checkpoints/tests/storage/rewritten.json"
    versions = [b"a" * 300_000, b"b" * 900_000]
    storage.write_bytes(uri, versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            storage.write_bytes(uri, versions[i % 2])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads = [storage.read_bytes(uri) for _ in range(150)]
    finally:
        stop.set()
        writer.join()
    assert all(r in versions for r in reads)
    assert {len(r) for r in reads} == {len(v) for v in versions}  # both versions were read while rewritten
