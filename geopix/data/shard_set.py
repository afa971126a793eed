"""A finished shard set as readers see it: its shard files per split, checked before anything
reads them, and its manifest. The sharding job (:mod:`geopix.data.shard`) writes shard sets;
training (:mod:`geopix.train.rank_reader`), evaluation and the tools read them through here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from geopix import storage

if TYPE_CHECKING:
    import ray.data

MANIFEST_FILE = "manifest.json"
# `geopix data shard` writes shard-00000-0.parquet (Ray adds a per-task file index).
SHARD_PATTERN = re.compile(r"shard-\d+(-\d+)?\.parquet$")


class ShardError(ValueError):
    """A shard set that cannot be written or read; the message names the URI or the file."""


def shard_files(shards_uri: str, split: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, sorted shard paths) of one split; :class:`ShardError` when none."""
    import pyarrow.fs as pafs

    split_uri = storage.join_uri(shards_uri, split)
    try:
        fs, path = storage.arrow_filesystem(split_uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:  # missing bucket, unreachable endpoint, no permission
        raise ShardError(f"cannot list shards under {split_uri}: {exc}") from None
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and SHARD_PATTERN.search(i.base_name)
    )
    if not files:
        raise ShardError(
            f"no shards for split {split!r}: nothing like shard-00000.parquet under {split_uri}/"
        )
    return fs, files


def shard_dataset(shards_uri: str, split: str) -> ray.data.Dataset:
    """The split's shards as a lazy Ray Dataset (what Ray Train hands each worker a share of).

    Every shard's Parquet footer is read here, so a missing or unreadable shard fails now with
    its name instead of deep inside a streaming read on a worker.
    """
    import ray.data

    fs, files = check_shards(shards_uri, split)
    return ray.data.read_parquet(files, filesystem=fs)


def check_shards(shards_uri: str, split: str) -> tuple[Any, list[str]]:
    """:func:`shard_files` of a finished shard set (its ``_SUCCESS`` written), with every shard's
    Parquet footer read and its columns checked, so an unfinished set or a missing or unreadable
    shard fails at once with its name instead of deep inside a worker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not storage.is_finished(shards_uri):
        raise ShardError(
            f"{shards_uri} holds no finished shard set (no {storage.SUCCESS_MARKER}): its sharding did not "
            "finish or is still writing; rerun `geopix data shard` for it"
        )
    fs, files = shard_files(shards_uri, split)
    for path in files:
        try:
            columns = set(pq.read_schema(path, filesystem=fs).names)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"shard {_uri_of(shards_uri, path)} is not readable Parquet: {exc}") from None
        missing = {"record_id", "image", "conversation", "targets"} - columns
        if missing:
            raise ShardError(f"shard {_uri_of(shards_uri, path)} lacks the columns {sorted(missing)}")
    return fs, files


def read_records(
    shards_uri: str,
    split: str,
    *,
    tasks: Iterable[str] | None = None,
    record_ids: Iterable[str] | None = None,
    columns: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The records of one split of a finished shard set, sorted by ``record_id``: only those of
    ``tasks`` and of ``record_ids`` where given, with ``columns`` (all when None). For the tools
    and reports that read a few records into memory; training streams through
    :func:`shard_dataset`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, files = check_shards(shards_uri, split)
    where = None
    for column, values in (("task", tasks), ("record_id", record_ids)):
        if values is not None:
            keep = pc.field(column).isin(sorted(set(values)))
            where = keep if where is None else where & keep
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns, filter=where)
    return sorted(table.to_pylist(), key=lambda r: r["record_id"])


def _uri_of(shards_uri: str, path: str) -> str:
    return f"s3://{path}" if storage.is_s3_uri(shards_uri) else path


def read_manifest(shards_uri: str) -> dict[str, Any]:
    """The manifest of a finished shard set; a clear error for a missing or unfinished one."""
    marker = storage.join_uri(shards_uri, storage.SUCCESS_MARKER)
    try:
        storage.read_bytes(marker)
    except (storage.StorageError, FileNotFoundError):
        raise ShardError(f"{shards_uri} holds no finished shard set (no {storage.SUCCESS_MARKER})") from None
    return json.loads(storage.read_bytes(storage.join_uri(shards_uri, MANIFEST_FILE)))


def class_names(manifest: dict[str, Any], num_classes: int) -> list[str]:
    """Class names by id from a shard manifest (``class_<id>`` for ids it does not name)."""
    names = [f"class_{k}" for k in range(num_classes)]
    for entry in manifest.get("classes", []):
        if not 0 <= entry["id"] < num_classes:
            raise ShardError(f"shard manifest: class {entry['name']!r} has id {entry['id']}; the model has {num_classes} classes")
        names[entry["id"]] = entry["name"]
    return names
