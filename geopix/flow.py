"""What every flow does before its own steps: the common arguments, logging, the config and Ray.

    parser = flow_parser(__doc__)
    parser.add_argument("--name", ...)                      # the flow's own arguments
    args = parser.parse_args(argv)
    cfg, job = start_flow(args)                             # then tracking.flow_run(...) and the steps
"""

from __future__ import annotations

import argparse
import logging

from geopix import ray_job
from geopix.config import GeoPixConfig, add_overrides_argument, load_config


def flow_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the flow's docstring as help and ``--config`` / ``--set``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="tiny", help="preset name or YAML path")
    add_overrides_argument(parser)
    return parser


def start_flow(args: argparse.Namespace) -> tuple[GeoPixConfig, str]:
    """Log to stderr, load the config (``--config`` with ``--set``), connect to Ray (the job's
    cluster, or the one this process is already connected to); returns (config, this run's id)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    ray_job.connect_ray(log_to_driver=False)
    return cfg, ray_job.run_id()
