"""`geopix eval` on the local stack: caption metrics against independent computations, and the
Ray Data evaluation job end to end (an overfitted model scores high, a fresh one low; a corrupt
record is counted and named; summary, per-target Parquet, report, MLflow and the comparison)."""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu
from pycocotools import mask as mask_utils

from geopix import storage, tracking
from geopix.answer_form import box_to_text, grounding_answer
from geopix.config import load_config
from geopix.data.batches import iter_batches
from geopix.data.schema import RECORD_SCHEMA
from geopix.data.tokenizer import corpus_texts, train_tokenizer
from geopix.evaluate.captions import caption_scores, caption_tokens
from geopix.evaluate.job import evaluate_model, evaluate_models, normalise_answer
from geopix.model import build_model
from geopix.train.stages import set_stage
from tests.records import CATALOG, SEG_VOCAB, make_record
from tests.test_model import SMALL, two_target_record

SHARDS = "s3://geopix-data/tests/eval/shards"
OVERRIDES = [
    *SMALL,
    "evaluate.out_uri=s3://geopix-checkpoints/tests/evals",
    "evaluate.max_new_tokens=40",  # room for the two-target answer: 24 tokens cut its second seg run
    "evaluate.batch_size=4",
    "tracking.experiment=geopix-tests-eval",
    "tracking.system_metrics=false",
]


# ------------------------------------------------------------------------------------ captions
def cider_d(candidates: dict[str, str], references: dict[str, list[str]]) -> float:
    """CIDEr-D as defined by Vedantam et al. (2015) and the COCO evaluation: TF-IDF n-gram vectors
    (n = 1..4, IDF from the references' document frequency), candidate counts clipped to the
    reference's, a Gaussian length penalty (σ = 6), ×10, averaged over references and images."""
    def grams(text: str, n: int) -> Counter:
        words = text.split()
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    ids = sorted(candidates)
    log_images = math.log(len(ids))
    scores = []
    for image in ids:
        total = 0.0
        for ref in references[image]:
            per_n = []
            for n in range(1, 5):
                df = Counter(g for i in ids for g in set().union(*(grams(r, n) for r in references[i])))

                def vector(counts: Counter, df=df) -> dict:
                    return {g: c * (log_images - math.log(max(1.0, df[g]))) for g, c in counts.items()}

                c, r = vector(grams(candidates[image], n)), vector(grams(ref, n))
                dot = sum(min(c[g], r[g]) * r[g] for g in c if g in r)
                norm = math.sqrt(sum(v * v for v in c.values())) * math.sqrt(sum(v * v for v in r.values()))
                delta = len(candidates[image].split()) - len(ref.split())
                per_n.append(dot / norm * math.exp(-(delta**2) / (2 * 6.0**2)) if norm else 0.0)
            total += 10 * sum(per_n) / 4
        scores.append(total / len(references[image]))
    return sum(scores) / len(scores)


def random_captions(seed: int, count: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    rng = random.Random(seed)
    words = ["the", "a", "ship", "tank", "building", "court", "field", "road", "river", "parked", "near", "left", "right", "large", "small", "two"]
    refs = {f"img{i}": [" ".join(rng.choices(words, k=rng.randint(6, 12))) for _ in range(rng.randint(1, 3))]
            for i in range(count)}
    cands = {}
    for key, rs in refs.items():  # a noisy copy of one reference: real overlap, at least 4 words
        tokens = rs[0].split()
        cands[key] = " ".join(t if rng.random() < 0.7 else rng.choice(words) for t in tokens[: rng.randint(4, len(tokens))])
    return cands, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_caption_metrics_match_independent_computations(seed):
    cands, refs = random_captions(seed, 12)
    scores = caption_scores(cands, refs)
    ids = sorted(cands)
    nltk_bleu = corpus_bleu([[r.split() for r in refs[i]] for i in ids], [cands[i].split() for i in ids])
    assert scores["BLEU-4"] == pytest.approx(nltk_bleu, abs=1e-6)
    assert scores["CIDEr"] == pytest.approx(cider_d(cands, refs), rel=1e-6)
    assert scores["captions"] == 12


def test_caption_metrics_edge_cases():
    refs = {"a": ["A ship, docked."], "b": ["Two storage tanks."]}
    perfect = caption_scores({"a": "a ship docked", "b": "two storage tanks"}, refs)
    # No 4-gram fits a 3-word caption: COCO's BLEU smooths the empty 4-gram precision to
    # (0 + 1e-15) / (0 + 1e-9), so a perfect 3-word caption scores (1 · 1 · 1 · 1e-6)^¼.
    assert perfect["BLEU-4"] == pytest.approx(1e-6**0.25, rel=1e-6)
    empty = caption_scores({"a": "", "b": ""}, refs)  # empty answers score 0, never crash
    assert empty["BLEU-4"] == pytest.approx(0.0, abs=1e-6) and empty["CIDEr"] == 0.0
    assert caption_tokens("The SHIP, docked!") == "the ship docked"
    with pytest.raises(ValueError, match="different ids"):
        caption_scores({"a": "x"}, refs)
    assert normalise_answer("Yes, there is one [SEG0][SEG1].") == "yes there is one"


# ---------------------------------------------------------------------------------- the job
def eval_records() -> tuple[list[dict], dict, dict]:
    records = [make_record(i, class_id=i % 3) for i in range(3)] + [two_target_record(3)]
    ground = make_record(4, class_id=1, task="ground")  # answered with a run and its box
    box = box_to_text(ground["targets"][0]["box"], ground["width"], ground["height"])
    ground["conversation"][1]["text"] = grounding_answer(SEG_VOCAB.run, box)
    records.append(ground)
    broken = make_record(9, class_id=1)
    broken["record_id"], broken["image"] = "rec-broken", b"\x89PNG but truncated"
    caption = make_record(8, task="caption")
    caption["conversation"] = [
        {"role": "user", "text": "<image>\n[caption] Describe the image in detail."},
        {"role": "assistant", "text": "A bright square object on a noisy background."},
    ]
    caption["targets"], caption["phrase_type"] = [], None
    return records, broken, caption


def generated_ciou(model, batch, records, tokenizer) -> float:
    """cIoU of the masks the model answers when asked as the evaluation asks (greedy chat on each
    record's own instruction), the k-th mask against the k-th target; 0 when a record gets another
    number of masks than it has targets."""
    from geopix.evaluate.job import user_turn

    answers = model.chat(batch["pixel_values"], [user_turn(r) for r in records], tokenizer, max_new_tokens=40)
    masks, offset, inter, union = batch["target_masks"] > 0.5, 0, 0, 0
    for record, answer in zip(records, answers, strict=True):
        truths = masks[offset : offset + len(record["targets"])]
        offset += len(record["targets"])
        if len(answer.masks) != len(truths):
            return 0.0
        inter += int((answer.masks & truths).sum())
        union += int((answer.masks | truths).sum())
    return inter / max(union, 1)


def fitted_model(cfg, records, tokenizer, max_steps: int = 1000):
    """The tiny model fitted to ``records`` until it answers them as the evaluation will ask: every
    record's seg runs written and the generated masks at cIoU >= 0.95, far above the evaluation
    tests' 0.7 bar. Seeded and on one thread, so the same steps run on any machine; the bound on
    steps is a failure with its reason, never a weaker model handed on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, tokenizer)
        set_stage(model, 1)
        batch = next(iter(iter_batches(records, tokenizer, image_size=64, batch_size=len(records),
                                       max_length=None, augment=False, seed=0, seg_vocab=SEG_VOCAB,
                                       chat_template=model.config.chat_template)))  # fmt: skip
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        ciou = 0.0
        for step in range(1, max_steps + 1):
            model.train()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 25 == 0:
                ciou = generated_ciou(model.eval(), batch, records, tokenizer)
                if ciou >= 0.95:
                    return model.eval()
        raise AssertionError(f"the test model did not fit its records in {max_steps} steps (generated cIoU {ciou:.3f})")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(stack, ray_cluster, tmp_path_factory):
    cfg = load_config("tiny", OVERRIDES)
    good, broken, caption = eval_records()
    rows = [*good, broken, caption]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([dict(r, split="test") for r in rows], schema=RECORD_SCHEMA), buffer)
    storage.write_bytes(f"{SHARDS}/test/shard-00000.parquet", buffer.getvalue())
    classes = [{"id": i, "name": n} for i, n in sorted(CATALOG.names.items())]
    storage.write_bytes(f"{SHARDS}/manifest.json", json.dumps({"classes": classes}).encode())
    storage.write_bytes(f"{SHARDS}/{storage.SUCCESS_MARKER}", b"")
    tokenizer = train_tokenizer(corpus_texts(rows), vocab_size=300, seg_vocab=SEG_VOCAB)
    root = tmp_path_factory.mktemp("models")
    fitted = fitted_model(cfg, good, tokenizer).save(root / "fitted", tokenizer)
    torch.manual_seed(1)
    fresh = build_model(cfg.model, tokenizer).eval().save(root / "fresh", tokenizer)
    tracking.configure(cfg.tracking)
    return cfg, str(fitted), str(fresh), good


def _predicted_iou(predicted_rle: dict, truth_rle: dict) -> float:
    """pycocotools' IoU of two RLEs (iscrowd 0), the independent check of each target's row."""
    encode = lambda r: {"size": r["size"], "counts": r["counts"].encode()}
    return float(mask_utils.iou([encode(predicted_rle)], [encode(truth_rle)], [0])[0, 0])


@pytest.fixture(scope="module")
def compared(setup):
    """The fitted and the fresh model evaluated side by side (each its own evaluation and MLflow
    run, then their comparison): what the tests below look at."""
    cfg, fitted, fresh, _ = setup
    return evaluate_models(cfg, {"fitted": fitted, "fresh": fresh}, shards_uri=SHARDS, name="compare")


def test_eval_job_scores_an_overfitted_model_and_reports(setup, compared):
    import mlflow

    _, _, _, good = setup
    result = compared[0]["fitted"]
    summary = result.summary
    assert summary["records"] == 7 and summary["failed"] == 1  # the broken record: counted and named
    assert summary["failures"][0]["record_id"] == "rec-broken"
    assert "image" in summary["failures"][0]["error"].lower()
    seg = summary["segmentation"]
    assert seg["overall"]["targets"] == 5 and seg["overall"]["answered"] == 1.0, seg["overall"]
    assert seg["overall"]["cIoU"] >= 0.7 and seg["overall"]["P@0.5"] >= 0.6, seg["overall"]
    # Single-target and all-of-class answers, each scored alone: together they are all targets.
    assert set(seg["by_task"]) <= {"segment", "refer"}
    assert sum(v["targets"] for v in seg["by_task"].values()) == seg["overall"]["targets"]
    assert summary["captions"]["captions"] == 1 and 0 <= summary["captions"]["CIDEr"]
    # The grounding answer's box is its mask's box: a hit, bucketed by the object's area (16² px).
    assert summary["grounding"]["records"] == 1 and summary["grounding"]["accuracy"] == 1.0
    assert summary["grounding"]["by_bucket"] == {"small": {"records": 1, "accuracy": 1.0}}

    # Per-target rows on S3 agree with pycocotools on the published predicted masks, and cIoU
    # is their Σ intersection / Σ union.
    targets = pq.read_table(io.BytesIO(storage.read_bytes(f"{result.out_uri}/targets.parquet"))).to_pylist()
    assert len(targets) == 5
    assert seg["overall"]["cIoU"] == pytest.approx(
        sum(t["intersection"] for t in targets) / sum(t["union"] for t in targets)
    )
    import pyarrow.dataset as pads

    fs, path = storage.arrow_filesystem(f"{result.out_uri}/records")
    rows = {r["record_id"]: r for r in pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()}
    truth = {r["record_id"]: r for r in good}
    for t in targets:
        assert t["predicted"] == (t["mask_index"] >= 0)
        if t["predicted"]:
            predicted = rows[t["record_id"]]["predicted_masks"][t["mask_index"]]
            expected = _predicted_iou(predicted, truth[t["record_id"]]["targets"][t["target"]]["mask"])
            assert t["iou"] == pytest.approx(expected)
        else:
            assert t["iou"] == 0

    # Report, summary and marker published; metrics in MLflow.
    listed = {u.rsplit("/", 1)[-1] for u in storage.list_files(result.out_uri + "/report")}
    assert {"report.md", "scores.png", "best_cases.png", "worst_cases.png"} <= listed
    assert storage.list_files(result.out_uri, storage.SUCCESS_MARKER)
    report = storage.read_bytes(f"{result.out_uri}/report/report.md").decode()
    assert "By size bucket" in report and "rec-broken" in report
    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.metrics["seg_cIoU"] == pytest.approx(seg["overall"]["cIoU"])
    assert run.data.metrics["failed_records"] == 1


def test_eval_compares_two_models(compared):
    results, comparison = compared
    assert results["fitted"].summary["segmentation"]["overall"]["cIoU"] > (
        results["fresh"].summary["segmentation"]["overall"]["cIoU"] + 0.5
    )
    text = storage.read_bytes(f"{comparison}/comparison.md").decode()
    assert "fitted cIoU / gIoU" in text and "Δ fresh − fitted" in text
    assert storage.list_files(comparison, "comparison.png")


def test_eval_refuses_a_missing_model_or_split(setup):
    from geopix.data.shard_set import ShardError
    from geopix.evaluate.job import EvalError

    cfg, fitted, _, _ = setup
    with pytest.raises(EvalError, match="no published model at s3://geopix-checkpoints/tests/none"):
        evaluate_model(cfg, "s3://geopix-checkpoints/tests/none", shards_uri=SHARDS)
    with pytest.raises(ShardError, match="split 'val'"):
        evaluate_model(cfg, fitted, shards_uri=SHARDS, split="val")


def test_eval_reads_only_a_finished_shard_set_and_writes_only_where_it_may(setup):
    from geopix.data.shard_set import ShardError
    from geopix.outputs import OutputRefused

    cfg, fitted, _, _ = setup
    unfinished = "s3://geopix-data/tests/eval/unfinished"
    storage.copy(f"{SHARDS}/test/shard-00000.parquet", f"{unfinished}/test/shard-00000.parquet")
    with pytest.raises(ShardError, match="unfinished holds no finished shard set"):
        evaluate_model(cfg, fitted, shards_uri=unfinished)
    # An output prefix holding what GeoPix did not write is refused, and left as it was.
    theirs = "s3://geopix-checkpoints/tests/evals/theirs"
    storage.write_bytes(f"{theirs}/quarterly.xlsx", b"numbers")
    with pytest.raises(OutputRefused, match="GeoPix did not write"):
        evaluate_model(cfg, fitted, shards_uri=SHARDS, name="theirs", log_to_mlflow=False)
    assert storage.read_bytes(f"{theirs}/quarterly.xlsx") == b"numbers"
    with pytest.raises(OutputRefused, match="holds the input"):  # an output over the shards it reads
        evaluate_model(cfg, fitted, shards_uri=SHARDS, name="eval", out_uri="s3://geopix-data/tests", log_to_mlflow=False)
