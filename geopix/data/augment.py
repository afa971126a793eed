"""Augmentation: the 8 flips and rotations of the square, applied to an image, its masks and boxes,
with the text rewritten to match (left ↔ right, "upper left" → "lower left", boxes in text).

A record whose text cannot follow a transform (relations such as "the ship left of the pier"
under a flip would need the whole scene re-described) keeps its identity transform; see
``docs/training_input.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from geopix.answer_form import BOX_TEXT


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

        return BOX_TEXT.sub(rewrite, text)

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
