"""What GeoPix may replace, and how it publishes: owned output prefixes and staged switches.

GeoPix never deletes what it did not write. Every output prefix it fills (a shard set, an
evaluation, a published model, a segmented scene) first gets an owner record,
``_GEOPIX_OUTPUT.json`` (``{"kind": "shard set", "geopix_version": ...}``), before anything else
is written there.
Before it replaces anything, :func:`prepare_output` checks:

* the place itself: never a bucket root, a filesystem root, the home or working directory (or a
  directory above them), nor a prefix that is, holds or lies inside one of the step's inputs;
* what is there: nothing (the prefix is claimed), or an output of the same kind with the owner
  record whose every object belongs to that kind's layout. A non-empty prefix without the owner
  record is somebody else's and is refused, as is any object outside the layout;
* a finished output (``_SUCCESS``) is replaced only when the caller says so (``--overwrite``);
  an unfinished one of ours (a killed run) is always cleaned up first.

Only the objects matching the layout are deleted, ``_SUCCESS`` first, so readers stop trusting the
prefix before its content goes.

:func:`publish_staged` replaces a finished output without a window in which neither the old nor the
new one is there: the new files go to ``_staging/<id>/`` beside the old ones (with their own marker),
then ``_SUCCESS`` is withdrawn, the staged files are copied into place, ``_SUCCESS`` is written and
the staging copy removed. A run killed while staging leaves the old output published; one killed
during the switch leaves a complete staged copy that :func:`finish_staged_switch` completes.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from geopix import storage
from geopix.storage import SUCCESS_MARKER, StorageError

OWNER_FILE = "_GEOPIX_OUTPUT.json"
STAGING_DIR = "_staging"
STAGED_MARKER = "_STAGED"


class OutputRefused(StorageError):
    """An output location GeoPix will not write to or clean; the message says why and what to do."""


class OutputExists(OutputRefused):
    """A finished output of the same kind is there, and replacing it was not asked for."""


def _inside(child: str, parent: str) -> bool:
    """Whether prefix ``child`` equals or lies under ``parent`` (both normalised, same kind)."""
    child, parent = child.rstrip("/"), parent.rstrip("/")
    return child == parent or child.startswith(parent + "/")


def _normal(uri: str) -> str:
    uri = storage.normalize_uri(uri)
    return uri.rstrip("/") if storage.is_s3_uri(uri) else str(Path(uri).expanduser().absolute())


def check_output_location(uri: str, inputs: Sequence[str] = ()) -> None:
    """Refuse a place no GeoPix output may be written to and cleaned (see the module docstring)."""
    out = _normal(uri)
    if storage.is_container_root(out):
        raise OutputRefused(f"{uri} is a {'bucket' if storage.is_s3_uri(out) else 'filesystem'} root; "
                            "write outputs under a prefix of their own (e.g. s3://bucket/shards/name)")  # fmt: skip
    if not storage.is_s3_uri(out):
        for special, what in ((Path.home(), "your home directory"), (Path.cwd(), "the working directory")):
            if _inside(str(special.absolute()), out):
                raise OutputRefused(f"{uri} is {what} or a directory above it; write outputs to a directory of their own")
    for source in inputs:
        if not source:
            continue
        try:
            source = _normal(source)
        except StorageError:
            continue
        if storage.is_s3_uri(source) != storage.is_s3_uri(out):
            continue
        if _inside(source, out) or _inside(out, source):
            raise OutputRefused(
                f"{uri} {'is' if source == out else 'holds' if _inside(source, out) else 'lies inside'} the "
                f"input {source}; write outputs to a prefix of their own"
            )


def read_record(uri: str) -> dict | None:
    """One small JSON object GeoPix wrote, or None when there is none or it is not one."""
    found = storage.read_object(uri)
    if found is None:
        return None
    try:
        record = json.loads(found[0])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_owner(uri: str) -> dict | None:
    owner = read_record(storage.join_uri(uri, OWNER_FILE))
    return owner if owner is not None and "kind" in owner else None


def prepare_output(
    uri: str, kind: str, layout: Sequence[str], *, replace: bool, inputs: Sequence[str] = ()
) -> list[str]:
    """Make ``uri`` an empty output of ``kind`` that GeoPix owns; returns what was deleted.

    ``layout``: fnmatch patterns (relative paths) of every object an output of this kind holds;
    ``replace``: a finished output there may be replaced (otherwise :class:`OutputExists`)."""
    check_output_location(uri, inputs)
    storage.require_bucket(uri)
    objects = storage.list_objects(uri)
    if not objects:
        _write_owner(uri, kind)
        return []
    _check_ours(uri, kind, objects, layout)
    if SUCCESS_MARKER in objects and not replace:
        raise OutputExists(f"{uri} already holds a finished {kind}; pass --overwrite to replace it")
    doomed = [o for o in objects if o != OWNER_FILE and not _hidden(o)]
    if SUCCESS_MARKER in doomed:  # readers stop trusting the prefix before its content goes
        storage.delete_objects(uri, [SUCCESS_MARKER])
    storage.delete_objects(uri, [o for o in doomed if o != SUCCESS_MARKER])
    return doomed


def _check_ours(uri: str, kind: str, objects: list[str], layout: Sequence[str]) -> None:
    """Raise :class:`OutputRefused` unless every object under ``uri`` belongs to a GeoPix ``kind``."""
    owner = read_owner(uri)
    if owner is None:
        shown = ", ".join(objects[:5]) + (f" and {len(objects) - 5} more" if len(objects) > 5 else "")
        raise OutputRefused(
            f"{uri} holds {len(objects)} object(s) GeoPix did not write ({shown}); GeoPix never deletes what it "
            "did not write: choose an empty prefix, or remove them yourself"
        )
    if owner["kind"] != kind:
        raise OutputRefused(f"{uri} holds a GeoPix {owner['kind']}, not a {kind}; choose another prefix")
    foreign = [o for o in objects if o not in (OWNER_FILE, SUCCESS_MARKER) and not _hidden(o) and not _in_layout(o, layout)]
    if foreign:
        raise OutputRefused(
            f"{uri} is a GeoPix {kind} but also holds objects that are not part of one "
            f"({', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}); GeoPix never deletes what it did "
            "not write: move them, or choose another prefix"
        )


def _hidden(path: str) -> bool:
    """Local lock and partial files (``.name.lock``) that GeoPix's own atomic writes leave beside."""
    return path.rsplit("/", 1)[-1].startswith(".")


def _in_layout(path: str, layout: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in layout)


def _write_owner(uri: str, kind: str) -> None:
    from geopix import __version__

    # No time or run id in it: the same inputs give byte-identical outputs, this record included.
    owner = {"kind": kind, "geopix_version": __version__}
    storage.write_bytes(storage.join_uri(uri, OWNER_FILE), json.dumps(owner, indent=1).encode())


# ------------------------------------------------------------------------------ staged publishing
def publish_staged(prefix: str, files: dict[str, Path], stage_id: str, kind: str, layout: Sequence[str]) -> None:
    """Publish ``files`` (name → local path) at ``prefix``, replacing a finished output of ``kind``
    there without ever leaving it with neither (module docstring)."""
    stage_output(prefix, files, stage_id, kind, layout)
    finish_staged_switch(prefix, stage_id)


def stage_output(prefix: str, files: dict[str, Path], stage_id: str, kind: str, layout: Sequence[str]) -> str:
    """Step 1: the complete new output under ``<prefix>/_staging/<stage_id>/``, its marker last.
    Whatever was published at ``prefix`` stays published. Returns the staging prefix."""
    check_output_location(prefix)
    objects = storage.list_objects(prefix)
    if objects:
        _check_ours(prefix, kind, objects, [*layout, f"{STAGING_DIR}/*"])
    else:
        _write_owner(prefix, kind)
    staging = storage.join_uri(prefix, STAGING_DIR, stage_id)
    for name, path in files.items():
        storage.upload_file(path, storage.join_uri(staging, name))
    storage.write_bytes(storage.join_uri(staging, STAGED_MARKER), json.dumps(sorted(files)).encode())
    return staging


def finish_staged_switch(prefix: str, stage_id: str | None = None) -> bool:
    """Step 2: move a complete staged output into place, then write ``_SUCCESS``. With no
    ``stage_id``, the newest complete staged output found (a switch a killed run left half done).
    Returns whether there was one to finish."""
    staged = _complete_stages(prefix)
    if stage_id is not None:
        staged = [s for s in staged if s == stage_id]
    if not staged:
        return False
    stage_id = staged[-1]
    staging = storage.join_uri(prefix, STAGING_DIR, stage_id)
    names = json.loads(storage.read_bytes(storage.join_uri(staging, STAGED_MARKER)))
    storage.delete_objects(prefix, [SUCCESS_MARKER])  # readers stop trusting the old output here
    for name in names:
        storage.copy(storage.join_uri(staging, name), storage.join_uri(prefix, name))
    storage.write_bytes(storage.join_uri(prefix, SUCCESS_MARKER), b"")
    leftovers = [o for o in storage.list_objects(prefix) if o.startswith(f"{STAGING_DIR}/")]
    storage.delete_objects(prefix, leftovers)  # this stage and any older, abandoned ones
    return True


def _complete_stages(prefix: str) -> list[str]:
    """Staged outputs under ``prefix`` whose marker was written, oldest first (by id)."""
    objects = storage.list_objects(storage.join_uri(prefix, STAGING_DIR))
    return sorted({o.split("/", 1)[0] for o in objects if o.endswith(f"/{STAGED_MARKER}")})


def remove_record(uri: str, expected: dict) -> bool:
    """Delete one JSON record GeoPix wrote (a quarantine record, a lease), after checking that it is
    one: it parses and holds ``expected``'s items. Returns whether it was deleted."""
    record = read_record(uri)
    if record is None or any(record.get(k) != v for k, v in expected.items()):
        return False
    storage.delete_object(uri)
    return True


def staging_id() -> str:
    """A sortable id for one staging attempt (time first, so the newest sorts last)."""
    import uuid

    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
