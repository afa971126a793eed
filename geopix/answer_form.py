"""How a GeoPix answer states what it found besides its masks: how many instances, and where.

**Counts.** An answer to "segment every X" states the count before its seg runs, so that the
model commits to a number first and then writes that many runs (one mask each)::

    Sure, there are 3 storage tanks: [SEG0]…[SEG5] [SEG0]…[SEG5] [SEG0]…[SEG5].
    Sure, there is one ship: [SEG0]…[SEG5].

It opens with "Sure," like every other answer that carries masks, so that its first word already
tells a segmentation answer from the VQA count answer "There are 3 storage tanks." (which shares
the rest of its opening and stops at the period): with the bare "There are 3 …:" form, a model
trained on both tasks ended segmentation answers at that period, without runs.

The synthetic generator writes this form (:mod:`geopix.data.phrases`); evaluation, chat and batch
segmentation read the stated count with :func:`stated_count` beside the runs they decode. Answers
in the earlier forms still parse: "There are 3 storage tanks: …" states its count the same way,
and "Sure, they are … and …" states none (``None``); their masks are their runs either way.

**Boxes.** A grounding answer draws the object and then states its box::

    Sure, it is [SEG0]…[SEG5] at {<12><40><31><58>}.

The box a GeoPix model states after a seg run is the box of that run's mask (of its largest
connected part): the model writes the box's form, and :func:`boxes_from_masks` writes its numbers
from the mask the model drew (``chat`` does this for every answer), so box and mask always agree
and the box is as good as the mask. A random LLM writing coordinates from image tokens learned
nothing of them (Acc@0.5 0.07, the whole-image box, in every run). Where the mask is empty, the
model's own numbers stay; a box with no run before it (the earlier form, "{<x1><y1><x2><y2>}"
alone) is the model's own.

**Colours.** A colour question may be answered with the object drawn before its colour::

    It is [SEG0]…[SEG5] red.

so that the model finds the object first; a model with a mask colour reader
(``model.mask_colour_reader``) reads the mean colour under that mask where it writes the word
after the run. VQA's exact match removes seg runs, so "It is red." and this form score alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# A box in answer text: {<x1><y1><x2><y2>}, integers 0–100 of the image size (GEOPIX.md §2).
BOX_TEXT = re.compile(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}")

# "Sure, there are 3 tanks:" / "There is one tank:" at the start of an answer (a count stated later
# in the text, e.g. in a caption, is not an answer's count).
_STATED = re.compile(r"^\s*(?:Sure,\s*)?There (?:is|are) (one|no|\d+)\b[^:.]*:", re.IGNORECASE)


def count_answer(count: int, singular: str, plural: str, run: str) -> str:
    """The answer listing ``count`` instances, one ``run`` (the seg-token text) per instance."""
    if count < 1:
        raise ValueError(f"an answer listing instances needs at least one, got {count}")
    if count == 1:
        return f"Sure, there is one {singular}: {run}."
    return f"Sure, there are {count} {plural}: {' '.join([run] * count)}."


def stated_count(text: str) -> int | None:
    """The number of instances an answer says it lists, or None where it states none."""
    found = _STATED.match(text)
    if found is None:
        return None
    word = found.group(1).lower()
    return {"one": 1, "no": 0}.get(word) if not word.isdigit() else int(word)


def box_to_text(box: Sequence[float], width: int, height: int) -> str:
    """Pixel box → ``{<x1><y1><x2><y2>}`` with integers 0–100 of the image size."""
    x1, y1, x2, y2 = box
    scaled = (x1 / width, y1 / height, x2 / width, y2 / height)
    return "{" + "".join(f"<{min(100, max(0, round(v * 100)))}>" for v in scaled) + "}"


def parse_box_text(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in match) for match in BOX_TEXT.findall(text)]


def grounding_answer(run: str, box_text: str) -> str:
    """The answer that draws one object (``run``) and states its box (``{<x1><y1><x2><y2>}``)."""
    return f"Sure, it is {run} at {box_text}."


def colour_answer(colour: str, run: str | None = None) -> str:
    """The answer to a colour question: "It is red.", or with ``run`` the object drawn before its
    colour, "It is [SEG…] red." (what VQA's exact match compares is the same: seg runs removed)."""
    return f"It is {run} {colour}." if run else f"It is {colour}."


# The colour words a colour answer names and a phrase may say ("the red storage tank").
COLOUR_WORDS = (
    "black", "blue", "brown", "gray", "green", "grey", "orange", "pink", "purple", "red", "turquoise", "white", "yellow",
)
COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOUR_WORDS) + r")\b")


def named_colour(phrase: str | None) -> str | None:
    """The one colour word ``phrase`` says ("red" in "the red-roofed building"), or None where it
    says none or several."""
    words = set(COLOUR_WORD.findall(phrase or ""))
    return words.pop() if len(words) == 1 else None


def mask_box_text(mask: np.ndarray) -> str | None:
    """The ``{<x1><y1><x2><y2>}`` box (0–100 of the mask's size) around the largest connected part
    of ``mask`` (8-connected), or None for an empty mask. One object is one part: a stray blob of
    the mask elsewhere would otherwise stretch the box over both (measured in docs/evaluation_history.md)."""
    from scipy import ndimage

    parts, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count > 1:
        mask = parts == np.bincount(parts.ravel())[1:].argmax() + 1
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    height, width = mask.shape
    return box_to_text((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1), width, height)


def boxes_from_masks(text: str, run: str, masks: Sequence[np.ndarray]) -> str:
    """``text`` with the first box after the k-th ``run`` rewritten as the box of ``masks[k]``
    (runs without a box after them, and empty masks, leave the text as it is)."""
    pieces = text.split(run)
    for k, mask in enumerate(masks[: len(pieces) - 1]):
        box = mask_box_text(np.asarray(mask))
        if box is not None:
            pieces[k + 1] = BOX_TEXT.sub(lambda _, box=box: box, pieces[k + 1], count=1)
    return run.join(pieces)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``x1, y1, x2, y2`` boxes (0 for an empty union)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
