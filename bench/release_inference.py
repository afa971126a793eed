"""Answering windows with a model of the authors' release shapes: GeoPix's batched answers at
batch 1 and 8 against the release's one-image loop, on the same windows, in one run.

    .venv/bin/python bench/release_inference.py                                   # tiny stand-in, CPU
    PYTHONPATH=. python3 bench/release_inference.py --shape full --device cuda --out $OUT   # one GPU

- The model is what `geopix model import-release` builds (``mask_decoder="release"``, BGR/bicubic
  processor, template 3) with random weights: ``full`` has the release's shapes (CLIP ViT-L/14 at
  336 px, a LLaMA-7B-sized LLM, D = 256, necks 512) in bf16; ``tiny`` is the tests' stand-in (CLIP
  56 px × 11 layers × 32, LLaMA 64 × 2) in fp32. The LLM's vocabulary is the small tokenizer's,
  so the LM head is smaller than 7B's 32,000 rows (about 2 % of its weights).
- A random LLM writes no seg run, so every answer is scripted through the LM head
  (bench/scripted_answers.py, as bench/gpu_check.py does): the same ``--tokens`` tokens in every
  mode, one seg run among them, so every window also gets one mask through the release's mask path.
- Modes, each over the same ``--windows`` random uint8 windows, processor included:
  ``release loop`` (how the release answers: one image at a time; its mask path reads the vision
  tower a second time, which this loop adds), ``GeoPix batch 1`` and ``GeoPix batch 8``
  (``model.chat``: left-padded batch, KV cache, masks from the hidden states kept while decoding).

Prints windows/s and each mode's ratio to the release loop; writes ``<out>/release_inference.json``.
Only ``geopix.model`` and what it needs are imported, so it runs on a machine without GeoPix's
services (the device machine).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scripted_answers import script_answers

from geopix.chat_template import chat_text
from geopix.config import load_config
from geopix.data.tokenizer import train_tokenizer
from geopix.model import GeoPixModel
from geopix.model.modeling import add_geopix_tokens, model_config

SHAPES = {
    "tiny": {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 11,
                        "num_attention_heads": 4, "patch_size": 14, "image_size": 56},
             "llm": ["model.llm_hidden_size=64", "model.llm_num_layers=2", "model.llm_intermediate_size=128",
                     "model.llm_num_heads=4"],
             "decoder_dim": 64, "neck": 32},
    "full": {"vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "patch_size": 14, "image_size": 336},
             "llm": ["model.llm_hidden_size=4096", "model.llm_num_layers=32", "model.llm_intermediate_size=11008",
                     "model.llm_num_heads=32"],
             "decoder_dim": 256, "neck": 512},
}  # fmt: skip
INSTRUCTION = "[refer] the storage tank closest to the top border"


def release_shaped_model(shape: str, device: str, dtype: torch.dtype) -> tuple[GeoPixModel, object]:
    """A random GeoPix model configured as an imported release, and its tokenizer."""
    sizes = SHAPES[shape]
    cfg = load_config("tiny", ["model.vision_encoder=clip", f"model.image_size={sizes['vision']['image_size']}",
                               "model.memory_len=0", *sizes["llm"]]).model  # fmt: skip
    run = cfg.seg_vocabulary.run
    texts = [chat_text([{"role": "user", "text": f"<image>\n{INSTRUCTION} {k}"},
                        {"role": "assistant", "text": f"Sure, it is {run}. An aerial view of {k} tanks."}]) for k in range(40)]  # fmt: skip
    tokenizer = train_tokenizer(texts, vocab_size=300, seg_vocab=cfg.seg_vocabulary)
    add_geopix_tokens(tokenizer, cfg)
    config = model_config(cfg, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          seg_token_ids=cfg.seg_vocabulary.token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)  # fmt: skip
    config = replace(config, vision_config=sizes["vision"], mask_decoder="release", release_neck_dim=sizes["neck"],
                     decoder_dim=sizes["decoder_dim"], memory_dim=sizes["decoder_dim"], seg_hidden_offset=-1,
                     seg_token_weighting="linear", image_channel_order="bgr", image_resample="bicubic", chat_template=3)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = GeoPixModel(config)
    return model.to(dtype).eval(), tokenizer


def scripted(model: GeoPixModel, tokenizer, tokens: int):
    """Every answer scripted to ``tokens`` tokens: an ordinary token, one seg run, ordinary tokens,
    eos. Returns (hook handle, reset)."""
    word = tokenizer.encode(" tanks", add_special_tokens=False)[0]
    run = list(model.seg_token_ids)
    return script_answers(model, [word, *run] + [word] * max(tokens - len(run) - 2, 0) + [tokenizer.eos_token_id])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=24, help="tokens every answer generates (one seg run among them)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    started = time.perf_counter()
    model, tokenizer = release_shaped_model(args.shape, args.device, dtype)
    built_s = time.perf_counter() - started
    processor = model.processor()
    size = model.config.image_size
    windows = list(np.random.default_rng(0).integers(0, 256, (args.windows, size, size, 3), dtype=np.uint8))
    handle, reset = scripted(model, tokenizer, args.tokens)

    def answer(images: list[np.ndarray], second_tower_read: bool) -> list:
        reset()
        pixels = processor(images).to(args.device, dtype)
        answers = model.chat(pixels, [INSTRUCTION] * len(images), tokenizer, max_new_tokens=args.tokens + 2)
        if second_tower_read:
            with torch.no_grad():
                model.vision(pixels)
        return answers

    def timed(batch: int, second_tower_read: bool) -> dict:
        answer(windows[:batch], second_tower_read)  # warm-up
        if args.device != "cpu":
            torch.cuda.synchronize()
        begin, masks = time.perf_counter(), 0
        for i in range(0, len(windows), batch):
            masks += sum(len(a.masks) for a in answer(windows[i : i + batch], second_tower_read))
        if args.device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
        return {"windows_per_s": round(len(windows) / seconds, 3), "seconds": round(seconds, 2), "masks": masks}

    modes = {"release loop (batch 1, second tower read)": timed(1, True),
             "GeoPix batch 1": timed(1, False), "GeoPix batch 8": timed(8, False)}  # fmt: skip
    handle.remove()
    base = next(iter(modes.values()))["windows_per_s"]
    for figures in modes.values():
        figures["vs_release_loop"] = round(figures["windows_per_s"] / base, 2)
    result = {"shape": args.shape, "device": args.device, "dtype": str(dtype), "windows": args.windows,
              "tokens_per_answer": args.tokens, "image_size": size, "build_s": round(built_s, 1),
              "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
              "modes": modes}  # fmt: skip
    print(f"{args.shape} release-shaped model ({result['parameters'] / 1e6:.1f} M parameters, {dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads), {args.windows} windows of {size}² px, {args.tokens} tokens each:")  # fmt: skip
    for name, figures in modes.items():
        print(f"  {name:<42} {figures['windows_per_s']:>8.2f} windows/s = {figures['vs_release_loop']:.2f}× "
              f"the release loop ({figures['masks']} masks)")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "release_inference.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
