"""Nightly segmentation: every new scene under the incoming prefix, or every item of a STAC
catalog, ItemCollection or API search, once (a Ray job).

    ray job submit --working-dir . -- python flows/nightly.py --model models:/geopix-tiny@champion \
        [--incoming s3://geopix-scenes/incoming | --stac s3://catalogs/nightly/catalog.json |
         --stac-api https://stac.example.com --collection sentinel-2-l2a [--collection ...] \
             [--bbox W,S,E,N] [--datetime 2026-11-26/2026-11-27] [--max-items N]] \
        [--out s3://geopix-predictions/scenes] \
        [--instruction "[segment] all storage tanks" ...] [--overwrite] [--config tiny] [--set key=value]

Scenes already published for this model and request are skipped (a STAC item only for the version
of it that was segmented), failed ones are quarantined with their reason (and retried once their
file or item changes); scenes another run holds the lease of are left
to it; a run summary goes to <out>/_runs/ and MLflow.
Exit status 0 when every listed scene is done or skipped, 1 when any failed this run (for cron alerts),
2 when the STAC source itself cannot be read (the file, a child catalog, the API).
Scheduling (cron + `ray job submit`, KubeRay CronJob): docs/segmentation.md.
"""

from __future__ import annotations

import sys

from geopix import tracking
from geopix.flow import flow_parser, start_flow
from geopix.infer.nightly import run_nightly
from geopix.infer.stac_scenes import StacError, stac_source


def main(argv: list[str] | None = None) -> int:
    parser = flow_parser(__doc__)
    parser.add_argument(
        "--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a model URI"
    )
    parser.add_argument("--incoming", help="prefix listed for scenes (default: segment.incoming_uri)")
    parser.add_argument("--stac", help="a STAC catalog, collection or ItemCollection (JSON; local or s3://)")
    parser.add_argument("--stac-api", help="a STAC API to search (with --collection, --bbox, --datetime)")
    parser.add_argument("--collection", action="append", help="collection to search (repeatable)")
    parser.add_argument("--bbox", help="search area W,S,E,N in degrees")
    parser.add_argument(
        "--datetime", help="search interval, e.g. 2026-11-26/2026-11-27 or 2026-11-26T00:00:00Z/.."
    )
    parser.add_argument("--max-items", type=int, help="at most this many items from the search")
    parser.add_argument("--out", help="output prefix (default: segment.out_uri)")
    parser.add_argument("--instruction", action="append", help="repeatable (default: segment.instructions)")
    parser.add_argument("--overwrite", action="store_true", help="redo scenes already done or quarantined")
    args = parser.parse_args(_bbox_as_one_value(sys.argv[1:] if argv is None else argv))
    try:
        stac = stac_source(
            args.stac, args.stac_api, args.collection, args.bbox, args.datetime, args.max_items
        )
        if stac is not None and args.incoming:
            raise ValueError("give --incoming (a prefix of GeoTIFFs) or --stac/--stac-api, not both")
    except ValueError as error:
        parser.error(str(error))
    cfg, _ = start_flow(args)
    if args.instruction:
        cfg.segment.instructions = args.instruction
    with tracking.flow_run("nightly", cfg, run_name="nightly"):
        try:
            result = run_nightly(
                cfg, args.model, args.incoming, args.out, stac=stac, overwrite=args.overwrite
            )
        except StacError as error:
            print(f"NIGHTLY failed: {error}", file=sys.stderr, flush=True)
            return 2
    print(
        f"NIGHTLY {result.run_id}: listed {result.listed}, done before {result.already_done}, "
        f"quarantined before {result.still_quarantined}, in progress elsewhere {result.in_progress}, "
        f"processed {result.processed}, failed {len(result.failed)} in {result.seconds:.0f} s; summary {result.summary_uri}",
        flush=True,
    )
    for scene in result.failed:
        print(f"  quarantined {scene.scene_id}: {scene.reason}: {scene.detail}", flush=True)
    return 1 if result.failed else 0


def _bbox_as_one_value(argv: list[str]) -> list[str]:
    """``--bbox -74.1,40.6,…`` → ``--bbox=-74.1,40.6,…``: argparse takes a value that starts with "-"
    for an option, and every bbox west of Greenwich or south of the equator does."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] == "--bbox" and i + 1 < len(argv):
            joined.append(f"--bbox={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


if __name__ == "__main__":
    sys.exit(main())
