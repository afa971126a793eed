"""Classes and their appearance variants, scene types, size buckets and ground labels."""

from __future__ import annotations

from dataclasses import dataclass

from geopix.data import schema


@dataclass(frozen=True)
class Variant:
    colour: str  # the word phrases use
    rgb: tuple[int, int, int]
    held_out: bool = False  # drawn only in the test split


@dataclass(frozen=True)
class SynthClass:
    id: int
    name: str
    layer: int  # paint order: higher layers cover lower ones
    variants: tuple[Variant, ...]


def _variants(train: dict[str, tuple[int, int, int]], held_out: dict[str, tuple[int, int, int]]) -> tuple:
    return tuple(Variant(c, rgb) for c, rgb in train.items()) + tuple(
        Variant(c, rgb, held_out=True) for c, rgb in held_out.items()
    )


# Held-out variants recombine colour words that training already uses for other classes.
# Sizes (px, the same at every chip size) are set by the planners; docs/synthetic_data.md lists them.
CLASSES = (
    SynthClass(0, "storage_tank", 5, _variants(
        {"white": (226, 226, 220), "grey": (168, 170, 168)}, {"green": (104, 132, 98)})),
    SynthClass(1, "ship", 6, _variants(
        {"white": (222, 222, 216), "grey": (120, 126, 132), "red": (160, 58, 50), "black": (46, 48, 52)},
        {"blue": (50, 82, 150)})),
    SynthClass(2, "small_vehicle", 3, _variants(
        {"white": (226, 226, 226), "black": (34, 35, 40), "grey": (148, 150, 154), "red": (176, 40, 40),
         "blue": (44, 70, 156)}, {"green": (46, 118, 58)})),
    SynthClass(3, "airplane", 6, _variants(
        {"white": (236, 236, 236), "grey": (166, 168, 172)}, {"red": (186, 58, 52)})),
    SynthClass(4, "building", 4, _variants(
        {"red": (164, 76, 58), "grey": (118, 120, 124), "white": (210, 208, 202), "brown": (116, 88, 66)},
        {"blue": (66, 98, 150)})),
    SynthClass(5, "swimming_pool", 2, _variants(
        {"blue": (56, 126, 198), "turquoise": (64, 186, 196)}, {"green": (78, 148, 108)})),
    SynthClass(6, "tennis_court", 1, _variants(
        {"green": (68, 128, 80), "red": (172, 88, 64)}, {"blue": (58, 98, 160)})),
    SynthClass(7, "ground_track_field", 0, _variants(
        {"red": (168, 80, 62)}, {"blue": (64, 102, 158)})),
)  # fmt: skip
SYNTH_CLASSES = schema.ClassCatalog({c.id: c.name for c in CLASSES})
TANK, SHIP, VEHICLE, AIRPLANE, BUILDING, POOL, COURT, TRACK = range(8)

SCENE_TYPES = ("harbour", "airport", "residential", "industrial", "sports", "rural")
# Chips draw their scene type with these weights (tuned so that every COCO size bucket holds
# well over 20 % of the instances); rural land appears in scenes only.
CHIP_SCENE_WEIGHTS = {"harbour": 0.22, "airport": 0.2, "residential": 0.16, "industrial": 0.22, "sports": 0.2}
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
HALL_ROOFS = ("grey", "white", "red", "blue")  # big flat roofs are sheet metal or membrane
SCENE_STREAM = 7
HELD_OUT_VARIANT_P = 0.4  # how often a test instance takes a held-out appearance

# COCO size buckets on visible mask area (GEOPIX.md §3): the one definition, schema.size_bucket.
size_bucket = schema.size_bucket
MIN_VISIBLE_PX = 12  # a chip instance with fewer visible pixels is not painted
MIN_VISIBLE_FRACTION = 0.3  # ... or with less than this share of its in-chip area visible
NEIGHBOUR_PX = 4  # instances this close count as "next to" each other

# Ground labels: what lies under the objects.
LAND, WATER, ROAD, PAVED, PIER = range(5)
FEATURE_RANK = {WATER: 0, PAVED: 1, ROAD: 2, PIER: 3}  # paint order of features
FEATURE_CELL = 256  # px cells of the feature lookup used while planning
