"""GeoPixInstruct annotations (the GeoPix authors' release) → GeoPix records.

Input, as the dataset card of ``Norman-ou/GeoPixInstruct-Anno`` publishes it: Parquet files named
``<split>.<subset>-NNNNN-of-NNNNN.parquet`` (usually under ``data/``), split ``train`` or
``valid``, subset ``SIOR_T``, ``FAST_T`` or ``SOTA_T``; one row per image::

    image_id: string, image_path: string,
    instances: list<{bbox: list<int64>, category: string, category_id: int64, description: string,
                     instance_id: string, mask: {counts: string, size: list<int64>}}>

The images are not in the release: they come from SAMRS (its SIOR, FAST and SOTA sets), and
``images`` names the user's copy, one root for every subset or one per subset. An image is
found at ``<root>/<image_path>`` or, failing that, by its file name anywhere under the root
(one match only).

Output, per image: one ``segment`` record per category ("Sure, there are 3 ships: …", every
instance of it), and per instance with a description one ``refer`` and one ``ground`` record
(the grounding answer draws the object and states its box, as GeoPix answers). Upstream
``train`` images go to our train split, a ``val_fraction`` of them (by image id) to val;
upstream ``valid`` is our test split (what the authors report on). The subset stays in each
record's ``source`` and id. The class space is the union of the data's categories with their
own ids.

Nothing is silently dropped. A missing or unreadable image rejects the image; an instance with a
mask whose RLE size is not the image's, a box outside the image, a missing field, or an
``instance_id`` used twice in one image is rejected, and so is the image's ``segment`` record
of that category (its count would be wrong). Every rejection is counted by reason with its
first examples (file, row, instance), printed and written to ``import_report.json``.

Boxes: the card does not say whether ``bbox`` is ``[x1, y1, x2, y2]`` or COCO's
``[x, y, w, h]``; ``box_format="auto"`` takes the one that agrees with the instances' masks
(their boxes) on the first instances where the two readings differ, and says which in the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from geopix import storage
from geopix.answer_form import box_iou, box_to_text, count_answer, grounding_answer
from geopix.data.coco import mask_box
from geopix.data.phrases import GROUND, REFER, SEGMENT, Template, label, plural
from geopix.data.schema import TASK_TAGS, ClassCatalog, decode_mask
from geopix.data.source import IMPORT_REPORT_FILE, SourceWriter
from geopix.vocabulary import IMAGE_TOKEN, SegVocabulary

SUBSETS = ("SIOR_T", "FAST_T", "SOTA_T")
SPLIT_OF = {"train": "train", "valid": "test"}  # upstream split → ours (val: carved from train)
FILE_NAME = re.compile(r"^(?P<split>train|valid)\.(?P<subset>[A-Za-z0-9_]+)-.*\.parquet$")
BOX_FORMATS = ("auto", "xyxy", "xywh")
MAX_EXAMPLES = 5
BOX_SAMPLE = 200  # instances whose two box readings differ, looked at by box_format="auto"


class GeoPixInstructError(ValueError):
    """Input that cannot be imported at all; the message names the file or option."""


@dataclass
class ImportReport:
    files: list[str] = field(default_factory=list)
    images: Counter = field(default_factory=Counter)  # subset.split → images imported
    records: Counter = field(default_factory=Counter)  # task → records written
    rejected: Counter = field(default_factory=Counter)  # reason → count (images or instances)
    examples: dict[str, list[str]] = field(default_factory=dict)
    instances_without_description: int = 0  # in segment records only (no refer/ground record)
    images_without_instances: int = 0  # imported, but no record to make of them
    images_found_by_name: int = 0  # not at <root>/<image_path>, found by file name under the root
    box_format: str = ""
    box_format_evidence: str = ""

    def reject(self, reason: str, example: str, count: int = 1) -> None:
        self.rejected[reason] += count
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "images": dict(sorted(self.images.items())),
            "records": dict(sorted(self.records.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "examples": self.examples,
            "instances_without_description": self.instances_without_description,
            "images_without_instances": self.images_without_instances,
            "images_found_by_name": self.images_found_by_name,
            "box_format": self.box_format,
            "box_format_evidence": self.box_format_evidence,
        }


# ---------------------------------------------------------------------------------------------
# Where things are


def annotation_files(annotations: str, subsets: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(uri, upstream split, subset) of every annotation file under ``annotations`` (the folder
    or S3 prefix of the downloaded dataset, or its ``data/`` folder), sorted."""
    found = [uri for uri in _parquet_files(annotations)]
    if not found:
        raise GeoPixInstructError(
            f"{annotations}: no Parquet files here or under data/ (expected the dataset card's "
            "<split>.<subset>-NNNNN-of-NNNNN.parquet, e.g. data/train.SIOR_T-00000-of-00001.parquet)"
        )
    files = []
    for uri in found:
        name = PurePosixPath(uri).name
        match = FILE_NAME.match(name)
        if match is None:
            raise GeoPixInstructError(
                f"{uri}: cannot tell split and subset from the file name (expected <train|valid>.<subset>-….parquet)"
            )
        if subsets is None or match["subset"] in subsets:
            files.append((uri, match["split"], match["subset"]))
    if not files:
        raise GeoPixInstructError(
            f"{annotations}: no annotation file of subset(s) {', '.join(subsets or [])}"
        )
    return files


def _parquet_files(annotations: str) -> list[str]:
    for uri in (annotations, storage.join_uri(annotations, "data")):
        found = storage.list_files(uri, "*.parquet")
        if found:
            return found
    return []


def parse_images_option(images: list[str]) -> dict[str | None, str]:
    """``["ROOT"]`` (every subset) or ``["SIOR_T=ROOT", …]`` → {subset or None: root}."""
    roots: dict[str | None, str] = {}
    for item in images:
        subset, sep, root = item.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9_]+", subset) and not storage.is_s3_uri(item):
            roots[subset] = root
        else:
            roots[None] = item
    return roots


class ImageFinder:
    """Resolves ``image_path`` under a subset's image root: ``<root>/<image_path>``, or the one
    file of that name anywhere under the root (the release's paths are the authors' own)."""

    def __init__(self, roots: Mapping[str | None, str]):
        self.roots = dict(roots)
        self._listing: dict[str, tuple[set[str], dict[str, list[str]]]] = {}

    def root(self, subset: str) -> str:
        root = self.roots.get(subset, self.roots.get(None))
        if root is None:
            raise GeoPixInstructError(
                f"no image root for subset {subset}: pass --images ROOT or --images {subset}=ROOT"
            )
        return root

    def _files(self, root: str) -> tuple[set[str], dict[str, list[str]]]:
        if root not in self._listing:
            relative = storage.list_objects(root)
            by_name: dict[str, list[str]] = defaultdict(list)
            for rel in relative:
                by_name[PurePosixPath(rel).name].append(rel)
            self._listing[root] = (set(relative), by_name)
        return self._listing[root]

    def find(self, subset: str, image_path: str) -> tuple[str | None, str]:
        """(URI or None, how it was found or why not)."""
        root = self.root(subset)
        relative, by_name = self._files(root)
        path = image_path.replace("\\", "/").lstrip("/")
        # the path as given, then with its leading folders dropped one by one (absolute paths of
        # the authors' machines end in the layout of the user's copy)
        parts = PurePosixPath(path).parts
        for k in range(len(parts)):
            candidate = "/".join(parts[k:])
            if candidate in relative:
                return storage.join_uri(root, candidate), "path" if k == 0 else "name"
        matches = by_name.get(PurePosixPath(path).name, [])
        if len(matches) == 1:
            return storage.join_uri(root, matches[0]), "name"
        if len(matches) > 1:
            return None, f"{len(matches)} files named {PurePosixPath(path).name!r} under {root}"
        return None, f"no file {path!r} (nor one named {PurePosixPath(path).name!r}) under {root}"


def image_size(uri: str) -> tuple[int, int]:
    """(width, height) of an image file; raises ValueError when no reader opens it."""
    from PIL import Image, UnidentifiedImageError

    data = storage.read_bytes(uri)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            from rasterio.io import MemoryFile

            with MemoryFile(data) as memfile, memfile.open() as dataset:
                return dataset.width, dataset.height
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Boxes


def as_xyxy(bbox: list[float], box_format: str) -> tuple[float, float, float, float]:
    x1, y1, a, b = (float(v) for v in bbox)
    return (x1, y1, x1 + a, y1 + b) if box_format == "xywh" else (x1, y1, a, b)


def _mask_box(rle: Mapping[str, Any]) -> list[float] | None:
    try:
        return mask_box(decode_mask(rle))
    except Exception:  # noqa: BLE001 - pycocotools raises plain Exceptions on bad RLE
        return None


def infer_box_format(files: list[tuple[str, str, str]]) -> tuple[str, str]:
    """("xyxy" | "xywh", the evidence): the reading of ``bbox`` that agrees with the masks' boxes,
    on the first instances where the two readings differ."""
    votes: Counter = Counter()
    instances = (inst for uri, _, _ in files for row in _rows(uri) for inst in row.get("instances") or [])
    for inst in instances:
        bbox, mask = inst.get("bbox"), inst.get("mask")
        if not bbox or len(bbox) != 4 or not mask or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            continue  # an [x, y, w, h] whose w, h are not beyond x, y reads only one way
        box = _mask_box(mask)
        if box is None:  # empty or undecodable: the import itself reports it
            continue
        xyxy, xywh = box_iou(box, as_xyxy(bbox, "xyxy")), box_iou(box, as_xyxy(bbox, "xywh"))
        if abs(xyxy - xywh) > 0.1:
            votes["xyxy" if xyxy > xywh else "xywh"] += 1
        if sum(votes.values()) >= BOX_SAMPLE:
            break
    if not votes:
        return "xyxy", "no instance told the two readings apart; [x1, y1, x2, y2] assumed"
    best, n = votes.most_common(1)[0]
    return best, f"{n} of {sum(votes.values())} instances' boxes agree with their masks read as {best}"


# ---------------------------------------------------------------------------------------------
# Records


def _rows(uri: str) -> Iterator[dict[str, Any]]:
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except (storage.StorageError, FileNotFoundError):
        raise GeoPixInstructError(f"{uri} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types on a damaged file
        raise GeoPixInstructError(f"{uri} is not a readable Parquet file: {exc}") from None
    missing = [c for c in ("image_id", "image_path", "instances") if c not in table.column_names]
    if missing:
        raise GeoPixInstructError(
            f"{uri}: column(s) {', '.join(missing)} missing (a GeoPixInstruct file has image_id, image_path, instances)"
        )
    yield from table.to_pylist()


def _pick(group: tuple[Template, ...], key: str) -> Template:
    """A training phrasing of ``group`` chosen by ``key`` (the same record, the same phrasing)."""
    train = [t for t in group if not t.held_out and "{" in t.text and not t.text.startswith("{")]
    return train[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(train)]


def _val_share(image_id: str) -> float:
    return int(hashlib.sha256(f"geopixinstruct:{image_id}".encode()).hexdigest()[:12], 16) / 16**12


def _phrase(description: str) -> str:
    """A description as the slot of a template: no final full stop, a capital only where it is not
    just the sentence's first letter."""
    text = description.strip().rstrip(".").strip()
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


def geopixinstruct_records(
    annotations: str,
    images: list[str],
    *,
    seg_vocab: SegVocabulary,
    subsets: list[str] | None = None,
    box_format: str = "auto",
    val_fraction: float = 0.05,
    threads: int = 8,
) -> tuple[Iterator[dict[str, Any]], ImportReport, dict[int, str]]:
    """A record iterator, the report it fills and the catalog ({id: name}) it fills while it runs."""
    if box_format not in BOX_FORMATS:
        raise GeoPixInstructError(f"box format {box_format!r} is none of {', '.join(BOX_FORMATS)}")
    files = annotation_files(annotations, subsets)
    finder = ImageFinder(parse_images_option(images))
    for _, _, subset in files:
        finder.root(subset)  # every subset needs a root before anything is read
    report = ImportReport(files=[uri for uri, _, _ in files])
    if box_format == "auto":
        report.box_format, report.box_format_evidence = infer_box_format(files)
    else:
        report.box_format, report.box_format_evidence = box_format, "given"
    names: dict[int, str] = {}
    return _records(files, finder, seg_vocab, report, names, val_fraction, threads), report, names


def _records(files, finder, seg_vocab, report, names, val_fraction, threads) -> Iterator[dict[str, Any]]:
    run = seg_vocab.run
    for uri, upstream_split, subset in files:
        rows = list(_rows(uri))

        def locate(row, subset=subset):
            path = row.get("image_path")
            if not path:
                return None, "no image_path", None
            found, how = finder.find(subset, str(path))
            if found is None:
                return None, how, None
            try:
                return found, how, image_size(found)
            except (ValueError, OSError, storage.StorageError) as exc:
                return None, f"{found} is not a readable image ({exc})", None

        with ThreadPoolExecutor(threads) as pool:  # image headers: one read per image, S3 or disk
            located = list(
                tqdm(
                    pool.map(locate, rows),
                    total=len(rows),
                    desc=f"{subset}.{upstream_split} images",
                    unit="image",
                    mininterval=5,
                )
            )
        for index, (row, (image_uri, how, size)) in enumerate(zip(rows, located, strict=True)):
            where = f"{uri}: row {index} (image_id {row.get('image_id')!r})"
            if not row.get("image_id"):
                report.reject("image without image_id", where)
                continue
            if image_uri is None:
                reason = (
                    "image without image_path" if how == "no image_path" else "image not found or unreadable"
                )
                report.reject(reason, f"{where}: {how}")
                continue
            report.images_found_by_name += how == "name"
            yield from _image_records(
                row, subset, upstream_split, image_uri, size, where, run, report, names, val_fraction
            )


def _image_records(row, subset, upstream_split, image_uri, size, where, run, report, names, val_fraction):
    width, height = size
    image_id = f"gpi-{subset}-{row['image_id']}"
    split = SPLIT_OF[upstream_split]
    if split == "train" and _val_share(image_id) < val_fraction:
        split = "val"
    targets, torn = _targets(row.get("instances") or [], width, height, where, report, names)
    report.images[f"{subset}.{upstream_split}"] += 1
    report.images_without_instances += not row.get("instances")
    base = {
        "image_id": image_id,
        "image": None,
        "image_uri": image_uri,
        "width": width,
        "height": height,
        "source": f"geopixinstruct/{subset}",
        "split": split,
    }
    by_class: dict[int, list[dict]] = defaultdict(list)
    for target in targets:
        by_class[target["class_id"]].append(target)
    for class_id, members in sorted(by_class.items()):
        if class_id in torn:
            report.reject(
                "segment record of a category with a rejected instance", f"{where}: category_id {class_id}"
            )
            continue
        record_id = f"{image_id}-segment-{class_id}"
        name = names[class_id]
        template = _pick(SEGMENT, record_id)
        answer = count_answer(len(members), label(name), plural(name), run)
        report.records["segment"] += 1
        yield base | {
            "record_id": record_id,
            "task": "segment",
            "phrase_type": "all_of_class",
            "template_id": f"geopixinstruct+{template.id}",
            "conversation": _conversation(
                "segment", template.text.format(label=label(name), plural=plural(name)), answer
            ),
            "targets": [_public(t) | {"description": f"all {plural(name)}"} for t in members],
        }
    for target in targets:
        if not target["description"]:
            report.instances_without_description += 1
            continue
        phrase = _phrase(target["description"])
        for task, group in (("refer", REFER), ("ground", GROUND)):
            record_id = f"{image_id}-{task}-{target['instance_key']}"
            template = _pick(group, record_id)
            answer = (
                f"Sure, it is {run}."
                if task == "refer"
                else grounding_answer(run, box_to_text(target["box"], width, height))
            )
            report.records[task] += 1
            yield base | {
                "record_id": record_id,
                "task": task,
                "phrase_type": None,
                "template_id": f"geopixinstruct+{template.id}",
                "conversation": _conversation(task, template.text.format(phrase=phrase), answer),
                "targets": [_public(target)],
            }


def _conversation(task: str, instruction: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "text": f"{IMAGE_TOKEN}\n{TASK_TAGS[task]} {instruction}"},
        {"role": "assistant", "text": answer},
    ]


def _public(target: dict) -> dict:
    return {k: v for k, v in target.items() if k != "instance_key"}


def _targets(instances, width, height, where, report, names) -> tuple[list[dict], set[int]]:
    """The image's valid targets, and the categories that lost an instance to a rejection."""
    torn: set[int] = set()
    ids = Counter(str(inst.get("instance_id")) for inst in instances if isinstance(inst, Mapping))
    targets = []
    for k, inst in enumerate(instances):
        at = f"{where}, instances[{k}]"
        problem = _instance_problem(inst, ids, width, height, report.box_format, names)
        category_id = inst.get("category_id") if isinstance(inst, Mapping) else None
        if problem is not None:
            reason, detail = problem
            report.reject(reason, f"{at}: {detail}")
            if isinstance(category_id, int):
                torn.add(category_id)
            continue
        names.setdefault(int(category_id), str(inst["category"]))
        x1, y1, x2, y2 = as_xyxy(inst["bbox"], report.box_format)
        targets.append({
            "instance_id": k,
            "instance_key": str(inst["instance_id"]),
            "class_id": int(category_id),
            "class_name": str(inst["category"]),
            "box": [x1, y1, x2, y2],
            "mask": {"size": [int(v) for v in inst["mask"]["size"]], "counts": inst["mask"]["counts"]},
            "description": str(inst.get("description") or "").strip(),
        })  # fmt: skip
    return targets, torn


def _instance_problem(inst, ids, width, height, box_format, names) -> tuple[str, str] | None:
    """(reason, detail) of what makes an instance unusable, or None."""
    if not isinstance(inst, Mapping):
        return "instance that is not an object", f"got {type(inst).__name__}"
    missing = [f for f in ("instance_id", "category_id", "category", "bbox", "mask") if inst.get(f) is None]
    if missing:
        return (
            f"instance without {', '.join(repr(f) for f in missing)}",
            f"instance_id {inst.get('instance_id')!r} has no {', '.join(missing)}",
        )
    ident = str(inst["instance_id"])
    if ids[ident] > 1:
        return "instance_id used twice in one image", f"instance_id {ident!r} appears {ids[ident]} times"
    category_id, category = int(inst["category_id"]), str(inst["category"])
    if names.get(category_id, category) != category:
        return ("category_id named two ways",
                f"category_id {category_id} is {names[category_id]!r} elsewhere, {category!r} here")  # fmt: skip
    mask = inst["mask"]
    size = list(mask.get("size") or []) if isinstance(mask, Mapping) else []
    if len(size) != 2 or not isinstance(mask.get("counts"), str):
        return (
            "mask that is not a compressed RLE",
            f"instance_id {ident!r}: mask needs counts (string) and size [h, w]",
        )
    if [int(v) for v in size] != [height, width]:
        return ("mask size differs from the image",
                f"instance_id {ident!r}: mask size {size} (height, width) but the image is {height}×{width}")  # fmt: skip
    bbox = inst["bbox"]
    if len(bbox) != 4:
        return "bbox without 4 numbers", f"instance_id {ident!r}: bbox {list(bbox)}"
    x1, y1, x2, y2 = as_xyxy(bbox, box_format)
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height or x2 <= x1 or y2 <= y1:
        return ("bbox outside the image",
                f"instance_id {ident!r}: bbox {list(bbox)} ({box_format}) is not a box inside the {width}×{height} image")  # fmt: skip
    try:
        decode_mask(mask)
    except Exception as exc:  # noqa: BLE001 - pycocotools raises plain Exceptions on bad RLE
        return "mask RLE that does not decode", f"instance_id {ident!r}: {exc}"
    return None


def import_geopixinstruct(
    annotations: str,
    images: list[str],
    out_uri: str,
    *,
    seg_vocab: SegVocabulary,
    subsets: list[str] | None = None,
    box_format: str = "auto",
    val_fraction: float = 0.05,
) -> ImportReport:
    """Write a record source at ``out_uri`` (with ``import_report.json``) from GeoPixInstruct."""
    records, report, names = geopixinstruct_records(
        annotations,
        images,
        seg_vocab=seg_vocab,
        subsets=subsets,
        box_format=box_format,
        val_fraction=val_fraction,
    )
    with SourceWriter(out_uri, ClassCatalog({})) as writer:
        for record in records:
            writer.write(record)
        writer.catalog = ClassCatalog(dict(sorted(names.items())))  # known once every row was read
        writer.attach(IMPORT_REPORT_FILE, json.dumps(report.to_json(), indent=1).encode())
    return report
