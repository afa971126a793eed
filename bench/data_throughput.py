"""Records per second of the synthetic generator and of sharding, on a local stack.

    .venv/bin/python bench/data_throughput.py [--images 400] [--workers 2]

Starts a stack of its own on free ports, generates a synthetic source into its S3 server, then
shards it with Ray Data. The baseline, run in the same script on the same source, is a plain
single-process loop doing the same per-record work (read every part from S3, fetch nothing,
validate, assign the split) without writing: sharding's figure is printed next to it as a ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from geopix.config import BucketsConfig, DataConfig
from geopix.stack import Stack, config_on_free_ports


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=400, help="training images (val and test get 10 %% each)"
    )
    parser.add_argument("--chip-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--figure", help="also write the shard run's class/task chart to this PNG")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="geopix-bench-") as tmp:
        stack = Stack(config_on_free_ports(Path(tmp) / "stack", persist_s3=False), BucketsConfig())
        stack.up(echo=lambda *_: None)
        os.environ.update(stack.client_env())
        try:
            run(args)
        finally:
            stack.down(echo=lambda *_: None)


def run(args) -> None:
    # Ray reads RAY_AUTH_MODE when it is first imported: import it only once the stack's
    # environment (token auth on) is in place.
    import ray

    from geopix.data.schema import validate_record
    from geopix.data.shard import assign_split, class_counts_figure, shard_sources
    from geopix.data.source import iter_records, read_catalog
    from geopix.data.synth import generate_chips
    from geopix.vocabulary import SegVocabulary

    source, out = "s3://geopix-data/bench/source", "s3://geopix-data/bench/shards"
    data = DataConfig(chip_size=args.chip_size, shard_target_mb=16)
    held_out = max(args.images // 10, 1)
    vocab = SegVocabulary()  # the presets' seg tokens

    started = time.perf_counter()
    stats = generate_chips(
        source, seed=0, chip_size=args.chip_size, train_images=args.images, val_images=held_out,
        test_images=held_out, test_seed_offset=data.test_seed_offset, seg_vocab=vocab, progress=False,
    )  # fmt: skip
    generate_s = time.perf_counter() - started
    images = args.images + 2 * held_out
    records = sum(stats["records"].values())

    started = time.perf_counter()
    catalog = read_catalog(source)
    baseline_records = 0
    for record in iter_records(source):
        validate_record(record, catalog, vocab)
        assign_split(record["image_id"], data)
        baseline_records += 1
    baseline_s = time.perf_counter() - started

    ray.init(log_to_driver=False)
    result = shard_sources([source], out, data, seg_vocab=vocab, workers=args.workers, overwrite=True)
    counts = result.counts
    if args.figure:
        class_counts_figure(result.manifest, args.figure)

    print(
        f"generate: {images} chips of {args.chip_size} px → {records} records in {generate_s:.1f} s: "
        f"{images / generate_s:.1f} chips/s, {records / generate_s:.1f} records/s (1 process)"
    )
    print(f"validate, single process (baseline): {baseline_records / baseline_s:.1f} records/s")
    print(
        f"shard, Ray Data with {args.workers} workers: read {counts['read']} = written {counts['written']} "
        f"+ rejected {counts['rejected']} in {result.seconds:.1f} s: {counts['read'] / result.seconds:.1f} records/s "
        f"= {counts['read'] / result.seconds / (baseline_records / baseline_s):.2f}× the baseline "
        f"(sharding also sorts, writes and checksums); {result.validation_workers} worker processes validated"
    )


if __name__ == "__main__":
    main()
