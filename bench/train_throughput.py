"""Training benchmarks, one run each, figures as ratios.

0. The tiny preset's step against the step as it was before the light fine scale, the folded
   vision encoder and the feature cache (``BEFORE``: ``model.fine_scale=full``, BatchNorms
   unfolded, no cache), both through Ray Train + DeepSpeed ZeRO-2 and through the plain loop, in
   the same run; and the preset's step against the same step without the vision feature cache.
1. Step throughput of Ray Train + DeepSpeed (ZeRO-2, 2 workers × 1 thread, 8 samples each) against a
   plain single-process torch loop (1 process × 2 threads, 16 samples) on the same tiny model,
   the same global batch and the same total thread count.
2. Per-rank optimizer-state + gradient memory, ZeRO-2 against ZeRO-0, at 2 ranks (tensor
   accounting inside each worker after a few steps).

    eval "$(geopix stack env)"   # a running local stack (Ray with ≥ 2 CPUs)
    .venv/bin/python bench/train_throughput.py [--steps 20] [--image-size 256]

Records are synthetic chips made in memory (no S3), so the figures are the training step alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time

WARMUP = 3
# + fold_batchnorm off: the step as it was on 2026-12-02, every image encoded every step
BEFORE = ["model.fine_scale=full", "train.vision_feature_cache_mb=0"]
NO_CACHE = ["train.vision_feature_cache_mb=0"]


@contextlib.contextmanager
def step_as_before(before: bool):
    """Within, when ``before``: EfficientNet-lite0 runs unfolded, as before 2026-12-03 (pair with ``BEFORE``)."""
    from geopix.model.vision import EfficientNetLite0Encoder

    saved = EfficientNetLite0Encoder.fold_batchnorm
    EfficientNetLite0Encoder.fold_batchnorm = saved and not before
    try:
        yield
    finally:
        EfficientNetLite0Encoder.fold_batchnorm = saved


def make_records(image_size: int, count: int, seg_vocab) -> list[dict]:
    from geopix.data.synth import chip_records, make_chip

    records = []
    index = 0
    while len(records) < count:
        records += [r for r in chip_records(make_chip("train", 0, index, image_size), seg_vocab) if r["targets"]]
        index += 1
    return records[:count]


def tiny_setup(cfg, count: int) -> tuple[list[dict], object, object, list]:
    """(records, tokenizer, stage-1 model, its trainable parameters), the same in every run."""
    import torch

    from geopix.data.tokenizer import corpus_texts, train_tokenizer
    from geopix.model import build_model
    from geopix.train.stages import set_stage

    records = make_records(cfg.model.image_size, count, cfg.model.seg_vocabulary)
    tokenizer = train_tokenizer(corpus_texts(records), vocab_size=2000, seg_vocab=cfg.model.seg_vocabulary)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    set_stage(model, 1)
    return records, tokenizer, model, [p for p in model.parameters() if p.requires_grad]


def batches_for(records, tokenizer, cfg, batch_size: int, rank: int = 0, world: int = 1) -> list[dict]:
    """Augmented as in training: each batch's turns are drawn once, so a cached pass holds them all."""
    from geopix.data.batches import iter_batches

    mine = records[rank::world]
    return list(iter_batches(mine, tokenizer, image_size=cfg.model.image_size, batch_size=batch_size,
                             max_length=None, augment=True, seed=0, seg_vocab=cfg.model.seg_vocabulary,
                             chat_template=cfg.model.chat_template, drop_last=True,
                             turn_per_image=cfg.train.augment_per_image))


def feature_cache(cfg, model, batches):
    """The preset's feature cache, filled by one untimed pass over ``batches``: the timed steps are
    those of the epochs after the first (the first epoch's misses cost what the step without it
    does; bench/learning_bar.py's train time has them all). None when the config has none."""
    from geopix.train.feature_cache import VisionFeatureCache

    cache = VisionFeatureCache.for_training(model.vision, cfg.train.vision_feature_cache_mb)
    if cache is not None:
        for batch in batches:
            cache(batch["pixel_values"])
    return cache


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _flatten(values) -> list:
    out = []
    for value in values:
        out += _flatten(value) if isinstance(value, (list, tuple)) else [value]
    return out


def gradient_bytes(engine) -> tuple[int, int]:
    """(gradients this rank holds after backward, ZeRO's reduce bucket as allocated)."""
    optimizer = engine.optimizer
    grads = [p.grad for p in engine.module.parameters()]
    grads += _flatten(getattr(optimizer, "averaged_gradients", {}).values())  # ZeRO: this rank's partition
    bucket = _flatten(getattr(optimizer, "ipg_buffer", None) or [])
    return tensor_bytes(grads), tensor_bytes(bucket)


def optimizer_state_bytes(engine) -> int:
    """Adam moments plus, under ZeRO, the fp32 master partition this rank owns."""
    import torch

    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps torch's AdamW
    state = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    masters = list(getattr(optimizer, "single_partition_of_fp32_groups", []))
    return tensor_bytes(state) + tensor_bytes(masters)


def worker(loop: dict) -> None:
    import deepspeed
    import ray.train
    import torch

    from geopix.config import GeoPixConfig, StageConfig
    from geopix.data.batches import to_device
    from geopix.train.loop import deepspeed_config

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    from geopix.model.vision import EfficientNetLite0Encoder

    cfg = GeoPixConfig.model_validate(loop["config"])
    EfficientNetLite0Encoder.fold_batchnorm = not loop["before"]  # this worker process only
    records, tokenizer, model, trainable = tiny_setup(cfg, loop["records"])
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    stage = StageConfig(max_steps=loop["steps"] + WARMUP, lr=1e-3, warmup_steps=2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg.train, stage, bf16=False))
    batches = batches_for(records, tokenizer, cfg, cfg.train.batch_size, rank, world)
    cache = feature_cache(cfg, engine.module, batches)
    times = []
    for i in range(loop["steps"] + WARMUP):
        batch = to_device(batches[i % len(batches)], torch.device("cpu"), torch.float32)
        started = time.perf_counter()
        if cache is not None:
            batch["vision_features"] = cache(batch["pixel_values"])
        out = engine(**batch)
        engine.backward(out.loss + 0.0 * sum(p.sum() for p in trainable))
        if i == loop["steps"] + WARMUP - 1:  # the gradient peak: after backward, before the step
            grads, bucket = gradient_bytes(engine)
        engine.step()
        times.append(time.perf_counter() - started)
    state = optimizer_state_bytes(engine)
    timed = sum(times[WARMUP:])
    figures = {"rank": rank, "step_s": timed / loop["steps"],
                      "samples_per_s": cfg.train.batch_size * world * loop["steps"] / timed,
                      "optimizer_state_mb": state / 2**20, "grad_mb": grads / 2**20,
                      "reduce_bucket_mb": bucket / 2**20,
                      "trainable_params": sum(p.numel() for p in trainable)}
    # Ray Train attaches rank 0's metrics to the run's result only together with a checkpoint.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report(figures, checkpoint=checkpoint)


def ray_train(cfg, steps: int, records: int, before: bool = False) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from geopix.train.run import worker_env

    trainer = TorchTrainer(
        train_loop_per_worker=worker,
        train_loop_config={"config": cfg.for_workers(), "steps": steps, "records": records, "before": before},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"bench-zero{cfg.train.zero_stage}-{time.time_ns()}",
                             storage_path="/tmp/geopix-bench-runs",
                             worker_runtime_env={"env_vars": worker_env(cfg)}),
    )
    started = time.perf_counter()
    result = trainer.fit()
    metrics = dict(result.metrics)
    metrics["wall_s"] = time.perf_counter() - started
    return metrics


def plain_loop(cfg, steps: int, records: int, before: bool = False) -> dict:
    with step_as_before(before):
        return _plain_loop(cfg, steps, records)


def reference_loop() -> float:
    """This machine's speed: samples/s of the plain loop on the step as it was (``BEFORE``), a
    figure that stays comparable across changes to the preset's step (bench/learning_bar.py)."""
    from geopix.config import load_config

    return plain_loop(load_config("tiny", ["train.batch_size=8", *BEFORE]), 20, 16 * 6, before=True)["samples_per_s"]


def _plain_loop(cfg, steps: int, records: int) -> dict:
    import torch

    torch.set_num_threads(2)
    data, tokenizer, model, params = tiny_setup(cfg, records)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch_size = cfg.train.batch_size * 2
    batches = batches_for(data, tokenizer, cfg, batch_size)
    cache = feature_cache(cfg, model, batches)
    times = []
    for i in range(steps + WARMUP):
        batch = batches[i % len(batches)]
        started = time.perf_counter()
        features = cache(batch["pixel_values"]) if cache is not None else None
        out = model(**batch, vision_features=features)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    timed = sum(times[WARMUP:])
    return {"step_s": timed / steps, "samples_per_s": batch_size * steps / timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    import ray

    from geopix.config import load_config

    size = [f"model.image_size={args.image_size}", "train.batch_size=8"]
    records = 16 * 6
    ray.init(log_to_driver=False)
    zero2_before = ray_train(load_config("tiny", [*size, "train.zero_stage=2", *BEFORE]), args.steps, records, True)
    zero2 = ray_train(load_config("tiny", [*size, "train.zero_stage=2"]), args.steps, records)
    zero2_no_cache = ray_train(load_config("tiny", [*size, "train.zero_stage=2", *NO_CACHE]), args.steps, records)
    zero0 = ray_train(load_config("tiny", [*size, "train.zero_stage=0"]), args.steps, records)
    plain_before = plain_loop(load_config("tiny", [*size, *BEFORE]), args.steps, records, before=True)
    plain = plain_loop(load_config("tiny", size), args.steps, records)
    plain_no_cache = plain_loop(load_config("tiny", [*size, *NO_CACHE]), args.steps, records)
    figures = {"zero2": zero2, "zero0": zero0, "plain": plain, "zero2_before": zero2_before,
               "plain_before": plain_before, "zero2_no_cache": zero2_no_cache,
               "plain_no_cache": plain_no_cache}  # fmt: skip
    print(json.dumps(figures, indent=2, default=str))
    print("\nthe vision feature cache (every image cached: the epochs after the first) against none:")
    for name, now, then in (("Ray Train + DeepSpeed ZeRO-2 (2)", zero2, zero2_no_cache),
                            ("plain torch loop (1 process)    ", plain, plain_no_cache)):  # fmt: skip
        print(f"  {name}  {then['samples_per_s']:.1f} → {now['samples_per_s']:.1f} samples/s "
              f"= {now['samples_per_s'] / then['samples_per_s']:.2f}x")
    print("\nthe preset's step against the step before (full fine scale, unfolded vision encoder):")
    for name, now, then in (("Ray Train + DeepSpeed ZeRO-2 (2)", zero2, zero2_before),
                            ("plain torch loop (1 process)    ", plain, plain_before)):  # fmt: skip
        print(f"  {name}  {then['samples_per_s']:.1f} → {now['samples_per_s']:.1f} samples/s "
              f"= {now['samples_per_s'] / then['samples_per_s']:.2f}x")
    print(f"\nthroughput, global batch 16, 2 threads in all, tiny at {args.image_size} px:")
    print(f"  plain torch loop (1 process)      {plain['samples_per_s']:.1f} samples/s")
    print(f"  Ray Train + DeepSpeed ZeRO-2 (2)  {zero2['samples_per_s']:.1f} samples/s "
          f"= {zero2['samples_per_s'] / plain['samples_per_s']:.2f}x the plain loop")
    print("per-rank optimizer state + gradients (rank 0, 2 ranks):")
    for name, m in (("ZeRO-0", zero0), ("ZeRO-2", zero2)):
        print(f"  {name}: optimizer state {m['optimizer_state_mb']:.1f} MB, gradients {m['grad_mb']:.1f} MB, "
              f"total {m['optimizer_state_mb'] + m['grad_mb']:.1f} MB")
    ratio = (zero2["optimizer_state_mb"] + zero2["grad_mb"]) / (zero0["optimizer_state_mb"] + zero0["grad_mb"])
    print(f"  ZeRO-2 / ZeRO-0 = {ratio:.2f}x ({zero2['trainable_params'] / 1e6:.2f} M trainable parameters); "
          f"ZeRO-2's reduce bucket, allocated beside: {zero2['reduce_bucket_mb']:.1f} MB")


if __name__ == "__main__":
    main()
