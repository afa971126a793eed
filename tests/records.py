"""Small, hand-made instruction records for tests that must not depend on the generator."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from geopix.data.schema import TASK_TAGS, ClassCatalog, encode_mask
from geopix.vocabulary import IMAGE_TOKEN, SegVocabulary

CATALOG = ClassCatalog({0: "storage_tank", 1: "ship", 2: "building"})
SEG_VOCAB = SegVocabulary()  # the presets' seg tokens: 3 per scale × 2 scales


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_record(
    index: int, *, size: int = 64, class_id: int = 0, split: str | None = None, task: str = "refer"
) -> dict:
    """A valid refer/segment record: one square object whose place depends on ``index``."""
    rng = np.random.default_rng(index)
    image = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    x, y = 4 + index % (size - 24), 4 + (index * 7) % (size - 24)
    mask = np.zeros((size, size), np.uint8)
    mask[y : y + 16, x : x + 16] = 1
    image[mask.astype(bool)] = (240, 240, 240)
    name = CATALOG.names[class_id]
    return {
        "record_id": f"rec-{index:05d}-{task}",
        "image_id": f"img-{index:05d}",
        "image": png_bytes(image),
        "image_uri": None,
        "width": size,
        "height": size,
        "source": "tests",
        "split": split,
        "task": task,
        "phrase_type": "class",
        "template_id": "t0",
        "conversation": [
            {"role": "user", "text": f"{IMAGE_TOKEN}\n{TASK_TAGS[task]} the {name}"},
            {"role": "assistant", "text": f"Sure, it is {SEG_VOCAB.run}."},
        ],
        "targets": [
            {
                "instance_id": 1,
                "class_id": class_id,
                "class_name": name,
                "box": [float(x), float(y), float(x + 16), float(y + 16)],
                "mask": encode_mask(mask),
                "description": f"the {name}",
            }
        ],
    }
