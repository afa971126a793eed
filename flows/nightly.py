"""Nightly segmentation: every new scene under the incoming prefix, once (a Ray job).

    ray job submit --working-dir . -- python flows/nightly.py --model models:/geopix-tiny@champion \
        [--incoming s3://geopix-scenes/incoming] [--out s3://geopix-predictions/scenes] \
        [--instruction "[segment] all storage tanks" ...] [--overwrite] [--config tiny] [--set key=value]

Scenes already published for this model and request are skipped, failed ones are quarantined with
their reason (and retried once their file changes); scenes another run holds the lease of are left
to it; a run summary goes to <out>/_runs/ and MLflow.
Exit status 0 when every listed scene is done or skipped, 1 when any failed this run (for cron alerts).
Scheduling (cron + `ray job submit`, KubeRay CronJob): docs/segmentation.md.
"""

from __future__ import annotations

import sys

from geopix import tracking
from geopix.flow import flow_parser, start_flow
from geopix.infer.nightly import run_nightly


def main(argv: list[str] | None = None) -> int:
    parser = flow_parser(__doc__)
    parser.add_argument(
        "--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a model URI"
    )
    parser.add_argument("--incoming", help="prefix listed for scenes (default: segment.incoming_uri)")
    parser.add_argument("--out", help="output prefix (default: segment.out_uri)")
    parser.add_argument("--instruction", action="append", help="repeatable (default: segment.instructions)")
    parser.add_argument("--overwrite", action="store_true", help="redo scenes already done or quarantined")
    args = parser.parse_args(argv)
    cfg, _ = start_flow(args)
    if args.instruction:
        cfg.segment.instructions = args.instruction
    with tracking.flow_run("nightly", cfg, run_name="nightly"):
        result = run_nightly(cfg, args.model, args.incoming, args.out, overwrite=args.overwrite)
    print(
        f"NIGHTLY {result.run_id}: listed {result.listed}, done before {result.already_done}, "
        f"quarantined before {result.still_quarantined}, in progress elsewhere {result.in_progress}, "
        f"processed {result.processed}, failed {len(result.failed)} in {result.seconds:.0f} s; summary {result.summary_uri}",
        flush=True,
    )
    for scene in result.failed:
        print(f"  quarantined {scene.scene_id}: {scene.reason}: {scene.detail}", flush=True)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
