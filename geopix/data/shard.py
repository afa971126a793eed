"""Sharding: record sources → validated, split, sized Parquet shards with a manifest (a Ray Data job).

    sources ─▶ read_parquet ─▶ validate + fetch images + assign split (map_batches, N workers)
            ─▶ rejects table (every invalid record with its reason)
            ─▶ per split: sort by record_id ─▶ repartition to the target size ─▶ write_parquet
            ─▶ checksums ─▶ manifest.json ─▶ _SUCCESS

Output layout under ``out_uri``::

    train/shard-00000.parquet …   val/…   test/…
    rejects/rejects.parquet       record_id, image_id, origin, reason
    manifest.json                 counts per split/task/class, shard checksums, schema version
    _SUCCESS                      written last: readers trust a shard set only once it exists
    _GEOPIX_OUTPUT.json           written first: this prefix is a GeoPix shard set (geopix/outputs.py)

Sources are read only once they carry their own ``_SUCCESS``; the output prefix must be empty, or a
GeoPix shard set that ``overwrite`` replaces (an unfinished one, from a killed run, always is).
Nothing else is ever deleted: not a prefix holding anything GeoPix did not write, not a bucket root,
not a prefix that is, holds or lies inside a source.

The same sources and config give byte-identical shards and manifest: rows are sorted by
record_id before they are cut into shards, file names depend only on the shard index, and the
manifest holds no timestamps (run times go to MLflow).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

from geopix import __version__, storage
from geopix.config import DataConfig
from geopix.data.schema import (
    OPTIONAL_COLUMNS,
    RECORD_SCHEMA,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    SPLITS,
    ClassCatalog,
    validate_record,
)
from geopix.data.shard_set import MANIFEST_FILE, ShardError
from geopix.data.source import SUCCESS_MARKER, SourceError, read_catalog, record_files, require_finished
from geopix.outputs import OutputRefused, prepare_output
from geopix.vocabulary import SegVocabulary

REJECTS_FILE = "rejects/rejects.parquet"
SHARDS_KIND = "shard set"
# Every object a shard set holds (geopix/outputs.py): only these are ever replaced by --overwrite.
SHARDS_LAYOUT = (*(f"{split}/shard-*.parquet" for split in SPLITS), REJECTS_FILE, MANIFEST_FILE)
HELPER_COLUMNS = ("_reason", "_origin", "_worker")


@dataclass
class ShardResult:
    out_uri: str
    manifest: dict[str, Any]
    validation_workers: int = 0  # distinct worker processes that validated records
    seconds: float = 0.0
    rejects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return self.manifest["counts"]


def assign_split(image_id: str, data: DataConfig) -> str:
    """Deterministic split from the image id alone, so an image never lands in two splits."""
    digest = hashlib.sha256(f"{data.split_seed}:{image_id}".encode()).hexdigest()
    u = int(digest[:12], 16) / 16**12
    if u < data.train_fraction:
        return "train"
    return "val" if u < data.train_fraction + data.val_fraction else "test"


def merge_catalogs(catalogs: dict[str, ClassCatalog]) -> ClassCatalog:
    merged: dict[int, str] = {}
    owner: dict[int, str] = {}
    for uri, catalog in catalogs.items():
        for class_id, name in catalog.names.items():
            if class_id in merged and merged[class_id] != name:
                raise ShardError(
                    f"class {class_id} is {merged[class_id]!r} in {owner[class_id]} but {name!r} in {uri}; "
                    "map both sources onto one class list first"
                )
            merged[class_id], owner[class_id] = name, uri
    return ClassCatalog(merged)


def _check_files(files: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Split record files into readable ones and unreadable ones (with the reason)."""
    good, bad = [], []
    expected = set(RECORD_SCHEMA.names) - OPTIONAL_COLUMNS
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            bad.append({"file": uri, "reason": f"not a readable Parquet file: {exc}"})
            continue
        missing = expected - set(schema.names)
        if missing:
            bad.append({"file": uri, "reason": f"missing columns: {', '.join(sorted(missing))}"})
            continue
        good.append(uri)
    return good, bad


def _validate_batch(batch: pa.Table, catalog_json: str, data: dict, seg_vocab: SegVocabulary) -> pa.Table:
    """Ray Data UDF: validate each record, fetch images given by URI, assign splits.

    Adds ``_reason`` (null when valid), ``_origin`` (the source file) and ``_worker`` (pid).
    """
    catalog = ClassCatalog.from_json(catalog_json)
    config = DataConfig.model_validate(data)
    records = batch.drop_columns(["path"]).to_pylist()
    reasons = []
    for record in records:
        reasons.append(_problems(record, catalog, seg_vocab))
        if not record.get("split"):
            record["split"] = assign_split(record.get("image_id") or "", config)
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    return (
        table.append_column("_reason", pa.array(reasons, pa.string()))
        .append_column("_origin", batch.column("path"))
        .append_column("_worker", pa.array([os.getpid()] * len(records), pa.int64()))
    )


def _problems(record: dict, catalog: ClassCatalog, seg_vocab: SegVocabulary) -> str | None:
    if not record.get("image") and record.get("image_uri"):
        try:
            record["image"] = storage.read_bytes(record["image_uri"])
        except (storage.StorageError, FileNotFoundError, OSError) as exc:
            return f"image_uri: cannot read {record['image_uri']} ({exc})"
    problems = validate_record(record, catalog, seg_vocab)
    return "; ".join(problems) if problems else None


def _keep_valid(batch: pa.Table, rejected_ids: list[str]) -> pa.Table:
    """Vectorised: rows without a reason and not rejected by a cross-record check."""
    keep = pc.and_(
        pc.is_null(batch.column("_reason")),
        pc.invert(pc.is_in(batch.column("record_id"), value_set=pa.array(rejected_ids, pa.string()))),
    )
    return batch.filter(keep).drop_columns(list(HELPER_COLUMNS))


def _only_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch.column("split"), split))


def _gather(ds, columns: Sequence[str]) -> pa.Table:
    refs = ds.select_columns(list(columns)).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})


class _ShardNames(FilenameProvider):
    """``shard-00000…`` by write-task index: one task per block after repartition.

    The name leaves out Ray's write UUID so that reruns give the same names; the split's
    prefix is emptied first and written with ``SaveMode.OVERWRITE``.
    """

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"shard-{task_index:05d}.parquet"


def _sha256(uri: str) -> tuple[str, int]:
    payload = storage.read_bytes(uri)
    return hashlib.sha256(payload).hexdigest(), len(payload)


def shard_sources(
    sources: Sequence[str],
    out_uri: str,
    data: DataConfig,
    *,
    seg_vocab: SegVocabulary,
    workers: int = 2,
    overwrite: bool = False,
) -> ShardResult:
    """Validate, split and shard ``sources`` into ``out_uri``; see the module docstring."""
    started = time.perf_counter()
    out_uri = storage.normalize_uri(out_uri).rstrip("/")
    sources = [storage.normalize_uri(s).rstrip("/") for s in sources]
    catalogs, files = {}, []
    for source in sources:  # every source whole and readable before anything is written or removed
        try:
            require_finished(source)
            catalogs[source] = read_catalog(source)
            files += record_files(source)
        except SourceError as exc:
            raise ShardError(str(exc)) from None
    try:
        prepare_output(out_uri, SHARDS_KIND, SHARDS_LAYOUT, replace=overwrite, inputs=sources)
    except OutputRefused as exc:
        raise ShardError(str(exc)) from None
    catalog = merge_catalogs(catalogs)
    readable, unreadable = _check_files(files)
    if not readable:
        raise ShardError(f"no readable record files in {', '.join(sources)}: {unreadable}")

    fs, _ = storage.arrow_filesystem(readable[0])
    paths = [storage.arrow_filesystem(f)[1] for f in readable]
    raw = ray.data.read_parquet(
        paths, filesystem=fs, include_paths=True, override_num_blocks=max(len(paths), workers)
    )
    # Tasks, not an actor pool: each task reads a file and validates it, so `workers` tasks
    # run side by side without actors holding the CPUs the reads need.
    validated = raw.map_batches(
        _validate_batch,
        fn_kwargs={
            "catalog_json": catalog.to_json(),
            "data": data.model_dump(),
            "seg_vocab": seg_vocab,
        },
        batch_format="pyarrow",
        batch_size=64,
        concurrency=workers,
    ).materialize()

    info = _gather(validated, ["record_id", "image_id", "split", "_reason", "_origin", "_worker"])
    rejects = _cross_record_rejects(info)
    reasons = info.column("_reason").to_pylist()
    rejected = [
        {"record_id": r, "image_id": i, "origin": o, "reason": reasons[k] or rejects[r]}
        for k, (r, i, o) in enumerate(
            zip(
                info["record_id"].to_pylist(),
                info["image_id"].to_pylist(),
                info["_origin"].to_pylist(),
                strict=True,
            )
        )
        if reasons[k] or r in rejects
    ]
    rejected_ids = {r["record_id"] for r in rejected}
    rejected.sort(key=lambda r: (r["record_id"] or "", r["origin"] or ""))

    valid = validated.map_batches(
        _keep_valid, fn_kwargs={"rejected_ids": sorted(rejected_ids)}, batch_format="pyarrow"
    ).materialize()
    shards = _write_splits(valid, out_uri, data, fs)

    stats = _gather(valid, ["split", "task", "phrase_type", "image_id", "targets"]) if valid.count() else None
    manifest = _manifest(sources, catalog, out_uri, info.num_rows, rejected, unreadable, shards, stats, data, seg_vocab)
    storage.write_bytes(
        storage.join_uri(out_uri, REJECTS_FILE),
        storage.parquet_bytes(pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA)),
    )
    storage.write_bytes(
        storage.join_uri(out_uri, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True).encode()
    )
    storage.write_bytes(
        storage.join_uri(out_uri, SUCCESS_MARKER),
        json.dumps({"records": manifest["counts"]["written"]}).encode(),
    )
    return ShardResult(
        out_uri=out_uri,
        manifest=manifest,
        validation_workers=len(set(info.column("_worker").to_pylist())),
        seconds=time.perf_counter() - started,
        rejects=rejected,
    )


def _cross_record_rejects(info: pa.Table) -> dict[str, str]:
    """Reasons that need all records at once: duplicate record ids, an image in two splits."""
    reasons: dict[str, str] = {}
    seen: Counter = Counter(info.column("record_id").to_pylist())
    for record_id, count in seen.items():
        if count > 1:
            reasons[record_id] = f"record_id: {count} records share the id {record_id!r}"
    splits_of: dict[str, set] = defaultdict(set)
    ok = pc.is_null(info.column("_reason"))
    for image_id, split, good in zip(
        info["image_id"].to_pylist(), info["split"].to_pylist(), ok.to_pylist(), strict=True
    ):
        if good:
            splits_of[image_id].add(split)
    torn = {i: sorted(s) for i, s in splits_of.items() if len(s) > 1}
    for record_id, image_id in zip(info["record_id"].to_pylist(), info["image_id"].to_pylist(), strict=True):
        if image_id in torn and record_id not in reasons:
            reasons[record_id] = (
                f"split: image {image_id!r} is assigned to several splits ({', '.join(torn[image_id])})"
            )
    return reasons


def _write_splits(valid, out_uri: str, data: DataConfig, fs) -> dict[str, list[dict[str, Any]]]:
    total_rows = valid.count()
    total_bytes = valid.size_bytes() or 1
    shards: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        part = valid.map_batches(_only_split, fn_kwargs={"split": split}, batch_format="pyarrow")
        rows = part.count()
        if rows == 0:
            shards[split] = []
            continue
        split_bytes = total_bytes * rows / max(total_rows, 1)
        n_shards = max(1, math.ceil(split_bytes / (data.shard_target_mb * 2**20)))
        target = storage.join_uri(out_uri, split)
        _, path = storage.arrow_filesystem(target)
        if n_shards == 1:
            # A split that fits one shard (at most shard_target_mb): sorted in one place. Ray Data's
            # distributed sort (sample, map, reduce) costs seconds of fixed overhead per split and
            # buys nothing when every row ends up in the same file.
            table = pa.concat_tables(ray.get(part.to_arrow_refs())).sort_by("record_id")
            part = ray.data.from_arrow(table)
        else:
            part = part.sort("record_id").repartition(n_shards)
        part.write_parquet(
            path, filesystem=fs, filename_provider=_ShardNames(), mode=SaveMode.OVERWRITE, compression="zstd"
        )
        shards[split] = []
        for uri in storage.list_files(target, "*.parquet"):
            digest, size = _sha256(uri)
            file_fs, file_path = storage.arrow_filesystem(uri)
            shards[split].append(
                {
                    "path": f"{split}/{uri.rsplit('/', 1)[-1]}",
                    "rows": pq.read_metadata(file_path, filesystem=file_fs).num_rows,
                    "bytes": size,
                    "sha256": digest,
                }
            )
    return shards


def _manifest(sources, catalog, out_uri, read, rejected, unreadable, shards, stats, data, seg_vocab) -> dict[str, Any]:
    per_split: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        per_split[split] = {
            "records": 0,
            "images": 0,
            "tasks": {},
            "classes": {},
            "phrase_types": {},
            "shards": shards.get(split, []),
        }
    if stats is not None:
        images: dict[str, set] = defaultdict(set)
        tasks: dict[str, Counter] = defaultdict(Counter)
        classes: dict[str, Counter] = defaultdict(Counter)
        phrases: dict[str, Counter] = defaultdict(Counter)
        for row in stats.to_pylist():
            split = row["split"]
            images[split].add(row["image_id"])
            tasks[split][row["task"]] += 1
            if row["phrase_type"]:
                phrases[split][row["phrase_type"]] += 1
            for target in row["targets"] or []:
                classes[split][target["class_name"]] += 1
        for split in SPLITS:
            per_split[split].update(
                records=sum(tasks[split].values()),
                images=len(images[split]),
                tasks=dict(sorted(tasks[split].items())),
                classes=dict(sorted(classes[split].items())),
                phrase_types=dict(sorted(phrases[split].items())),
            )
    written = sum(s["records"] for s in per_split.values())
    reason_kinds = Counter(r["reason"].split(":", 1)[0] for r in rejected)
    return {
        "schema_version": SCHEMA_VERSION,
        "geopix_version": __version__,
        "sources": list(sources),
        "classes": [{"id": k, "name": v} for k, v in sorted(catalog.names.items())],
        # The seg run every record was checked against: a model trained on the set must use it.
        "seg_vocabulary": dataclasses.asdict(seg_vocab),
        "split_rule": {
            "kept_from_records": True,
            "by_image_id": {"seed": data.split_seed, "train": data.train_fraction, "val": data.val_fraction},
        },
        "shard_target_mb": data.shard_target_mb,
        "counts": {
            "read": read,
            "written": written,
            "rejected": len(rejected),
            "unreadable_files": len(unreadable),
        },
        "rejects_by_field": dict(sorted(reason_kinds.items())),
        "unreadable_files": unreadable,
        "splits": per_split,
        "rejects": REJECTS_FILE,
    }


def class_counts_figure(manifest: dict[str, Any], path: str) -> None:
    """A bar chart of instances per class and records per task, by split (for MLflow and docs)."""
    from geopix.plotting import pyplot

    plt = pyplot()

    splits = [s for s in SPLITS if manifest["splits"][s]["records"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in (
        (axes[0], "classes", "instances per class"),
        (axes[1], "tasks", "records per task"),
    ):
        names = sorted({n for s in splits for n in manifest["splits"][s][key]})
        width = 0.8 / max(len(splits), 1)
        for k, split in enumerate(splits):
            values = [manifest["splits"][split][key].get(n, 0) for n in names]
            ax.bar([i + k * width for i in range(len(names))], values, width, label=split)
        ax.set_xticks(
            [i + width * (len(splits) - 1) / 2 for i in range(len(names))], names, rotation=35, ha="right"
        )
        ax.set_title(title)
        ax.legend()
    counts = manifest["counts"]
    fig.suptitle(f"read {counts['read']} = written {counts['written']} + rejected {counts['rejected']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_shard_run(result: ShardResult) -> None:
    """Params, counts, the manifest, the rejects and a picture, into the active MLflow run."""
    import tempfile
    from pathlib import Path

    import mlflow

    counts = result.counts
    mlflow.log_params({"out_uri": result.out_uri, "sources": ",".join(result.manifest["sources"])})
    mlflow.log_metrics(
        {
            **{f"records_{k}": v for k, v in counts.items()},
            "seconds": result.seconds,
            "records_per_s": counts["read"] / max(result.seconds, 1e-9),
            **{f"{split}_records": info["records"] for split, info in result.manifest["splits"].items()},
        }
    )
    mlflow.log_dict(result.manifest, "manifest.json")
    with tempfile.TemporaryDirectory() as tmp:
        rejects = Path(tmp) / "rejects.csv"
        with rejects.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=REJECT_SCHEMA.names)
            writer.writeheader()
            writer.writerows(result.rejects)
        mlflow.log_artifact(str(rejects))
        figure = Path(tmp) / "class_and_task_counts.png"
        class_counts_figure(result.manifest, str(figure))
        mlflow.log_artifact(str(figure))
