"""The ``geopix`` command line."""

from __future__ import annotations

import json
import shlex
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from geopix import __version__, ray_job
from geopix.config import (
    STACK_DIR_ENV,
    ConfigError,
    GeoPixConfig,
    default_stack_dir,
    list_presets,
    load_config,
    to_yaml,
)
from geopix.stack import Stack, StackError

app = typer.Typer(
    help="GeoPix: remote-sensing multimodal LLM with pixel masks, on Ray, S3 and MLflow.",
    no_args_is_help=True,
    add_completion=False,
)
stack_app = typer.Typer(
    help="The embedded local stack: Ray head, S3 server, MLflow server.", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect configs and presets.", no_args_is_help=True)
data_app = typer.Typer(help="Instruction data: generate, import, shard, preview.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
model_app = typer.Typer(help="Model directories: import the GeoPix authors' release.", no_args_is_help=True)
app.add_typer(model_app, name="model")

ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Preset name (tiny, full) or path to a YAML file.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help=f"Stack state directory [default: ${STACK_DIR_ENV} or ~/.geopix/stack]."
    ),
]


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(config: str, overrides: list[str] | None) -> GeoPixConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        fail(str(exc))


def _recorded_stack(state_dir: Path | None) -> Stack:
    try:
        return Stack.at(state_dir or default_stack_dir())
    except StackError as exc:
        fail(str(exc))


@app.command()
def version() -> None:
    """Print the GeoPix version."""
    typer.echo(__version__)


@stack_app.command("up")
def stack_up(
    config: ConfigOption = "tiny", overrides: SetOption = None, state_dir: StateDirOption = None
) -> None:
    """Start the stack (idempotent: running services are left alone, stopped ones are started)."""
    cfg = _load(config, overrides)
    if state_dir is not None:
        cfg.stack.state_dir = state_dir
    stack = Stack(cfg.stack, cfg.storage.buckets)
    try:
        statuses = stack.up(echo=typer.echo)
    except StackError as exc:
        fail(str(exc))
    typer.echo(f"GeoPix stack is up (state: {stack.state_dir})")
    for status in statuses:
        typer.echo(status.line())
    typer.echo(
        'Load its environment with:  eval "$(geopix stack env)"'
        if state_dir is None
        else f'Load its environment with:  eval "$(geopix stack env --state-dir {shlex.quote(str(state_dir))})"'
    )


@stack_app.command("down")
def stack_down(state_dir: StateDirOption = None) -> None:
    """Stop every process the stack started (S3 objects are saved first when persist_s3 is on)."""
    stack = _recorded_stack(state_dir)
    try:
        stack.down(echo=typer.echo)
    except StackError as exc:
        fail(str(exc))
    typer.echo(f"GeoPix stack is down (state kept in {stack.state_dir})")


@stack_app.command("status")
def stack_status(
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say what runs where; exits 1 when any service is not running and answering."""
    stack = _recorded_stack(state_dir)
    statuses = stack.status()
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "service": s.name,
                        "state": s.state,
                        "pid": s.pid,
                        "url": s.url,
                        "log": str(s.log),
                        "memory_mb": round(s.memory_mb, 1),
                    }
                    for s in statuses
                ],
                indent=2,
            )
        )
    else:
        typer.echo(f"GeoPix stack at {stack.state_dir}")
        for status in statuses:
            typer.echo(status.line())
        typer.echo(f"  buckets: {', '.join(stack.buckets.all())}")
    if any(s.state != "running" for s in statuses):
        raise typer.Exit(1)


class EnvFormat(str, Enum):
    shell = "shell"
    json = "json"
    dotenv = "dotenv"


@stack_app.command("env")
def stack_env(
    state_dir: StateDirOption = None,
    fmt: Annotated[
        EnvFormat, typer.Option("--format", help="shell exports, JSON or a .env file.")
    ] = EnvFormat.shell,
) -> None:
    """Print the environment a client needs: S3 endpoint and credentials, MLflow, Ray, GDAL /vsis3."""
    env = _recorded_stack(state_dir).client_env()
    if fmt is EnvFormat.json:
        typer.echo(json.dumps(env, indent=2))
        return
    prefix = "export " if fmt is EnvFormat.shell else ""
    for key, value in env.items():
        typer.echo(f"{prefix}{key}={shlex.quote(value)}")


@config_app.command("show")
def config_show(config: ConfigOption = "tiny", overrides: SetOption = None) -> None:
    """Print the resolved config (preset + overrides), secrets hidden."""
    cfg = _load(config, overrides)
    typer.echo(f"# config hash {cfg.config_hash()}")
    typer.echo(to_yaml(cfg), nl=False)


@config_app.command("presets")
def config_presets() -> None:
    """List the presets under configs/."""
    for name in list_presets():
        typer.echo(name)


@app.command()
def train(
    stage: Annotated[int, typer.Option(min=1, max=2, help="1 (pixel alignment) or 2 (instruction tuning).")],
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
    shards: Annotated[str | None, typer.Option(help="Shard set (default: data.shards_uri).")] = None,
    init_model: Annotated[
        str | None, typer.Option(help="Model directory to start from (stage 2: stage 1's model).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Run name: an existing one resumes from its last checkpoint.")
    ] = None,
    register: Annotated[bool, typer.Option(help="Register the model in MLflow (alias candidate).")] = True,
) -> None:
    """Train one stage with DeepSpeed ZeRO on Ray Train workers; prints where the model went."""

    from geopix import storage, tracking
    from geopix.data.shard_set import ShardError
    from geopix.train.run import TrainError, train_stage

    cfg = _load(config, overrides)
    ray_job.connect_ray()
    try:
        tracking.configure(cfg.tracking)
        result = train_stage(
            cfg, stage, shards_uri=shards, init_model_uri=init_model, run_name=name, register=register
        )
    except (TrainError, ShardError, storage.StorageError) as error:
        fail(str(error))
    typer.echo(
        f"stage {stage}: {result.steps} steps in {result.seconds:.0f} s, run {result.run_name}"
        + (f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else "")
    )
    typer.echo(f"model: {result.model_uri}")
    if result.model_version:
        typer.echo(f"registered: {cfg.train.registered_model} version {result.model_version} (alias candidate)")


@app.command("eval")
def eval_(
    model: Annotated[list[str], typer.Option(help="Saved model (local or s3://); repeat to compare models.")],
    label: Annotated[
        list[str] | None, typer.Option(help="A label per --model (default: model-1, model-2, ...).")
    ] = None,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
    shards: Annotated[str | None, typer.Option(help="Shard set (default: data.shards_uri).")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    name: Annotated[str | None, typer.Option(help="Output name under evaluate.out_uri.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N records.")] = None,
) -> None:
    """Evaluate model(s) on a split with a Ray Data actor pool: per-record and per-target Parquet,
    summary JSON, report (Markdown + PNGs), MLflow metrics; with two models, their comparison."""

    from geopix import storage, tracking
    from geopix.data.shard_set import ShardError
    from geopix.evaluate.job import EvalError, evaluate_models, headline

    labels = label or [f"model-{i + 1}" for i in range(len(model))]
    if len(labels) != len(model) or len(set(labels)) != len(labels):
        fail(f"give one distinct --label per --model ({len(model)} models, labels {labels})")
    cfg = _load(config, overrides)
    ray_job.connect_ray()
    try:
        tracking.configure(cfg.tracking)
        results, comparison = evaluate_models(
            cfg, dict(zip(labels, model, strict=True)), shards_uri=shards, split=split, name=name, limit=limit
        )
    except (EvalError, ShardError, storage.StorageError) as error:
        fail(str(error))
    for key, result in results.items():
        typer.echo(f"{key}: {headline(result.summary)}")
        typer.echo(f"  report: {result.out_uri}/report/report.md")
    if comparison:
        typer.echo(f"comparison: {comparison}/comparison.md")


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="A saved GeoPix model directory (local or s3://).")],
    image: Annotated[str, typer.Option(help="The image (PNG/JPEG/TIFF; local or s3://).")],
    instruction: Annotated[str, typer.Option(help='e.g. "[refer] the largest storage tank".')],
    out: Annotated[Path, typer.Option(help="Overlay PNG to write.")] = Path("chat_overlay.png"),
    answer_json: Annotated[Path | None, typer.Option(help="Also write the answer as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
) -> None:
    """Answer an instruction about one image: prints the answer and writes a PNG with its masks."""
    import torch

    from geopix.infer.chat import run_chat
    from geopix.storage import StorageError

    generator = torch.Generator(device=device).manual_seed(seed) if sample else None
    try:
        summary = run_chat(
            model, image, instruction, out, device=device, answer_json=answer_json,
            max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p,
            generator=generator,
        )
    except (FileNotFoundError, StorageError, ValueError) as error:
        fail(str(error))
    typer.echo(summary["answer"])
    stated = summary.get("stated_count")
    if stated is not None and stated != len(summary["masks"]):
        typer.echo(f"  (the answer says {stated}, and lists {len(summary['masks'])} masks)")
    for mask in summary["masks"]:
        typer.echo(
            f"  mask {mask['index']}: {mask['class']} (p={mask['class_probability']:.2f}), "
            f"{100 * mask['area_fraction']:.1f} % of the image"
        )
    typer.echo(f"wrote {summary['overlay']}")


@app.command()
def segment(
    model: Annotated[str, typer.Option(help="models:/<name>@<alias>, models:/<name>/<version>, or a model URI.")],
    scene: Annotated[list[str] | None, typer.Option(help="Scene GeoTIFF/COG (local or s3://); repeatable.")] = None,
    instruction: Annotated[
        list[str] | None, typer.Option(help='e.g. "[segment] all storage tanks" (repeatable; default: segment.instructions).')
    ] = None,
    out: Annotated[str | None, typer.Option(help="Output prefix (default: segment.out_uri).")] = None,
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
    scene_id: Annotated[
        list[str] | None, typer.Option(help="Name per --scene in output paths (default: its file name).")
    ] = None,
    keep_class: Annotated[
        list[str] | None, typer.Option(help="Keep only masks of these classes (repeatable; default: all).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo scenes already published for this model and request.")] = False,
    stac: Annotated[
        str | None, typer.Option(help="Segment the items of a STAC catalog, collection or ItemCollection (JSON, local or s3://).")
    ] = None,
    stac_api: Annotated[str | None, typer.Option(help="Segment the items a STAC API search returns (with --collection …).")] = None,
    collection: Annotated[list[str] | None, typer.Option(help="--stac-api: collection to search (repeatable).")] = None,
    bbox: Annotated[str | None, typer.Option(help="--stac-api: area W,S,E,N in degrees.")] = None,
    datetime: Annotated[str | None, typer.Option(help="--stac-api: interval, e.g. 2026-11-26/2026-11-27.")] = None,
    max_items: Annotated[int | None, typer.Option(help="--stac-api: at most this many items.")] = None,
) -> None:
    """Segment large scenes window by window (Ray Data actor pool) into COG masks and instance ids,
    GeoParquet polygons, a preview, run metadata and a STAC item per scene, published atomically
    (``_SUCCESS`` last).
    The scenes are files (--scene) or STAC items (--stac, or --stac-api with a search)."""

    from geopix import tracking
    from geopix.infer.segment import run_segment
    from geopix.infer.stac_scenes import StacError, list_stac_scenes, stac_source

    try:
        source = stac_source(stac, stac_api, collection, bbox, datetime, max_items)
    except ValueError as error:
        fail(str(error))
    if source is not None and (scene or scene_id):
        fail("give --scene (with --scene-id) or --stac/--stac-api, not both")
    if source is None and not scene:
        fail("give the scenes to segment: --scene FILE (repeatable), --stac CATALOG or --stac-api URL --collection …")
    cfg = _load(config, overrides)
    if instruction:
        cfg.segment.instructions = list(instruction)
    if keep_class:
        cfg.segment.keep_classes = list(keep_class)
    try:  # the STAC source is read before Ray is started: a bad catalog or search fails at once
        scenes = list_stac_scenes(source, cfg.segment) if source is not None else scene
    except StacError as error:
        fail(str(error))
    ray_job.connect_ray(log_to_driver=False)
    try:
        tracking.configure(cfg.tracking)
        results, _ = run_segment(cfg, model, scenes, out, scene_ids=scene_id, overwrite=overwrite)
    except ValueError as error:
        fail(str(error))
    for result in results:
        if result.status == "failed":
            typer.secho(f"{result.scene_id}: failed: {result.reason}: {result.detail}", fg=typer.colors.RED)
        else:
            typer.echo(f"{result.scene_id}: {result.status}, {result.windows} windows, "
                       f"{result.polygons} polygons, {result.instances} instances in {result.seconds:.1f} s "
                       f"→ {result.out_uri}")  # fmt: skip
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


@data_app.command("synth")
def data_synth(
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
    out: Annotated[
        str | None, typer.Option(help="Where to write the source (default: data.source_uri).")
    ] = None,
    scenes: Annotated[
        str | None, typer.Option(help="Also write data.scene_count large scenes (COG + ground truth) here.")
    ] = None,
) -> None:
    """Generate the synthetic remote-sensing source (chips, all five tasks; optionally large scenes)."""
    from geopix.data.synth import generate_source

    cfg = _load(config, overrides)
    out = out or cfg.data.source_uri
    stats = generate_source(cfg.data, out, seg_vocab=cfg.model.seg_vocabulary, scenes_uri=scenes)
    typer.echo(f"wrote {out} in {stats['seconds']:.0f} s ({stats['chips_per_s']:.1f} chips/s)")
    for key in ("images", "records", "records_per_task", "instances_per_class", "instances_per_bucket"):
        typer.echo(f"  {key}: {json.dumps(stats[key])}")
    for scene in stats["scenes"]:
        typer.echo(f"wrote scene {scene.get('uri', scenes)}: {scene.get('instances', '?')} instances")


@data_app.command("preview")
def data_preview(
    source: Annotated[str, typer.Option(help="A record source or shard split (local or s3://).")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("contact_sheet.png"),
    n: Annotated[int, typer.Option(help="How many records to show.")] = 12,
    seed: Annotated[int, typer.Option(help="Which records (sampled across tasks).")] = 0,
) -> None:
    """A contact sheet: chips with masks, boxes and descriptions overlaid."""
    from geopix.data.contact_sheet import contact_sheet

    typer.echo(f"wrote {contact_sheet(source, out, n=n, seed=seed)}")


@data_app.command("import-coco")
def data_import_coco(
    instances: Annotated[str, typer.Option(help="COCO instance JSON (local path or s3://).")],
    images: Annotated[str, typer.Option(help="Folder or S3 prefix holding the images by file_name.")],
    out: Annotated[str, typer.Option(help="Where to write the record source.")],
    refs: Annotated[
        str | None, typer.Option(help="Referring expressions JSON (refCOCO / RRSIS-D style).")
    ] = None,
    source: Annotated[str, typer.Option(help="Source name, prefixed to image ids.")] = "coco",
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Turn COCO instances (+ referring expressions) into a GeoPix record source (answers written
    with the config's seg tokens, model.seg_token_num × model.num_scales)."""
    from geopix.data.coco import CocoImportError, import_coco

    cfg = _load(config, overrides)
    try:
        stats = import_coco(instances, images, out, refs_uri=refs, source=source, seg_vocab=cfg.model.seg_vocabulary)
    except CocoImportError as exc:
        fail(str(exc))
    typer.echo(
        f"imported {stats.images} images → {sum(stats.records.values())} records {dict(stats.records)} at {out}"
    )
    for reason, count in sorted(stats.skipped.items()):
        typer.echo(f"  skipped {count}: {reason}")
        for example in stats.examples.get(reason, []):
            typer.echo(f"      {example}")
    if stats.boxes_from_masks:
        typer.echo(f"  {stats.boxes_from_masks} annotations had no bbox: their boxes were taken from their masks")


@data_app.command("import-geopixinstruct")
def data_import_geopixinstruct(
    annotations: Annotated[
        str, typer.Option(help="The downloaded GeoPixInstruct-Anno folder or S3 prefix (its Parquet files, or data/).")
    ],
    images: Annotated[
        list[str],
        typer.Option(help="Image root (SAMRS) for every subset, or SUBSET=ROOT per subset (repeatable)."),
    ],
    out: Annotated[str, typer.Option(help="Where to write the record source.")],
    subset: Annotated[
        list[str] | None, typer.Option(help="Import only this subset (repeatable): SIOR_T, FAST_T, SOTA_T.")
    ] = None,
    box_format: Annotated[
        str, typer.Option(help="How bbox reads: auto (agreeing with the masks), xyxy or xywh.")
    ] = "auto",
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
) -> None:
    """Turn the GeoPixInstruct annotations into a GeoPix record source: segment-every-category,
    refer and ground records; upstream train → train (+ data.val_fraction of its images → val),
    valid → test. Rejections are counted by reason and written to import_report.json."""
    from geopix.data.geopixinstruct import GeoPixInstructError, import_geopixinstruct

    cfg = _load(config, overrides)
    try:
        report = import_geopixinstruct(
            annotations, images, out, seg_vocab=cfg.model.seg_vocabulary, subsets=subset,
            box_format=box_format, val_fraction=cfg.data.val_fraction,
        )  # fmt: skip
    except GeoPixInstructError as exc:
        fail(str(exc))
    typer.echo(
        f"imported {sum(report.images.values())} images {dict(report.images)} → "
        f"{sum(report.records.values())} records {dict(report.records)} at {out}"
    )
    typer.echo(f"  boxes read as {report.box_format}: {report.box_format_evidence}")
    if report.images_found_by_name:
        typer.echo(f"  {report.images_found_by_name} images found by file name, not at <root>/<image_path>")
    if report.images_without_instances:
        typer.echo(f"  {report.images_without_instances} images without instances (no records)")
    if report.instances_without_description:
        typer.echo(f"  {report.instances_without_description} instances without a description (segment records only)")
    for reason, count in sorted(report.rejected.items()):
        typer.echo(f"  rejected {count}: {reason}")
        for example in report.examples.get(reason, []):
            typer.echo(f"      {example}")


@model_app.command("import-release")
def model_import_release(
    directory: Annotated[Path, typer.Argument(help="The downloaded release checkpoint (a local directory).")],
    out: Annotated[str, typer.Option(help="Where to write the GeoPix model directory (local or s3://).")],
    memory_len: Annotated[int, typer.Option(min=0, help="GeoPix's class memory slots (0: none).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a model GeoPix wrote there before.")] = False,
) -> None:
    """Convert the GeoPix authors' released checkpoint into a GeoPix model directory that every
    command loads; every release tensor is mapped or dropped with its reason (import_report.json)."""
    import tempfile

    from geopix import storage
    from geopix.model.release_import import ReleaseImportError, import_release
    from geopix.outputs import OutputRefused, prepare_output
    from geopix.train.loop import MODEL_KIND, MODEL_LAYOUT

    try:
        prepare_output(out, MODEL_KIND, MODEL_LAYOUT, replace=overwrite)
        with tempfile.TemporaryDirectory() as tmp:
            report = import_release(directory, Path(tmp) / "model", memory_len=memory_len)
            storage.upload_directory(Path(tmp) / "model", out)
    except (ReleaseImportError, OutputRefused, storage.StorageError) as exc:
        fail(str(exc))
    typer.echo(f"imported {report['release_tensors']} release tensors → {out}: {report['mapped']} mapped")
    for reason, count in report["dropped"].items():
        typer.echo(f"  dropped {count}: {reason}")
    if report["geopix_own_at_their_start"]:
        typer.echo(f"  GeoPix's own, at their start: {', '.join(report['geopix_own_at_their_start'])}")


@data_app.command("shard")
def data_shard(
    config: ConfigOption = "tiny",
    overrides: SetOption = None,
    source: Annotated[
        list[str] | None, typer.Option(help="Record source(s) (default: data.source_uri).")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Output prefix (default: data.shards_uri).")] = None,
    workers: Annotated[int, typer.Option(help="Ray Data tasks validating at once.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing shard set.")] = False,
) -> None:
    """Validate, split and shard record sources into Parquet shards with a manifest (Ray Data)."""

    from geopix import storage, tracking
    from geopix.data.shard import log_shard_run, shard_sources
    from geopix.data.shard_set import ShardError
    from geopix.data.source import SourceError

    cfg = _load(config, overrides)
    sources = source or [cfg.data.source_uri]
    out = out or cfg.data.shards_uri
    ray_job.connect_ray(log_to_driver=False)
    try:
        with tracking.flow_run("shard", cfg, run_name=f"shard-{ray_job.run_id()}"):
            result = shard_sources(
                sources,
                out,
                cfg.data,
                seg_vocab=cfg.model.seg_vocabulary,
                workers=workers,
                overwrite=overwrite,
            )
            log_shard_run(result)
    except (ShardError, SourceError, storage.StorageError) as exc:
        fail(str(exc))
    counts = result.counts
    typer.echo(
        f"read {counts['read']} = written {counts['written']} + rejected {counts['rejected']} "
        f"({counts['unreadable_files']} unreadable files) in {result.seconds:.1f} s → {out}"
    )
    for split, info in result.manifest["splits"].items():
        typer.echo(
            f"  {split}: {info['records']} records, {info['images']} images, {len(info['shards'])} shards"
        )
    for reject in result.rejects[:20]:
        typer.echo(f"  rejected {reject['record_id']}: {reject['reason']}")
    if len(result.rejects) > 20:
        typer.echo(f"  … {len(result.rejects) - 20} more in {out}/rejects/rejects.parquet")


if __name__ == "__main__":
    app()
