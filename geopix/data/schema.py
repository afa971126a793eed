"""The canonical instruction record: one image, one task, one conversation, its targets.

Records are rows of :data:`RECORD_SCHEMA` (a versioned pyarrow schema). Every source (the
synthetic generator, the COCO importer) writes them; sharding validates them with
:func:`validate_record`, which returns every problem it finds, each naming the field.

Text conventions (GEOPIX.md §3):

* the first user turn starts with ``<image>\\n`` and a task tag (``[segment]``, ``[refer]``, …);
* an answer holds one seg run per target, ``[SEG0][SEG1]…[SEG5]`` for 3 tokens × 2 scales (the
  run is the model's :class:`~geopix.vocabulary.SegVocabulary`, which records are checked against);
* boxes in text are ``{<x1><y1><x2><y2>}``, integers 0–100 of the image width/height;
* pixel boxes in targets are ``[x1, y1, x2, y2]`` floats in pixels, masks COCO RLE (compressed
  counts as text, ``size = [height, width]``).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from geopix.answer_form import parse_box_text
from geopix.vocabulary import IMAGE_TOKEN, SegVocabulary

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"geopix.schema_version"

TASKS = ("segment", "refer", "caption", "vqa", "ground")
SPLITS = ("train", "val", "test")
ROLES = ("user", "assistant")
PHRASE_TYPES = ("class", "colour", "size_rank", "position", "relation", "all_of_class")
SEG_TASKS = ("segment", "refer")  # answers carry one seg run per target
COMPLETE_PHRASE_TYPE = "all_of_class"  # its targets are every instance of their class in the image

# Size buckets on mask area in pixels, COCO's convention as half-open ranges, so every area has
# exactly one bucket: small < 32², medium 32² to < 96², large ≥ 96². The generator's statistics and
# the evaluation both bucket through size_bucket (evaluation with its configurable bounds).
SIZE_BUCKETS = ("small", "medium", "large")
SMALL_MAX_AREA, MEDIUM_MAX_AREA = 32 * 32, 96 * 96


def size_bucket(area: int, small_max_area: int = SMALL_MAX_AREA, medium_max_area: int = MEDIUM_MAX_AREA) -> str:
    if area < small_max_area:
        return "small"
    return "medium" if area < medium_max_area else "large"


TASK_TAGS = {
    "segment": "[segment]",
    "refer": "[refer]",
    "caption": "[caption]",
    "vqa": "[Visual Question Answering]",
    "ground": "[grounding]",
}

RLE_TYPE = pa.struct([pa.field("size", pa.list_(pa.int32(), 2)), pa.field("counts", pa.string())])
TARGET_TYPE = pa.struct(
    [
        pa.field("instance_id", pa.int32()),
        pa.field("class_id", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("box", pa.list_(pa.float32(), 4)),
        pa.field("mask", RLE_TYPE),
        pa.field("description", pa.string()),
    ]
)
TURN_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("text", pa.string())])
CLASS_COUNT_TYPE = pa.struct([pa.field("class_id", pa.int32()), pa.field("count", pa.int32())])

RECORD_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),  # encoded PNG/JPEG/TIFF bytes, or null when image_uri is set
        pa.field("image_uri", pa.string()),  # s3://… or a local path, or null when image is set
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("split", pa.string()),  # train/val/test, or null: sharding assigns it by image id
        pa.field("task", pa.string()),
        pa.field("phrase_type", pa.string()),  # how the referring phrase picks its target(s)
        pa.field("template_id", pa.string()),  # which phrasing template produced the text
        pa.field("conversation", pa.list_(TURN_TYPE)),
        pa.field("targets", pa.list_(TARGET_TYPE)),
        # Every class the picture holds, with its number of instances (classes not listed hold
        # none), when the source annotates every instance of every class; null otherwise. The
        # targets of one question rarely say which classes a picture lacks: training reads it.
        pa.field("class_counts", pa.list_(CLASS_COUNT_TYPE)),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

# Columns a record file may lack (written before they existed): read as null.
OPTIONAL_COLUMNS = frozenset({"class_counts"})

REJECT_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("origin", pa.string()),  # file (and row) the record came from
        pa.field("reason", pa.string()),
    ]
)


class BadRecord(ValueError):
    """A record a reader cannot use (undecodable image, inconsistent targets, too long, …): the
    training input drops it and counts it under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ClassCatalog:
    """Class ids and names of one source (written beside it as ``classes.json``)."""

    names: Mapping[int, str]

    @classmethod
    def from_json(cls, text: str | bytes) -> ClassCatalog:
        data = json.loads(text)
        return cls({int(item["id"]): str(item["name"]) for item in data})

    def to_json(self) -> str:
        return json.dumps([{"id": k, "name": v} for k, v in sorted(self.names.items())], indent=1)

    def __contains__(self, class_id: int) -> bool:
        return class_id in self.names


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Binary H×W mask → COCO RLE ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_run_lengths(counts: str) -> list[int]:
    """Run lengths of COCO's compressed RLE string (the inverse of maskApi's rleToString).

    pycocotools decodes malformed strings into arbitrary masks without complaint, so the
    validator reads the runs itself and checks that they are non-negative and cover the image.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("RLE counts end in the middle of a number")
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"RLE counts hold an invalid character {counts[pos]!r}")
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_rle(rle: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``rle`` is a well-formed compressed RLE covering its size."""
    height, width = (int(v) for v in rle["size"])
    runs = rle_run_lengths(rle["counts"])
    if any(r < 0 for r in runs):
        raise ValueError("RLE has a negative run length")
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the mask has {height * width}")


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    return mask_utils.decode(
        {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    )


def _check_image_bytes(data: bytes, width: int | None, height: int | None) -> list[str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.load()  # decodes every byte: a truncated file fails here
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return [f"image: bytes do not decode as an image ({exc})"]
    if width and height and size != (width, height):
        return [f"image: decodes to {size[0]}x{size[1]} but width/height say {width}x{height}"]
    return []


def validate_record(
    record: Mapping[str, Any],
    catalog: ClassCatalog | None,
    seg_vocab: SegVocabulary,
    check_image: bool = True,
) -> list[str]:
    """Every problem with ``record``, each naming its field; an empty list means valid."""
    problems: list[str] = []
    for key in ("record_id", "image_id"):
        if not record.get(key):
            problems.append(f"{key}: missing")
    width, height = record.get("width"), record.get("height")
    if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
        problems.append(f"width/height: must be positive integers, got {width!r}x{height!r}")
        width = height = None
    task = record.get("task")
    if task not in TASKS:
        problems.append(f"task: {task!r} is not one of {', '.join(TASKS)}")
    if record.get("split") not in (None, *SPLITS):
        problems.append(f"split: {record.get('split')!r} is not one of {', '.join(SPLITS)} (or null)")
    if record.get("phrase_type") not in (None, *PHRASE_TYPES):
        problems.append(f"phrase_type: {record.get('phrase_type')!r} is not one of {', '.join(PHRASE_TYPES)}")

    image, uri = record.get("image"), record.get("image_uri")
    if not image and not uri:
        problems.append("image: neither image bytes nor image_uri is set")
    elif image and check_image:
        problems += _check_image_bytes(image, width, height)

    problems += _validate_conversation(
        record.get("conversation") or [], task, len(record.get("targets") or []), seg_vocab
    )
    for index, target in enumerate(record.get("targets") or []):
        problems += [f"targets[{index}].{p}" for p in _validate_target(target, width, height, catalog)]
    if task in SEG_TASKS and not record.get("targets"):
        problems.append(f"targets: a {task} record needs at least one target")
    if record.get("class_counts") is not None:
        problems += _validate_class_counts(record, catalog)
    return problems


def _validate_class_counts(record: Mapping[str, Any], catalog: ClassCatalog | None) -> list[str]:
    """``class_counts`` lists each class once with a positive count, and agrees with the targets:
    no target of an unlisted class, no more targets of a class than it holds, and exactly as
    many as it holds when the targets are every instance of their class."""
    problems, counts = [], {}
    for index, item in enumerate(record["class_counts"]):
        class_id, count = item.get("class_id"), item.get("count")
        if catalog is not None and class_id not in catalog:
            problems.append(f"class_counts[{index}].class_id: {class_id!r} is not in the source's classes")
        if class_id in counts:
            problems.append(f"class_counts[{index}].class_id: class {class_id} is listed twice")
        if not isinstance(count, int) or count < 1:
            problems.append(f"class_counts[{index}].count: must be a positive integer, got {count!r}")
        counts[class_id] = count
    held = Counter(t.get("class_id") for t in record.get("targets") or [])
    complete = record.get("phrase_type") == COMPLETE_PHRASE_TYPE
    for class_id, n in sorted(held.items()):
        holds = counts.get(class_id) or 0
        if n > holds or (complete and n != holds):
            problems.append(f"class_counts: class {class_id} holds {holds} but the targets have {n} of it")
    return problems


def _validate_conversation(
    turns: Sequence[Mapping[str, Any]], task: str | None, n_targets: int, seg_vocab: SegVocabulary
) -> list[str]:
    if len(turns) < 2:
        return ["conversation: needs at least one user turn and one assistant turn"]
    problems = []
    for index, turn in enumerate(turns):
        expected = ROLES[index % 2]
        if turn.get("role") != expected:
            problems.append(f"conversation[{index}].role: {turn.get('role')!r}, expected {expected!r}")
        if not (turn.get("text") or "").strip():
            problems.append(f"conversation[{index}].text: empty")
    first = turns[0].get("text") or ""
    if not first.startswith(IMAGE_TOKEN):
        problems.append(f"conversation[0].text: must start with {IMAGE_TOKEN}")
    if task in TASK_TAGS and TASK_TAGS[task] not in first:
        problems.append(f"conversation[0].text: lacks the task tag {TASK_TAGS[task]} of task {task!r}")
    answers = " ".join(t.get("text") or "" for t in turns if t.get("role") == "assistant")
    runs, run_problems = seg_vocab.count_runs(answers)
    problems += [f"conversation: {p}" for p in run_problems]
    if task in SEG_TASKS and runs != n_targets:
        problems.append(f"conversation: {runs} seg runs in the answers for {n_targets} targets")
    if task == "vqa" and runs and runs != n_targets:  # a run draws the asked object (geopix.answer_form)
        problems.append(f"conversation: {runs} seg runs in a vqa answer for {n_targets} targets")
    if task == "ground":
        boxes = parse_box_text(answers)
        if not boxes:
            problems.append("conversation: a ground answer needs a {<x1><y1><x2><y2>} box")
        if runs and runs != n_targets:  # a run draws the boxed target (geopix.answer_form)
            problems.append(f"conversation: {runs} seg runs in a ground answer for {n_targets} targets")
        for box in boxes:
            if any(v > 100 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
                problems.append(f"conversation: box {box} is not x1<x2, y1<y2 within 0–100")
    return problems


def _validate_target(
    target: Mapping[str, Any], width: int | None, height: int | None, catalog: ClassCatalog | None
) -> list[str]:
    problems = []
    class_id = target.get("class_id")
    if catalog is not None:
        if class_id not in catalog:
            problems.append(f"class_id: {class_id!r} is not in the source's classes")
        elif target.get("class_name") != catalog.names[class_id]:
            problems.append(
                f"class_name: {target.get('class_name')!r} but class {class_id} is {catalog.names[class_id]!r}"
            )
    box = target.get("box")
    if box is None or len(box) != 4:
        problems.append(f"box: needs [x1, y1, x2, y2], got {box!r}")
    else:
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            problems.append(f"box: {list(box)} is empty or inverted")
        if width and height and (x1 < 0 or y1 < 0 or x2 > width or y2 > height):
            problems.append(f"box: {list(box)} lies outside the {width}x{height} image")
    rle = target.get("mask")
    if not rle:
        problems.append("mask: missing")
    else:
        try:
            check_rle(rle)
            mask = decode_mask(rle)
        except Exception as exc:  # noqa: BLE001 - pycocotools raises bare Exceptions on malformed counts
            problems.append(f"mask: RLE does not decode ({exc})")
        else:
            if width and height and mask.shape != (height, width):
                problems.append(
                    f"mask: RLE size {list(mask.shape)} but the image is {height}x{width} (h x w)"
                )
            elif not mask.any():
                problems.append("mask: empty")
    return problems
