"""Synthetic remote-sensing data: instruction chips with exact instance masks, and large COG scenes.

Everything is drawn as a function of *world* pixel coordinates. A :class:`World` holds the
land-cover parameters, linear and areal features (water, roads, paved lots, piers), object
instances and trees; :func:`render_window` paints any window of it. Land-cover texture and
noise come from hashed lattices, and every object is drawn from its own stored parameters, so
two windows that share pixels paint them identically: a chip is one window of a small world,
and a scene is tiled into windows whose objects cross tile borders seamlessly.

Chips are random from ``np.random.default_rng([seed, split stream, image index])``, so each
image is independent of the others and of the order they are generated in. Text for each chip
comes from :mod:`geopix.data.phrases`, computed from what was actually painted.

Instance masks are the pixels an instance painted that no later instance or tree covered
(paint order = layer order); shadows are painted but belong to no mask. A chip instance whose
visible part becomes tiny is not painted at all, so no unlabelled object ever appears.

The modules, in the order they build on each other: ``classes`` (classes, appearance variants,
scene types, size buckets), ``noise`` (hashed noise), ``world`` (what a world holds),
``drawing`` (painting a window), ``planning`` (where things go), ``chips`` (chips and their
records), ``scenes`` (large georeferenced scenes), ``generate`` (the whole source in one call:
:func:`generate_source`).
"""

from geopix.data.synth.chips import chip_records, generate_chips, image_id, make_chip
from geopix.data.synth.classes import (
    CLASSES,
    MIN_VISIBLE_PX,
    SPLIT_STREAMS,
    SYNTH_CLASSES,
    Variant,
    size_bucket,
)
from geopix.data.synth.drawing import render_window
from geopix.data.synth.generate import generate_source
from geopix.data.synth.scenes import generate_scene, plan_scene
from geopix.data.synth.world import World

__all__ = [
    "CLASSES", "MIN_VISIBLE_PX", "SPLIT_STREAMS", "SYNTH_CLASSES", "Variant", "World", "chip_records",
    "generate_chips", "generate_scene", "generate_source", "image_id", "make_chip", "plan_scene",
    "render_window", "size_bucket",
]  # fmt: skip
