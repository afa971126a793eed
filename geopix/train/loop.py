"""What every Ray Train worker runs: model → DeepSpeed engine → steps over its data share.

One optimizer step = ``grad_accum_steps`` micro-batches of ``batch_size`` samples on every worker.
Every ``checkpoint_every`` steps all ranks write DeepSpeed's sharded checkpoint (module and
scheduler from rank 0, each rank's optimizer partition) with the step, every rank's data position
and the config hash as client state, and hand it to Ray Train, which stores it under the run's
name. A restarted worker group (``FailureConfig``) or a rerun with the same name loads the latest
one and goes on from there. At the end rank 0 writes the consolidated model directory
(safetensors, tokenizer, processor) to ``train.models_uri/<run name>``, published with ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from geopix.config import GeoPixConfig, StageConfig, TrainConfig
from geopix.data import schema
from geopix.data.batches import LoaderStats, iter_batches, to_device
from geopix.train import checkpoints
from geopix.train.feature_cache import VisionFeatureCache
from geopix.train.rank_reader import Position, RankReader

log = logging.getLogger("geopix.train")
LOSS_KEYS = (
    "text", "mask_bce", "mask_dice", "mask_prior", "class", "image_class_map", "image_presence",
    "reader_presence", "reader_count", "reader_image_presence", "reader_image_count", "mask_colour_word",
)  # fmt: skip
# The text loss per record task (mean over a task's samples of their mean answer-token CE): logged
# as loss/text_<task>, one curve per task. Every rank reduces every key, so the set is fixed.
TASK_TEXT_KEYS = tuple(f"text_{task}" for task in schema.TASKS)


def deepspeed_config(train: TrainConfig, stage: StageConfig, bf16: bool) -> dict[str, Any]:
    """DeepSpeed's config: ZeRO stage, precision, accumulation, clipping, warm-up + cosine schedule."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        # bf16 casts parameters only: buffers (BatchNorm statistics, RoPE frequencies, the memory's
        # EMA part) stay fp32, and our BatchNorm layers compute in fp32 (model/layers.py).
        "bf16": {"enabled": bf16},
        # Our optimizer is torch's AdamW (DeepSpeed's fused/CPU Adam would JIT-compile first).
        "zero_allow_untested_optimizer": True,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": stage.max_steps,
                "warmup_num_steps": max(stage.warmup_steps, 1),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": stage.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,  # progress lines are ours
    }


def batch_stream(
    reader: RankReader, start: Position, tokenizer: Any, cfg: GeoPixConfig, model: Any
) -> Iterator[tuple[dict[str, Any], Position, LoaderStats]]:
    """(batch, position after it, that epoch's loader stats), epoch after epoch from ``start``, in
    the model's own input size, seg tokens, image format and chat template."""
    epoch, skip = start.epoch, start.rows
    while True:
        consumed = [skip]

        def records(epoch=epoch, skip=skip, consumed=consumed):
            for rows, record in reader.epoch_records(epoch, skip):
                consumed[0] = rows
                yield record

        batches = iter_batches(
            records(),
            tokenizer,
            image_size=model.config.image_size,  # the model's own: a saved model may differ from the config
            batch_size=cfg.train.batch_size,
            max_length=cfg.train.max_length,
            augment=cfg.train.augment,
            turn_per_image=cfg.train.augment_per_image,
            seed=cfg.train.seed,
            epoch=epoch,
            seg_vocab=model.config.seg_vocabulary,
            image_format=model.image_format,
            chat_template=model.config.chat_template,
        )
        produced = 0
        for batch in batches:
            produced += 1
            yield batch, Position(epoch, consumed[0]), batches.stats
        if produced == 0 and skip == 0:  # every row of a whole epoch dropped: never loop forever
            raise ValueError(
                f"no usable training samples in a whole epoch: {batches.stats.rows} rows read, "
                f"dropped {dict(batches.stats.dropped)}"
            )
        epoch, skip = epoch + 1, 0


def sync_buffers(module: torch.nn.Module) -> None:
    """Average the trainable part's floating buffers (neck BatchNorm statistics, the memory's EMA)
    over ranks, so every rank holds the same model. DeepSpeed syncs parameters, not buffers."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    buffers = [
        b for name, b in module.named_buffers() if b.is_floating_point() and not name.startswith("vision.")
    ]
    if buffers:
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sums over ranks; every rank must pass the same keys (a collective of one fixed-size tensor)."""
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def gather_positions(position: Position) -> list[dict[str, int]]:
    import torch.distributed as dist

    mine = {"epoch": position.epoch, "rows": position.rows}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def log_overlays(writer: Any, model: Any, batch: dict[str, Any], count: int, dtype: torch.dtype, name: str) -> None:
    """The training-sample picture; a picture that cannot be drawn is a warning, not a failed run."""
    from geopix.train.figures import training_overlays

    try:
        with tempfile.TemporaryDirectory() as pictures:
            writer.log_artifact(training_overlays(model, batch, count, dtype, Path(pictures) / name))
    except Exception:  # e.g. a batch without targets (stage 2 captions): no picture, training goes on
        log.warning("no %s: drawing it failed", name, exc_info=True)


MODEL_KIND = "model"
MODEL_LAYOUT = ("model.safetensors", "geopix_config.json", "tokenizer/*", "processor/*", "import_report.json")


def publish_model(model: Any, tokenizer: Any, uri: str) -> str:
    """The consolidated model directory, written locally, then uploaded with ``_SUCCESS`` last, to a
    prefix that is empty or holds this run's earlier publication (geopix/outputs.py)."""
    from geopix.outputs import prepare_output
    from geopix.storage import upload_directory

    prepare_output(uri, MODEL_KIND, MODEL_LAYOUT, replace=True)
    with tempfile.TemporaryDirectory() as directory:
        return upload_directory(model.save(Path(directory) / "model", tokenizer), uri)


def wait_for_registration(run_uri: str, checkpoint_name: str, rank: int, timeout_s: float = 60.0) -> None:
    """Hold every rank until Ray Train has registered ``checkpoint_name`` (its controller notices
    reports on a ~2 s health-check cycle). Without this, a failure in that window would restart
    from the checkpoint before, redoing up to two intervals; with it, at most one."""
    import json

    import torch.distributed as dist

    from geopix.storage import StorageError, join_uri, read_bytes

    if rank == 0:
        snapshot = join_uri(run_uri, "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if checkpoint_name in json.dumps(json.loads(read_bytes(snapshot))):
                    break
            except (StorageError, OSError, ValueError):  # absent, or being rewritten by Ray (ETag moved)
                pass
            time.sleep(0.25)
        else:
            log.warning("checkpoint %s not registered by Ray Train after %.0f s; going on", checkpoint_name,
                        timeout_s)
    if dist.is_initialized():
        dist.barrier()


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; ``loop`` is built by :func:`geopix.train.run.train_stage`.

    A worker's error is also written to the stage's MLflow run (tag ``geopix.worker_error.rank<N>``)
    before Ray Train sees it: a failure that a restart then hides stays on record.
    """
    try:
        _train(loop)
    except Exception as error:
        _record_error(loop, error)
        raise


def _record_error(loop: dict[str, Any], error: BaseException) -> None:
    import traceback

    import ray.train

    from geopix.tracking import MetricsWriter

    if not loop.get("mlflow_run_id"):
        return
    rank = ray.train.get_context().get_world_rank()
    text = "".join(traceback.format_exception(error))[-4000:]
    try:
        MetricsWriter(loop["mlflow_run_id"]).set_tag(f"geopix.worker_error.rank{rank}.{int(time.time())}", text)
    except Exception:  # recording must never mask the error itself
        log.exception("could not record the worker error in MLflow")


def _train(loop: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    from geopix.model import GeoPixModel, build_model
    from geopix.model.class_reader import class_word_ids
    from geopix.storage import local_copy
    from geopix.tracking import MetricsWriter
    from geopix.train.stages import set_stage
    from geopix.weights import local_weights

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = GeoPixConfig.model_validate(loop["config"])
    train, stage_no = cfg.train, loop["stage"]
    stage = train.stage(stage_no)
    torch.set_num_threads(train.threads_per_worker)
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    bf16 = train.precision == "bf16"

    tokenizer_dir = local_copy(loop["tokenizer_uri"])
    if (tokenizer_dir / "tokenizer").is_dir():  # a GeoPix model directory
        tokenizer_dir = tokenizer_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    if loop.get("init_model_uri"):
        model = GeoPixModel.load(local_copy(loop["init_model_uri"]))
    else:
        model = build_model(local_weights(cfg.model), tokenizer)
    model.class_names = list(loop["class_names"])
    model.config.class_word_ids = class_word_ids(model.class_names, tokenizer)
    set_stage(model, stage_no, cfg.model)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=train.weight_decay)
    if not train.use_gpu:
        # On CPU DeepSpeed builds its shared-memory all-reduce op when it first starts (a C++ compile,
        # ~40 s per environment). Only its inference all-reduce uses that op, never ZeRO training,
        # whose collectives go through gloo: it is marked unavailable, so nothing is compiled.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train, stage, bf16)
    )
    checkpoints.install(engine)  # resuming never unpickles code from storage (train/checkpoints.py)
    dtype = torch.bfloat16 if bf16 else torch.float32

    step, position = 0, Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # Each rank downloads into its own directory: as_directory() shares one download per node,
        # and a rank once read a file the other was still writing (EOFError in torch.load).
        directory = tempfile.mkdtemp(prefix=f"geopix-resume-rank{rank}-")
        try:
            _, client = engine.load_checkpoint(checkpoint.to_directory(directory), load_module_strict=False)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if client["config_hash"] != loop["config_hash"]:
            raise RuntimeError(
                f"run {loop['run_name']}: its checkpoints were written with config {client['config_hash']}, "
                f"this run has {loop['config_hash']}; use another run name"
            )
        step, position = client["step"], Position(**client["positions"][rank])
        if rank == 0:
            log.info("stage %d: resumed at step %d from the latest checkpoint", stage_no, step)

    reader = RankReader(
        loop["shards_uri"],
        "train",
        rank=rank,
        world=world,
        seed=cfg.train.seed,
        tasks=stage.tasks,
        task_weights=stage.task_weights,
    )
    stream = batch_stream(reader, position, tokenizer, cfg, model)
    writer = MetricsWriter(loop["mlflow_run_id"]) if rank == 0 and loop.get("mlflow_run_id") else None
    if writer is not None and checkpoint is not None:
        writer.log({"resumed_at_step": step}, step)  # the checkpoint's step; training goes on after it
    sums = dict.fromkeys((*LOSS_KEYS, "total", *TASK_TEXT_KEYS), 0.0)
    counts = dict.fromkeys(sums, 0)
    window_samples = window_tokens = 0
    window_start = attempt_start = time.perf_counter()
    first_step = step
    overlay_batch = None
    cache = VisionFeatureCache.for_training(engine.module.vision, train.vision_feature_cache_mb)
    engine.train()
    while step < stage.max_steps:
        batch, position, stats = next(stream)
        if overlay_batch is None and rank == 0 and len(batch.get("class_ids", ())) > 0:
            overlay_batch = batch
        inputs = to_device(batch, device, dtype)
        if cache is not None:
            inputs["vision_features"] = cache(inputs["pixel_values"])
        out = engine(**inputs)
        # Every trainable parameter must get a gradient on every rank, or ZeRO's gradient buckets
        # differ between ranks and the collective fails: a batch without targets leaves the mask
        # path unused. A zero-weighted term touches them all (ZeRO treats a missing gradient as zero
        # anyway, so the update is the same).
        engine.backward(out.loss + 0.0 * sum(p.sum() for p in trainable))
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        for key, value in (*out.losses.items(), ("total", out.loss)):
            sums[key] += float(value.detach())
            counts[key] += 1
        if out.sample_text_loss is not None:
            for task, value in zip(batch["tasks"], out.sample_text_loss.tolist(), strict=True):
                if f"text_{task}" in sums and not math.isnan(value):  # NaN: no answer tokens
                    sums[f"text_{task}"] += value
                    counts[f"text_{task}"] += 1
        window_samples += len(batch["input_ids"])
        window_tokens += int(batch["attention_mask"].sum())
        if not boundary:
            continue
        step += 1
        sync_buffers(engine.module)

        if step % train.log_every == 0 or step == stage.max_steps:
            elapsed = time.perf_counter() - window_start
            totals = sum_over_ranks(
                {**{f"sum/{k}": v for k, v in sums.items()}, **{f"n/{k}": v for k, v in counts.items()}}, device
            )
            losses = {f"loss/{k}": totals[f"sum/{k}"] / totals[f"n/{k}"] for k in sums if totals[f"n/{k}"]}
            rates = sum_over_ranks({"samples": window_samples, "tokens": window_tokens}, device)
            metrics = {
                **losses,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": rates["samples"] / elapsed,
                "tokens_per_s": rates["tokens"] / elapsed,
                "epoch": position.epoch,
                **{f"loader/{k}": v for k, v in stats.as_dict().items() if k in ("dropped", "samples")},
            }
            if rank == 0:
                memory = engine.module.mask_predictor.memory  # ZeRO-1/2: every rank holds the weights
                metrics |= memory.openness() if memory is not None else {}
                metrics |= {f"feature_cache/{k}": v for k, v in cache.stats().items()} if cache else {}
                per_step = (time.perf_counter() - attempt_start) / max(step - first_step, 1)
                terms = " ".join(f"{k} {losses[f'loss/{k}']:.3f}" for k in LOSS_KEYS if f"loss/{k}" in losses)
                log.info(
                    "stage %d step %d/%d loss %.4f (%s) lr %.2e %.1f samples/s %.0f tok/s ETA %s",
                    stage_no, step, stage.max_steps, losses.get("loss/total", float("nan")), terms,
                    metrics["lr"], metrics["samples_per_s"], metrics["tokens_per_s"],
                    format_eta(per_step * (stage.max_steps - step)),
                )
                if writer is not None:
                    writer.log(metrics, step)
            sums = dict.fromkeys(sums, 0.0)
            counts = dict.fromkeys(sums, 0)
            window_samples = window_tokens = 0
            window_start = time.perf_counter()

        if step % train.checkpoint_every == 0 or step == stage.max_steps:
            client = {
                "step": step,
                "positions": gather_positions(position),
                "config_hash": loop["config_hash"],
                "stage": stage_no,
            }
            report = {"step": step, "epoch": position.epoch}
            with tempfile.TemporaryDirectory() as directory:
                engine.save_checkpoint(directory, tag=f"step-{step:07d}", client_state=client,
                                       exclude_frozen_parameters=True)
                if step == stage.max_steps and rank == 0:
                    report["model_uri"] = publish_model(engine.module, tokenizer, loop["model_uri"])
                    if writer is not None and overlay_batch is not None and train.overlay_samples:
                        log_overlays(writer, engine.module, overlay_batch, train.overlay_samples, dtype,
                                     f"train_overlays_stage{stage_no}.png")
                name = f"checkpoint-step-{step:07d}"
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=name)
            wait_for_registration(loop["run_uri"], name, rank)
    if first_step >= stage.max_steps:  # resumed after the last checkpoint: publish again
        report = {"step": step, "epoch": position.epoch}
        if rank == 0:
            report["model_uri"] = publish_model(engine.module, tokenizer, loop["model_uri"])
        ray.train.report(report)
    if writer is not None:
        writer.close()
