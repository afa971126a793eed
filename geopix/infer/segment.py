"""Batch segmentation of large scenes: the Ray Data pipeline behind `geopix segment` and the nightly job.

    scenes ─open/plan (driver)→ chunks ─read (tasks)→ windows ─WindowSegmenter (actor pool)→ answers
           ─stitch (driver, window by window into a local tiled GeoTIFF)→ COG + polygons ─publish→ S3

Several scenes share one pipeline (and one actor pool, each actor loading the model once). No scene
is ever held in memory: the readers hold one chunk, the actors one batch of windows, the driver one
window's answer at a time. Each scene is published on its own as soon as its last window is written:
staged beside an earlier run's outputs, then switched in with ``_SUCCESS`` last (geopix/outputs.py), under

    <out>/<scene id>/<model label>/<request hash>/{mask.tif, polygons.parquet, instances.tif,
                                                   instances.parquet, preview.png, run.json, item.json, _SUCCESS}

``mask.tif`` holds class and confidence; ``instances.tif`` one id per object, the same across window
seams (geopix/infer/instances.py); the Parquet files are their polygons; ``item.json`` describes
them all as a STAC item, listed in ``<out>/catalog.json`` (geopix/infer/stac_outputs.py).

A scene that fails (unreadable, no CRS, all nodata, a corrupt block …) is reported with its reason
and never stops the others; whatever it had written locally is dropped and nothing of it reaches S3.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geopix import storage
from geopix.config import GeoPixConfig, SegmentConfig
from geopix.infer.actor import ModelActor
from geopix.infer.instances import NO_INSTANCE, InstanceStitcher
from geopix.infer.scene_reader import (
    GDAL_CACHE_MB,
    SceneError,
    SceneInfo,
    Window,
    gdal_message,
    open_scene,
    plan_chunks,
    plan_windows,
    read_chunk,
    scene_id_of,
)
from geopix.infer.stac_outputs import ITEM_FILE, scene_item, write_catalog
from geopix.infer.stac_scenes import StacScene
from geopix.infer.stitch import MaskWriter, WindowAnswer, to_cog, window_answer
from geopix.leases import Lease
from geopix.outputs import finish_staged_switch, publish_staged, staging_id
from geopix.tracking import ModelRef

log = logging.getLogger(__name__)

MASK_FILE, POLYGONS_FILE, PREVIEW_FILE, RUN_FILE = "mask.tif", "polygons.parquet", "preview.png", "run.json"
INSTANCES_FILE, INSTANCE_POLYGONS_FILE = "instances.tif", "instances.parquet"
SCENE_OUTPUT_KIND = "scene segmentation"
SCENE_OUTPUT_LAYOUT = (MASK_FILE, POLYGONS_FILE, INSTANCES_FILE, INSTANCE_POLYGONS_FILE, PREVIEW_FILE, RUN_FILE, ITEM_FILE)


@dataclass
class SceneResult:
    scene_uri: str
    scene_id: str
    status: str  # "done", "skipped" (already published), "failed", "in progress" (leased by another run)
    out_uri: str | None = None
    reason: str | None = None  # failed: short key (missing, no CRS, all nodata, unreadable, …)
    detail: str | None = None
    windows: int = 0
    windows_nodata: int = 0  # windows with no valid pixel: not run through the model
    polygons: int = 0
    instances: int = 0  # objects in instances.tif, one id each across window seams
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_hash(cfg: SegmentConfig, window_size: int) -> str:
    """What shapes a scene's outputs besides the model and the scene: the instructions and the
    windowing/scaling parameters (so changing any of them never overwrites or skips older outputs)."""
    content = {
        "instructions": cfg.instructions, "window_size": window_size, "overlap": cfg.overlap, "bands": cfg.bands,
        "percentiles": cfg.percentiles, "fixed_range": cfg.fixed_range, "min_polygon_pixels": cfg.min_polygon_pixels,
        "decode": cfg.decode, "keep_classes": cfg.keep_classes, "forced_answer": cfg.forced_answer if cfg.decode == "teacher_forced" else None,
    }  # fmt: skip
    if cfg.instance_match_iou != SegmentConfig().instance_match_iou:  # keeps the hashes outputs had before it
        content["instance_match_iou"] = cfg.instance_match_iou
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def scene_prefix(out_uri: str, scene_id: str, model: ModelRef, request: str) -> str:
    return storage.join_uri(out_uri, scene_id, model.label, request)


def is_published(prefix: str, source_version: str | None = None) -> bool:
    """Whether a scene's outputs are published at ``prefix`` (and, given ``source_version``, made
    from that version of its STAC item: a re-published item is segmented again). A switch that a
    killed run left half done (its staged outputs complete, ``_SUCCESS`` not yet written) is finished here."""
    if not storage.is_finished(prefix) and not finish_staged_switch(prefix):
        return False
    if source_version is None:
        return True
    try:
        run = json.loads(storage.read_bytes(storage.join_uri(prefix, RUN_FILE)))
    except (storage.StorageError, OSError, ValueError):  # no readable run.json: redo rather than trust it
        return False
    return (run.get("source") or {}).get("version") == source_version


# ------------------------------------------------------------------------------ worker side
def read_windows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Data ``flat_map``: one chunk → one row per window (image + validity), or one error row."""
    scene_row = json.loads(row["scene"])
    scene = SceneInfo(**{**scene_row, "scaling": _scaling(scene_row["scaling"]),
                         "band_uris": tuple(scene_row.get("band_uris", ()))})  # fmt: skip
    windows = [Window(w[0], tuple(w[1]), tuple(w[2])) for w in json.loads(row["windows"])]
    key, size = row["key"], windows[0].read[2]
    try:
        return [
            {"key": key, "window": window.index, "image": image, "valid": valid, "reason": "", "error": ""}
            for window, image, valid in read_chunk(scene, windows)
        ]
    except Exception as exc:  # noqa: BLE001 - a corrupt block fails its scene, not the job
        col, row = min(w.read[0] for w in windows), min(w.read[1] for w in windows)
        error = f"reading the pixels at column {col}, row {row}: {type(exc).__name__}: {gdal_message(exc)}"
        # Same column types as a good row (Ray Data concatenates blocks), flagged by `error`.
        return [{"key": key, "window": -1, "image": np.zeros((size, size, 3), np.uint8),
                 "valid": np.zeros((size, size), bool), "reason": "unreadable", "error": error}]  # fmt: skip


def _scaling(data: dict[str, Any]):
    from geopix.infer.scene_reader import Scaling

    return Scaling(
        tuple(data["low"]) if data["low"] is not None else None,
        tuple(data["high"]) if data["high"] is not None else None,
    )


class WindowSegmenter(ModelActor):
    """A Ray Data actor: the model is loaded once; each batch of windows is answered for every
    instruction, and the answers become the window's [2, S, S] class/confidence raster and its
    instances (every seg run: the pixels its mask wins, its class and instruction)."""

    def __init__(self, model_uri: str, config: dict[str, Any], threads: int, device: str):
        super().__init__(model_uri, config, threads, device)
        self.cfg = self.config.segment
        names = self.model.class_names
        self.keep = None if self.cfg.keep_classes is None else {names.index(n) for n in self.cfg.keep_classes}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        errors, reasons, valid = list(batch["error"]), list(batch["reason"]), batch["valid"]
        size = valid.shape[1:]
        rasters = np.zeros((len(errors), 2, *size), np.uint8)
        instance_ids = np.zeros((len(errors), *size), np.uint16)
        instances = ["[]"] * len(errors)
        todo = [i for i, error in enumerate(errors) if not error and valid[i].any()]
        nodata = np.array([not error and i not in todo for i, error in enumerate(errors)])
        tallies = np.zeros((len(errors), 2), np.int64)  # answers stating a count, of them with other mask counts

        def keep(index: int, answer: WindowAnswer, counts: np.ndarray) -> None:
            rasters[index], instance_ids[index], tallies[index] = answer.raster, answer.instance_ids, counts
            instances[index] = json.dumps(answer.instances)

        try:
            if todo:
                answered, counts = self.answer([batch["image"][i] for i in todo], [valid[i] for i in todo])
                for i, answer, count in zip(todo, answered, counts, strict=True):
                    keep(i, answer, count)
        except Exception as batch_error:  # noqa: BLE001 - one failing window must not fail the whole batch
            # Answer the batch's windows one by one (a batch of one already was): only the windows the
            # model fails on (and their scenes) fail, each with the model's own error.
            for i in todo:
                error = batch_error
                if len(todo) > 1:
                    try:
                        answered, counts = self.answer([batch["image"][i]], [valid[i]])
                        keep(i, answered[0], counts[0])
                        continue
                    except Exception as exc:  # noqa: BLE001
                        error = exc
                errors[i] = f"the model failed on window {batch['window'][i]}: {type(error).__name__}: {error}"
                reasons[i] = "model error"
        return {"key": batch["key"], "window": batch["window"], "raster": rasters, "instance_ids": instance_ids,
                "instances": np.array(instances, dtype=object), "nodata_window": nodata,
                "stated_counts": tallies[:, 0], "count_mismatches": tallies[:, 1],
                "reason": np.array(reasons, dtype=object), "error": np.array(errors, dtype=object)}  # fmt: skip

    def segment(self, images: list[np.ndarray], valid: list[np.ndarray]) -> list[WindowAnswer]:
        """[S, S, 3] uint8 windows → their answers (every instruction's masks merged)."""
        return self.answer(images, valid)[0]

    def answer(
        self, images: list[np.ndarray], valid: list[np.ndarray]
    ) -> tuple[list[WindowAnswer], np.ndarray]:
        """(answers as :meth:`segment`, [N, 2] per window: answers that state how many instances they
        list ("Sure, there are 3 …:", geopix/answer_form.py), and of those, answers whose number of
        masks differs from what they state — before ``keep_classes`` drops any)."""
        import torch.nn.functional as F

        size = images[0].shape[:2]
        pixels = self.processor(images).to(device=self.device, dtype=self.dtype)
        # per window: (mask, probabilities, class id, instruction index) of each seg run kept
        per_window: list[list[tuple[np.ndarray, np.ndarray, int, int]]] = [[] for _ in images]
        tallies = np.zeros((len(images), 2), np.int64)
        for number, instruction in enumerate(self.cfg.instructions):
            if self.cfg.decode == "teacher_forced":
                answers = self.model.answer_forced(
                    pixels, instruction, self.cfg.forced_answer, self.tokenizer
                )
            else:
                answers = self.model.chat(
                    pixels,
                    [instruction] * len(images),
                    self.tokenizer,
                    max_new_tokens=self.cfg.max_new_tokens,
                )
            for k, answer in enumerate(answers):
                if answer.stated_count is not None:
                    tallies[k] += (1, answer.stated_count != len(answer.mask_probs))
                if not len(answer.mask_probs):
                    continue
                probs = answer.mask_probs.float()
                if tuple(probs.shape[-2:]) != size:  # window size ≠ model input size
                    probs = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
                classes = answer.class_probs.argmax(-1).tolist()
                for mask_probs, class_id in zip(probs.numpy(), classes, strict=True):
                    if self.keep is None or class_id in self.keep:
                        per_window[k].append((mask_probs > 0.5, mask_probs, class_id, number))
        answered = []
        for found, ok in zip(per_window, valid, strict=True):
            masks = np.stack([f[0] for f in found]) if found else np.zeros((0, *size), bool)
            probs = np.stack([f[1] for f in found]) if found else np.zeros((0, *size), np.float32)
            answered.append(window_answer(masks, probs, [f[2] for f in found], [f[3] for f in found], ok))
        return answered, tallies


# ------------------------------------------------------------------------------ driver side
@dataclass
class _Open:
    """A scene being written: its writer, window bookkeeping and timings."""

    scene: SceneInfo
    prefix: str
    windows: dict[int, Window]
    writer: MaskWriter
    instances: InstanceStitcher
    workdir: Path
    started: float
    remaining: int
    source: dict[str, Any] | None = None  # a STAC scene's item (run.json's "source")
    nodata_windows: int = 0
    stated_counts: int = 0  # answers that said how many instances they list
    count_mismatches: int = 0  # … and drew another number of masks


def segment_scenes(
    cfg: GeoPixConfig,
    model: str | ModelRef,
    scenes: list[str | StacScene],
    out_uri: str | None = None,
    *,
    scene_ids: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    leases: dict[str, Lease] | None = None,
) -> list[SceneResult]:
    """Segment ``scenes`` (scene file URIs, or STAC items as :class:`StacScene`) with ``model`` (a
    model URI, ``models:/name@alias`` or a ModelRef) and publish each under ``out_uri`` (default
    ``segment.out_uri``); one result per scene, in order. ``scene_ids`` name the files in output
    paths (default: each file name without extension; a STAC scene is named by its item id). A STAC
    scene published from another version of its item is segmented again.
    ``leases`` (scene id → its held lease, from the nightly job): a scene whose lease another run
    took over is not published (it fails as ``lease lost``)."""
    import rasterio
    import ray
    import ray.data
    from tqdm.auto import tqdm

    from geopix.model.configuration import saved_model_config
    from geopix.tracking import resolve_model

    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    model_cfg = saved_model_config(ref.uri)
    class_names = list(model_cfg.class_names)
    seg = cfg.segment
    unknown = sorted(set(seg.keep_classes or []) - set(class_names))
    if unknown:
        raise ValueError(f"segment.keep_classes {unknown} are not classes of {ref.uri} ({class_names})")
    ids = scene_ids or [None] * len(scenes)
    if len(ids) != len(scenes) or len({i for i in ids if i}) != len([i for i in ids if i]):
        raise ValueError(f"give one distinct scene id per scene ({len(scenes)} scenes, ids {scene_ids})")
    window_size = seg.window_size or model_cfg.image_size
    request = request_hash(seg, window_size)
    out_uri = storage.normalize_uri(out_uri or seg.out_uri).rstrip("/")
    results: dict[str, SceneResult] = {}
    opened: dict[str, _Open] = {}
    tasks: list[dict[str, Any]] = []
    workroot = Path(tempfile.mkdtemp(prefix="geopix-segment-"))
    keys = [str(i) for i in range(len(scenes))]  # a scene's key in the pipeline's rows and in results
    for key, source, scene_id in zip(keys, scenes, ids, strict=True):
        started = time.perf_counter()
        stac = source if isinstance(source, StacScene) else None
        try:
            scene = stac.open(seg) if stac else open_scene(source, seg, scene_id)
        except SceneError as exc:
            scene_id = stac.scene_id if stac else scene_id or scene_id_of(source)
            failed_uri = exc.uri if stac else source  # a STAC scene: the file (or item) at fault
            results[key] = SceneResult(failed_uri, scene_id, "failed", reason=exc.reason, detail=exc.detail)
            log.warning("scene %s failed: %s", scene_id, exc)
            continue
        prefix = scene_prefix(out_uri, scene.scene_id, ref, request)
        if not overwrite and is_published(prefix, stac.version if stac else None):
            results[key] = SceneResult(scene.uri if stac else source, scene.scene_id, "skipped", out_uri=prefix)
            continue
        windows = plan_windows(scene.width, scene.height, window_size, seg.overlap)
        workdir = workroot / f"{len(opened):04d}-{scene.scene_id}"
        opened[key] = _Open(
            scene, prefix, {w.index: w for w in windows}, MaskWriter(scene, workdir / MASK_FILE, class_names),
            InstanceStitcher(scene, windows, workdir / "instances-provisional.tif", seg.instance_match_iou),
            workdir, started, remaining=len(windows), source=stac.describe() if stac else None,
        )  # fmt: skip
        scene_row = json.dumps(scene.as_dict())
        for chunk in plan_chunks(windows, seg.chunk_size):
            tasks.append(
                {
                    "key": key,
                    "scene": scene_row,
                    "windows": json.dumps([(w.index, w.read, w.keep) for w in chunk]),
                }
            )

    if tasks:
        if not ray.is_initialized():
            ray.init()
        use_gpu = cfg.train.use_gpu
        answered = (
            ray.data.from_items(tasks, override_num_blocks=len(tasks))
            .flat_map(read_windows)
            .map_batches(
                WindowSegmenter,
                fn_constructor_kwargs={
                    "model_uri": ref.uri, "config": cfg.for_workers(),
                    "threads": seg.threads_per_actor, "device": "cuda" if use_gpu else "cpu",
                },
                batch_size=seg.batch_size,
                compute=ray.data.ActorPoolStrategy(size=seg.concurrency),
                num_cpus=seg.threads_per_actor,
                num_gpus=1 if use_gpu else 0,
            )
        )  # fmt: skip
        total = sum(o.remaining for o in opened.values())
        bar = tqdm(total=total, desc=f"segment {len(opened)} scene(s)", unit="window", disable=not progress)
        # GDAL's block cache (default 5 % of RAM) would keep every written block of a scene's mask
        # until close (555 MB for a 16384² scene, 26 MB capped); COG and polygons run under it too.
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            for row in answered.iter_rows():
                state = opened.get(row["key"])
                if state is None:  # its scene already failed
                    continue
                if row["error"]:
                    results[row["key"]] = _fail(state, row["reason"] or "unreadable", row["error"])
                    bar.update(state.remaining)
                    del opened[row["key"]]
                    continue
                window = state.windows[int(row["window"])]
                if row["nodata_window"]:
                    state.nodata_windows += 1
                    state.instances.add_empty(window)
                else:
                    raster = np.asarray(row["raster"])
                    state.writer.write(window, raster)
                    state.instances.add(
                        window, np.asarray(row["instance_ids"]), json.loads(row["instances"]), raster[1]
                    )
                    state.stated_counts += int(row["stated_counts"])
                    state.count_mismatches += int(row["count_mismatches"])
                state.remaining -= 1
                bar.update(1)
                if state.remaining == 0:
                    lease = (leases or {}).get(state.scene.scene_id)
                    if lease is not None and lease.lost:
                        results[row["key"]] = _fail(state, "lease lost", "another run took this scene's lease over; "
                                                    "its outputs were not published")  # fmt: skip
                    else:
                        results[row["key"]] = _finish(state, ref, cfg, class_names, request)
                    del opened[row["key"]]
        bar.close()
    for key, state in opened.items():  # never completed: the stream ended early
        results[key] = _fail(state, "incomplete", f"{state.remaining} windows never came back")
    shutil.rmtree(workroot, ignore_errors=True)
    if any(r.status == "done" for r in results.values()):
        try:
            write_catalog(out_uri)
        except Exception as exc:  # noqa: BLE001 - the scenes are published; only their listing is late
            log.warning("the STAC catalog of %s was not rewritten: %s: %s", out_uri, type(exc).__name__, exc)
    return [results[key] for key in keys]


def _fail(state: _Open, reason: str, detail: str) -> SceneResult:
    state.writer.close()
    state.instances.close()
    shutil.rmtree(state.workdir, ignore_errors=True)
    log.warning("scene %s failed: %s: %s", state.scene.uri, reason, detail)
    return SceneResult(
        state.scene.uri, state.scene.scene_id, "failed", reason=reason, detail=detail[:500],
        windows=len(state.windows), seconds=round(time.perf_counter() - state.started, 2),
    )  # fmt: skip


def _finish(
    state: _Open, ref: ModelRef, cfg: GeoPixConfig, class_names: list[str], request: str
) -> SceneResult:
    """COGs, polygons, preview and run metadata; then publish: objects first, ``_SUCCESS`` last."""
    state.writer.close()  # the instance layer's file is closed by its finish
    scene, work = state.scene, state.workdir
    timings = {"windows_s": round(time.perf_counter() - state.started, 2)}
    try:
        metadata = _outputs(state, ref, cfg, class_names, request, timings)  # under segment_scenes' GDAL cap
    except Exception as exc:  # noqa: BLE001 - a scene that cannot be finished fails alone
        return _fail(state, "finish failed", f"{type(exc).__name__}: {exc}")
    shutil.rmtree(work, ignore_errors=True)
    seconds = round(time.perf_counter() - state.started, 2)
    log.info("scene %s: %d windows, %d polygons in %.1f s → %s", scene.scene_id, len(state.windows),
             metadata["polygons"]["polygons"], seconds, state.prefix)  # fmt: skip
    return SceneResult(
        scene.uri, scene.scene_id, "done", out_uri=state.prefix, windows=len(state.windows),
        windows_nodata=state.nodata_windows, polygons=metadata["polygons"]["polygons"],
        instances=metadata["instances"]["instances"], seconds=seconds,
        metadata=metadata,
    )  # fmt: skip


def _outputs(
    state: _Open, ref: ModelRef, cfg: GeoPixConfig, class_names: list[str], request: str, timings: dict
) -> dict[str, Any]:
    """Write the COG, polygons, preview and run.json of a finished scene and publish them."""
    from affine import Affine
    from rasterio.transform import array_bounds

    from geopix.infer.scene_overlay import scene_preview
    from geopix.infer.vectorize import trace_polygons

    scene, work, seg = state.scene, state.workdir, cfg.segment
    t = time.perf_counter()
    cog = work / "cog" / MASK_FILE
    cog.parent.mkdir()
    validation = to_cog(work / MASK_FILE, cog)
    if not validation["valid"]:
        raise RuntimeError(f"the written COG does not validate: {validation['errors']}")
    timings["cog_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    stats = trace_polygons(cog, work / POLYGONS_FILE, class_names, seg.polygon_block, seg.min_polygon_pixels)
    timings["polygons_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    instance_stats = state.instances.finish(
        work / "instances-raw.tif",
        work / INSTANCE_POLYGONS_FILE,
        class_names,
        seg.instructions,
        seg.polygon_block,
    )
    instances_cog = work / "cog" / INSTANCES_FILE
    instances_validation = to_cog(work / "instances-raw.tif", instances_cog, nodata=NO_INSTANCE)
    if not instances_validation["valid"]:
        raise RuntimeError(f"the written instance COG does not validate: {instances_validation['errors']}")
    timings["instances_s"] = round(time.perf_counter() - t, 2)
    scene_preview(scene, cog, work / PREVIEW_FILE, class_names)
    metadata = {
        "scene": scene.as_dict() | {"scaling": asdict(scene.scaling)},
        "source": state.source,  # the STAC item the scene came from (its version decides "done"); None: a file
        "model": asdict(ref),
        "instructions": seg.instructions,
        "request_hash": request,
        "params": seg.model_dump(mode="json"),
        "windows": len(state.windows),
        "windows_nodata": state.nodata_windows,
        # Answers (one per window and instruction) that state a count, and those whose masks
        # number otherwise: the model said "3 storage tanks" and drew 2.
        "answers": {"stating_a_count": state.stated_counts, "masks_differ_from_stated_count": state.count_mismatches},
        "polygons": asdict(stats),
        # Seg runs of the windows, joined across seams into instances (geopix/infer/instances.py).
        "instances": asdict(instance_stats)
        | {"match_rule": f"same class and IoU > {seg.instance_match_iou} in the windows' overlap"},
        "cog": validation,
        "instances_cog": instances_validation,
        "class_encoding": {
            "0": "background",
            **{str(i + 1): n for i, n in enumerate(class_names)},
            "255": "nodata",
        },
        "outputs": {
            "mask": MASK_FILE,
            "polygons": POLYGONS_FILE,
            "instances": INSTANCES_FILE,
            "instance_polygons": INSTANCE_POLYGONS_FILE,
            "preview": PREVIEW_FILE,
        },
        "timings": timings,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (work / RUN_FILE).write_text(json.dumps(metadata, indent=1, default=str))
    item = scene_item(
        scene_id=scene.scene_id, label=ref.label, request=request, crs_wkt=scene.crs,
        bounds=array_bounds(scene.height, scene.width, Affine(*scene.transform)), model=asdict(ref),
        instructions=seg.instructions, finished_at=metadata["finished_at"],
        outputs=metadata["outputs"] | {"run": RUN_FILE},
        acquired_at=(state.source or {}).get("datetime"), source_href=(state.source or {}).get("item_href"),
    )  # fmt: skip
    (work / ITEM_FILE).write_text(json.dumps(item, indent=1))
    publish(state.prefix, {MASK_FILE: cog, POLYGONS_FILE: work / POLYGONS_FILE, INSTANCES_FILE: instances_cog,
                           INSTANCE_POLYGONS_FILE: work / INSTANCE_POLYGONS_FILE,
                           PREVIEW_FILE: work / PREVIEW_FILE, RUN_FILE: work / RUN_FILE,
                           ITEM_FILE: work / ITEM_FILE})  # fmt: skip
    return metadata


def publish(prefix: str, files: dict[str, Path]) -> None:
    """Publish a scene's outputs at ``prefix``: staged beside whatever an earlier run published
    there, then switched in with ``_SUCCESS`` last (geopix/outputs.py), so a run killed at any point
    never loses good outputs and a reader that checks the marker never sees a mix."""
    publish_staged(prefix, files, staging_id(), SCENE_OUTPUT_KIND, SCENE_OUTPUT_LAYOUT)


def log_segment_run(cfg: GeoPixConfig, ref: ModelRef, results: list[SceneResult], seconds: float) -> str:
    """One MLflow run (a child of the active flow run, if any) for a batch of scenes: counts, timings,
    each scene's preview and run metadata as artifacts, and the per-scene table."""
    import mlflow

    from geopix import tracking

    done = [r for r in results if r.status == "done"]
    with tracking.step_run(
        "segment", params={"model": ref.uri, "model_label": ref.label, "scenes": len(results),
                           "instructions": " | ".join(cfg.segment.instructions)}, config=cfg,
    ) as run:  # fmt: skip
        windows = sum(r.windows - r.windows_nodata for r in done)
        mlflow.log_metrics({
            "scenes_done": len(done), "scenes_failed": sum(r.status == "failed" for r in results),
            "scenes_skipped": sum(r.status == "skipped" for r in results),
            "scenes_in_progress_elsewhere": sum(r.status == "in progress" for r in results), "windows": windows,
            "polygons": sum(r.polygons for r in done), "instances": sum(r.instances for r in done), "seconds": seconds,
            "windows_per_s": windows / seconds if seconds else 0.0,
        })  # fmt: skip
        mlflow.log_dict(
            {"scenes": [r.as_dict() | {"metadata": None} for r in results]}, "segment/scenes.json"
        )
        for r in done:
            with tempfile.TemporaryDirectory() as tmp:
                for name in (PREVIEW_FILE, RUN_FILE):
                    local = Path(tmp, f"{r.scene_id}-{name}")
                    local.write_bytes(storage.read_bytes(storage.join_uri(r.out_uri, name)))
                    mlflow.log_artifact(str(local), "segment")
        return run.info.run_id


def run_segment(
    cfg: GeoPixConfig,
    model: str,
    scenes: list[str | StacScene],
    out_uri: str | None = None,
    *,
    scene_ids: list[str] | None = None,
    overwrite: bool = False,
    log_to_mlflow: bool = True,
) -> tuple[list[SceneResult], str | None]:
    """`geopix segment` as a Python entry for flows: segment, publish, log one MLflow run."""
    from geopix.tracking import resolve_model

    started = time.perf_counter()
    ref = resolve_model(model)
    results = segment_scenes(cfg, ref, scenes, out_uri, scene_ids=scene_ids, overwrite=overwrite)
    run_id = log_segment_run(cfg, ref, results, time.perf_counter() - started) if log_to_mlflow else None
    return results, run_id
