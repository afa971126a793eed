"""The nightly job: segment every new scene under the incoming prefix (or every item of a STAC
catalog, ItemCollection or API search: geopix/infer/stac_scenes.py), once.

A scene is *done* when its output prefix (scene id + model label + request hash) carries
``_SUCCESS``; done scenes are skipped, so a second run processes nothing and writes no scene object.
A scene that fails is *quarantined*: ``<out>/_quarantine/<scene id>.json`` records the reason, the
detail and the input's checksum; later runs skip it while the input is unchanged (a re-uploaded,
fixed file is retried; a failure of the model's own making is retried by a new model version).
A STAC item is done for the version of it that was segmented (run.json's ``source.version``): a
re-published item is segmented again, and its quarantine holds only while its version is unchanged.
Inputs are never moved or deleted. Each scene is segmented under a lease (geopix/leases.py), so two
runs at once split the scenes between them and none is done twice. Each run writes a summary under
``<out>/_runs/<run id>.json`` and logs an MLflow run with the per-scene table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from geopix import ray_job, storage
from geopix.config import GeoPixConfig
from geopix.infer.scene_reader import input_checksum, scene_id_of
from geopix.infer.segment import (
    SceneResult,
    is_published,
    log_segment_run,
    request_hash,
    scene_prefix,
    segment_scenes,
)
from geopix.infer.stac_scenes import StacScene, StacSearch, list_stac_scenes
from geopix.leases import Lease
from geopix.outputs import check_output_location, remove_record
from geopix.tracking import resolve_model

log = logging.getLogger(__name__)

QUARANTINE_DIR, RUNS_DIR, LEASES_DIR = "_quarantine", "_runs", "_leases"
SCENE_SUFFIXES = (".tif", ".tiff")
# Failures that say something about the input itself: quarantined until the file changes.
INPUT_REASONS = frozenset({"missing", "access denied", "unreadable", "no CRS", "no transform", "bad bands",
                           "all nodata", "unsupported URI", "duplicate scene id", "band grid mismatch",
                           "no asset", "unreadable item"})  # fmt: skip
# Failures that are no reason to hold the scene back (another run's doing): never quarantined.
NOT_QUARANTINED = frozenset({"lease lost"})


@dataclass
class NightlyResult:
    run_id: str
    incoming: str
    out: str
    model: str
    listed: int = 0
    already_done: int = 0
    still_quarantined: int = 0
    in_progress: int = 0  # leased by another run that is segmenting them now
    results: list[SceneResult] = field(default_factory=list)
    summary_uri: str = ""
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return sum(r.status == "done" for r in self.results)

    @property
    def failed(self) -> list[SceneResult]:
        return [r for r in self.results if r.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "incoming": self.incoming, "out": self.out, "model": self.model,
            "listed": self.listed, "already_done": self.already_done, "still_quarantined": self.still_quarantined,
            "in_progress": self.in_progress,
            "processed": self.processed, "failed": len(self.failed), "seconds": round(self.seconds, 1),
            "scenes": [r.as_dict() | {"metadata": None} for r in self.results],
        }  # fmt: skip


def list_scenes(incoming: str) -> list[str]:
    """GeoTIFFs directly or anywhere under ``incoming``, sorted."""
    if storage.is_s3_uri(incoming):
        fs = storage.s3_filesystem()
        fs.invalidate_cache()
        keys = fs.find(incoming.removeprefix("s3://").rstrip("/"))
        return sorted(f"s3://{k}" for k in keys if k.lower().endswith(SCENE_SUFFIXES))
    from pathlib import Path

    return sorted(str(p) for p in Path(incoming).rglob("*") if p.suffix.lower() in SCENE_SUFFIXES)


def quarantine_uri(out: str, scene_id: str) -> str:
    return storage.join_uri(out, QUARANTINE_DIR, f"{scene_id}.json")


def _scene_id(source: str | StacScene) -> str:
    return source.scene_id if isinstance(source, StacScene) else scene_id_of(source)


def _input_version(source: str | StacScene) -> str:
    """What identifies the input as it is now: a file's checksum (S3 ETag), a STAC item's version."""
    if isinstance(source, StacScene):
        return source.version
    return input_checksum(storage.normalize_uri(source))


def _quarantine_name(source: str | StacScene, duplicate: bool) -> str:
    """A scene's quarantine record is named by its id; a duplicate's by its id and a hash of where
    it is (its id is the scene's listed first, and so would be that scene's record)."""
    if not duplicate:
        return _scene_id(source)
    where = source.where if isinstance(source, StacScene) else source
    return f"{_scene_id(source)}.duplicate-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def _quarantined(out: str, source: str | StacScene, model_label: str, request: str, duplicate: bool = False) -> bool:
    """True while the scene's quarantine record names the input as it is now (a file's checksum, a
    STAC item's version). A failure of the model's own making (``model error``, ``finish failed``, …)
    holds only for the same model and request: a new model version retries the scene."""
    try:
        record = json.loads(storage.read_bytes(quarantine_uri(out, _quarantine_name(source, duplicate))))
    except (FileNotFoundError, storage.StorageError, ValueError):  # no (readable) record: not quarantined
        return False
    if record.get("reason") not in INPUT_REASONS and (record.get("model"), record.get("request_hash")) != (
        model_label, request
    ):
        return False
    try:
        return record.get("checksum") == _input_version(source)
    except Exception:  # noqa: BLE001 - an input that cannot even be stat'ed stays quarantined
        return True


def lease_uri(out: str, scene_id: str, model_label: str, request: str) -> str:
    """Where the lease of one scene's segmentation (for one model and request) lives."""
    return storage.join_uri(out, LEASES_DIR, scene_id, model_label, f"{request}.json")


def run_nightly(
    cfg: GeoPixConfig,
    model: str,
    incoming: str | None = None,
    out: str | None = None,
    *,
    stac: str | StacSearch | None = None,
    overwrite: bool = False,
    log_to_mlflow: bool = True,
) -> NightlyResult:
    """List, skip what is done or quarantined (unless ``overwrite``), take a lease on each scene left,
    segment the leased ones in one pipeline, quarantine failures, write the run summary, log to MLflow.
    The scenes are the GeoTIFFs under ``incoming`` (default ``segment.incoming_uri``) or, given
    ``stac`` (a catalog, collection or ItemCollection file, or a :class:`StacSearch`), its items.

    Two runs at once (a scheduler's retry beside a running job) never segment one scene twice: a
    scene whose lease another run holds is reported as in progress there and left to it."""
    started = time.perf_counter()
    if stac is not None and incoming is not None:
        raise ValueError(f"give an incoming prefix ({incoming}) or a STAC source, not both")
    out = storage.normalize_uri(out or cfg.segment.out_uri).rstrip("/")
    sources: list[str | StacScene]
    if stac is None:
        incoming = storage.normalize_uri(incoming or cfg.segment.incoming_uri).rstrip("/")
        check_output_location(out, [incoming])  # outputs under the listed prefix would be listed as scenes
        sources = list(list_scenes(incoming))
    else:
        incoming = stac.describe() if isinstance(stac, StacSearch) else storage.normalize_uri(stac)
        sources = list(list_stac_scenes(stac, cfg.segment))
    ref = resolve_model(model)
    from geopix.model.configuration import saved_model_config

    window = cfg.segment.window_size or saved_model_config(ref.uri).image_size
    request = request_hash(cfg.segment, window)
    result = NightlyResult(ray_job.run_id(), incoming, out, ref.label)
    # (scene, its result) of the scenes not segmented this run: duplicates, in progress elsewhere
    todo: list[str | StacScene] = []
    seen: set[str] = set()
    skipped: list[tuple[str | StacScene, SceneResult]] = []
    for source in sources:
        result.listed += 1
        scene_id = _scene_id(source)
        version = source.version if isinstance(source, StacScene) else None
        if scene_id in seen:  # two files or items, one output prefix: the first listed wins, the rest fail
            if not overwrite and _quarantined(out, source, ref.label, request, duplicate=True):
                result.still_quarantined += 1
            else:
                skipped.append((source, _duplicate(source, incoming)))
            continue
        seen.add(scene_id)
        if not overwrite and is_published(scene_prefix(out, scene_id, ref, request), version):
            result.already_done += 1
        elif not overwrite and _quarantined(out, source, ref.label, request):
            result.still_quarantined += 1
        else:
            todo.append(source)
    leases: dict[str, Lease] = {}  # scene id → its lease
    leased: list[str | StacScene] = []
    outcomes: list[tuple[str | StacScene, SceneResult]] = []
    try:
        for source in todo:
            scene_id = _scene_id(source)
            version = source.version if isinstance(source, StacScene) else None
            lease = Lease(lease_uri(out, scene_id, ref.label, request), ttl_s=cfg.segment.lease_ttl_s)
            if not lease.acquire():
                result.in_progress += 1
                skipped.append((source, SceneResult(_where(source), scene_id, "in progress", reason="leased",
                                                    detail=f"being segmented by {lease.describe_holder()}")))  # fmt: skip
            elif not overwrite and is_published(scene_prefix(out, scene_id, ref, request), version):
                lease.release()  # another run finished it between our listing and our lease
                result.already_done += 1
            else:
                leases[scene_id] = lease
                leased.append(source)
        log.info("nightly %s: %d scenes listed, %d done before, %d quarantined, %d in progress elsewhere, "
                 "%d to process", result.run_id, result.listed, result.already_done, result.still_quarantined,
                 result.in_progress, len(leases))  # fmt: skip
        if leased:
            done = segment_scenes(cfg, ref, leased, out, overwrite=overwrite, leases=leases)
            outcomes = list(zip(leased, done, strict=True))
    finally:
        for lease in leases.values():
            lease.release()
    outcomes += skipped
    result.results = [scene for _, scene in outcomes]
    for source, scene in outcomes:
        if scene.status == "failed" and scene.reason not in NOT_QUARANTINED:
            _quarantine(out, source, scene, result.run_id, ref.label, request)
        elif scene.status == "done":  # fixed since an earlier night: its record goes
            remove_record(quarantine_uri(out, scene.scene_id), {"scene_id": scene.scene_id})
    result.seconds = time.perf_counter() - started
    result.summary_uri = storage.join_uri(out, RUNS_DIR, f"{result.run_id}.json")
    if log_to_mlflow:
        result.mlflow_run_id = log_segment_run(cfg, ref, result.results, result.seconds)
    summary = result.as_dict() | {"mlflow_run_id": result.mlflow_run_id}
    storage.write_bytes(result.summary_uri, json.dumps(summary, indent=1, default=str).encode())
    return result


def _where(source: str | StacScene) -> str:
    return source.where if isinstance(source, StacScene) else source


def _duplicate(source: str | StacScene, incoming: str) -> SceneResult:
    scene_id = _scene_id(source)
    detail = f"another file under {incoming} is also named {scene_id}"
    if isinstance(source, StacScene):
        detail = source.detail or f"another item of {incoming} has the id {scene_id}"
    return SceneResult(_where(source), scene_id, "failed", reason="duplicate scene id", detail=detail)


def _quarantine(
    out: str, source: str | StacScene, scene: SceneResult, run_id: str, model_label: str, request: str
) -> None:
    try:
        checksum = _input_version(source)
    except Exception:  # noqa: BLE001 - a missing input has no checksum
        checksum = None
    record = {
        "scene_uri": scene.scene_uri, "scene_id": scene.scene_id, "reason": scene.reason, "detail": scene.detail,
        "checksum": checksum, "model": model_label, "request_hash": request, "run_id": run_id,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    if isinstance(source, StacScene):
        record["stac_item"] = source.describe()  # checksum: the item's version
    duplicate = scene.reason == "duplicate scene id"
    storage.write_bytes(quarantine_uri(out, _quarantine_name(source, duplicate)), json.dumps(record, indent=1).encode())
