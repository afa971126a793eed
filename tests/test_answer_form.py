"""The counting answer form: what the generator writes, what every reader parses."""

from __future__ import annotations

import pytest

from geopix.answer_form import count_answer, stated_count
from geopix.data.synth import chip_records, make_chip
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
