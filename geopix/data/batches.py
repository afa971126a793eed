"""Training batches: records → tokenised, augmented, collated samples.

Per row: decode the image and masks (:mod:`geopix.data.images`) → (optionally) a random flip or
rotation that rewrites the text to match (:mod:`geopix.data.augment`) → resize to the model's
input size → tokenise with the chat template of :mod:`geopix.data.tokenizer`, prompt tokens
masked out of the labels, one seg run per mask target. A Ray Train worker reads its share of the
shard files (:class:`geopix.train.rank_reader.RankReader`) and turns the rows into batches here::

    batches = iter_batches(records, tokenizer, image_size=256, batch_size=16, max_length=256,
                           augment=True, seed=cfg.data.seed, seg_vocab=cfg.model.seg_vocabulary,
                           chat_template=model.config.chat_template, epoch=epoch)
    for batch in batches: ...
    log(batches.stats.as_dict())                        # bad and dropped rows, never silent

See ``docs/training_input.md`` for the rules and the batch format.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from geopix.answer_form import COLOUR_WORDS, named_colour
from geopix.chat_template import assistant_turn_text, prompt_text
from geopix.data import schema
from geopix.data.augment import IDENTITY, Augmented, augment
from geopix.data.images import decode_targets, record_image
from geopix.data.schema import BadRecord
from geopix.imaging import GEOPIX_IMAGE_FORMAT, ImageFormat, resize_masks
from geopix.vocabulary import IGNORE_INDEX, SegVocabulary, seg_run_starts

log = logging.getLogger(__name__)

MAX_REPORTED_DROPS = 100  # record ids kept in LoaderStats.dropped_ids; the counts are complete


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(getattr(ids, "ids", ids))


def encode_conversation(
    tokenizer: Any,
    conversation: Sequence[Mapping[str, Any]],
    max_length: int | None = None,
    chat_template: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of a conversation in the chat template (of version ``chat_template``).

    Layout: ``<s>`` (when the tokenizer has one), then per turn pair ``USER: {q} ASSISTANT:``
    (version 2: ``… ASSISTANT: [tag]``; version 3: the system sentence first; labels IGNORE_INDEX) and `` {answer}</s>`` (labels = ids,
    so seg tokens and eos are supervised). A conversation longer than ``max_length`` raises
    :class:`BadRecord` ("too long"): cutting it would cut seg runs away from their targets, so it
    is dropped and counted.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = tokenizer.eos_token_id
    ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [] if bos is None else [IGNORE_INDEX]
    for index, turn in enumerate(conversation):
        if turn["role"] == "user":
            piece = _encode(tokenizer, prompt_text(turn["text"], chat_template, first=index == 0))
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        else:
            piece = [*_encode(tokenizer, assistant_turn_text(turn["text"])), eos]
            ids += piece
            labels += piece
    if max_length is not None and len(ids) > max_length:
        raise BadRecord("too long", f"{len(ids)} tokens > max_length {max_length}")
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def find_seg_runs(input_ids: np.ndarray, seg_ids: Sequence[int]) -> list[int]:
    """Index in ``input_ids`` of the first seg token of each complete run ``[SEG0]…[SEG{n-1}]``."""
    positions = seg_run_starts(input_ids.tolist(), seg_ids)
    if len(positions) * len(seg_ids) != int(np.isin(input_ids, seg_ids).sum()):
        raise BadRecord("broken seg run", "seg tokens outside complete runs")
    return positions


@dataclass
class Sample:
    """One record, ready to collate."""

    record_id: str
    image_id: str
    task: str
    phrase_type: str | None
    transform: str
    image: np.ndarray  # S×S×3 uint8
    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64
    masks: np.ndarray  # [N, S, S] uint8, one per seg run (empty for text-only answers)
    boxes: np.ndarray  # [N, 4] float32, pixels of the S×S image
    class_ids: np.ndarray  # [N] int64
    seg_positions: np.ndarray  # [N] int64, index of each run's first seg token in input_ids
    colour_ids: np.ndarray  # [N] int64, token of the colour word its phrase says (IGNORE_INDEX: none)
    original_masks: np.ndarray | None = None  # [N, H, W] uint8 at the decoded size
    class_counts: np.ndarray | None = None  # [K, 2] int64 (class id, instances): every class held; None: unknown


def record_rng(seed: int, epoch: int, record_id: str) -> np.random.Generator:
    """The augmentation RNG of one record (or of one image: pass its id) in one epoch: independent
    of row order and of which worker reads the row, so a run is reproducible however Ray splits
    the shards."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, zlib.crc32(record_id.encode())])


def prepare_sample(
    record: Mapping[str, Any],
    tokenizer: Any,
    *,
    image_size: int,
    max_length: int | None,
    seg_ids: Sequence[int],
    rng: np.random.Generator | None = None,
    keep_original_masks: bool = False,
    chat_template: int = 1,
    image_format: ImageFormat = GEOPIX_IMAGE_FORMAT,
    colour_ids: Mapping[str, int] | None = None,
) -> tuple[Sample, Augmented | None]:
    """Decode, augment (when ``rng`` is given), resize and tokenise one record.

    Raises :class:`BadRecord` for rows that cannot be used. Mask targets are the record's
    targets when its answers hold one seg run per target (segment/refer); records whose answers
    hold no seg run (ground, caption, vqa) are supervised by text only and bring no masks.
    ``colour_ids`` is :func:`colour_token_ids` of ``tokenizer`` (built here when not given).
    """
    image = record_image(record)
    masks, boxes, class_ids = decode_targets(record)
    if len(masks) and masks.shape[1:] != image.shape[:2]:
        raise BadRecord("image size", f"image {image.shape[:2]} but masks {masks.shape[1:]}")
    if not len(masks):  # no targets: the empty mask stack takes the decoded image's size
        masks = np.zeros((0, *image.shape[:2]), np.uint8)
    conversation = [dict(t) for t in record.get("conversation") or []]
    if not conversation or conversation[0].get("role") != "user":
        raise BadRecord("bad conversation", "must start with a user turn")

    augmented = None
    if rng is not None:
        augmented = augment(image, masks, boxes, conversation, record.get("phrase_type"), rng)
        image, masks, boxes, conversation = augmented[:4]
    original_size = image.shape[:2]

    input_ids, labels = encode_conversation(tokenizer, conversation, max_length, chat_template)
    positions = find_seg_runs(input_ids, seg_ids)
    if positions and len(positions) != len(masks):
        raise BadRecord("seg runs", f"{len(positions)} seg runs for {len(masks)} targets")
    if not positions and record.get("task") in schema.SEG_TASKS:
        raise BadRecord("seg runs", f"a {record.get('task')} answer without seg runs")
    if not positions:  # text-only supervision: targets (e.g. of a ground record) are not masks
        masks, boxes, class_ids = masks[:0], boxes[:0], class_ids[:0]
    phrases = [t.get("description") for t in record.get("targets") or []] if positions else []

    scale = np.asarray([image_size / original_size[1], image_size / original_size[0]] * 2, np.float32)
    sample = Sample(
        record_id=record["record_id"],
        image_id=record.get("image_id") or "",
        task=record.get("task") or "",
        phrase_type=record.get("phrase_type"),
        transform=augmented.transform.name if augmented else IDENTITY.name,
        image=image_format.resize(image, image_size),
        input_ids=input_ids,
        labels=labels,
        masks=resize_masks(masks, image_size),
        boxes=boxes * scale,
        class_ids=class_ids,
        seg_positions=np.asarray(positions, dtype=np.int64),
        colour_ids=phrase_colour_ids(phrases, colour_token_ids(tokenizer) if colour_ids is None else colour_ids),
        original_masks=np.ascontiguousarray(masks) if keep_original_masks else None,
        class_counts=_class_counts(record),
    )
    return sample, augmented


def colour_token_ids(tokenizer: Any) -> dict[str, int]:
    """Each colour word's token as an answer writes it after a seg run (" red"), for the words
    that are one token: the reader adds to one state, so it can name only those."""
    ids = {c: tokenizer.encode(f" {c}", add_special_tokens=False) for c in COLOUR_WORDS}
    return {c: i[0] for c, i in ids.items() if len(i) == 1}


def phrase_colour_ids(phrases: Sequence[str | None], colour_ids: Mapping[str, int]) -> np.ndarray:
    """[T] the token of the colour word each phrase says, or IGNORE_INDEX where it says no single
    colour or the word is not one token."""
    return np.asarray([colour_ids.get(named_colour(p) or "", IGNORE_INDEX) for p in phrases], dtype=np.int64).reshape(-1)


def _class_counts(record: Mapping[str, Any]) -> np.ndarray | None:
    """The record's ``class_counts`` as [K, 2] (class id, count), or None where unknown; flips and
    rotations leave them as they are."""
    items = record.get("class_counts")
    if items is None:
        return None
    return np.asarray([(c["class_id"], c["count"]) for c in items], dtype=np.int64).reshape(-1, 2)


def collate(
    samples: Sequence[Sample],
    pad_token_id: int,
    image_format: ImageFormat = GEOPIX_IMAGE_FORMAT,
) -> dict[str, Any]:
    """Samples → one batch (see docs/training_input.md for every key).

    Targets are packed along one axis T = Σ N_i (no padding): ``target_masks[T,S,S]``,
    ``target_sample[T]`` (which sample), ``seg_positions[T]`` (where its run starts in that
    sample's ``input_ids``); ``torch.split(x, target_counts.tolist())`` gives per-sample lists.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    pixel_values = image_format.pixel_values(np.stack([s.image for s in samples]))

    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):  # right padding
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.from_numpy(sample.input_ids)
        labels[row, :n] = torch.from_numpy(sample.labels)
        attention_mask[row, :n] = 1

    size = samples[0].image.shape[0]
    counts = [len(s.masks) for s in samples]
    batch: dict[str, Any] = {
        "pixel_values": pixel_values.contiguous(),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "target_masks": torch.from_numpy(
            np.concatenate([s.masks for s in samples]).reshape(-1, size, size)
        ).float(),
        "target_boxes": torch.from_numpy(np.concatenate([s.boxes for s in samples]).reshape(-1, 4)),
        "class_ids": torch.from_numpy(np.concatenate([s.class_ids for s in samples])).long(),
        "seg_positions": torch.from_numpy(np.concatenate([s.seg_positions for s in samples])).long(),
        "colour_ids": torch.from_numpy(np.concatenate([s.colour_ids for s in samples])).long(),
        "target_sample": torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)),
        "target_counts": torch.tensor(counts, dtype=torch.long),
        "targets_complete": torch.tensor([s.phrase_type == schema.COMPLETE_PHRASE_TYPE for s in samples]),
        **_collate_class_counts(samples),
        "record_ids": [s.record_id for s in samples],
        "image_ids": [s.image_id for s in samples],
        "tasks": [s.task for s in samples],
        "phrase_types": [s.phrase_type for s in samples],
        "transforms": [s.transform for s in samples],
    }
    if all(s.original_masks is not None for s in samples):
        batch["original_masks"] = [torch.from_numpy(s.original_masks) for s in samples]
    return batch


def _collate_class_counts(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Each picture's class counts packed along one axis (as targets are): ``class_count_sample``
    [K] (which sample), ``class_count_ids`` [K], ``class_count_values`` [K]; ``class_counts_known``
    [B] says whose are known (a known picture lists every class it holds; the rest hold none)."""
    rows = [(i, c, n) for i, s in enumerate(samples) if s.class_counts is not None for c, n in s.class_counts]
    packed = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return {
        "class_count_sample": packed[:, 0],
        "class_count_ids": packed[:, 1],
        "class_count_values": packed[:, 2],
        "class_counts_known": torch.tensor([s.class_counts is not None for s in samples]),
    }


# What a batch hands the model's forward (the rest: ids, tasks, transforms, original masks).
MODEL_INPUTS = (
    "pixel_values",
    "input_ids",
    "attention_mask",
    "labels",
    "seg_positions",
    "target_sample",
    "target_masks",
    "class_ids",
    "colour_ids",
    "targets_complete",
    "class_count_sample",
    "class_count_ids",
    "class_count_values",
    "class_counts_known",
)


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model inputs of ``batch`` on ``device``, floating tensors in ``dtype``."""
    moved = {}
    for key in MODEL_INPUTS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype if value.is_floating_point() else None)
        moved[key] = value
    return moved


@dataclass
class LoaderStats:
    """What one pass of :func:`iter_batches` did; bad rows are counted here and logged."""

    rows: int = 0
    samples: int = 0
    batches: int = 0
    augmented: int = 0  # samples that got a non-identity transform
    augment_skipped: int = 0  # samples whose text could not follow a transform
    dropped: Counter = field(default_factory=Counter)  # reason → rows dropped
    dropped_ids: list[tuple[str, str]] = field(default_factory=list)  # (record_id, reason), first 100

    def as_dict(self) -> dict[str, int]:
        """Flat counters for metrics (``loader/dropped/too long`` …)."""
        out = {k: getattr(self, k) for k in ("rows", "samples", "batches", "augmented", "augment_skipped")}
        out["dropped"] = sum(self.dropped.values())
        out.update({f"dropped/{reason}": n for reason, n in sorted(self.dropped.items())})
        return out


class BatchIterator:
    """One pass over a Ray ``DataIterator``/``Dataset`` (or any iterable of records) as batches.

    Decoding, augmentation and tokenisation run in the consuming process (the train worker).
    Make a new one per epoch (``epoch=`` changes the augmentation draws).
    """

    def __init__(
        self,
        data: Any,
        tokenizer: Any,
        *,
        image_size: int,
        batch_size: int,
        max_length: int | None,
        augment: bool,
        seed: int,
        epoch: int = 0,
        seg_vocab: SegVocabulary,
        keep_original_masks: bool = False,
        drop_last: bool = False,
        image_format: ImageFormat = GEOPIX_IMAGE_FORMAT,
        prefetch_batches: int = 1,
        read_batch_size: int | None = None,
        chat_template: int,
        turn_per_image: bool = False,
    ):
        self.data = data
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.max_length = max_length
        self.augment = augment
        self.turn_per_image = turn_per_image  # one draw per image_id and epoch (train.augment_per_image)
        self.seed = seed
        self.epoch = epoch
        self.keep_original_masks = keep_original_masks
        self.drop_last = drop_last
        self.image_format = image_format  # the trained model's (GeoPixModel.image_format)
        self.prefetch_batches = prefetch_batches
        # The version of the model these batches train (its config's), never a default: batches in
        # another version than the model answers in teach it a prompt it never sees.
        self.chat_template = chat_template
        # Rows are fetched from Ray in bigger blocks than training batches: fewer round trips.
        self.read_batch_size = read_batch_size or max(batch_size, 64)
        self.seg_ids = seg_vocab.token_ids(tokenizer)
        self.colour_ids = colour_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id  # LLaMA has no pad
        self.stats = LoaderStats()
        self._batches: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._batches is None:
            self._batches = self._generate()
        return next(self._batches)

    def _rows(self) -> Iterator[Mapping[str, Any]]:
        import pyarrow as pa

        if hasattr(self.data, "iter_batches") and hasattr(self.data, "iter_rows"):  # Ray Dataset/DataIterator
            for table in self.data.iter_batches(
                batch_size=self.read_batch_size,
                batch_format="pyarrow",
                prefetch_batches=self.prefetch_batches,
            ):
                yield from table.to_pylist()
        elif isinstance(self.data, pa.Table):
            yield from self.data.to_pylist()
        else:
            yield from self.data

    def _generate(self) -> Iterator[dict[str, Any]]:
        pending: list[Sample] = []
        for record in self._rows():
            self.stats.rows += 1
            sample = self._sample(record)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        if pending and not self.drop_last:
            yield self._collate(pending)

    def _sample(self, record: Mapping[str, Any]) -> Sample | None:
        record_id = str(record.get("record_id"))
        draw_id = (record.get("image_id") or record_id) if self.turn_per_image else record_id
        rng = record_rng(self.seed, self.epoch, draw_id) if self.augment else None
        try:
            sample, augmented = prepare_sample(
                record,
                self.tokenizer,
                image_size=self.image_size,
                max_length=self.max_length,
                seg_ids=self.seg_ids,
                rng=rng,
                keep_original_masks=self.keep_original_masks,
                chat_template=self.chat_template,
                image_format=self.image_format,
                colour_ids=self.colour_ids,
            )
        except BadRecord as exc:
            self._drop(record_id, exc.reason, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - a malformed row must not end the epoch; it is counted
            self._drop(record_id, "malformed record", f"{type(exc).__name__}: {exc}")
            return None
        if augmented is not None:
            self.stats.augment_skipped += augmented.skipped is not None
            self.stats.augmented += not augmented.transform.is_identity
        self.stats.samples += 1
        return sample

    def _drop(self, record_id: str, reason: str, message: str) -> None:
        self.stats.dropped[reason] += 1
        if len(self.stats.dropped_ids) < MAX_REPORTED_DROPS:
            self.stats.dropped_ids.append((record_id, reason))
        log.warning("training input: dropped record %s (%s)", record_id, message)

    def _collate(self, samples: list[Sample]) -> dict[str, Any]:
        self.stats.batches += 1
        return collate(samples, self.pad_token_id, self.image_format)


def iter_batches(data: Any, tokenizer: Any, **options: Any) -> BatchIterator:
    """Collated batches from an iterable of records, a pyarrow Table, a Ray ``Dataset`` or
    ``DataIterator``; ``.stats`` counts what was dropped. ``options`` are :class:`BatchIterator`'s:
    ``image_size``, ``batch_size``, ``max_length``, ``augment``, ``seed``, ``seg_vocab`` and
    ``chat_template`` (the trained model's version) always; ``turn_per_image`` draws a record's
    flip/rotation by its image id (every record of a picture turned alike within an epoch).

    Deterministic for a given ``seed``/``epoch`` and row order (augmentation draws depend only on
    seed, epoch and record id, or image id with ``turn_per_image``).
    """
    return BatchIterator(data, tokenizer, **options)
