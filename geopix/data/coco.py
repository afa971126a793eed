"""COCO-style instances (+ optional referring expressions) → GeoPix records.

Input:

* a COCO instance JSON: ``images`` (id, file_name, width, height), ``annotations`` (id,
  image_id, category_id, segmentation as polygons or RLE, bbox ``[x, y, w, h]``, iscrowd) and
  ``categories`` (id, name);
* optionally referring expressions as JSON in the refCOCO / RRSIS-D style: a list of
  ``{"ann_id", "image_id", "split", "sentences": [{"sent": …}]}`` (the refs pickle those data
  sets ship is never unpickled: convert it to JSON once, see docs/data.md);
* images in a local folder or under an S3 prefix, named by ``file_name``.

Output, per image: one ``segment`` record per class present ("Segment all ships." → every
instance of the class), and per referring sentence one ``refer`` record and one ``ground``
record (whose answer draws the object and states its box, as GeoPix answers: "Sure, it is
[SEG…] at {<x1><y1><x2><y2>}."). Images are referenced by URI and fetched (and checked) by sharding. Crowd annotations
are skipped and counted. Every record of an image carries its ``class_counts`` (COCO annotates
every instance of its categories), null where one of the image's annotations was skipped.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geopix import storage
from geopix.answer_form import box_to_text, count_answer, grounding_answer
from geopix.data.phrases import label, plural
from geopix.data.schema import (
    TASK_TAGS,
    ClassCatalog,
    decode_mask,
    encode_mask,
)
from geopix.data.source import SourceWriter
from geopix.vocabulary import IMAGE_TOKEN, SegVocabulary

REFCOCO_SPLITS = {
    "train": "train",
    "val": "val",
    "test": "test",
    "testA": "test",
    "testB": "test",
    "testC": "test",
}


class CocoImportError(ValueError):
    """Input that cannot be imported; the message names the file and the entry."""


@dataclass
class ImportStats:
    images: int = 0
    records: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason → count, never silently dropped
    # reason → the first few entries it hit, each naming the file, the entry and the field
    examples: dict[str, list[str]] = field(default_factory=dict)
    boxes_from_masks: int = 0  # annotations without a bbox: the box is the mask's

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)


MAX_EXAMPLES = 5


def _load_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_bytes(uri))
    except (storage.StorageError, FileNotFoundError):
        raise CocoImportError(f"{uri} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CocoImportError(f"{uri} is not valid JSON: {exc}") from None


def _entry(key: str, index: int, entry: Any) -> str:
    """``annotations[4] (id 17)``: where an entry sits in its file."""
    ident = entry.get("id", entry.get("ref_id")) if isinstance(entry, Mapping) else None
    return f"{key}[{index}]" + (f" (id {ident})" if ident is not None else "")


def _missing(entry: Any, fields: tuple[str, ...]) -> list[str]:
    if not isinstance(entry, Mapping):
        return ["(not an object)"]
    return [f for f in fields if entry.get(f) is None]


def _names(fields: list[str]) -> str:
    return ", ".join(repr(f) for f in fields)


def _complete(
    entries: list, key: str, fields: tuple[str, ...], what: str, uri: str, stats: ImportStats
) -> Iterator[tuple[int, dict]]:
    """(index, entry) of the entries that have every field; the others are skipped and counted,
    each named by file, entry and the fields it lacks."""
    for index, entry in enumerate(entries):
        missing = _missing(entry, fields)
        if missing:
            stats.skip(f"{what} without {_names(missing)}", f"{uri}: {_entry(key, index, entry)} has no {_names(missing)}")
            continue
        yield index, entry


def _segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        rles = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.decode(mask_utils.merge(rles))
    if isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, Mapping):
        return decode_mask(segmentation)
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def coco_records(
    instances_uri: str,
    images_uri: str,
    refs_uri: str | None = None,
    source: str = "coco",
    *,
    seg_vocab: SegVocabulary,
) -> tuple[ClassCatalog, Iterator[dict[str, Any]], ImportStats]:
    """The catalog, a record iterator and the stats it fills while it runs.

    The class list must be whole (a category without ``id`` or ``name`` is an error naming the file
    and the entry). An image, annotation or referring expression that lacks what it needs is skipped
    and counted by reason, with the first few named (file, entry, field) in ``stats.examples``; an
    annotation without ``bbox`` takes its mask's box (counted too)."""
    coco = _load_json(instances_uri)
    if not isinstance(coco, Mapping):
        raise CocoImportError(f"{instances_uri}: expected a COCO object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise CocoImportError(f"{instances_uri}: key {key!r} is missing or not a list")
    names: dict[int, str] = {}
    for index, category in enumerate(coco["categories"]):
        missing = _missing(category, ("id", "name"))
        if missing:
            raise CocoImportError(
                f"{instances_uri}: {_entry('categories', index, category)} has no {_names(missing)}: "
                "every category needs an id and a name"
            )
        names[int(category["id"])] = str(category["name"])
    catalog = ClassCatalog(names)
    refs = _load_json(refs_uri) if refs_uri else []
    if not isinstance(refs, list):
        raise CocoImportError(f"{refs_uri}: expected a list of referring expressions")
    stats = ImportStats()
    files = {"instances": instances_uri, "refs": refs_uri or ""}
    return catalog, _records(coco, refs, catalog, images_uri, source, seg_vocab, stats, files), stats


def _records(coco, refs, catalog, images_uri, source, seg_vocab, stats, files) -> Iterator[dict[str, Any]]:
    instances_uri, refs_uri = files["instances"], files["refs"]
    anns_by_image: dict[Any, list[tuple[int, dict]]] = defaultdict(list)
    fields = ("id", "image_id", "category_id", "segmentation")
    for index, ann in _complete(coco["annotations"], "annotations", fields, "annotation", instances_uri, stats):
        if int(ann["category_id"]) not in catalog.names:
            stats.skip("annotation of an unknown category",
                       f"{instances_uri}: {_entry('annotations', index, ann)}: category_id {ann['category_id']} "
                       "is not in categories")  # fmt: skip
            continue
        anns_by_image[ann["image_id"]].append((index, ann))
    refs_by_image: dict[Any, list[tuple[int, dict]]] = defaultdict(list)
    for index, ref in _complete(refs, "refs", ("ann_id", "image_id"), "referring expression", refs_uri, stats):
        split = ref.get("split")
        if split is not None and split not in REFCOCO_SPLITS:
            stats.skip("referring expression of an unknown split",
                       f"{refs_uri}: {_entry('refs', index, ref)}: split {split!r} is none of "
                       f"{', '.join(REFCOCO_SPLITS)}")  # fmt: skip
            continue
        refs_by_image[ref["image_id"]].append((index, ref))
    run = seg_vocab.run

    fields = ("id", "file_name", "width", "height")
    images = [image for _, image in _complete(coco["images"], "images", fields, "image", instances_uri, stats)]
    for image in sorted(images, key=lambda i: i["id"]):
        width, height = int(image["width"]), int(image["height"])
        image_id = f"{source}-{image['id']}"
        base = {
            "image_id": image_id,
            "image": None,
            "image_uri": storage.join_uri(images_uri, image["file_name"]),
            "width": width,
            "height": height,
            "source": source,
        }
        targets: dict[int, dict] = {}
        every_instance = True  # until an annotation of the image is skipped
        for index, ann in anns_by_image.get(image["id"], []):
            if ann.get("iscrowd"):
                stats.skipped["crowd annotation"] += 1
                every_instance = False
                continue
            try:
                mask = _segmentation_to_mask(ann["segmentation"], height, width)
            except Exception as exc:  # noqa: BLE001 - pycocotools raises plain Exceptions on bad input
                stats.skip(f"annotation with unreadable segmentation ({type(exc).__name__})",
                           f"{instances_uri}: {_entry('annotations', index, ann)}: segmentation: {exc}")  # fmt: skip
                every_instance = False
                continue
            if ann.get("bbox") is None:
                box = mask_box(mask)
                if box is None:
                    stats.skip("annotation without 'bbox' and with an empty mask",
                               f"{instances_uri}: {_entry('annotations', index, ann)} has no 'bbox' and an empty mask")  # fmt: skip
                    every_instance = False
                    continue
                stats.boxes_from_masks += 1
            else:
                x, y, w, h = (float(v) for v in ann["bbox"])
                box = [x, y, x + w, y + h]
            class_id = int(ann["category_id"])
            targets[ann["id"]] = {
                "instance_id": int(ann["id"]),
                "class_id": class_id,
                "class_name": catalog.names[class_id],
                "box": box,
                "mask": encode_mask(mask),
                "description": "",
            }
        stats.images += 1
        by_class: dict[int, list[dict]] = defaultdict(list)
        for target in targets.values():
            by_class[target["class_id"]].append(target)
        # COCO annotates every instance of its categories; a skipped annotation leaves it unknown.
        base["class_counts"] = (
            [{"class_id": c, "count": len(m)} for c, m in sorted(by_class.items())] if every_instance else None
        )
        for class_id, members in sorted(by_class.items()):
            class_name = catalog.names.get(class_id, str(class_id))
            name = plural(class_name)
            answer = count_answer(len(members), label(class_name), name, run)
            stats.records["segment"] += 1
            yield base | {
                "record_id": f"{image_id}-segment-{class_id}",
                "split": None,
                "task": "segment",
                "phrase_type": "all_of_class",
                "template_id": "coco-segment",
                "conversation": [
                    {"role": "user", "text": f"{IMAGE_TOKEN}\n{TASK_TAGS['segment']} Segment all {name}."},
                    {"role": "assistant", "text": answer},
                ],
                "targets": [t | {"description": f"all {name}"} for t in members],
            }
        for index, ref in refs_by_image.get(image["id"], []):
            target = targets.get(ref.get("ann_id"))
            if target is None:
                stats.skip("referring expression whose annotation is missing or skipped",
                           f"{refs_uri}: {_entry('refs', index, ref)}: ann_id {ref.get('ann_id')} is not an imported "
                           "annotation of its image")  # fmt: skip
                continue
            split = REFCOCO_SPLITS.get(ref.get("split"))  # None (no split given): assigned by sharding
            for k, sentence in enumerate(ref.get("sentences") or []):
                phrase = (sentence.get("sent") or sentence.get("raw") or "").strip()
                if not phrase:
                    stats.skip("empty referring sentence", f"{refs_uri}: {_entry('refs', index, ref)}: sentences[{k}] is empty")
                    continue
                described = target | {"description": phrase}
                ref_id = f"{image_id}-{ref.get('ref_id', ref['ann_id'])}-{k}"
                stats.records["refer"] += 1
                yield base | {
                    "record_id": f"{ref_id}-refer",
                    "split": split,
                    "task": "refer",
                    "phrase_type": None,
                    "template_id": "coco-refer",
                    "conversation": [
                        {"role": "user", "text": f"{IMAGE_TOKEN}\n{TASK_TAGS['refer']} {phrase}"},
                        {"role": "assistant", "text": f"Sure, it is {run}."},
                    ],
                    "targets": [described],
                }
                stats.records["ground"] += 1
                yield base | {
                    "record_id": f"{ref_id}-ground",
                    "split": split,
                    "task": "ground",
                    "phrase_type": None,
                    "template_id": "coco-ground",
                    "conversation": [
                        {"role": "user", "text": f"{IMAGE_TOKEN}\n{TASK_TAGS['ground']} Where is {phrase}?"},
                        {"role": "assistant", "text": grounding_answer(run, box_to_text(target["box"], width, height))},
                    ],
                    "targets": [described],
                }


def import_coco(
    instances_uri: str,
    images_uri: str,
    out_uri: str,
    refs_uri: str | None = None,
    source: str = "coco",
    *,
    seg_vocab: SegVocabulary,
) -> ImportStats:
    """Write a record source at ``out_uri`` from COCO instances (+ referring expressions)."""
    catalog, records, stats = coco_records(instances_uri, images_uri, refs_uri, source, seg_vocab=seg_vocab)
    with SourceWriter(out_uri, catalog) as writer:
        for record in records:
            writer.write(record)
    return stats


def mask_box(mask: np.ndarray) -> list[float] | None:
    """[x1, y1, x2, y2] of a mask's pixels (None when it is empty)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
