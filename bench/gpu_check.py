"""One-shot GPU check: GeoPix correctness in bf16 on CUDA, and ZeRO throughput of a mid-size preset.

    PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --out $OUT            # one H100/H200
    DS_ACCELERATOR=cpu .venv/bin/python bench/gpu_check.py --device cpu --dry-run --out /tmp/gc

Sections (each is caught on its own, so one failure does not hide the others' figures):

- ``correctness``: the tiny LLM with a random CLIP ViT-L/14 at 336 px on the device. Forward +
  backward with fp32 weights under bf16 autocast; with parameters cast to bf16 and buffers left
  fp32 (what DeepSpeed 0.19's bf16 mode does); then fully in bf16 at batch 1 and 4, one and several
  targets per sample, text-only samples, the optional EMA memory write; then ``chat`` (greedy) on
  2 images, free and with a forced seg run, and a teacher-forced answer with two seg runs.
- ``throughput``: CLIP ViT-L/14 (random, 336 px) + a 1.1 B-class LLaMA (hidden 2048 × 22 layers),
  stage-1 policy (a random LLM trains whole), random well-formed batches. Baseline: a plain torch
  loop, fp32 weights + bf16 autocast, torch AdamW (also: bf16 weights and optimizer state). Then
  DeepSpeed ZeRO-2 and ZeRO-1 (bf16, client torch AdamW, no compiled ops), one process; a ZeRO run
  that fails on a dtype mismatch is retried with ``data_types.buffer_dtype = bf16``. Samples/s,
  tokens/s, peak memory, and the ratios to the baseline.

Writes ``<out>/gpu_check.json`` after every section (a timeout keeps what finished) and exits 1
when any section failed. Only ``geopix.config`` and ``geopix.model`` are imported from the project,
so it runs from the repo root via PYTHONPATH without installing GeoPix or its services' clients.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from scripted_answers import script_answers

RESULTS: dict[str, Any] = {"sections": {}}
FAILURES: list[str] = []


# ------------------------------------------------------------------------------------ reporting
def report(ok: bool, name: str, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)
    return ok


def save(out: Path) -> None:
    RESULTS["failures"] = FAILURES
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def error_text(exc: BaseException) -> str:
    """The message, the deepest GeoPix frame (where in our code it broke) and the last frames."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}geopix{os.sep}" in f.filename]
    where = f"  at {ours[-1].filename}:{ours[-1].lineno} in {ours[-1].name}: {ours[-1].line}\n" if ours else ""
    return f"{type(exc).__name__}: {exc}\n{where}" + "".join(traceback.format_exception(exc)[-6:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- sizes
def presets(dry_run: bool) -> dict[str, dict[str, Any]]:
    """Model sizes and run lengths. The dry run keeps the code paths and shrinks every size so that
    it finishes in a couple of minutes on 2 shared CPU cores."""
    clip_l = None  # None: ClipEncoder's own ViT-L/14 sizes (random weights)
    if not dry_run:
        return {
            "correctness": {
                "model": {"vision_encoder": "clip", "image_size": 336, "llm_hidden_size": 192,
                          "llm_num_layers": 3, "llm_num_heads": 4, "llm_intermediate_size": 512,
                          "decoder_dim": 64, "memory_len": 8, "memory_dim": 64, "num_classes": 8},
                "vision_config": clip_l,
                "max_new_tokens": 12,
            },
            "throughput": {
                "model": {"vision_encoder": "clip", "image_size": 336, "llm_hidden_size": 2048,
                          "llm_num_layers": 22, "llm_num_heads": 32, "llm_intermediate_size": 5632,
                          "decoder_dim": 256, "memory_len": 8, "memory_dim": 256, "num_classes": 8},
                "vision_config": clip_l,
                "vocab_size": 32007, "batch": 8, "text_len": 128, "warmup": 3, "steps": 20, "batches": 4,
            },
        }
    # A CLIP small enough for the CPU; 11 layers so that hidden layer -11 exists.
    small_clip = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 11,
                  "num_attention_heads": 4, "patch_size": 14, "image_size": 112, "projection_dim": 32}
    small = {"vision_encoder": "clip", "image_size": 112, "llm_hidden_size": 64, "llm_num_layers": 2,
             "llm_num_heads": 4, "llm_intermediate_size": 128, "decoder_dim": 32, "memory_len": 4,
             "memory_dim": 32, "num_classes": 8}
    return {
        "correctness": {"model": small, "vision_config": small_clip, "max_new_tokens": 6},
        "throughput": {"model": small, "vision_config": small_clip, "vocab_size": 1007, "batch": 2,
                       "text_len": 24, "warmup": 1, "steps": 2, "batches": 2},
    }


# ---------------------------------------------------------------------------------- model / data
def build_geopix(cfg, device, *, vocab_size: int, image_token_id: int, seg_token_ids: list[int],
                 pad_token_id: int, vision_config: dict | None):
    """GeoPixModel built directly on ``device`` with random weights (no fp32 copy on the CPU
    first: 1.6 B parameters would take minutes there)."""
    import torch

    from geopix.model import GeoPixModel, model_config

    config = model_config(cfg, vocab_size=vocab_size, image_token_id=image_token_id,
                          seg_token_ids=seg_token_ids, pad_token_id=pad_token_id)
    if vision_config is not None:
        config = dataclasses.replace(config, vision_config=vision_config)
    with torch.device(device):
        return GeoPixModel(config)


def make_batch(*, targets: list[int], text_len: int, image_size: int, vocab_size: int, image_token_id: int,
               seg_token_ids: list[int], pad_token_id: int, num_classes: int, generator, device) -> dict:
    """A random batch in the loader's format (docs/training_input.md): right-padded ids with one
    ``<image>`` at position 1, prompt tokens masked out of the labels, one seg run per target in
    the answer, packed targets with rectangular 0/1 masks. Rows have different lengths."""
    import torch

    run = len(seg_token_ids)
    special = {image_token_id, pad_token_id, *seg_token_ids}
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special])
    rows, seg_positions, target_sample = [], [], []
    for sample, n_targets in enumerate(targets):
        length = text_len - int(torch.randint(0, max(1, text_len // 4), (1,), generator=generator))
        prompt = max(3, length // 3)
        length = max(length, prompt + n_targets * (run + 2) + 1)
        ids = allowed[torch.randint(len(allowed), (length,), generator=generator)]
        ids[1] = image_token_id
        slot = (length - prompt) // max(n_targets, 1)
        for t in range(n_targets):  # one run per slot of the answer, after one ordinary token
            start = prompt + t * slot + 1
            ids[start : start + run] = torch.tensor(seg_token_ids)
            seg_positions.append(start)
            target_sample.append(sample)
        rows.append((ids, prompt))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        labels[i, prompt : len(ids)] = ids[prompt:]
    n = len(seg_positions)
    masks = torch.zeros(n, image_size, image_size)
    for t in range(n):
        w, h = (int(v) for v in torch.randint(image_size // 16, image_size // 2, (2,), generator=generator))
        x, y = (int(v) for v in torch.randint(0, image_size - max(w, h), (2,), generator=generator))
        masks[t, y : y + h, x : x + w] = 1
    batch = {
        "pixel_values": torch.randn(len(rows), 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "seg_positions": torch.tensor(seg_positions, dtype=torch.long),
        "target_sample": torch.tensor(target_sample, dtype=torch.long),
        "target_masks": masks,
        "class_ids": torch.randint(num_classes, (n,), generator=generator),
        "target_counts": torch.tensor(targets, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()}


def tiny_tokenizer(seg_vocab):
    """A small BPE trained on a handful of template conversations (the tiny preset's recipe)."""
    from geopix.chat_template import chat_text
    from geopix.data.tokenizer import train_tokenizer

    run = seg_vocab.run
    phrases = ["the small vehicle on the left", "the large building", "all ships", "the storage tank",
               "the plane at the top right", "the harbor", "every tennis court", "the bridge"]
    texts = []
    for phrase in phrases:
        for task in ("[refer]", "[segment]"):
            conversation = [{"role": "user", "text": f"<image>\n{task} {phrase}"},
                            {"role": "assistant", "text": f"Sure, it is {run}."}]
            texts.append(chat_text(conversation))
        texts.append(chat_text([{"role": "user", "text": "<image>\n[caption] Describe the image in detail"},
                                {"role": "assistant", "text": f"An aerial view with {phrase}."}]))
    return train_tokenizer(texts, vocab_size=400, seg_vocab=seg_vocab)


def grads_finite(model) -> tuple[bool, int]:
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads), len(grads)


# ------------------------------------------------------------------------------- a: correctness
def check_correctness(args, device, sizes: dict) -> dict:
    import torch

    from geopix.chat_template import prompt_text
    from geopix.config import ModelConfig
    from geopix.train.stages import set_stage

    res: dict[str, Any] = {"cases": []}
    cfg = ModelConfig(**sizes["model"])
    tokenizer = tiny_tokenizer(cfg.seg_vocabulary)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    seg_ids = cfg.seg_vocabulary.token_ids(tokenizer)
    ids = {"vocab_size": len(tokenizer), "image_token_id": image_id, "seg_token_ids": seg_ids,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_geopix(cfg, device, vision_config=sizes["vision_config"], **ids)
    set_stage(model, 1)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    res["params_total"] = sum(p.numel() for p in model.parameters())
    res["attn_implementation"] = getattr(model.llm.config, "_attn_implementation", None)
    gen = torch.Generator().manual_seed(0)
    S = cfg.image_size

    def case(name: str, targets: list[int], autocast: bool, ema: float = 0.0) -> None:
        entry: dict[str, Any] = {"name": name, "targets": targets, "autocast": autocast}
        res["cases"].append(entry)
        try:
            batch = make_batch(targets=targets, text_len=40, image_size=S, num_classes=cfg.num_classes,
                               generator=gen, device=device, **ids)
            saved_cfg = model.config
            memory = model.mask_predictor.memory
            written = getattr(memory, "ema", None) if memory is not None else None
            if memory is not None and written is None:
                written = memory.memory  # older layout: the EMA writes into the parameter
            before = written.detach().clone() if written is not None else None
            if ema:  # the EMA write is read from the model config at forward time
                model.config = dataclasses.replace(saved_cfg, memory_ema_momentum=ema)
            model.train()
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out = model(**batch)
                out.loss.backward()
            finally:
                model.config = saved_cfg
            if device.type == "cuda":
                torch.cuda.synchronize()
            entry["seconds"] = round(time.perf_counter() - start, 3)
            t = int(sum(targets))
            entry["loss"] = float(out.loss.detach())
            entry["losses"] = {k: float(v) for k, v in out.losses.items()}
            entry["dtypes"] = {
                "loss": str(out.loss.dtype),
                "logits": str(out.logits.dtype),
                "mask_logits": str(out.mask_logits.dtype) if out.mask_logits is not None else None,
                "class_logits": str(out.class_logits.dtype) if out.class_logits is not None else None,
                **{f"loss_{k}": str(v.dtype) for k, v in out.losses.items()},
            }
            finite, n_grads = grads_finite(model)
            problems = []
            if not math.isfinite(entry["loss"]):
                problems.append("loss not finite")
            if t:
                if out.mask_logits is None or tuple(out.mask_logits.shape) != (t, S, S):
                    shape = None if out.mask_logits is None else tuple(out.mask_logits.shape)
                    problems.append(f"mask_logits shape {shape}, want {(t, S, S)}")
                if out.class_logits is None or tuple(out.class_logits.shape) != (t, cfg.num_classes):
                    problems.append("class_logits shape")
                if not {"mask_bce", "mask_dice", "class"} <= set(out.losses):
                    problems.append(f"losses {sorted(out.losses)}")
            elif out.mask_logits is not None:
                problems.append("mask_logits for a batch without targets")
            if not finite:
                problems.append("non-finite gradients")
            if n_grads == 0:
                problems.append("no gradients")
            if ema and before is not None and torch.equal(before, written.detach()):
                problems.append("EMA write left the memory unchanged")
            entry["ok"] = not problems
            shape = tuple(out.mask_logits.shape) if out.mask_logits is not None else None
            report(entry["ok"], f"correctness/{name}",
                   f"loss {entry['loss']:.3f} ({entry['dtypes']['loss']}), mask_logits {shape} "
                   f"{entry['dtypes']['mask_logits']}, {n_grads} grads, {entry['seconds']} s"
                   + (f"; {', '.join(problems)}" if problems else ""))
        except Exception as exc:  # noqa: BLE001 - every case reports, whatever it raised
            entry["ok"], entry["error"] = False, error_text(exc)
            report(False, f"correctness/{name}", entry["error"])

    # fp32 weights under bf16 autocast: the plain-torch mixed-precision recipe.
    case("autocast_b4_targets_1_3_2_1", [1, 3, 2, 1], autocast=True)
    # DeepSpeed 0.19's bf16 mode casts parameters only; buffers (BatchNorm statistics, rotary
    # inv_freq, the memory's EMA) keep fp32 unless data_types.buffer_dtype says otherwise.
    for param in model.parameters():
        param.data = param.data.to(args.check_dtype)
    res["dtype"] = str(args.check_dtype)
    case("deepspeed_cast_b4_targets_1_3_2_1", [1, 3, 2, 1], autocast=False)
    # Everything in bf16 (model.to(bf16), buffers included): how one would serve it.
    model.to(args.check_dtype)
    case("b1_one_target", [1], autocast=False)
    case("b1_three_targets", [3], autocast=False)
    case("b4_one_target_each", [1, 1, 1, 1], autocast=False)
    case("b4_several_targets_and_text_only", [2, 0, 1, 3], autocast=False)
    case("b2_text_only", [0, 0], autocast=False)
    if cfg.memory_dim == cfg.decoder_dim:
        case("b4_memory_ema_write", [1, 2, 1, 1], autocast=False, ema=0.9)

    # Inference: eval-mode forward and chat on 2 images.
    pixels = torch.randn(2, 3, S, S, generator=gen).to(device)
    instructions = ["[refer] the small vehicle on the left", "[segment] all ships"]
    try:
        start = time.perf_counter()
        answers = model.chat(pixels, instructions, tokenizer, max_new_tokens=sizes["max_new_tokens"])
        ok = len(answers) == 2 and all(isinstance(a.text, str) for a in answers) and all(
            a.masks.dtype == torch.bool and tuple(a.masks.shape[1:]) == (S, S) for a in answers)
        res["chat"] = {"ok": ok, "texts": [a.text for a in answers],
                       "masks": [list(a.masks.shape) for a in answers],
                       "seconds": round(time.perf_counter() - start, 2)}
        report(ok, "correctness/chat_greedy", f"{res['chat']['texts']} masks {res['chat']['masks']}")
    except Exception as exc:  # noqa: BLE001
        res["chat"] = {"ok": False, "error": error_text(exc)}
        report(False, "correctness/chat_greedy", res["chat"]["error"])

    # A random LLM rarely emits a seg run, so force one through the logits: an ordinary token,
    # the run, eos. Each lm_head call is one decoding step; this exercises the mask path of chat.
    script = [tokenizer.encode(" Sure", add_special_tokens=False)[0], *seg_ids, tokenizer.eos_token_id]
    handle, _ = script_answers(model, script)
    try:
        answers = model.chat(pixels, instructions, tokenizer, max_new_tokens=len(script) + 2)
        shapes = [list(a.masks.shape) for a in answers]
        ok = len(answers) == 2 and all(
            a.masks.shape[0] == 1 and tuple(a.masks.shape[1:]) == (S, S) and a.class_probs.shape[0] == 1
            for a in answers)
        res["chat_forced_seg"] = {"ok": ok, "texts": [a.text for a in answers], "masks": shapes,
                                  "mask_fraction": [float(a.masks.float().mean()) for a in answers]}
        report(ok, "correctness/chat_forced_seg_run", f"{res['chat_forced_seg']['texts']} masks {shapes}")
    except Exception as exc:  # noqa: BLE001
        res["chat_forced_seg"] = {"ok": False, "error": error_text(exc)}
        report(False, "correctness/chat_forced_seg_run", res["chat_forced_seg"]["error"])
    finally:
        handle.remove()

    # Teacher-forced answer with two runs (segment_answer): two masks from one pass.
    try:
        prompt = [tokenizer.bos_token_id,
                  *tokenizer.encode(prompt_text("<image>\n[segment] x"), add_special_tokens=False)]
        run = cfg.seg_vocabulary.run
        answer = tokenizer.encode(f" Sure, {run} and {run}.", add_special_tokens=False)
        result = model.segment_answer(pixels[:1], prompt + answer, len(prompt), tokenizer)
        ok = tuple(result.masks.shape) == (2, S, S) and bool(
            torch.allclose(result.class_probs.float().sum(-1), torch.ones(2), atol=1e-2))
        res["segment_answer"] = {"ok": ok, "masks": list(result.masks.shape)}
        report(ok, "correctness/segment_answer_two_runs", f"masks {list(result.masks.shape)}")
    except Exception as exc:  # noqa: BLE001
        res["segment_answer"] = {"ok": False, "error": error_text(exc)}
        report(False, "correctness/segment_answer_two_runs", res["segment_answer"]["error"])

    if device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


# -------------------------------------------------------------------------------- b: throughput
def lr_ratio(iteration: int, warmup: int, total: int) -> float:
    """DeepSpeed's WarmupCosineLR (linear warm-up, cos_min_ratio 1e-4) at ``last_batch_iteration``;
    its first step runs at lr 0 (iteration −1). The plain loop uses the same schedule, so that
    the loss curves of all modes are comparable."""
    if iteration < 0:
        return 0.0
    warmup = max(2, warmup)
    if iteration < warmup:
        return iteration / warmup
    progress = min(1.0, (iteration - warmup + 1) / max(1, total - warmup))
    return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * progress)) / 2


def run_training(mode: str, args, device, sizes: dict, batches: list[dict], ids: dict, n_img: int,
                 ds_extra: dict | None = None, name: str | None = None) -> dict:
    """Build a fresh model (same seed), train ``warmup`` + ``steps`` steps in ``mode``, time the last
    ``steps``. Modes: plain_autocast (fp32 weights, bf16 autocast), plain_bf16 (bf16 weights and
    optimizer state), zero1/zero2 (DeepSpeed, bf16 with fp32 master weights)."""
    import torch

    from geopix.config import ModelConfig
    from geopix.train.stages import set_stage

    cfg = ModelConfig(**sizes["model"])
    is_cuda = device.type == "cuda"
    res: dict[str, Any] = {"mode": mode}
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
        res["mem_at_start_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_geopix(cfg, device, vision_config=sizes["vision_config"], **ids)
    set_stage(model, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    res["params_trainable"] = sum(p.numel() for p in params)
    res["params_total"] = sum(p.numel() for p in model.parameters())
    total = sizes["warmup"] + sizes["steps"]
    lr = 1e-4
    use_bf16 = args.dtype == torch.bfloat16
    # foreach (not fused): torch's multi-tensor AdamW, the same optimizer DeepSpeed is given below.
    opt_kwargs = {"lr": lr, "betas": (0.9, 0.95), "weight_decay": 0.0, "foreach": is_cuda, "fused": False}
    optimizer = torch.optim.AdamW(params, **opt_kwargs)
    engine = None
    if mode.startswith("plain"):
        if mode == "plain_bf16":
            model.to(args.dtype)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: lr_ratio(k - 1, sizes["warmup"], total))
        autocast = mode == "plain_autocast" and use_bf16
        model.train()
        res["precision"] = ("fp32 weights + bf16 autocast" if autocast else
                            f"{str(args.dtype).removeprefix('torch.')} weights and optimizer state")

        def step(batch: dict) -> tuple[torch.Tensor, float]:
            current = scheduler.get_last_lr()[0]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach(), current
    else:
        import deepspeed

        from geopix.config import StageConfig, TrainConfig
        from geopix.train.loop import deepspeed_config

        # The training loop's own DeepSpeed config (geopix.train.loop), for this batch and schedule.
        train = TrainConfig(batch_size=sizes["batch"], zero_stage=int(mode[4]), grad_clip=1.0)
        stage = StageConfig(max_steps=total, lr=lr, warmup_steps=sizes["warmup"])
        config = deepspeed_config(train, stage, use_bf16) | dict(ds_extra or {})
        res["ds_config"] = config
        res["precision"] = "bf16 weights, fp32 master + optimizer state" if use_bf16 else "fp32"
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                               config=config)
        res["ds_optimizer"] = type(engine.optimizer).__name__
        engine.train()
        # DeepSpeed casts the module, not the inputs: images go in at the weights' dtype.
        dtype = args.dtype if use_bf16 else torch.float32

        def step(batch: dict) -> tuple[torch.Tensor, float]:
            current = engine.get_lr()[0]
            out = engine(**dict(batch, pixel_values=batch["pixel_values"].to(dtype)))
            engine.backward(out.loss)
            engine.step()
            return out.loss.detach(), current

    res["init_s"] = round(time.perf_counter() - t0, 2)
    if is_cuda:
        res["mem_after_init_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    losses, times, lrs = [], [], []
    for i in range(total):
        if is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, current = step(batches[i % len(batches)])
        if is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        lrs.append(float(current))
    timed = times[sizes["warmup"]:]
    timed_batches = [batches[i % len(batches)] for i in range(sizes["warmup"], total)]
    b = sizes["batch"]
    seconds = sum(timed)
    text_tokens = sum(int(x["attention_mask"].sum()) for x in timed_batches)
    res.update(
        steps=len(timed),
        step_s_median=round(sorted(timed)[len(timed) // 2], 4),
        samples_per_s=round(b * len(timed) / seconds, 2),
        tokens_per_s=round((text_tokens + len(timed) * b * (n_img - 1)) / seconds, 1),  # text + image
        text_tokens_per_s=round(text_tokens / seconds, 1),
        losses=[round(v, 4) for v in losses],
        lrs=[float(f"{v:.3g}") for v in lrs],
        warmup_step_s=[round(v, 3) for v in times[: sizes["warmup"]]],
    )
    if is_cuda:
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        # What this run added, in case an earlier run left memory behind.
        res["peak_over_start_gib"] = round(res["peak_mem_gib"] - res["mem_at_start_gib"], 2)
    res["ok"] = all(math.isfinite(v) for v in losses)
    report(res["ok"], f"throughput/{name or mode}",
           f"{res['samples_per_s']} samples/s, {res['tokens_per_s']} tokens/s, median step "
           f"{res['step_s_median']} s, peak {res.get('peak_mem_gib', '-')} GiB, init {res['init_s']} s, "
           f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()  # removes ZeRO's gradient hooks; the caller frees the memory
    return res


def check_throughput(args, device, sizes: dict, started: float) -> dict:
    import torch

    from geopix.config import ModelConfig

    cfg = ModelConfig(**sizes["model"])
    vocab = sizes["vocab_size"]
    run = cfg.seg_vocabulary.run_length
    # Like a LLaMA tokenizer grown by GeoPix: <image> and the seg tokens are the last rows.
    ids = {"vocab_size": vocab, "image_token_id": vocab - run - 1,
           "seg_token_ids": list(range(vocab - run, vocab)), "pad_token_id": 0}
    patch = (sizes["vision_config"] or {}).get("patch_size", 14)
    n_img = (cfg.image_size // patch) ** 2
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(sizes["batches"]):
        targets = torch.randint(1, 4, (sizes["batch"],), generator=gen).tolist()
        batches.append(make_batch(targets=targets, text_len=sizes["text_len"], image_size=cfg.image_size,
                                  num_classes=cfg.num_classes, generator=gen, device=device, **ids))
    res: dict[str, Any] = {
        "sizes": sizes,
        "image_tokens": n_img,
        "mean_text_len": round(sum(float(b["attention_mask"].sum(1).float().mean()) for b in batches)
                               / len(batches), 1),
        "mean_targets_per_sample": round(sum(len(b["seg_positions"]) for b in batches)
                                         / (len(batches) * sizes["batch"]), 2),
        "runs": {},
    }

    def attempt(name: str, mode: str, ds_extra: dict | None = None) -> bool:
        try:
            res["runs"][name] = run_training(mode, args, device, sizes, batches, ids, n_img, ds_extra, name)
        except Exception as exc:  # noqa: BLE001 - one mode failing must not hide the others
            res["runs"][name] = {"ok": False, "error": error_text(exc)}
            report(False, f"throughput/{name}", res["runs"][name]["error"])
            if device.type == "cuda" and "out of memory" in str(exc):
                res["runs"][name]["memory_summary"] = torch.cuda.memory_summary(abbreviated=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            res["runs"][name]["mem_after_free_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        RESULTS["sections"]["throughput"] = res
        save(args.out)
        return bool(res["runs"][name].get("ok"))

    for mode in [m for m in args.modes.split(",") if m]:
        elapsed = time.perf_counter() - started
        if mode not in ("plain_autocast", "zero2") and elapsed > args.budget_s:  # the two that matter run
            res["runs"][mode] = {"skipped": f"time budget: {elapsed:.0f} s > {args.budget_s} s"}
            print(f"SKIP throughput/{mode}: {res['runs'][mode]['skipped']}", flush=True)
            continue
        error = "" if attempt(mode, mode) else res["runs"][mode].get("error", "")
        if mode.startswith("zero") and any(k in error for k in ("scalar type", "dtype", "BFloat16")):
            # bf16 parameters next to fp32 buffers (e.g. BatchNorm statistics: DeepSpeed casts
            # parameters only). Casting the buffers too still gives a figure, under its own name.
            attempt(f"{mode}_buffers_bf16", mode, {"data_types": {"buffer_dtype": "bf16"}})
    base = res["runs"].get("plain_autocast", {})
    ratios = {}
    for mode, r in res["runs"].items():
        if mode != "plain_autocast" and r.get("samples_per_s") and base.get("samples_per_s"):
            ratios[f"{mode}/plain_autocast"] = {
                "samples_per_s": round(r["samples_per_s"] / base["samples_per_s"], 3),
                "peak_mem": round(r["peak_over_start_gib"] / base["peak_over_start_gib"], 3)
                if r.get("peak_over_start_gib") and base.get("peak_over_start_gib") else None,
            }
    res["ratios"] = ratios
    return res


# ------------------------------------------------------------------------------------------ main
def environment(device) -> dict:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "device": str(device)}
    for name in ("transformers", "peft", "deepspeed", "pydantic", "tokenizers", "huggingface_hub",
                 "accelerate"):
        try:
            module = __import__(name)
            env[name] = f"{getattr(module, '__version__', '?')} ({Path(module.__file__).parent.parent})"
        except Exception as exc:  # noqa: BLE001
            env[name] = f"import failed: {exc}"
    probes = {"ds_accelerator": lambda: __import__("deepspeed.accelerator").accelerator.get_accelerator()._name}
    if device.type == "cuda":
        probes.update(
            gpu=lambda: torch.cuda.get_device_name(0),
            capability=lambda: list(torch.cuda.get_device_capability(0)),
            gpu_mem_gib=lambda: round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            nccl=lambda: str(torch.cuda.nccl.version()),
            bf16_supported=torch.cuda.is_bf16_supported,
        )
    for key, probe in probes.items():
        try:
            env[key] = probe()
        except Exception as exc:  # noqa: BLE001 - a missing figure must not stop the check
            env[key] = f"failed: {exc}"
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; training in fp32 (CPU rehearsal)")
    parser.add_argument("--sections", default="correctness,throughput")
    parser.add_argument("--modes", default="plain_autocast,zero2,plain_bf16,zero1",
                        help="training runs of the throughput section, in order")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="runs other than plain_autocast and zero2 are skipped past this many seconds")
    parser.add_argument("--fp32-check", action="store_true", help="run the correctness checks in fp32")
    parser.add_argument("--train-bf16", action="store_true", help="train in bf16 in a CPU dry run too")
    parser.add_argument("--steps", type=int, help="timed steps per throughput run (default per preset)")
    parser.add_argument("--batch", type=int, help="throughput micro-batch per GPU (default per preset)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # Before anything imports deepspeed: its accelerator is picked once, at import.
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            report(False, "setup", "CUDA not available")
            save(args.out)
            return 1
        torch.cuda.set_device(0)
    # The correctness checks run bf16 everywhere (CPU kernels have bf16 too, so a dry run already
    # catches dtype mismatches); training runs bf16 on the GPU and fp32 in the CPU rehearsal.
    args.check_dtype = torch.float32 if args.fp32_check else torch.bfloat16
    args.dtype = torch.bfloat16 if args.train_bf16 or (device.type == "cuda" and not args.dry_run) else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes = presets(args.dry_run)
    if args.steps:
        sizes["throughput"]["steps"] = args.steps
    if args.batch:
        sizes["throughput"]["batch"] = args.batch

    RESULTS["env"] = environment(device)
    RESULTS["args"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(RESULTS["env"], indent=1), flush=True)
    save(args.out)

    sections = [s for s in args.sections.split(",") if s]
    if "correctness" in sections:
        print("== correctness", flush=True)
        try:
            RESULTS["sections"]["correctness"] = check_correctness(args, device, sizes["correctness"])
        except Exception as exc:  # noqa: BLE001
            RESULTS["sections"]["correctness"] = {"error": error_text(exc)}
            report(False, "correctness", RESULTS["sections"]["correctness"]["error"])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(args.out)
    if "throughput" in sections:
        print("== throughput", flush=True)
        try:
            import logging

            import deepspeed

            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its config dumps flood the log
            # One process, world size 1: NCCL on the GPU, gloo for the CPU rehearsal.
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
            RESULTS["sections"]["throughput"] = check_throughput(args, device, sizes["throughput"], started)
        except Exception as exc:  # noqa: BLE001
            RESULTS["sections"].setdefault("throughput", {})["error"] = error_text(exc)
            report(False, "throughput", error_text(exc))
        save(args.out)

    RESULTS["total_s"] = round(time.perf_counter() - started, 1)
    save(args.out)
    print("== summary", flush=True)
    checks = list(RESULTS["sections"].get("correctness", {}).get("cases", []))
    checks += [v for k, v in RESULTS["sections"].get("correctness", {}).items() if isinstance(v, dict)]
    if checks:
        print(f"  correctness: {sum(bool(c.get('ok')) for c in checks)}/{len(checks)} checks PASS")
    tp = RESULTS["sections"].get("throughput", {})
    for mode, r in tp.get("runs", {}).items():
        if "samples_per_s" in r:
            print(f"  {mode:18s} {r['samples_per_s']:8.2f} samples/s {r['tokens_per_s']:10.1f} tokens/s "
                  f"peak {r.get('peak_mem_gib', '-')} GiB  step {r['step_s_median']} s  ({r['precision']}"
                  f"{', ' + r['ds_optimizer'] if 'ds_optimizer' in r else ''})")
        else:
            reason = r.get("skipped") or (r.get("error") or "failed").splitlines()[0]
            print(f"  {mode:18s} {reason}")
    for name, ratio in tp.get("ratios", {}).items():
        print(f"  {name}: samples/s x{ratio['samples_per_s']}, peak memory x{ratio['peak_mem']}")
    print(f"  total {RESULTS['total_s']} s; {'FAILED: ' + ', '.join(FAILURES) if FAILURES else 'all PASS'}")
    print(f"  wrote {args.out / 'gpu_check.json'}", flush=True)
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # leave the process group cleanly so NCCL does not warn at exit
        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
