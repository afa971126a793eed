"""A record source: what the generator and the importers write, and what sharding reads.

Layout under one local directory or S3 prefix::

    <source>/classes.json                 [{"id": 0, "name": "storage_tank"}, ...]
    <source>/records/part-00000.parquet   rows of RECORD_SCHEMA (split may be null)
    <source>/records/part-00001.parquet   ...
    <source>/import_report.json           (importers) what was imported and what rejected, and why

Parts are written whole and the ``_SUCCESS`` marker last, so a reader never sees half a source.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Self

import pyarrow as pa
import pyarrow.parquet as pq

from geopix import storage
from geopix.data.schema import RECORD_SCHEMA, ClassCatalog
from geopix.outputs import prepare_output

CLASSES_FILE = "classes.json"
RECORDS_DIR = "records"
IMPORT_REPORT_FILE = "import_report.json"
SUCCESS_MARKER = storage.SUCCESS_MARKER


class SourceError(ValueError):
    """A source that cannot be read; the message names the file."""


def records_to_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=RECORD_SCHEMA)


SOURCE_KIND = "record source"
SOURCE_LAYOUT = (f"{RECORDS_DIR}/part-*.parquet", CLASSES_FILE, IMPORT_REPORT_FILE)


class SourceWriter:
    """Writes records in parts of ``rows_per_part``; call :meth:`close` (or use ``with``).

    The prefix must be empty or an earlier GeoPix source, which is replaced (its ``_SUCCESS`` goes
    first, so no reader takes the half-written new one for the old); anything else is refused
    (geopix/outputs.py)."""

    def __init__(self, uri: str, catalog: ClassCatalog, rows_per_part: int = 512):
        self.uri = storage.normalize_uri(uri).rstrip("/")
        prepare_output(self.uri, SOURCE_KIND, SOURCE_LAYOUT, replace=True)
        self.catalog = catalog
        self.rows_per_part = rows_per_part
        self._pending: list[Mapping[str, Any]] = []
        self.parts: list[str] = []
        self.rows = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()

    def write(self, record: Mapping[str, Any]) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.rows_per_part:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        part = storage.join_uri(self.uri, RECORDS_DIR, f"part-{len(self.parts):05d}.parquet")
        storage.write_bytes(part, storage.parquet_bytes(records_to_table(self._pending)))
        self.parts.append(part)
        self.rows += len(self._pending)
        self._pending = []

    def attach(self, name: str, payload: bytes) -> None:
        """A file beside the records (an importer's report), published with them by the marker."""
        if name not in SOURCE_LAYOUT:
            raise ValueError(f"{name} is not part of a record source's layout")
        storage.write_bytes(storage.join_uri(self.uri, name), payload)

    def close(self) -> None:
        self._flush()
        storage.write_bytes(storage.join_uri(self.uri, CLASSES_FILE), self.catalog.to_json().encode())
        marker = {"parts": len(self.parts), "rows": self.rows}
        storage.write_bytes(storage.join_uri(self.uri, SUCCESS_MARKER), json.dumps(marker).encode())


def require_finished(uri: str) -> None:
    """A source is read only once its writer finished it (``_SUCCESS`` written after every part)."""
    if not storage.is_finished(uri):
        if not storage.list_objects(uri):
            raise SourceError(f"source {uri} does not exist (nothing there)")
        raise SourceError(
            f"source {uri} is unfinished: no {SUCCESS_MARKER} (its writer did not finish, or is still writing); "
            "rerun the import or generation that writes it"
        )


def read_catalog(uri: str) -> ClassCatalog:
    path = storage.join_uri(uri, CLASSES_FILE)
    try:
        return ClassCatalog.from_json(storage.read_bytes(path))
    except (storage.StorageError, FileNotFoundError):
        raise SourceError(f"source {uri} has no {CLASSES_FILE}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{path} is not a list of {{id, name}} objects: {exc}") from None


def record_files(uri: str) -> list[str]:
    """The source's record parts, sorted; a clear error when there are none."""
    records_uri = storage.join_uri(uri, RECORDS_DIR)
    found = storage.list_files(records_uri, "*.parquet")
    if not found:
        raise SourceError(f"source {uri} has no record files under {records_uri}/")
    return found


def iter_records(uri: str) -> Iterator[dict[str, Any]]:
    """Every record of a source, in order (for small sources and tests; sharding uses Ray Data)."""
    for part in record_files(uri):
        table = pq.read_table(io.BytesIO(storage.read_bytes(part)))
        yield from table.to_pylist()
