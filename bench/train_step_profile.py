"""Where a tiny training step's time goes: data, vision, projector + embedding, LLM, LM head, seg
projection, mask predictor (memory included), class head, losses, backward, optimizer.

    .venv/bin/python bench/train_step_profile.py [--steps 10] [--batch 8] [--threads 1] [--stage 1] [--cached]

One process with the threads one training worker has (``train.threads_per_worker``) and one
worker's batch, the tiny preset's model at its real input size, synthetic chips made in memory.
Forward parts are timed by forward hooks on the model's modules (CPU: synchronous); "losses and
glue" is the forward's remainder (image-token expansion, the seg-run gather, Hungarian matching,
BCE/Dice/CE). Backward and the optimizer step are timed whole. Data is ``iter_batches`` making
the same batches (decode, augment, resize, tokenise, collate). Each part is printed as a share of
the step, and the step against the data time (what a faster step would buy before data bounds it).
DeepSpeed's own cost beside a plain loop is ``bench/train_throughput.py``'s figure.

``--cached`` times the step as the preset trains it with ``train.vision_feature_cache_mb``: the
vision features come from training's feature cache, filled by one untimed pass over the same
batches first, so every timed step is all hits (the encoder does not run; the digest and lookup
are timed as their own part).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from train_throughput import feature_cache, make_records

from geopix.config import add_overrides_argument, load_config

PARTS = {  # module attribute → name in the table
    "vision": "vision encoder (frozen, no grad)",
    "projector": "projector",
    "llm.model": "LLM transformer",
    "llm.lm_head": "LM head",
    "seg_projection": "seg projection",
    "mask_predictor": "mask predictor (+ memory)",
    "class_head": "class head",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage", type=int, default=1, choices=[1, 2])
    add_overrides_argument(parser)
    parser.add_argument("--cached", action="store_true", help="vision features from the feature cache (all hits)")
    args = parser.parse_args()

    import torch

    from geopix.data.batches import iter_batches
    from geopix.data.tokenizer import corpus_texts, train_tokenizer
    from geopix.model import build_model
    from geopix.train.stages import set_stage

    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", args.overrides)
    vocab = cfg.model.seg_vocabulary
    records = make_records(cfg.model.image_size, args.batch * (args.steps + 2), vocab)
    tokenizer = train_tokenizer(corpus_texts(records), vocab_size=cfg.train.tokenizer_vocab_size, seg_vocab=vocab)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    set_stage(model, args.stage, cfg.model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def make_batches():
        return iter_batches(records, tokenizer, image_size=cfg.model.image_size, batch_size=args.batch,
                            max_length=cfg.train.max_length, augment=cfg.train.augment, seed=0,
                            seg_vocab=vocab, chat_template=cfg.model.chat_template, drop_last=True)  # fmt: skip

    started = time.perf_counter()
    batches = list(make_batches())
    data_s = (time.perf_counter() - started) / len(batches)

    spent: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    for attr, name in PARTS.items():
        module = model.get_submodule(attr)
        module.register_forward_pre_hook(lambda _m, _a, name=name: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda _m, _a, _o, name=name: spent.__setitem__(name, spent[name] + time.perf_counter() - starts[name])
        )
    cache = feature_cache(cfg, model, batches[: args.steps + 2]) if args.cached else None  # filled: all hits
    if args.cached and cache is None:
        parser.error("--cached needs train.vision_feature_cache_mb > 0 (the tiny preset has 1024)")
    totals: dict[str, float] = defaultdict(float)
    timed = 0
    tokens = padded = 0
    for step, batch in enumerate(batches[: args.steps + 2]):
        if step == 2:  # two warm-up steps
            spent.clear()
            totals.clear()
        t0 = time.perf_counter()
        features = cache(batch["pixel_values"]) if cache else None
        tc = time.perf_counter()
        out = model(**batch, vision_features=features)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        totals["feature cache"] += tc - t0
        totals["forward"] += t1 - tc
        totals["backward"] += t2 - t1
        totals["optimizer"] += t3 - t2
        if step >= 2:
            timed += 1
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
    per_step = {k: v / timed for k, v in totals.items()}
    parts = {"feature cache (digest, lookup, stack)": per_step["feature cache"]} if cache else {}
    parts |= {name: spent[name] / timed for name in PARTS.values()}
    parts["losses and glue (forward remainder)"] = per_step["forward"] - sum(spent[n] / timed for n in PARTS.values())
    parts["backward"] = per_step["backward"]
    parts["optimizer step"] = per_step["optimizer"]
    step_s = sum(per_step.values())
    print(f"tiny stage {args.stage}, batch {args.batch}, {args.threads} thread(s), {timed} timed steps"
          f"{', vision features from the cache (all hits)' if cache else ''}: "
          f"{step_s:.3f} s per step = {args.batch / step_s:.2f} samples/s")  # fmt: skip
    print(f"{'part':<40} {'s/step':>8} {'share':>7}")
    for name, seconds in parts.items():
        print(f"{name:<40} {seconds:>8.4f} {seconds / step_s:>7.1%}")
    print(f"data (iter_batches, per batch)           {data_s:>8.4f} {data_s / step_s:>7.1%} of a step")
    print(f"text tokens that are padding: {1 - tokens / padded:.1%} (before the image tokens are inserted)")
    print(json.dumps({"step_s": step_s, "samples_per_s": args.batch / step_s, "data_s": data_s, "parts": parts,
                      "padding_share": 1 - tokens / padded}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
