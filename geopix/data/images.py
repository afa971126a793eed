"""A record's image and targets as arrays: its image (inline bytes or ``image_uri``) decoded, its
targets' masks, boxes and class ids. Decoding and resizing themselves are :mod:`geopix.imaging`'s,
shared with the model's processor; here a failure makes the record bad (:class:`BadRecord`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from geopix import imaging, storage
from geopix.data import schema
from geopix.data.schema import BadRecord


def decode_image(data: bytes) -> np.ndarray:
    """A record's encoded image → H×W×3 uint8 (:func:`geopix.imaging.decode_image`); bytes no
    decoder reads make the record bad."""
    try:
        return imaging.decode_image(data)
    except imaging.UndecodableImage as exc:
        raise BadRecord("undecodable image", str(exc)) from None


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


# The shard columns that record_image and decode_targets read: a reader of a few records' pictures
# and truth reads these, not every column.
TRUTH_COLUMNS = ["record_id", "image", "image_uri", "width", "height", "targets"]


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
