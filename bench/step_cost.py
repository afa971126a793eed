"""What a design change costs per training step: the tiny preset's plain-loop step against the same
step with config overrides, alternated in one run so both see the same machine.

    .venv/bin/python bench/step_cost.py --set model.fine_feature_stride=4 [--repeats 2] [--steps 20]

The plain loop is bench/train_throughput.py's (1 process × 2 threads, global batch 16, the vision
feature cache warm: every picture cached after its first step, as in a training epoch's later
batches). Prints samples/s of each and the ratio changed / preset.
"""

from __future__ import annotations

import argparse
import statistics

from train_throughput import plain_loop

from geopix.config import add_overrides_argument, load_config

RECORDS = 16 * 6
SIZE = ["model.image_size=256", "train.batch_size=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_overrides_argument(parser, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    runs: dict[str, list[float]] = {"preset": [], "changed": []}
    for repeat in range(args.repeats):
        for name, overrides in (("preset", SIZE), ("changed", [*SIZE, *args.overrides])):
            samples_per_s = plain_loop(load_config("tiny", overrides), args.steps, RECORDS)["samples_per_s"]
            runs[name].append(samples_per_s)
            print(f"repeat {repeat}: {name:7s} {samples_per_s:.1f} samples/s", flush=True)
    preset, changed = statistics.mean(runs["preset"]), statistics.mean(runs["changed"])
    print(f"\nplain loop, tiny preset: {preset:.1f} samples/s; with {' '.join(args.overrides)}: {changed:.1f} "
          f"samples/s = {changed / preset:.3f}x the preset's step")


if __name__ == "__main__":
    main()
