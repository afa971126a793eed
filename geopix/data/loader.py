"""The training input: Parquet shards → decoded, augmented, tokenised, collated batches.

Shards are written by the sharding job as ``<shards_uri>/<split>/shard-00000.parquet, …`` (rows of
:data:`~geopix.data.schema.RECORD_SCHEMA` with the image bytes embedded). A Ray Train worker
streams its share of them and turns rows into batches itself::

    shard = ray.train.get_dataset_shard("train")      # from shard_dataset(uri, "train")
    batches = iter_batches(shard, tokenizer, image_size=256, batch_size=16, max_length=256,
                           augment=True, seed=cfg.data.seed, seg_vocab=cfg.model.seg_vocabulary,
                           epoch=epoch)
    for batch in batches: ...
    log(batches.stats.as_dict())                        # bad and dropped rows, never silent

Per row: decode the image and masks → (optionally) a random flip/rotation that rewrites the
text to match (:func:`augment`) → resize to the model's input size → tokenise with the chat
template of :mod:`geopix.data.tokenizer`, prompt tokens masked out of the labels. See
``docs/training_input.md`` for the rules and the batch format.
"""

from __future__ import annotations

import io
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from geopix import storage
from geopix.data import schema
from geopix.data.tokenizer import answer_text, prompt_text
from geopix.vocabulary import SegVocabulary, seg_run_starts

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# `geopix data shard` writes shard-00000-0.parquet (Ray adds a per-task file index).
SHARD_PATTERN = re.compile(r"shard-\d+(-\d+)?\.parquet$")
MAX_REPORTED_DROPS = 100  # record ids kept in LoaderStats.dropped_ids; the counts are complete


class ShardError(ValueError):
    """Shards that cannot be read; the message names the URI or the file."""


class BadRecord(ValueError):
    """A row the loader drops (undecodable image, inconsistent targets, too long, …)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------- decoding
def decode_image(data: bytes) -> np.ndarray:
    """Encoded PNG/JPEG/TIFF bytes → H×W×3 uint8 RGB.

    Palette, grey, alpha and CMYK images are converted by Pillow; 16-bit and float images are
    stretched from their 2nd–98th percentile to 0–255 (the usual display stretch for remote
    sensing); multi-band TIFFs Pillow cannot open are read with rasterio (first three bands).
    EXIF orientation is ignored on purpose: masks are stored in the pixel order of the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _pil_to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_to_rgb(data)
        raise BadRecord("undecodable image", str(exc)) from None


def _pil_to_rgb(image) -> np.ndarray:
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _stretch(np.asarray(image)[None])
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _tiff_to_rgb(data: bytes) -> np.ndarray:
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as memfile, memfile.open() as dataset:
            bands = dataset.read(indexes=list(range(1, min(3, dataset.count) + 1)))
    except (RasterioError, OSError, ValueError) as exc:
        raise BadRecord("undecodable image", f"TIFF: {exc}") from None
    return _stretch(bands)


def _stretch(bands: np.ndarray) -> np.ndarray:
    """[C, H, W] any dtype → H×W×3 uint8; one or two bands become grey."""
    if bands.dtype != np.uint8:
        values = bands.astype(np.float32)
        low, high = np.percentile(values, (2, 98))
        scale = 255.0 / (high - low) if high > low else 0.0
        bands = np.clip((values - low) * scale, 0, 255).astype(np.uint8)
    if bands.shape[0] < 3:
        bands = np.repeat(bands[:1], 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(bands[:3], 0, -1))


def decode_targets(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks [N,H,W] uint8, boxes [N,4] float32 pixel xyxy, class_ids [N] int64) of a record."""
    targets = record.get("targets") or []
    height, width = record.get("height") or 0, record.get("width") or 0
    masks = np.zeros((len(targets), height, width), dtype=np.uint8)
    for index, target in enumerate(targets):
        try:
            mask = schema.decode_mask(target["mask"])
        except Exception as exc:  # noqa: BLE001 - pycocotools raises bare Exceptions on malformed counts
            raise BadRecord("undecodable mask", f"targets[{index}]: {exc}") from None
        if mask.shape != (height, width):
            raise BadRecord("mask size", f"targets[{index}] is {mask.shape}, the record {height}x{width}")
        masks[index] = mask
    boxes = np.asarray([t["box"] for t in targets], dtype=np.float32).reshape(-1, 4)
    class_ids = np.asarray([t["class_id"] for t in targets], dtype=np.int64)
    return masks, boxes, class_ids


# ------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Transform:
    """One of the 8 flips/rotations of a square (the dihedral group D4).

    Applied as: transpose (swap x and y) first, then flip x, then flip y. Directions are unit
    steps ``(dx, dy)`` in image coordinates (x right, y down).
    """

    swap: bool = False
    flip_x: bool = False
    flip_y: bool = False

    @property
    def name(self) -> str:
        return _TRANSFORM_NAMES[(self.swap, self.flip_x, self.flip_y)]

    @property
    def is_identity(self) -> bool:
        return not (self.swap or self.flip_x or self.flip_y)

    def image(self, array: np.ndarray) -> np.ndarray:
        """An H×W(×C) array transformed (a view; copy before writing)."""
        if self.swap:
            array = array.swapaxes(0, 1)
        if self.flip_x:
            array = array[:, ::-1]
        if self.flip_y:
            array = array[::-1]
        return array

    def masks(self, masks: np.ndarray) -> np.ndarray:
        """N×H×W masks transformed like the image (a view)."""
        if self.swap:
            masks = masks.swapaxes(1, 2)
        if self.flip_x:
            masks = masks[:, :, ::-1]
        if self.flip_y:
            masks = masks[:, ::-1]
        return masks

    def boxes(self, boxes: np.ndarray, width: float, height: float) -> np.ndarray:
        """xyxy boxes in a ``width``×``height`` frame → xyxy boxes in the transformed frame."""
        x1, y1, x2, y2 = (boxes[:, i].copy() for i in range(4))
        if self.swap:
            x1, y1, x2, y2 = y1, x1, y2, x2
            width, height = height, width
        if self.flip_x:
            x1, x2 = width - x2, width - x1
        if self.flip_y:
            y1, y2 = height - y2, height - y1
        return np.stack([x1, y1, x2, y2], axis=1).astype(boxes.dtype)

    def direction(self, dx: int, dy: int) -> tuple[int, int]:
        if self.swap:
            dx, dy = dy, dx
        return (-dx if self.flip_x else dx), (-dy if self.flip_y else dy)

    def box_text(self, text: str) -> str:
        """Rewrite every ``{<x1><y1><x2><y2>}`` (0–100 of the image) in ``text``."""

        def rewrite(match: re.Match) -> str:
            box = np.asarray([[int(v) for v in match.groups()]], dtype=np.int64)
            x1, y1, x2, y2 = self.boxes(box, 100, 100)[0]
            return f"{{<{x1}><{y1}><{x2}><{y2}>}}"

        return schema.BOX_TEXT.sub(rewrite, text)

    def text(self, text: str) -> str:
        """Position words and text boxes rewritten for this transform (see :func:`rewrite_blocker`)."""
        if self.is_identity:
            return text
        return self.box_text(_DIRECTION_RE.sub(lambda m: _rewrite_direction(m, self), text))


_TRANSFORM_NAMES = {
    (False, False, False): "identity",
    (False, True, False): "hflip",
    (False, False, True): "vflip",
    (False, True, True): "rot180",
    (True, False, False): "transpose",
    (True, True, False): "rot90cw",
    (True, False, True): "rot90ccw",
    (True, True, True): "antitranspose",
}
TRANSFORMS = tuple(Transform(*key) for key in _TRANSFORM_NAMES)
IDENTITY = TRANSFORMS[0]

# Direction words, by family: a word is rewritten into the word of its own family that names the
# transformed direction ("upper" → "left" under transpose, "top" → "left", "left" → "top").
_LEFT, _RIGHT, _UP, _DOWN = (-1, 0), (1, 0), (0, -1), (0, 1)
_FAMILIES = (
    {_LEFT: "left", _RIGHT: "right", _UP: "top", _DOWN: "bottom"},
    {_LEFT: "left", _RIGHT: "right", _UP: "upper", _DOWN: "lower"},
    {_LEFT: "leftmost", _RIGHT: "rightmost", _UP: "topmost", _DOWN: "bottommost"},
    {_LEFT: "leftmost", _RIGHT: "rightmost", _UP: "uppermost", _DOWN: "lowermost"},
    {_LEFT: "west", _RIGHT: "east", _UP: "north", _DOWN: "south"},
)
_WORDS: dict[str, tuple[tuple[int, int], dict]] = {}
for _family in reversed(_FAMILIES):  # reversed: "left"/"right" belong to the first family
    for _direction, _word in _family.items():
        _WORDS[_word] = (_direction, _family)
_AXIS_WORDS = {"horizontal": "vertical", "vertical": "horizontal"}  # swapped by a transpose
_VERTICAL = "upper|lower|top|bottom|north|south"
_HORIZONTAL = "left|right|west|east"
_DIRECTION_RE = re.compile(
    r"(?:\b(?P<prep>on|at)(?P<the> the ))?"  # kept so that "on the left" can become "at the top"
    rf"(?:\b(?P<v>{_VERTICAL})(?P<sep>[ -]?)(?P<h>{_HORIZONTAL})\b"  # "upper left", "top-right", "northwest"
    rf"|\b(?P<word>{'|'.join(sorted(_WORDS, key=len, reverse=True))})\b"
    r"|\b(?P<axis>horizontal|vertical)(?P<ly>ly)?\b)",
    re.IGNORECASE,
)
# Words that start like a direction but are not one we can rewrite ("northern", "lefthand"), and
# relative or rotational words whose rewrite is not a word swap: a text holding one is not
# augmented. False alarms ("topic") only cost augmentation, never correctness.
_DIRECTION_STEM_RE = re.compile(
    r"\b(?:left|right|upper|lower|top|bottom|north|south|east|west)\w*", re.IGNORECASE
)
_UNSAFE_RE = re.compile(
    r"\b(?:above|below|beneath|under|underneath|clockwise|counterclockwise|anticlockwise|"
    r"diagonal|diagonally|rotated|facing|heading)\b"
    r"|\btop\s+\d",  # "the top 3 largest": a rank, not a position
    re.IGNORECASE,
)
_KNOWN_STEM_WORDS = set(_WORDS) | {v + h for v in _VERTICAL.split("|") for h in _HORIZONTAL.split("|")}
UNSAFE_PHRASE_TYPES = ("relation",)


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word


def _rewrite_direction(match: re.Match, transform: Transform) -> str:
    prep = match.group("prep")
    if match.group("v"):  # a corner: one vertical and one horizontal component
        v_dir, v_family = _WORDS[match.group("v").lower()]
        h_dir, h_family = _WORDS[match.group("h").lower()]
        dx, dy = transform.direction(h_dir[0], v_dir[1])
        vertical, horizontal = v_family[(0, dy)], h_family[(dx, 0)]
        new = (
            _match_case(vertical, match.group("v"))
            + match.group("sep")
            + _match_case(horizontal, match.group("h"))
        )
    elif match.group("word"):
        direction, family = _WORDS[match.group("word").lower()]
        new = _match_case(family[transform.direction(*direction)], match.group("word"))
        if prep and family is _FAMILIES[0] and not match.string[match.end() :].startswith(" side"):
            # The generator's idiom: "on the left", "at the top" (but "on the top side").
            prep = _match_case("at" if new.lower() in ("top", "bottom") else "on", prep)
    else:
        axis = match.group("axis").lower()
        new = _match_case(_AXIS_WORDS[axis] if transform.swap else axis, match.group("axis"))
        new += match.group("ly") or ""
    return f"{prep}{match.group('the')}{new}" if prep else new


def rewrite_blocker(texts: Iterable[str], phrase_type: str | None = None) -> str | None:
    """None when every text can follow a flip/rotation, else the reason why not."""
    if phrase_type in UNSAFE_PHRASE_TYPES:
        return f"phrase_type {phrase_type}"
    for text in texts:
        unsafe = _UNSAFE_RE.search(text)
        if unsafe:
            return f"word {unsafe.group(0)!r}"
        for stem in _DIRECTION_STEM_RE.finditer(text):
            if stem.group(0).lower() not in _KNOWN_STEM_WORDS:
                return f"word {stem.group(0)!r}"
    return None


class Augmented(NamedTuple):
    image: np.ndarray  # H'×W'×3 uint8
    masks: np.ndarray  # N×H'×W' uint8
    boxes: np.ndarray  # N×4 float32 pixel xyxy in the new frame
    conversation: list[dict[str, Any]]
    transform: Transform
    skipped: str | None  # why the record was not augmented, None when it could be


def augment(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    conversation: Sequence[Mapping[str, Any]],
    phrase_type: str | None,
    rng: np.random.Generator,
    choices: Sequence[Transform] = TRANSFORMS,
) -> Augmented:
    """A random flip/rotation (one of 8, identity included) applied to pixels, masks, boxes and text.

    Position words ("left", "upper right", "bottommost", "north-west", "horizontal") and
    ``{<x1><y1><x2><y2>}`` boxes in every turn are rewritten for the transform. Records whose
    text cannot be rewritten safely (phrase type ``relation``, words like "above" or "northern")
    are returned unchanged with ``skipped`` set. ``choices`` narrows the draw (e.g. flips only).
    """
    transform = choices[int(rng.integers(len(choices)))]
    skipped = rewrite_blocker((t["text"] for t in conversation), phrase_type)
    if skipped is not None or transform.is_identity:
        return Augmented(image, masks, boxes, [dict(t) for t in conversation], IDENTITY, skipped)
    height, width = image.shape[:2]
    return Augmented(
        image=np.ascontiguousarray(transform.image(image)),
        masks=np.ascontiguousarray(transform.masks(masks)),
        boxes=transform.boxes(boxes, width, height),
        conversation=[{**t, "text": transform.text(t["text"])} for t in conversation],
        transform=transform,
        skipped=None,
    )


# ------------------------------------------------------------------------------------ resizing
def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """H×W×3 uint8 → size×size×3, bilinear. Non-square images are stretched, not padded, so
    that boxes written in text (fractions of the image) stay valid."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """N×H×W → N×size×size, nearest neighbour at pixel centres (labels stay binary)."""
    _, height, width = masks.shape
    if (height, width) == (size, size):
        return masks
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return masks[:, rows[:, None], cols[None, :]]


# -------------------------------------------------------------------------------- tokenising
def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(getattr(ids, "ids", ids))


def encode_conversation(
    tokenizer: Any, conversation: Sequence[Mapping[str, Any]], max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of a conversation in the chat template.

    Layout: ``<s>`` (when the tokenizer has one), then per turn pair ``USER: {q} ASSISTANT:``
    (labels IGNORE_INDEX) and `` {answer}</s>`` (labels = ids, so seg tokens and eos are
    supervised). A conversation longer than ``max_length`` raises :class:`BadRecord` ("too
    long"): cutting it would cut seg runs away from their targets, so it is dropped and counted.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = tokenizer.eos_token_id
    ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [] if bos is None else [IGNORE_INDEX]
    for turn in conversation:
        if turn["role"] == "user":
            piece = _encode(tokenizer, prompt_text(turn["text"]))
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        else:
            piece = [*_encode(tokenizer, answer_text(turn["text"])), eos]
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


# ------------------------------------------------------------------------------------ samples
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
    original_masks: np.ndarray | None = None  # [N, H, W] uint8 at the decoded size


def record_image(record: Mapping[str, Any]) -> np.ndarray:
    data = record.get("image")
    if not data and record.get("image_uri"):
        try:
            data = storage.read_bytes(record["image_uri"])
        except (storage.StorageError, OSError) as exc:  # missing object, unreachable store: a bad row
            raise BadRecord("unreadable image_uri", f"{record['image_uri']}: {exc}") from None
    if not data:
        raise BadRecord("no image", "neither image bytes nor image_uri")
    return decode_image(data)


def record_rng(seed: int, epoch: int, record_id: str) -> np.random.Generator:
    """The augmentation RNG of one record in one epoch: independent of row order and of which
    worker reads the row, so a run is reproducible however Ray splits the shards."""
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
) -> tuple[Sample, Augmented | None]:
    """Decode, augment (when ``rng`` is given), resize and tokenise one record.

    Raises :class:`BadRecord` for rows that cannot be used. Mask targets are the record's
    targets when its answers hold one seg run per target (segment/refer); records whose answers
    hold no seg run (ground, caption, vqa) are supervised by text only and bring no masks.
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

    input_ids, labels = encode_conversation(tokenizer, conversation, max_length)
    positions = find_seg_runs(input_ids, seg_ids)
    if positions and len(positions) != len(masks):
        raise BadRecord("seg runs", f"{len(positions)} seg runs for {len(masks)} targets")
    if not positions and record.get("task") in schema.SEG_TASKS:
        raise BadRecord("seg runs", f"a {record.get('task')} answer without seg runs")
    if not positions:  # text-only supervision: targets (e.g. of a ground record) are not masks
        masks, boxes, class_ids = masks[:0], boxes[:0], class_ids[:0]

    scale = np.asarray([image_size / original_size[1], image_size / original_size[0]] * 2, np.float32)
    sample = Sample(
        record_id=record["record_id"],
        image_id=record.get("image_id") or "",
        task=record.get("task") or "",
        phrase_type=record.get("phrase_type"),
        transform=augmented.transform.name if augmented else IDENTITY.name,
        image=resize_image(image, image_size),
        input_ids=input_ids,
        labels=labels,
        masks=resize_masks(masks, image_size),
        boxes=boxes * scale,
        class_ids=class_ids,
        seg_positions=np.asarray(positions, dtype=np.int64),
        original_masks=np.ascontiguousarray(masks) if keep_original_masks else None,
    )
    return sample, augmented


# ------------------------------------------------------------------------------------ collate
def collate(
    samples: Sequence[Sample],
    pad_token_id: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """Samples → one batch (see docs/training_input.md for every key).

    Targets are packed along one axis T = Σ N_i (no padding): ``target_masks[T,S,S]``,
    ``target_sample[T]`` (which sample), ``seg_positions[T]`` (where its run starts in that
    sample's ``input_ids``); ``torch.split(x, target_counts.tolist())`` gives per-sample lists.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    pixel_values = images.permute(0, 3, 1, 2).float().div_(255.0)
    pixel_values.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1))

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
        "target_sample": torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)),
        "target_counts": torch.tensor(counts, dtype=torch.long),
        "record_ids": [s.record_id for s in samples],
        "image_ids": [s.image_id for s in samples],
        "tasks": [s.task for s in samples],
        "phrase_types": [s.phrase_type for s in samples],
        "transforms": [s.transform for s in samples],
    }
    if all(s.original_masks is not None for s in samples):
        batch["original_masks"] = [torch.from_numpy(s.original_masks) for s in samples]
    return batch


# ---------------------------------------------------------------------------------- streaming
def shard_files(shards_uri: str, split: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, sorted shard paths) of one split; :class:`ShardError` when none."""
    import pyarrow.fs as pafs

    split_uri = storage.join_uri(shards_uri, split)
    try:
        fs, path = storage.arrow_filesystem(split_uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:  # missing bucket, unreachable endpoint, no permission
        raise ShardError(f"cannot list shards under {split_uri}: {exc}") from None
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and SHARD_PATTERN.search(i.base_name)
    )
    if not files:
        raise ShardError(
            f"no shards for split {split!r}: nothing like shard-00000.parquet under {split_uri}/"
        )
    return fs, files


def shard_dataset(shards_uri: str, split: str) -> ray.data.Dataset:
    """The split's shards as a lazy Ray Dataset (what Ray Train hands each worker a share of).

    Every shard's Parquet footer is read here, so a missing or unreadable shard fails now with
    its name instead of deep inside a streaming read on a worker.
    """
    import ray.data

    fs, files = check_shards(shards_uri, split)
    return ray.data.read_parquet(files, filesystem=fs)


def check_shards(shards_uri: str, split: str) -> tuple[Any, list[str]]:
    """:func:`shard_files` of a finished shard set (its ``_SUCCESS`` written), with every shard's
    Parquet footer read and its columns checked, so an unfinished set or a missing or unreadable
    shard fails at once with its name instead of deep inside a worker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not storage.is_finished(shards_uri):
        raise ShardError(
            f"{shards_uri} holds no finished shard set (no {storage.SUCCESS_MARKER}): its sharding did not "
            "finish or is still writing; rerun `geopix data shard` for it"
        )
    fs, files = shard_files(shards_uri, split)
    for path in files:
        try:
            columns = set(pq.read_schema(path, filesystem=fs).names)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"shard {_uri_of(shards_uri, path)} is not readable Parquet: {exc}") from None
        missing = {"record_id", "image", "conversation", "targets"} - columns
        if missing:
            raise ShardError(f"shard {_uri_of(shards_uri, path)} lacks the columns {sorted(missing)}")
    return fs, files


def _uri_of(shards_uri: str, path: str) -> str:
    return f"s3://{path}" if storage.is_s3_uri(shards_uri) else path


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
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        prefetch_batches: int = 1,
        read_batch_size: int | None = None,
    ):
        self.data = data
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.max_length = max_length
        self.augment = augment
        self.seed = seed
        self.epoch = epoch
        self.keep_original_masks = keep_original_masks
        self.drop_last = drop_last
        self.mean, self.std = mean, std
        self.prefetch_batches = prefetch_batches
        # Rows are fetched from Ray in bigger blocks than training batches: fewer round trips.
        self.read_batch_size = read_batch_size or max(batch_size, 64)
        self.seg_ids = seg_vocab.token_ids(tokenizer)
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
        rng = record_rng(self.seed, self.epoch, record_id) if self.augment else None
        try:
            sample, augmented = prepare_sample(
                record,
                self.tokenizer,
                image_size=self.image_size,
                max_length=self.max_length,
                seg_ids=self.seg_ids,
                rng=rng,
                keep_original_masks=self.keep_original_masks,
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
        return collate(samples, self.pad_token_id, self.mean, self.std)


def iter_batches(
    data: Any,
    tokenizer: Any,
    *,
    image_size: int,
    batch_size: int,
    max_length: int | None,
    augment: bool,
    seed: int,
    seg_vocab: SegVocabulary,
    epoch: int = 0,
    **options: Any,
) -> BatchIterator:
    """Collated batches from a Ray ``DataIterator`` (``ray.train.get_dataset_shard``), a Ray
    ``Dataset``, a pyarrow Table or an iterable of records; ``.stats`` counts what was dropped.

    Deterministic for a given ``seed``/``epoch`` and row order (augmentation draws depend only on
    seed, epoch and record id). ``options``: see :class:`BatchIterator`.
    """
    return BatchIterator(
        data,
        tokenizer,
        image_size=image_size,
        batch_size=batch_size,
        max_length=max_length,
        augment=augment,
        seed=seed,
        seg_vocab=seg_vocab,
        epoch=epoch,
        **options,
    )
