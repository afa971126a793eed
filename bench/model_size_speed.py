"""Parameter counts (tiny, full) and forward+backward time per sample of the tiny model on CPU.

    .venv/bin/python bench/model_size_speed.py [--batch 16] [--steps 5] [--threads 2]

The tiny model is the `tiny` preset at its real input size (256 px) with a BPE tokenizer trained
on synthetic records; the full preset is built on the meta device (nothing allocated). The first
step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import time

import torch

from geopix.config import load_config
from geopix.data.batches import iter_batches
from geopix.data.synth import chip_records, make_chip
from geopix.data.tokenizer import corpus_texts, train_tokenizer
from geopix.model import GeoPixModel, build_model, count_parameters, model_config
from geopix.train.stages import set_stage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config("tiny")
    records = [r for i in range(32) for r in chip_records(make_chip("train", 0, i, cfg.data.chip_size), cfg.model.seg_vocabulary)]
    tokenizer = train_tokenizer(corpus_texts(records), vocab_size=2000, seg_vocab=cfg.model.seg_vocabulary)
    model = build_model(cfg.model, tokenizer)
    for stage in (1, 2):
        set_stage(model, stage)
        trainable, total = count_parameters(model)
        print(f"tiny stage {stage}: trainable {trainable / 1e6:.2f} M / total {total / 1e6:.2f} M")

    full = load_config("full").model
    with torch.device("meta"):
        big = GeoPixModel(
            model_config(full, vocab_size=32007, image_token_id=32000, seg_token_ids=list(range(32001, 32007)))
        )
    # The stage-1 policy trains a random LLM whole; count it as for real weights from a local path.
    big.config.llm_pretrained = True
    for stage in (1, 2):
        set_stage(big, stage)
        trainable, total = count_parameters(big)
        print(f"full stage {stage}: trainable {trainable / 1e6:.1f} M / total {total / 1e9:.3f} B")

    model = build_model(cfg.model, tokenizer)
    set_stage(model, 1)
    model.train()
    batch = next(
        iter(
            iter_batches(
                records,
                tokenizer,
                image_size=cfg.model.image_size,
                batch_size=args.batch,
                max_length=None,
                augment=False,
                seed=0,
                seg_vocab=cfg.model.seg_vocabulary,
                chat_template=cfg.model.chat_template,
            )
        )
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    per_sample = sorted(times)[len(times) // 2] / args.batch
    print(
        f"tiny fwd+bwd+step: {per_sample * 1e3:.1f} ms/sample (median of {args.steps}, batch {args.batch}, "
        f"{args.threads} threads, {int(batch['target_counts'].sum())} targets)"
    )


if __name__ == "__main__":
    main()
