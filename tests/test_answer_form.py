"""The counting and box answer forms: what the generator writes, what every reader parses."""

from __future__ import annotations

import numpy as np
import pytest

from geopix.answer_form import (
    COLOUR_WORDS,
    box_to_text,
    boxes_from_masks,
    count_answer,
    grounding_answer,
    mask_box_text,
    named_colour,
    parse_box_text,
    stated_count,
)
from geopix.data.schema import decode_mask
from geopix.data.synth import chip_records, make_chip
from geopix.data.synth.classes import CLASSES
from geopix.evaluate.job import counting, vqa_kind
from geopix.vocabulary import SegVocabulary

VOCAB = SegVocabulary()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 11])
def test_a_count_answer_states_its_count_and_holds_that_many_runs(n):
    text = count_answer(n, "storage tank", "storage tanks", VOCAB.run)
    assert stated_count(text) == n
    runs, problems = VOCAB.count_runs(text)
    assert runs == n and not problems
    # Its first word is a segmentation answer's, never the VQA count answer's ("There are 3 …").
    assert text.startswith("Sure, there ")
    with pytest.raises(ValueError, match="at least one"):
        count_answer(0, "ship", "ships", VOCAB.run)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        (f"Sure, they are {VOCAB.run} and {VOCAB.run}.", None),  # the earlier form states none
        (f"Sure, it is {VOCAB.run}.", None),
        ("There are 3 storage tanks.", None),  # a VQA count answer: no runs follow
        ("This aerial image shows a harbour. There are 3 ships: none.", None),  # not at the start
        (f"There are no ships: {VOCAB.run}.", 0),
        (f"there is one ship: {VOCAB.run}.", 1),
        (f"Sure, there are 4 ships: {VOCAB.run}.", 4),  # the stated count, whatever the runs say
        (f"There are 2 ships: {VOCAB.run} {VOCAB.run}.", 2),  # the first counting form still reads
    ],
)
def test_stated_count_reads_only_an_answers_leading_count(text, count):
    assert stated_count(text) == count


def test_every_synthetic_segment_answer_states_as_many_as_it_lists():
    segments = [
        r for i in range(12) for r in chip_records(make_chip("train", 0, i, 256), VOCAB) if r["task"] == "segment"
    ]
    assert segments
    for record in segments:
        answer = record["conversation"][1]["text"]
        assert stated_count(answer) == len(record["targets"]) == VOCAB.count_runs(answer)[0], answer


def test_the_counting_table_and_vqa_kinds_come_from_the_rows():
    def row(targets: int, masks: int, stated: int | None, task: str = "segment") -> dict:
        return {"task": task, "targets": [{}] * targets, "masks": masks, "stated_count": stated}

    rows = [row(2, 2, 2), row(2, 1, 2), row(2, 2, None), row(3, 1, 1), row(1, 1, 1, task="refer")]
    table = counting(rows)
    assert set(table) == {"2", "3"}  # refer answers are not counting answers
    assert table["2"] == {"answers": 3, "masks_mean": 5 / 3, "exact": 2 / 3, "stated_exact": 2 / 3}
    assert table["3"] == {"answers": 1, "masks_mean": 1.0, "exact": 0.0, "stated_exact": 0.0}
    assert [vqa_kind({"template_id": t}) for t in ("vqa.count.t0", "vqa.colour.h0+cls.t1", "coco-vqa", None)] == [
        "count", "colour", "other", "other",
    ]  # fmt: skip


def test_a_box_after_a_run_is_rewritten_as_the_box_of_its_mask():
    mask = np.zeros((50, 100), bool)
    mask[10:20, 30:60] = True  # rows 10–19, columns 30–59: 20–40 % down, 30–60 % across
    empty = np.zeros_like(mask)
    text = grounding_answer(VOCAB.run, "{<0><0><100><100>}")
    assert boxes_from_masks(text, VOCAB.run, [mask]) == grounding_answer(VOCAB.run, "{<30><20><60><40>}")
    assert boxes_from_masks(text, VOCAB.run, [empty]) == text  # nothing drawn: the model's own numbers stay
    # Each run's box is its own mask's; a box before any run, and a run without a box, are left alone.
    two = f"{{<1><1><2><2>}} then {VOCAB.run}, and {VOCAB.run} at {{<0><0><9><9>}} {{<5><5><6><6>}}."
    assert boxes_from_masks(two, VOCAB.run, [empty, mask]) == (
        f"{{<1><1><2><2>}} then {VOCAB.run}, and {VOCAB.run} at {{<30><20><60><40>}} {{<5><5><6><6>}}."
    )
    assert boxes_from_masks("{<0><0><9><9>}", VOCAB.run, []) == "{<0><0><9><9>}"
    # A stray blob away from the object does not stretch its box; a diagonal touch is one part.
    blob = mask.copy()
    blob[45:47, 90:92] = True
    assert boxes_from_masks(text, VOCAB.run, [blob]) == grounding_answer(VOCAB.run, "{<30><20><60><40>}")
    blob[20, 60] = True  # touches (19, 59) at a corner: part of the object, which now ends at column 61
    assert mask_box_text(blob) == "{<30><20><61><42>}"


def test_every_synthetic_ground_answer_draws_its_target_and_boxes_it():
    chips = [make_chip("train", 0, i, 256) for i in range(12)]
    records = [r for chip in chips for r in chip_records(chip, VOCAB) if r["task"] == "ground"]
    assert records
    for record in records:
        answer = record["conversation"][1]["text"]
        (target,) = record["targets"]
        assert VOCAB.count_runs(answer) == (1, [])
        assert parse_box_text(answer) == parse_box_text(box_to_text(target["box"], 256, 256))
        # The box GeoPix writes from a mask is the generator's box of the same object.
        assert mask_box_text(decode_mask(target["mask"]).astype(bool)) == box_to_text(target["box"], 256, 256)


def test_a_phrase_names_one_colour_or_none():
    assert {v.colour for c in CLASSES for v in c.variants} <= set(COLOUR_WORDS)  # every synthetic colour
    assert named_colour("the red-roofed building") == "red"
    assert named_colour("the ship with the white hull") == "white"
    assert named_colour("the white ship beside the white tank") == "white"
    assert named_colour("the red car next to the blue car") is None  # which is the target's?
    assert named_colour("the bored reader") is None  # words, not letters
    assert named_colour("the storage tank") is None and named_colour(None) is None
