"""The seg vocabulary is one definition: a config other than the presets' 3 tokens × 2 scales
goes through every part that writes or reads seg runs (generator → shards → tokenizer → a
training step → answers → a saved model), and parts built for another vocabulary refuse it."""

from __future__ import annotations

import uuid

import pytest
import torch

from geopix.config import DataConfig, load_config
from geopix.data.batches import iter_batches
from geopix.data.schema import SEG_TASKS, validate_record
from geopix.data.shard import shard_sources
from geopix.data.source import iter_records, read_catalog
from geopix.data.synth import generate_chips
from geopix.data.tokenizer import corpus_texts, train_tokenizer
from geopix.model import GeoPixModel, build_model, model_config
from geopix.train.rank_reader import RankReader
from geopix.train.run import TrainError, check_data
from geopix.train.stages import set_stage
from geopix.vocabulary import SegVocabulary
from tests.test_model import SMALL

TWO_BY_TWO = ["model.seg_token_num=2", "model.num_scales=2", "data.chip_size=64"]


def test_a_two_by_two_vocabulary_goes_from_generation_to_answer(stack, ray_cluster, tmp_path):
    cfg = load_config("tiny", [*SMALL, *TWO_BY_TWO])
    vocab = cfg.model.seg_vocabulary
    assert vocab == SegVocabulary(2, 2) and vocab.run == "[SEG0][SEG1][SEG2][SEG3]"
    prefix = f"s3://geopix-data/tests/vocabulary/{uuid.uuid4().hex[:8]}"
    source, shards = f"{prefix}/source", f"{prefix}/shards"

    # The generator answers with this vocabulary's runs, one per target.
    generate_chips(source, seed=0, chip_size=64, train_images=8, val_images=1, test_images=1,
                   test_seed_offset=1000, seg_vocab=vocab, progress=False)  # fmt: skip
    records = list(iter_records(source))
    seg_records = [r for r in records if r["task"] in SEG_TASKS]
    assert seg_records
    for record in seg_records:
        answer = record["conversation"][1]["text"]
        assert vocab.count_runs(answer) == (len(record["targets"]), []) and "[SEG4]" not in answer
    # Checked against another vocabulary, the same records are wrong, and say why.
    problems = validate_record(seg_records[0], read_catalog(source), SegVocabulary())
    assert any("seg tokens outside a complete [SEG0][SEG1][SEG2][SEG3][SEG4][SEG5] run" in p for p in problems)

    # Sharding checks them against the config's vocabulary and records it.
    result = shard_sources([source], shards, DataConfig(chip_size=64), seg_vocab=vocab, overwrite=True)
    assert result.counts["rejected"] == 0 and result.counts["written"] == len(records)
    assert result.manifest["seg_vocabulary"] == {"tokens_per_scale": 2, "num_scales": 2}
    check_data(cfg, shards, 1)  # this model may train on them ...
    with pytest.raises(TrainError, match=r"seg run \[SEG0\]\[SEG1\]\[SEG2\]\[SEG3\], this model with "
                                         r"\[SEG0\]\[SEG1\]\[SEG2\]\[SEG3\]\[SEG4\]\[SEG5\]"):  # fmt: skip
        check_data(load_config("tiny", SMALL), shards, 1)  # ... a 3 × 2 model may not

    # Tokenizer and model take the vocabulary from the config: one training step on the shards.
    rows = [r for _, r in RankReader(shards, "train", rank=0, world=1, seed=0).epoch_records(0)]
    tokenizer = train_tokenizer(corpus_texts(rows), vocab_size=300, seg_vocab=vocab)
    assert "[SEG4]" not in tokenizer.get_vocab() and len(vocab.token_ids(tokenizer)) == 4
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    set_stage(model, 1)
    assert model.seg_token_ids == vocab.token_ids(tokenizer)
    seg_rows = [r for r in rows if r["task"] in SEG_TASKS][:4]
    batch = next(iter(iter_batches(seg_rows, tokenizer, image_size=64, batch_size=4, max_length=None,
                                   augment=False, seed=0, seg_vocab=vocab,
                                   chat_template=model.config.chat_template)))  # fmt: skip
    out = model(**batch)
    assert out.mask_logits.shape[0] == int(batch["target_counts"].sum()) == sum(len(r["targets"]) for r in seg_rows)
    before = model.seg_projection.mlp[0].weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss) and not torch.equal(before, model.seg_projection.mlp[0].weight)

    # Answers are read by the same runs: two runs, two masks; a saved model keeps its vocabulary.
    processor = model.processor()
    pixels = processor([seg_rows[0]["image"], seg_rows[1]["image"]])
    answers = model.answer_forced(pixels, "[segment] all ships", "Sure, they are {seg} and {seg}.", tokenizer)
    assert [tuple(a.masks.shape) for a in answers] == [(2, 64, 64)] * 2 and vocab.run in answers[0].text
    saved = model.save(tmp_path / "model", tokenizer)
    loaded = GeoPixModel.load(saved)
    assert loaded.config.seg_vocabulary == vocab and loaded.seg_token_ids == model.seg_token_ids

    # A model whose seg ids do not make one run of its vocabulary is refused, naming it.
    with pytest.raises(ValueError, match=r"6 seg token ids for a run of 4 .*\[SEG0\]\[SEG1\]\[SEG2\]\[SEG3\]"):
        model_config(cfg.model, vocab_size=len(tokenizer), image_token_id=model.image_token_id,
                     seg_token_ids=list(range(6)))  # fmt: skip
