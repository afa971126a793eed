"""Typed GeoPix configuration, loaded from YAML presets under ``configs/`` with dotted overrides.

A config is one :class:`GeoPixConfig`. It is built from a preset name (``tiny``, ``full``) or a
YAML path, then ``section.key=value`` overrides are applied before validation, so a typo in a
key or a wrong type is reported with the file and the key that caused it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from geopix.redaction import (
    REDACTED,
    has_credentials,
    is_secret_key,
    redact_override,
    redact_text,
    redact_tree,
)
from geopix.vocabulary import SegVocabulary

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR_ENV = "GEOPIX_CONFIG_DIR"
STACK_DIR_ENV = "GEOPIX_STACK_DIR"


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid :class:`GeoPixConfig`."""


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt key silently falling back to a default is worse.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def default_stack_dir() -> Path:
    return Path(os.environ.get(STACK_DIR_ENV) or Path.home() / ".geopix" / "stack")


class StackConfig(_Section):
    """The embedded local stack: ports, credentials of the local S3 server, where its state lives."""

    state_dir: Path = Field(default_factory=default_stack_dir)
    # Loopback only: the S3 server and MLflow have no authentication (docs/security.md). Another
    # address is refused unless allow_non_loopback says it is meant.
    host: str = "127.0.0.1"
    allow_non_loopback: bool = False
    s3_port: int = Field(9100, ge=1, le=65535)
    mlflow_port: int = Field(5050, ge=1, le=65535)
    ray_port: int = Field(6379, ge=1, le=65535)
    ray_dashboard_port: int = Field(8265, ge=1, le=65535)
    ray_client_port: int = Field(10001, ge=1, le=65535)
    ray_dashboard_agent_port: int = Field(52365, ge=1, le=65535)
    ray_num_cpus: int | None = Field(None, ge=1)
    ray_object_store_mb: int | None = Field(None, ge=64)
    mlflow_workers: int = Field(1, ge=1)
    # Credentials of the local S3 server only; they open nothing outside this machine.
    s3_access_key_id: str = "geopix-local"
    s3_secret_access_key: SecretStr = SecretStr("geopix-local-secret")
    region: str = "us-east-1"
    # The S3 server keeps objects in memory; with persist_s3 they are saved under state_dir on
    # `down` and restored on `up`, so MLflow artifacts stay consistent with its sqlite database.
    persist_s3: bool = True
    start_timeout_s: float = Field(120.0, gt=0)


class BucketsConfig(_Section):
    """Names of the project's buckets (on the local stack they are created by `stack up`)."""

    data: str = "geopix-data"
    checkpoints: str = "geopix-checkpoints"
    scenes: str = "geopix-scenes"
    predictions: str = "geopix-predictions"
    mlflow: str = "geopix-mlflow"

    def all(self) -> list[str]:
        return list(self.model_dump().values())


class StorageConfig(_Section):
    """Where data lives: the buckets. The S3 endpoint, region and credentials are the environment's
    (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_*`` keys or an instance role; see
    ``storage.S3Settings``), never the config's: a config is logged and shared."""

    buckets: BucketsConfig = Field(default_factory=BucketsConfig)


class TrackingConfig(_Section):
    """MLflow. With no tracking URI, ``MLFLOW_TRACKING_URI`` from the environment is used."""

    tracking_uri: str | None = None
    experiment: str = "geopix"
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)


class DataConfig(_Section):
    """Instruction data: the synthetic generator, sharding and the training input."""

    chip_size: int = Field(256, ge=32)
    seed: int = 0
    # The test split is generated from its own seed range and held-out phrasing templates.
    test_seed_offset: int = Field(1_000_000, ge=1)
    train_images: int = Field(2000, ge=0)
    val_images: int = Field(200, ge=0)
    test_images: int = Field(200, ge=0)
    scene_size: int = Field(8192, ge=256)
    scene_count: int = Field(1, ge=0)
    # Fractions for records that arrive without a split (importers); the rest is test.
    train_fraction: float = Field(0.9, gt=0, le=1)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    split_seed: int = 0
    shard_target_mb: float = Field(64.0, gt=0)
    source_uri: str = "s3://geopix-data/sources/synthetic"
    shards_uri: str = "s3://geopix-data/shards/synthetic"
    augment: bool = True
    # The synthetic colour questions are answered with the asked object drawn before its colour
    # ("It is [SEG…] red.", the object as the record's one target) instead of "It is red.", so that
    # the model finds the object first and a mask colour reader (model.mask_colour_reader) can
    # name the colour under its mask.
    vqa_colour_drawn: bool = False


class ModelConfig(_Section):
    """Model sizes (see GEOPIX.md §1). The model package reads these; weights come from a path."""

    vision_encoder: Literal["efficientnet_lite0", "clip"] = "efficientnet_lite0"
    # Weights: a local directory/file or an s3:// prefix (downloaded once into the cache); never a hub.
    vision_weights: str | None = None
    llm_weights: str | None = None
    # LLaVA projector weights (mm_projector safetensors/bin, or a LLaVA checkpoint directory).
    projector_weights: str | None = None
    image_size: int = Field(256, ge=32)
    llm_hidden_size: int = Field(192, ge=16)
    llm_num_layers: int = Field(3, ge=1)
    llm_num_heads: int = Field(4, ge=1)
    llm_intermediate_size: int = Field(512, ge=16)
    # One answer's run of seg tokens per target is seg_token_num × num_scales long (seg_vocabulary).
    seg_token_num: int = Field(SegVocabulary.tokens_per_scale, ge=1)
    num_scales: int = Field(SegVocabulary.num_scales, ge=1)
    decoder_dim: int = Field(64, ge=8)
    # The mask predictor's coarsest grid is image_size / mask_grid_stride; each further scale doubles
    # it. The finest scale reads the encoder's finer level, which for EfficientNet-lite0 is taken at
    # stride fine_feature_stride (4: 24 channels, 8: 40, 16: 112; CLIP has one patch grid).
    mask_grid_stride: Literal[4, 8, 16, 32] = 16
    # The scales after the first: "full" (a 3×3 neck and a two-way transformer each, GEOPIX.md §1)
    # or "light" (a pointwise second neck conv and a hypernetwork readout of the gated features
    # with the first scale's decoded mask token: no transformer over the finest, per-target grid;
    # docs/performance.md, "Where a tiny step's time goes").
    fine_scale: Literal["full", "light"] = "full"
    # What the transformer scales add to the image features as their place in the attention:
    # "linear", a learned 1×1 conv of the x/y grid (a query can only prefer one side, monotonically);
    # "fourier", sin/cos of the grid under fixed random Gaussian frequencies (SAM's encoding), in
    # which a query can peak at one place: a seg prompt can say "there", not only "more to the left";
    # "linear_fourier", the linear one plus a learned projection of the Fourier features that
    # starts at zero (training starts from the linear embedding).
    mask_position_embedding: Literal["linear", "fourier", "linear_fourier"] = "linear"
    # Several seg runs in one answer are paired with its targets by the loss-minimising assignment
    # (Hungarian) rather than by order; off: the k-th run is supervised by the k-th target.
    match_targets: bool = True
    fine_feature_stride: Literal[4, 8, 16] = 16
    # Mask loss = BCE (pixel mean) × mask_bce_weight + Dice × mask_dice_weight (GEOPIX.md §1: 2.0 and
    # 0.5). Dice is per target and scale-free, so its weight sets how much small targets count.
    mask_bce_weight: float = Field(2.0, ge=0)
    mask_dice_weight: float = Field(0.5, ge=0)
    # Each scale's 8×8 prior (the "where" a seg prompt predicts before the decoder reads the image)
    # trained towards the target's area fraction per cell, × this weight; 0: the prior learns only
    # through the mask loss. A direct signal that the prompt must say which instance it means.
    mask_prior_weight: float = Field(0.0, ge=0)
    # A linear head on each projected image token predicts, per class, the share of the token's
    # cell that class covers, trained (BCE × this weight) where an answer names every instance of
    # a class ("segment every X": the class's map is then complete). A signal that the tokens the
    # LLM reads say what lies where, which VQA counts and presence need; 0: off, no head.
    image_class_map_weight: float = Field(0.0, ge=0)
    # The same head's most confident token per class, trained (BCE × this weight) against whether
    # the picture holds the class at all, for every class, on records whose source annotates every
    # instance (`class_counts`): the one signal that says which classes a picture lacks. 0: off
    # (a head is built when either weight is above 0).
    image_presence_weight: float = Field(0.0, ge=0)
    # The class reader (geopix/model/class_reader.py): presence and count maps per class from the
    # fine and coarse vision features, summed up into one token per class after the image tokens
    # (what the LLM reads to say whether and how many); its maps are trained where the class map
    # is, each loss × this weight. 0: off, no reader, no extra tokens.
    class_reader_weight: float = Field(0.0, ge=0)
    # The reader's maps trained from each picture's `class_counts` instead (or as well), × this
    # weight: BCE of a class's most confident cell against whether the picture holds the class,
    # and the L1 distance of log(1 + its summed count) to log(1 + the class's count), for every
    # class. These are the two figures its token carries. The reader is built when either reader
    # weight is above 0. The tiny preset: 1.0, with on_class_words (docs/evaluation.md).
    class_reader_image_weight: float = Field(0.0, ge=0)
    # Where the LLM reads the reader: "after_image", one token per class after the image tokens
    # (the LLM must find the token of the class a question names); "on_class_words", each class's
    # summary added to the prompt's words that name it ("tank", "tanks" for storage_tank), so a
    # question carries the answer's evidence on its own words.
    class_reader_tokens: Literal["after_image", "on_class_words"] = "after_image"
    # The reader's loss on a class's summed count from class_counts: "log_l1", the L1 distance of
    # log(1 + count); "poisson", the Poisson negative log-likelihood of the class's count given the
    # summed count, whose gradient does not fade as counts grow. Trained alone on frozen features
    # (docs/evaluation_history.md, fourteenth session), Poisson read 50 % of test counts exactly
    # against 24 %; the tiny preset trains with it (configs/tiny.yaml has the three-seed figures).
    class_reader_count_loss: Literal["log_l1", "poisson"] = "log_l1"
    # With on_class_words: each summary added to a word rescaled to this many times the RMS of the
    # word's own embedding, so the word still says which class it names; 0: the summary as its MLP
    # gives it (about 18× the word's norm, trained so). The tiny preset: 1.0 (configs/tiny.yaml).
    class_reader_word_scale: float = Field(0.0, ge=0)
    # Each class's summary also carries the class's mean colour: the picture's pixels averaged over
    # the reader's presence map (geopix/model/class_reader.py, class_colours). The LLM answers
    # colour questions with the commonest colour words; with this, seeds 0-1, it still did (colour
    # +0.007 +- 0.051); not in any preset (docs/evaluation_history.md, 2026-12-07).
    class_reader_colours: bool = False
    # The text loss over a batch: "token" is the mean over every answer token, so a 35-word
    # caption weighs about nine times a 4-word VQA answer; "answer" is the mean over answers of
    # each answer's mean token loss, so every answer weighs the same whatever its length.
    text_loss_mean: Literal["token", "answer"] = "token"
    memory_len: int = Field(8, ge=0)
    memory_dim: int = Field(64, ge=1)
    num_classes: int = Field(8, ge=1)
    # Optional EMA write of masked-pooled instance features into their class's memory slots, on top
    # of the gradient write; 0 turns it off. Needs memory_dim == decoder_dim.
    memory_ema_momentum: float = Field(0.0, ge=0, lt=1)
    # In training, each target's memory read is left out with this probability (per scale), so the
    # decoder keeps a path of its own beside the read; 0 reads always (docs/model.md, Class memory).
    memory_read_dropout: float = Field(0.0, ge=0, lt=1)
    # With a pretrained LLM, train only the rows of the tokens GeoPix adds (peft TrainableTokens)
    # rather than the whole embedding and output matrices (2 × 131 M parameters at 7B).
    new_token_rows_only: bool = True
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    # The chat template a new model is trained with (geopix/chat_template.py): 2 says the
    # instruction's task tag again where the answer starts; 3 opens with LLaVA v1's system
    # sentence (the authors' release answers with it). A model keeps the version it was
    # trained with; training from a saved model uses that model's.
    chat_template: Literal[1, 2, 3] = 1
    # A learned embedding per image-token place, added to the projected image tokens: the LLM's
    # 1-D positions put an image token at a distance from the seg token that depends on the text's
    # length, so a random LLM cannot tell where in the image a token lies. CLIP's tokens carry
    # their place already; EfficientNet's do not. Starts at zero (the projector's output as is).
    image_token_positions: bool = False
    # The mean colour of k × k cells under each image token (0: off), added to it through a linear
    # map that starts at zero. The stride-32 tokens carry an object's colour poorly: probes name it
    # for 0.44-0.53 of the test objects from the tokens under its mask, for 0.94 from the mean colour
    # under the mask (bench/colour_probe.py). Seed 0: colour answers 13 of 69 right against 10; not
    # in any preset (docs/evaluation_history.md, 2026-12-07, twenty-second session).
    image_colour_cells: int = Field(0, ge=0, le=16)
    # The word after each seg run also reads the mean colour of the run's own mask: the picture's
    # pixels under the mask (its detached probabilities as weights) go through a small MLP that
    # starts at zero and is added to the run's last hidden state before the output layer. With
    # data.vqa_colour_drawn, a colour question is answered "It is [SEG…] red.": the model draws
    # the object, then names the colour under what it drew (docs/model.md, data flow step 4, LLM).
    mask_colour_reader: bool = False
    # Weight of a loss that teaches the reader colours on every target whose phrase names one
    # ("the red storage tank"), not only on the colour answers: the output layer on the reader's
    # reading alone, of the mean colour under the target's true mask, against the colour word.
    # Needs mask_colour_reader.
    mask_colour_word_weight: float = Field(0.0, ge=0)

    @property
    def seg_vocabulary(self) -> SegVocabulary:
        """The seg tokens this model reads and writes: what its data, tokenizer and answers use."""
        return SegVocabulary(self.seg_token_num, self.num_scales)


class StageConfig(_Section):
    """One training stage's schedule and data (GEOPIX.md §2)."""

    max_steps: int = Field(300, ge=1)  # optimizer steps
    lr: float = Field(1e-3, gt=0)  # peak; linear warm-up, then cosine decay to min_lr_ratio · lr
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    # Record tasks this stage trains on (None = all): stage 1 aligns pixels on segmentation tasks.
    tasks: list[str] | None = None
    # How many times an epoch shows each record of a task (absent tasks: 1). 2 shows every record
    # twice; 0.5 shows a seeded half, another half each epoch. Sets the task mix without new data.
    task_weights: dict[str, float] | None = None

    @field_validator("task_weights")
    @classmethod
    def _positive_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        # The task names are checked against the record schema by train.run.check_data.
        for task, weight in (weights or {}).items():
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"{task}: {weight} is not a finite number > 0 (leave a task out with stage.tasks)")
        return weights


class TrainConfig(_Section):
    """Distributed training settings (Ray Train workers under DeepSpeed ZeRO)."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    seed: int = 0  # initial weights, data order and augmentation
    zero_stage: Literal[0, 1, 2] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = Field(8, ge=1)  # per worker and micro-step; global = batch × workers × accum
    grad_accum_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_length: int | None = Field(256, ge=16)  # longer samples are dropped (counted), never cut
    augment: bool = True
    # Draw a flip/rotation per image and epoch rather than per record: every record of a picture
    # shows it the same way within an epoch, so the feature cache below computes it once.
    augment_per_image: bool = False
    # Per worker: the frozen vision encoder's features of each picture as it sees it (after the
    # flip/rotation), kept once computed (geopix/train/feature_cache.py); 0 computes them every
    # step. About 0.24 MB per 256-px picture for EfficientNet-lite0, 4.7 MB for CLIP-L at 336.
    vision_feature_cache_mb: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(100, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=0)  # worker-group restarts (each resumes from the last checkpoint)
    threads_per_worker: int = Field(1, ge=1)
    tokenizer_vocab_size: int = Field(2000, ge=300)  # the tiny BPE trained on the train split
    # Ray Train's storage (DeepSpeed checkpoints per run) and the consolidated models.
    runs_uri: str = "s3://geopix-checkpoints/runs"
    models_uri: str = "s3://geopix-checkpoints/models"
    registered_model: str = "geopix"
    # Fail at once when the cluster lacks the workers' CPUs/GPUs (off for autoscaling clusters).
    require_resources_now: bool = True
    overlay_samples: int = Field(4, ge=0)
    stage1: StageConfig = Field(
        default_factory=lambda: StageConfig(max_steps=300, lr=1e-3, tasks=["segment", "refer"])
    )
    stage2: StageConfig = Field(default_factory=lambda: StageConfig(max_steps=200, lr=5e-4))

    def stage(self, number: int) -> StageConfig:
        if number not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {number}")
        return self.stage1 if number == 1 else self.stage2


class EvalConfig(_Section):
    """Evaluation. Size buckets on ground-truth mask area in pixels, COCO's convention by default:
    small < 32², medium 32² to < 96², large ≥ 96²."""

    small_max_area: int = Field(32 * 32, ge=1)
    medium_max_area: int = Field(96 * 96, ge=1)
    iou_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    grounding_iou: float = Field(0.5, gt=0, le=1)
    # Several targets in one answer are paired with its masks by the IoU-maximising assignment
    # (Hungarian); off: the k-th seg run is scored against the k-th target.
    match_targets: bool = True
    out_uri: str = "s3://geopix-checkpoints/evals"  # each evaluation under <out_uri>/<name>/
    # The model runs in a Ray Data actor pool: `concurrency` actors of `threads_per_actor` CPUs
    # each (one GPU each when train.use_gpu); on a 2-CPU machine one actor leaves a CPU for reading.
    concurrency: int = Field(1, ge=1)
    threads_per_actor: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)  # records answered together (one batched, KV-cached decode)
    max_new_tokens: int = Field(80, ge=1)  # long enough for the synthetic captions
    report_cases: int = Field(6, ge=1)  # best and worst referring cases drawn in the report


class SegmentConfig(_Section):
    """Batch segmentation of large scenes (`geopix segment`, flows/nightly.py).

    Windows of ``window_size`` (default: the model's input size, read at the scene's own resolution)
    step by ``window_size - overlap``; each output pixel comes from the one window in whose centre
    part it lies (centre-cropping), so the stitched raster is exactly what the windows give one by one.
    """

    window_size: int | None = Field(None, ge=32)  # None: model.image_size
    overlap: int = Field(64, ge=0)  # px shared by neighbouring windows; half of it is cropped off each
    chunk_size: int = Field(1024, ge=64)  # windows are read in block-aligned chunks of this size
    bands: list[int] = Field(default_factory=lambda: [1, 2, 3])  # 1-based source bands → R, G, B
    # uint8 sources are used as they are; others are stretched to 0–255 per band between the
    # scene's `percentiles` (from its smallest overview, nodata excluded) or a `fixed_range`.
    percentiles: tuple[float, float] = (2.0, 98.0)
    fixed_range: tuple[float, float] | None = None
    instructions: list[str] = Field(default_factory=lambda: ["[segment] Segment all storage tanks."])
    # Keep only masks whose class (the model's class head) is one of these names; None keeps all.
    # An instruction about storage tanks can still draw a mask on something else; this drops it.
    keep_classes: list[str] | None = None
    concurrency: int = Field(1, ge=1)  # model actors (one GPU each when train.use_gpu)
    threads_per_actor: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)  # windows answered together
    max_new_tokens: int = Field(48, ge=1)
    # generate: greedy token-by-token answers (the model decides how many masks). teacher_forced:
    # every window is answered `forced_answer` in one batched forward pass ({seg} = one seg run) —
    # faster, and the same masks wherever greedy decoding would have written that answer.
    decode: Literal["generate", "teacher_forced"] = "generate"
    forced_answer: str = "Sure, it is {seg}."
    out_uri: str = "s3://geopix-predictions/scenes"  # <out_uri>/<scene id>/<model>/<instruction hash>/
    incoming_uri: str = "s3://geopix-scenes/incoming"  # what the nightly job lists
    # Scenes from STAC items (geopix/infer/stac_scenes.py): the asset keys tried first, in order; then
    # an asset with role "visual" and a GeoTIFF media type; then one asset per colour (R, G, B), each
    # named by key or by its band's common name.
    stac_assets: list[str] = Field(default_factory=lambda: ["visual"])
    stac_band_assets: list[str] = Field(default_factory=lambda: ["red", "green", "blue"], min_length=3, max_length=3)
    # A scene being segmented is leased (geopix/leases.py): renewed every third of this while its run
    # lives; a run killed elsewhere frees it after this long (one on the same host at once).
    lease_ttl_s: float = Field(600.0, ge=10)
    polygon_block: int = Field(2048, ge=256)  # polygons are traced block by block, then merged
    min_polygon_pixels: int = Field(4, ge=1)  # smaller connected components are not written as polygons
    # Two seg runs of overlapping windows are one instance when they have the same class and their
    # pixels in the windows' overlap have IoU above this (geopix/infer/instances.py); 1 joins none.
    instance_match_iou: float = Field(0.5, ge=0, le=1)


class PipelineConfig(_Section):
    """flows/full_pipeline.py: where its step records live, what it starts from, the promotion gate."""

    state_uri: str = "s3://geopix-checkpoints/pipelines"  # <state_uri>/<pipeline name>/steps/<step>.json
    # Generate the synthetic source and scenes as the first step (the demo); otherwise data.source_uri
    # must be a record source and the scenes are read from scenes_uri.
    synthetic: bool = False
    scenes_uri: str | None = None  # scenes to segment; None: segment.incoming_uri
    # The registered model becomes `champion` only when this evaluation metric (a name from the
    # evaluate step's MLflow metrics) reaches gate_min; it is `candidate` either way.
    gate_metric: str = "seg_cIoU"
    gate_min: float = 0.3
    # ... and only when at most this share of the evaluated records failed (an evaluation that could
    # answer few records says little, however high its score on the rest).
    gate_max_failed_share: float = Field(0.05, ge=0, le=1)
    # Each step runs under a lease (geopix/leases.py); see segment.lease_ttl_s.
    lease_ttl_s: float = Field(600.0, ge=10)


class SweepConfig(_Section):
    """flows/tune_memory.py: Ray Tune over the memory size K (and optionally its dim) with ASHA.

    Each trial trains stage 1, is evaluated, reports (ASHA's first rung), then trains stage 2 and
    is evaluated again; ASHA stops trials whose stage-1 score is in the bottom 1/reduction_factor
    of the trials that reached that rung before them."""

    memory_len: list[int] = Field(default_factory=lambda: [0, 4, 8, 16])  # 0 = the ablation
    memory_dim: list[int] | None = None  # None: model.memory_dim only
    metric: str = "seg_cIoU"  # an evaluation metric name (evaluate's MLflow metrics), maximised
    split: str = "val"  # never the test split: that one reports the chosen model
    eval_limit: int | None = Field(None, ge=1)  # evaluate the first N records of the split only
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int = Field(1, ge=1)  # each trial takes train.num_workers × threads CPUs
    out_uri: str = "s3://geopix-checkpoints/sweeps"  # Tune's experiment state, table, plot, best config


# What the config hash leaves out: where things run and are tracked, and how flows and sweeps run.
UNHASHED_SECTIONS = frozenset({"name", "stack", "tracking", "pipeline", "sweep"})
# The hash leaves out every value at its field's default, so a field added with a default that
# keeps what GeoPix did before changes no hash: a run interrupted before an upgrade resumes after
# it, and a flow's outputs stay current. A changed default would then go unseen, so this number
# stands for the defaults in every hash: bump it when a default changes what a config that does
# not set it produces (tests/test_config.py pins the defaults and says so).
HASH_DEFAULTS_VERSION = 1


class GeoPixConfig(_Section):
    name: str = "custom"
    stack: StackConfig = Field(default_factory=StackConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    def config_hash(self) -> str:
        """A short content hash of what shapes outputs (not the stack, tracking or name); stable
        across key order. Tags runs, and lets a flow tell whether a step's outputs are current."""
        return self.section_hash(*(set(type(self).model_fields) - UNHASHED_SECTIONS))

    def for_workers(self) -> dict[str, Any]:
        """The config as JSON for other processes (Ray Train workers, Tune trials, Ray Data actors).
        Ray keeps such arguments in its metadata, so no secret goes in: secret values are redacted
        and a tracking URI that carries credentials is left out (workers then use their own
        ``MLFLOW_TRACKING_URI``, as they use the cluster's own S3 credentials)."""
        data = redact_tree(self.model_dump(mode="json"))
        if has_credentials(self.tracking.tracking_uri):
            data["tracking"]["tracking_uri"] = None
        return data

    def section_hash(self, *sections: str) -> str:
        """The content hash of some sections only (training's identity: data, model and train).
        Values at their field's default are left out, and HASH_DEFAULTS_VERSION stands for them."""
        content = self.model_dump(mode="json", include=set(sections), exclude_defaults=True)
        canonical = json.dumps({"defaults": HASH_DEFAULTS_VERSION, **content}, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV) or REPO_ROOT / "configs")


def list_presets() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config_path(source: str | Path) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = config_dir() / f"{source}.yaml"
    if not preset.exists():
        raise ConfigError(
            f"no config file or preset named {str(source)!r}; presets in {config_dir()}: "
            f"{', '.join(list_presets()) or 'none'}"
        )
    return preset


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:  # permissions, a directory, ...
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def read_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config whose ``base: <preset or path>`` key names a config it changes: the base is read
    first and this file's keys are merged into it, section by section."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: its bases form a cycle ({' → '.join(str(p) for p in seen)})")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    base = str(base)  # a preset name, or a YAML path relative to this file
    base_path = path.parent / base if base.endswith((".yaml", ".yml")) else resolve_config_path(base)
    merged = _merge(read_with_base(base_path, (*seen, path.resolve())), data)
    merged["name"] = data.get("name", path.stem)  # a config is named by its own file, not its base
    return merged


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, booleans, null, lists)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {redact_override(override)!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {redact_override(override)!r}: {part!r} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


def _describe_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            shown = REDACTED if is_secret_key(key) else redact_text(repr(err.get("input")))
            lines.append(f"  {key}: {err['msg']} (got {shown})")
    return "\n".join(lines)


def load_config(source: str | Path = "tiny", overrides: Sequence[str] = ()) -> GeoPixConfig:
    """Load a preset or YAML file, apply overrides, validate. Raises :class:`ConfigError`."""
    path = resolve_config_path(source)
    data = apply_overrides(read_with_base(path), overrides)
    data.setdefault("name", path.stem)
    try:
        return GeoPixConfig.model_validate(data)
    except ValidationError as exc:
        origin = f"{path}" + (f" with overrides {[redact_override(o) for o in overrides]}" if overrides else "")
        raise ConfigError(f"invalid config {origin}:\n{_describe_errors(exc)}") from None


def add_overrides_argument(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--set``/``-s`` into ``args.overrides``: every occurrence adds (``--set a=1 b=2`` and
    ``--set a=1 --set b=2`` give both; a plain ``nargs`` list would keep the last one only)."""
    parser.add_argument("--set", "-s", dest="overrides", action="extend", nargs="+", required=required,
                        default=None if required else [], metavar="SECTION.KEY=VALUE",
                        help="config override; repeatable")


def to_yaml(config: GeoPixConfig) -> str:
    """The config as YAML with every secret redacted (geopix/redaction.py): fit to print or log."""
    return yaml.safe_dump(redact_tree(config.model_dump(mode="json")), sort_keys=False)
