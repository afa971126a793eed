"""The training input: tokenizer, label masking, augmentation that keeps text and pixels in
agreement, collation, and streaming shards from S3 through Ray Data into two train workers."""

from __future__ import annotations

import io
import threading
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from geopix import storage
from geopix.answer_form import COLOUR_WORDS, box_to_text, parse_box_text
from geopix.chat_template import SYSTEM_SENTENCE, task_tag
from geopix.data import schema
from geopix.data.augment import TRANSFORMS, Transform, augment, rewrite_blocker
from geopix.data.batches import (
    colour_token_ids,
    encode_conversation,
    find_seg_runs,
    iter_batches,
    phrase_colour_ids,
)
from geopix.data.images import decode_image, decode_targets
from geopix.data.schema import BadRecord
from geopix.data.shard_set import ShardError, shard_dataset
from geopix.data.tokenizer import corpus_texts, load_tokenizer, save_tokenizer, train_tokenizer
from geopix.vocabulary import IGNORE_INDEX, IMAGE_TOKEN
from tests.records import SEG_VOCAB

SIZE = 64
SEG_RUN = SEG_VOCAB.run
CORNERS = {"upper left": (0, 0), "upper right": (1, 0), "lower left": (0, 1), "lower right": (1, 1)}
BY_TRANSFORM = {t.name: t for t in TRANSFORMS}


# ------------------------------------------------------------------------------ test records
def encode_png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


def make_record(
    record_id: str,
    corner: str = "upper left",
    task: str = "refer",
    phrase_type: str | None = "position",
    size: int = SIZE,
    image: bytes | None = None,
) -> dict:
    """A grey image with one red 12 px square vehicle in ``corner``, its mask, box and conversation."""
    rng = np.random.default_rng(zlib.crc32(record_id.encode()))
    pixels = rng.integers(90, 110, size=(size, size, 3), dtype=np.uint8)
    col, row = CORNERS[corner]
    x0, y0 = 6 + col * (size - 24), 8 + row * (size - 24)
    mask = np.zeros((size, size), np.uint8)
    mask[y0 : y0 + 12, x0 : x0 + 12] = 1
    pixels[mask.astype(bool)] = (220, 30, 30)
    box = [float(x0), float(y0), float(x0 + 12), float(y0 + 12)]
    user = {
        "refer": f"{IMAGE_TOKEN}\n[refer] the small vehicle on the {corner}",
        "ground": f"{IMAGE_TOKEN}\n[grounding] where is the small vehicle on the {corner}?",
        "caption": f"{IMAGE_TOKEN}\n[caption] Describe the image in detail",
    }[task]
    answer = {
        "refer": f"Sure, it is {SEG_RUN}.",
        "ground": f"It is at {box_to_text(box, size, size)}.",
        "caption": f"A grey scene with one red vehicle in the {corner} corner.",
    }[task]
    return {
        "record_id": record_id,
        "image_id": f"img-{record_id}",
        "image": image if image is not None else encode_png(pixels),
        "image_uri": None,
        "width": size,
        "height": size,
        "source": "test",
        "split": "train",
        "task": task,
        "phrase_type": phrase_type if task == "refer" else None,
        "template_id": "t0",
        "conversation": [{"role": "user", "text": user}, {"role": "assistant", "text": answer}],
        "targets": [
            {
                "instance_id": 1,
                "class_id": 2,
                "class_name": "small_vehicle",
                "box": box,
                "mask": schema.encode_mask(mask),
                "description": f"the small vehicle on the {corner}",
            }
        ],
    }


def mixed_records(n: int, prefix: str = "r") -> list[dict]:
    tasks = ("refer", "ground", "caption")
    return [make_record(f"{prefix}{i:03d}", list(CORNERS)[i % 4], tasks[i % 3]) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [*corpus_texts(mixed_records(24)), "A two-turn chat: is there more? No, that is all."]
    return train_tokenizer(texts, vocab_size=400, seg_vocab=SEG_VOCAB)


# --------------------------------------------------------------------------------- tokenizer
def test_tokenizer_keeps_seg_tokens_atomic_and_reloads(tokenizer, tmp_path):
    seg_ids = SEG_VOCAB.token_ids(tokenizer)
    assert len(set(seg_ids)) == 6
    ids = tokenizer.encode("it is [SEG0][SEG1].", add_special_tokens=False)
    assert ids.count(seg_ids[0]) == 1 and ids.count(seg_ids[1]) == 1
    assert tokenizer.convert_ids_to_tokens(ids).count("[SEG0]") == 1
    inside_word = tokenizer.encode("vehicle[SEG0]tank", add_special_tokens=False)
    assert inside_word.count(seg_ids[0]) == 1
    assert tokenizer.decode(inside_word) == "vehicle[SEG0]tank"
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tokenizer.encode(f"{IMAGE_TOKEN}\n[refer] x", add_special_tokens=False)[0] == image_id
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert len(tokenizer) <= 400 and tokenizer.pad_token_id is not None

    reloaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tok"))
    text = f"USER: {IMAGE_TOKEN}\n[refer] the car ASSISTANT: Sure, it is {SEG_RUN}.</s>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert SEG_VOCAB.token_ids(reloaded) == seg_ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_labels_mask_every_prompt_token_and_supervise_answers(tokenizer):
    conversation = [
        {"role": "user", "text": f"{IMAGE_TOKEN}\n[refer] the small vehicle on the upper left"},
        {"role": "assistant", "text": f"Sure, it is {SEG_RUN}."},
        {"role": "user", "text": "is there more?"},
        {"role": "assistant", "text": "No, that is all."},
    ]
    input_ids, labels = encode_conversation(tokenizer, conversation)
    supervised = labels != IGNORE_INDEX
    assert np.array_equal(labels[supervised], input_ids[supervised])
    # The supervised tokens are exactly the two answers, each closed by eos; nothing of the prompts.
    runs, start = [], None
    for i, flag in enumerate([*supervised, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(input_ids[start:i])
            start = None
    assert [tokenizer.decode(r) for r in runs] == [f" Sure, it is {SEG_RUN}.</s>", " No, that is all.</s>"]
    prompt = tokenizer.decode(input_ids[~supervised])
    assert prompt.startswith("<s>USER: <image>") and "ASSISTANT" in prompt and "Sure" not in prompt

    seg_ids = SEG_VOCAB.token_ids(tokenizer)
    positions = find_seg_runs(input_ids, seg_ids)
    assert len(positions) == 1 and input_ids[positions[0]] == seg_ids[0]
    assert list(input_ids[positions[0] : positions[0] + 6]) == seg_ids
    assert all(labels[positions[0] + k] == seg_ids[k] for k in range(6))

    with pytest.raises(BadRecord, match="too long"):
        encode_conversation(tokenizer, conversation, max_length=len(input_ids) - 1)
    broken = np.asarray([*input_ids[:10], seg_ids[0], seg_ids[1], 5], dtype=np.int64)
    with pytest.raises(BadRecord, match="broken seg run"):
        find_seg_runs(broken, seg_ids)


def test_template_2_says_the_task_tag_again_where_the_answer_starts(tokenizer):
    """Version 2 of the chat template: the first user turn's tag is repeated after "ASSISTANT:" as
    part of the prompt (never supervised); a turn without a tag and every answer are as in version 1."""
    conversation = [
        {"role": "user", "text": f"{IMAGE_TOKEN}\n[Visual Question Answering] How many ships are there?"},
        {"role": "assistant", "text": "There are 2 ships."},
        {"role": "user", "text": "and cars?"},
        {"role": "assistant", "text": "There are no cars."},
    ]
    old_ids, old_labels = encode_conversation(tokenizer, conversation)
    ids, labels = encode_conversation(tokenizer, conversation, chat_template=2)
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == tokenizer.decode(old_labels[old_labels != IGNORE_INDEX])
    text = tokenizer.decode(ids)
    assert text.count("[Visual Question Answering]") == 2
    assert "ASSISTANT: [Visual Question Answering] There are 2 ships." in text
    assert "and cars? ASSISTANT: There are no cars." in text
    assert len(ids) > len(old_ids)
    assert task_tag("[refer] the ship") == "[refer]" and task_tag(f"{IMAGE_TOKEN}\nthe ship [refer]") is None
    with pytest.raises(ValueError, match="chat template version 4"):
        encode_conversation(tokenizer, conversation, chat_template=4)


def test_template_3_opens_the_conversation_with_the_system_sentence(tokenizer):
    """Version 3 (the authors' release): LLaVA v1's system sentence once, before the first user
    turn; the turns and the supervised answers are version 1's."""
    conversation = [
        {"role": "user", "text": f"{IMAGE_TOKEN}\n[refer] the ship"},
        {"role": "assistant", "text": "Sure, it is a ship."},
        {"role": "user", "text": "and the car?"},
        {"role": "assistant", "text": "There is no car."},
    ]
    old_ids, old_labels = encode_conversation(tokenizer, conversation)
    ids, labels = encode_conversation(tokenizer, conversation, chat_template=3)
    assert labels[labels != IGNORE_INDEX].tolist() == old_labels[old_labels != IGNORE_INDEX].tolist()
    text, old_text = tokenizer.decode(ids), tokenizer.decode(old_ids)
    assert text.count(SYSTEM_SENTENCE) == 1  # once, before the first turn
    assert text.replace(f"{SYSTEM_SENTENCE} ", "", 1) == old_text
    assert text.index(SYSTEM_SENTENCE) < text.index("USER:")


# ------------------------------------------------------------------------------ augmentation
def named_corner(text: str) -> tuple[int, int]:
    """(column, row) of the corner the text names: the oracle's reading of the rewritten text."""
    found = [c for c in CORNERS if c in text]
    assert len(found) == 1, text
    return CORNERS[found[0]]


def centroid_corner(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    return int(cols.mean() >= width / 2), int(rows.mean() >= height / 2)


def test_hflip_turns_upper_left_into_upper_right():
    record = make_record("flip", "upper left")
    image = decode_image(record["image"])
    masks, boxes, _ = decode_targets(record)
    out = augment(
        image,
        masks,
        boxes,
        record["conversation"],
        "position",
        np.random.default_rng(0),
        [BY_TRANSFORM["hflip"]],
    )
    assert out.transform.name == "hflip" and out.skipped is None
    assert "upper right" in out.conversation[0]["text"] and "left" not in out.conversation[0]["text"]
    assert centroid_corner(out.masks[0]) == (1, 0)
    assert (out.image[out.masks[0].astype(bool)] == (220, 30, 30)).all()
    np.testing.assert_array_equal(out.boxes[0], [SIZE - 18, 8, SIZE - 6, 20])


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.name)
def test_every_transform_keeps_pixels_boxes_and_text_in_agreement(transform: Transform):
    rng = np.random.default_rng(0)
    for corner in CORNERS:
        for task in ("refer", "ground"):
            record = make_record(f"{corner}-{task}", corner, task, size=SIZE)
            image = decode_image(record["image"])
            masks, boxes, _ = decode_targets(record)
            out = augment(
                image, masks, boxes, record["conversation"], record["phrase_type"], rng, [transform]
            )
            mask = out.masks[0]
            # The oracle: the object's centroid lies in the corner that the rewritten text names.
            assert centroid_corner(mask) == named_corner(out.conversation[0]["text"]), (
                corner,
                transform.name,
            )
            assert (out.image[mask.astype(bool)] == (220, 30, 30)).all()
            rows, cols = np.nonzero(mask)
            np.testing.assert_array_equal(
                out.boxes[0], [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            )
            if task == "ground":
                [text_box] = parse_box_text(out.conversation[1]["text"])
                [expected] = parse_box_text(box_to_text(out.boxes[0], SIZE, SIZE))
                assert np.abs(np.subtract(text_box, expected)).max() <= 1


def test_position_words_follow_the_transform():
    text = "The ship on the left, the car at the top-right, the leftmost tank, a horizontal runway, north-west, {<5><10><30><40>}"
    assert BY_TRANSFORM["rot90cw"].text(text) == (
        "The ship at the top, the car at the bottom-right, the topmost tank, a vertical runway, north-east, {<60><5><90><30>}"
    )
    assert BY_TRANSFORM["vflip"].text("Left or right, upper or lower, top or bottom?") == (
        "Left or right, lower or upper, bottom or top?"
    )
    assert BY_TRANSFORM["hflip"].text("on the road, in the centre") == "on the road, in the centre"


def test_records_whose_text_cannot_follow_are_not_augmented():
    assert rewrite_blocker(["the car on the left"], "relation") == "phrase_type relation"
    assert rewrite_blocker(["the tank above the road"]) == "word 'above'"
    assert rewrite_blocker(["the northern runway"]) == "word 'northern'"
    assert rewrite_blocker(["the top 3 largest ships"]) is not None
    assert rewrite_blocker(["the bright car at the top-left, northwest of the horizontal runway"]) is None

    record = make_record("rel", "upper left")
    image = decode_image(record["image"])
    masks, boxes, _ = decode_targets(record)
    out = augment(
        image,
        masks,
        boxes,
        record["conversation"],
        "relation",
        np.random.default_rng(0),
        [BY_TRANSFORM["hflip"]],
    )
    assert out.skipped == "phrase_type relation" and out.transform.is_identity
    assert out.conversation == record["conversation"] and out.masks is masks


def test_decode_image_turns_any_mode_into_rgb():
    grey16 = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 40
    colour = np.zeros((32, 48, 3), np.uint8)
    colour[..., 0] = 200
    images = {
        "L.png": Image.fromarray((grey16 % 256).astype(np.uint8)),
        "I16.tiff": Image.fromarray(grey16),
        "RGBA.png": Image.fromarray(colour).convert("RGBA"),
        "P.png": Image.fromarray(colour).convert("P"),
        "RGB.jpeg": Image.fromarray(colour),
    }
    for name, image in images.items():
        out = io.BytesIO()
        image.save(out, format=name.split(".")[1].upper())
        decoded = decode_image(out.getvalue())
        assert decoded.shape == (32, 48, 3) and decoded.dtype == np.uint8, name
        if name == "I16.tiff":
            assert decoded.max() == 255 and decoded.min() == 0  # 16-bit is stretched, not clipped
    with pytest.raises(BadRecord, match="undecodable image"):
        decode_image(b"not an image")


# ---------------------------------------------------------------------------------- batches
def test_a_turn_per_image_shows_every_record_of_a_picture_the_same_way_within_an_epoch(tokenizer):
    """``train.augment_per_image``: the draw is keyed by image id and epoch, so the feature cache
    sees a picture once per epoch; the text of each record still follows its picture's turn."""
    records = []
    for i in range(6):
        picture = make_record(f"img{i}", list(CORNERS)[i % 4])
        for task in ("refer", "ground", "caption"):
            records.append(dict(make_record(f"img{i}-{task}", list(CORNERS)[i % 4], task),
                                image=picture["image"], image_id=f"img{i}"))  # fmt: skip

    def turns(epoch: int, per_image: bool) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for batch in iter_batches(records, tokenizer, image_size=32, batch_size=6, max_length=128, augment=True,
                                  seed=1, epoch=epoch, seg_vocab=SEG_VOCAB, chat_template=1,
                                  turn_per_image=per_image):  # fmt: skip
            for image_id, turn in zip(batch["image_ids"], batch["transforms"], strict=True):
                out.setdefault(image_id, set()).add(turn)
            for mask, sample in zip(batch["target_masks"], batch["target_sample"].tolist(), strict=True):
                user = tokenizer.decode(batch["input_ids"][sample][batch["labels"][sample] == IGNORE_INDEX])
                assert centroid_corner(mask.numpy()) == named_corner(user)
        return out

    first, second = turns(0, True), turns(1, True)
    assert all(len(t) == 1 for t in (*first.values(), *second.values())), (first, second)
    assert first != second and len(set().union(*first.values())) > 1  # epochs and pictures differ
    assert any(len(t) > 1 for t in turns(0, False).values())  # per record: a picture's records differ


def test_batches_have_the_documented_shapes_and_count_bad_rows(tokenizer):
    records = mixed_records(7)
    records.insert(3, make_record("broken", image=b"\x89PNG but not really"))
    batches = iter_batches(
        records, tokenizer, image_size=32, batch_size=3, max_length=128, augment=True, seed=1, seg_vocab=SEG_VOCAB, chat_template=1
    )
    out = list(batches)
    assert [len(b["record_ids"]) for b in out] == [3, 3, 1]
    assert batches.stats.dropped == {"undecodable image": 1} and batches.stats.dropped_ids == [
        ("broken", "undecodable image")
    ]
    assert batches.stats.rows == 8 and batches.stats.samples == 7 and batches.stats.as_dict()["dropped"] == 1

    seg_ids = SEG_VOCAB.token_ids(tokenizer)
    for batch in out:
        b, length = batch["input_ids"].shape
        assert batch["pixel_values"].shape == (b, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert -2.2 < batch["pixel_values"].min() and batch["pixel_values"].max() < 2.7  # ImageNet-normalised
        assert batch["labels"].shape == batch["attention_mask"].shape == (b, length)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        lengths = batch["attention_mask"].sum(1)
        for row in range(b):  # right padding: pad ids and ignored labels after each sequence
            assert (batch["input_ids"][row, lengths[row] :] == tokenizer.pad_token_id).all()
            assert (batch["labels"][row, lengths[row] :] == IGNORE_INDEX).all()
        refer = [i for i, t in enumerate(batch["tasks"]) if t == "refer"]
        assert batch["target_counts"].tolist() == [
            int(i in refer) for i in range(b)
        ]  # ground/caption: text only
        t = int(batch["target_counts"].sum())
        assert batch["target_masks"].shape == (t, 32, 32) and batch["target_masks"].dtype == torch.float32
        assert set(batch["target_masks"].unique().tolist()) <= {0.0, 1.0}
        assert batch["target_boxes"].shape == (t, 4) and batch["class_ids"].tolist() == [2] * t
        assert batch["target_sample"].tolist() == refer
        first = batch["input_ids"][batch["target_sample"], batch["seg_positions"]]
        assert (first == seg_ids[0]).all()
        assert (batch["labels"][batch["target_sample"], batch["seg_positions"]] == seg_ids[0]).all()
        # The mask still sits where the (possibly rewritten) text says it is.
        for mask, sample in zip(batch["target_masks"], batch["target_sample"].tolist(), strict=True):
            user = tokenizer.decode(batch["input_ids"][sample][batch["labels"][sample] == IGNORE_INDEX])
            assert centroid_corner(mask.numpy()) == named_corner(user)

    # Same seed and epoch → same batches; another epoch → other draws.
    again = list(
        iter_batches(records, tokenizer, image_size=32, batch_size=3, max_length=128, augment=True, seed=1, seg_vocab=SEG_VOCAB, chat_template=1)
    )
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(out, again, strict=True))
    assert [x["transforms"] for x in out] == [y["transforms"] for y in again]
    other = list(
        iter_batches(
            records, tokenizer, image_size=32, batch_size=3, max_length=128, augment=True, seed=1, epoch=1, seg_vocab=SEG_VOCAB, chat_template=1
        )
    )
    assert [x["transforms"] for x in out] != [y["transforms"] for y in other]

    short = iter_batches(
        records, tokenizer, image_size=32, batch_size=8, max_length=20, augment=False, seed=1, seg_vocab=SEG_VOCAB, chat_template=1
    )
    assert list(short) == [] and short.stats.dropped["too long"] == 7

    kept = next(
        iter_batches(
            records[:2],
            tokenizer,
            image_size=32,
            batch_size=2,
            max_length=128,
            augment=False,
            seed=0,
            keep_original_masks=True, seg_vocab=SEG_VOCAB, chat_template=1
        )
    )
    assert [m.shape for m in kept["original_masks"]] == [(1, SIZE, SIZE), (0, SIZE, SIZE)]
    assert kept["transforms"] == ["identity", "identity"]


def test_each_target_carries_the_token_of_the_colour_its_phrase_names(tokenizer):
    (red_id,) = tokenizer.encode(" red", add_special_tokens=False)  # the captions made " red" one token
    phrases = ["the red small vehicle on the upper left", "the small vehicle", "the red and grey small vehicle"]
    records = [make_record(f"c{i}", "upper left") for i in range(3)] + [make_record("g", task="ground")]
    for record, phrase in zip(records, phrases):
        record["targets"][0]["description"] = phrase
    batch = next(iter_batches(records, tokenizer, image_size=32, batch_size=4, max_length=128, augment=False,
                              seed=0, seg_vocab=SEG_VOCAB, chat_template=1))  # fmt: skip
    # One per mask target (the ground record's target is no mask), in the targets' order.
    assert batch["colour_ids"].tolist() == [red_id, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["colour_ids"].shape == batch["seg_positions"].shape


def test_colour_words_of_several_tokens_carry_no_colour_id(tokenizer):
    table = colour_token_ids(tokenizer)
    several = [c for c in COLOUR_WORDS if len(tokenizer.encode(f" {c}", add_special_tokens=False)) > 1]
    assert table["red"] == tokenizer.encode(" red", add_special_tokens=False)[0]
    assert several and not set(several) & set(table)  # the tiny tokenizer splits the words its captions lack
    phrases = [f"the {several[0]} small vehicle", "the red small vehicle", None]
    assert phrase_colour_ids(phrases, table).tolist() == [IGNORE_INDEX, table["red"], IGNORE_INDEX]


# ---------------------------------------------------------------------------------- shards
def write_shards(shards_uri: str, split: str, records: list[dict], per_shard: int) -> None:
    for index in range(0, len(records), per_shard):
        table = pa.Table.from_pylist(records[index : index + per_shard], schema=schema.RECORD_SCHEMA)
        uri = storage.join_uri(shards_uri, split, f"shard-{index // per_shard:05d}.parquet")
        if storage.is_s3_uri(uri):
            fs, path = storage.arrow_filesystem(uri)
            pq.write_table(table, path, filesystem=fs)
        else:
            storage.write_bytes(uri, b"")  # creates the folder
            pq.write_table(table, uri)
    storage.write_bytes(storage.join_uri(shards_uri, storage.SUCCESS_MARKER), b"")  # finished, as sharding leaves it


def test_missing_or_unreadable_shards_fail_with_their_names(tmp_path):
    with pytest.raises(ShardError, match=f"{tmp_path}/nothing holds no finished shard set"):
        shard_dataset(str(tmp_path / "nothing"), "train")
    storage.write_bytes(str(tmp_path / "empty" / storage.SUCCESS_MARKER), b"")
    with pytest.raises(ShardError, match=f"split 'train'.*{tmp_path}/empty/train"):
        shard_dataset(str(tmp_path / "empty"), "train")
    write_shards(str(tmp_path / "shards"), "train", mixed_records(2), per_shard=2)
    (tmp_path / "shards" / "train" / "shard-00001.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ShardError, match="shard-00001.parquet is not readable Parquet"):
        shard_dataset(str(tmp_path / "shards"), "train")


def test_two_workers_stream_every_s3_record_exactly_once(ray_cluster, tokenizer, tmp_path):
    uri = "s3://geopix-data/tests/loader"
    records = mixed_records(20, prefix="s3-")
    write_shards(uri, "train", records, per_shard=10)
    dataset = shard_dataset(uri, "train")
    assert dataset.count() == 20

    seen: list[list[str]] = [[], []]
    shapes: list[tuple] = []
    stats = [None, None]

    def worker(rank: int, shard) -> None:  # what a Ray Train worker does with get_dataset_shard("train")
        batches = iter_batches(
            shard, tokenizer, image_size=32, batch_size=4, max_length=128, augment=True, seed=0, seg_vocab=SEG_VOCAB, chat_template=1
        )
        for batch in batches:
            seen[rank] += batch["record_ids"]
            shapes.append(
                (tuple(batch["pixel_values"].shape[1:]), batch["input_ids"].shape == batch["labels"].shape)
            )
        stats[rank] = batches.stats

    threads = [
        threading.Thread(target=worker, args=(r, s))
        for r, s in enumerate(dataset.streaming_split(2, equal=True))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(s is not None for s in stats), "a worker did not finish"
    assert sorted(seen[0] + seen[1]) == sorted(r["record_id"] for r in records)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert set(shapes) == {((3, 32, 32), True)}
    assert sum(s.dropped.total() for s in stats) == 0

    # A local shard folder reads the same way; a missing S3 prefix fails naming it.
    write_shards(str(tmp_path / "shards"), "val", records[:5], per_shard=3)
    batch = next(
        iter_batches(
            shard_dataset(str(tmp_path / "shards"), "val"),
            tokenizer,
            image_size=32,
            batch_size=8,
            max_length=128,
            augment=False,
            seed=0, seg_vocab=SEG_VOCAB, chat_template=1
        )
    )
    assert sorted(batch["record_ids"]) == sorted(r["record_id"] for r in records[:5])
    with pytest.raises(ShardError, match="no shards for split 'val'.*s3://geopix-data/tests/loader/val"):
        shard_dataset(uri, "val")
