"""How a GeoPix answer that lists instances says how many it lists.

An answer to "segment every X" states the count before its seg runs, so that the model commits to
a number first and then writes that many runs (one mask each)::

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
"""

from __future__ import annotations

import re

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
