"""The synthetic source in one call: the chips (records of all five tasks) and, where asked for,
the large scenes — what `geopix data synth` and the full pipeline's source step both run."""

from __future__ import annotations

from typing import Any

from geopix import storage
from geopix.config import DataConfig
from geopix.data.synth.chips import generate_chips
from geopix.data.synth.scenes import generate_scene
from geopix.vocabulary import SegVocabulary


def scene_id(data: DataConfig, index: int) -> str:
    return f"scene-{data.seed}-{index:03d}"


def generate_source(
    data: DataConfig,
    out_uri: str,
    *,
    seg_vocab: SegVocabulary,
    scenes_uri: str | None = None,
    incoming_uri: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``data``'s chips as a record source at ``out_uri`` (answers with ``seg_vocab``'s
    runs) and, with ``scenes_uri``, its ``data.scene_count`` scenes there (COG + ground truth per
    scene); with ``incoming_uri`` too, each scene's image also as ``<incoming_uri>/<scene id>.tif``,
    where batch segmentation lists new scenes. Returns the chips' statistics with ``scenes``: what
    each scene's ``scene.json`` holds."""
    stats = generate_chips(
        out_uri, seed=data.seed, chip_size=data.chip_size, train_images=data.train_images,
        val_images=data.val_images, test_images=data.test_images, test_seed_offset=data.test_seed_offset,
        seg_vocab=seg_vocab, vqa_colour_drawn=data.vqa_colour_drawn, progress=progress,
    )  # fmt: skip
    scenes = []
    for index in range(data.scene_count if scenes_uri else 0):
        name = scene_id(data, index)
        scenes.append(generate_scene(scenes_uri, name, data.scene_size, data.seed + index, progress=progress))
        if incoming_uri:
            storage.copy(storage.join_uri(scenes_uri, name, "image.tif"), storage.join_uri(incoming_uri, f"{name}.tif"))
    return stats | {"scenes": scenes}
