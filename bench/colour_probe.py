"""How much of an object's colour reaches what the LLM reads: probes on a trained model's inputs.

The test split's colour questions ("What colour is the building in the lower left …?") need the
asked object's colour, and the models answer them with the commonest colour words. This asks
where the colour is lost. Every target whose phrase names one synthetic colour
(``answer_form.named_colour``: "the red-roofed building", "the ship whose deck is grey") gives one
(features, colour word) pair; classifiers trained on the train split's pairs name the colour of
the test split's objects from:

- ``mask_colour``: the mean colour of the picture under the object's mask (3 values: what the
  pixels say, a ceiling for the rest);
- ``tokens_under_mask``: the encoder tokens the projector reads, averaged with the mask's share
  of each token's cell as weights (the object found perfectly);
- ``projected_under_mask``: the same after the projector (what the LLM reads);
- ``token_at_object``: the one token whose cell the mask covers most.

Each is read by a linear classifier and by a one-hidden-layer MLP (128 units), both trained full
batch with AdamW on standardised inputs, seed 0. Accuracy is reported on all test objects and on
those whose appearance is held out (a (class, colour) pair no training object has), with the
majority colour as the floor. Writes the same as JSON.

    eval "$(geopix stack env)"
    .venv/bin/python bench/colour_probe.py --model <stage-2 model URI> [--json docs/benchmarks/colour_probe.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geopix.answer_form import named_colour
from geopix.config import load_config
from geopix.data.images import decode_image, decode_targets
from geopix.data.shard_set import read_records
from geopix.data.synth.classes import CLASSES
from geopix.model import GeoPixModel
from geopix.storage import local_copy

COLOURS = sorted({v.colour for c in CLASSES for v in c.variants})  # the labels: the synthetic colours
FEATURES = ("mask_colour", "tokens_under_mask", "projected_under_mask", "token_at_object")


def colour_pairs(model: GeoPixModel, shards_uri: str, split: str, limit: int) -> tuple[dict[str, np.ndarray], list]:
    """Up to ``limit`` (features, (class, colour)) pairs of distinct objects of ``split``."""
    image_format, size = model.image_format, model.config.image_size
    features: dict[str, list[np.ndarray]] = defaultdict(list)
    labels, seen = [], set()
    for record in read_records(shards_uri, split, tasks=["refer", "segment"]):
        named = [(i, t, named_colour(t["description"])) for i, t in enumerate(record["targets"])]
        named = [(i, t, c) for i, t, c in named if c in COLOURS and (record["image_id"], t["instance_id"]) not in seen]
        if not named:
            continue
        image = image_format.resize(decode_image(record["image"]), size)
        masks, _, _ = decode_targets(record)
        with torch.no_grad():
            _, _, tokens = model.vision(image_format.pixel_values(image[None]))
            projected = model.projector(tokens)
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise SystemExit(f"{tokens.shape[1]} image tokens are not a square grid; the probe reads square grids only")
        for i, target, colour in named:
            seen.add((record["image_id"], target["instance_id"]))
            at_input = F.interpolate(torch.from_numpy(masks[i]).float()[None, None], size=(size, size), mode="nearest")
            share = F.adaptive_avg_pool2d(at_input, side).flatten()  # [N]: the mask's share of each cell
            if share.sum() == 0:
                continue
            weights = (share / share.sum())[:, None]
            pixels = image.reshape(-1, 3)[at_input.flatten() > 0]
            features["mask_colour"].append(pixels.mean(0) / 255.0)
            features["tokens_under_mask"].append((tokens[0] * weights).sum(0).numpy())
            features["projected_under_mask"].append((projected[0] * weights).sum(0).numpy())
            features["token_at_object"].append(tokens[0, int(share.argmax())].numpy())
            labels.append((target["class_name"], colour))
        if len(labels) >= limit:
            break
    return {k: np.stack(v).astype(np.float32) for k, v in features.items()}, labels


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, hidden: int, classes: int) -> np.ndarray:
    """A classifier trained full batch on standardised inputs → its predictions on ``x_test``."""
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xs = (torch.from_numpy((x - mean) / std) for x in (x_train, x_test))
    yt = torch.from_numpy(y_train)
    width = x_train.shape[1]
    net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, classes)) if hidden else nn.Linear(width, classes)
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(500):
        optimiser.zero_grad()
        F.cross_entropy(net(xt), yt).backward()
        optimiser.step()
    with torch.no_grad():
        return net(xs).argmax(1).numpy()


def probe(model_uri: str, config: str, train_limit: int, test_limit: int) -> dict[str, Any]:
    model, _, _ = GeoPixModel.load_pretrained(local_copy(model_uri))
    model.eval()
    shards = load_config(config).data.shards_uri
    x_train, train_labels = colour_pairs(model, shards, "train", train_limit)
    x_test, test_labels = colour_pairs(model, shards, "test", test_limit)
    index = {c: i for i, c in enumerate(COLOURS)}
    y_train = np.array([index[c] for _, c in train_labels])
    y_test = np.array([index[c] for _, c in test_labels])
    seen = set(train_labels)
    held_out = np.array([pair not in seen for pair in test_labels])
    majority = Counter(y_train.tolist()).most_common(1)[0][0]
    result: dict[str, Any] = {
        "model_uri": model_uri,
        "train_objects": len(y_train),
        "test_objects": len(y_test),
        "held_out_test_objects": int(held_out.sum()),
        "majority": {"all": float((y_test == majority).mean()), "held_out": float((y_test[held_out] == majority).mean())},
    }
    for name in FEATURES:
        for reader, hidden in (("linear", 0), ("mlp", 128)):
            right = fit_and_score(x_train[name], y_train, x_test[name], hidden, len(COLOURS)) == y_test
            result[f"{name}/{reader}"] = {"all": float(right.mean()), "held_out": float(right[held_out].mean())}
            print(f"{name:22s} {reader:6s} test {right.mean():.3f}  held-out appearances {right[held_out].mean():.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model (URI)")
    parser.add_argument("--config", default="tiny", help="whose data.shards_uri holds the splits")
    parser.add_argument("--train-objects", type=int, default=3000)
    parser.add_argument("--test-objects", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = probe(args.model, args.config, args.train_objects, args.test_objects)
    print(f"{result['train_objects']} training objects, {result['test_objects']} test objects "
          f"({result['held_out_test_objects']} of held-out appearance); majority colour "
          f"{result['majority']['all']:.3f} / {result['majority']['held_out']:.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
