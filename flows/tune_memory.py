"""The memory-size sweep on Ray Tune with ASHA, as one Ray job (resumable).

    ray job submit --working-dir . -- python flows/tune_memory.py [--config tiny] [--set key=value] \
        [--name NAME] [--shards s3://…] [--pipeline NAME]

Trials: sweep.memory_len × sweep.memory_dim (K = 0 is the ablation); each trains stage 1, is
evaluated on sweep.split (ASHA's rung), then stage 2 and evaluated again (geopix/tune/memory_sweep.py).
The shards are --shards, else those the full pipeline named --pipeline (default: the config's
name) recorded, else data.shards_uri. Submitting the same --name again resumes the sweep from its
trials' own records (Ray Tune's pickled state is never restored, geopix/tune/memory_sweep.py): finished
trials are not trained again, an interrupted one resumes from its checkpoint.
Results (table, best config, plot of the metric against K per size bucket) go to
<sweep.out_uri>/<name>/ and to the MLflow parent run, each trial a nested run under it.
"""

from __future__ import annotations

import sys

import mlflow

from geopix import tracking
from geopix.config import GeoPixConfig
from geopix.flow import flow_parser, start_flow
from geopix.step_runner import pipeline_root, read_step_record
from geopix.tune.memory_sweep import results_table, sweep_memory


def shards_for(cfg: GeoPixConfig, shards: str | None, pipeline: str) -> str:
    """--shards, else the shard step the full pipeline recorded, else data.shards_uri."""
    if shards:
        return shards
    record = read_step_record(pipeline_root(cfg.pipeline.state_uri, pipeline), "shard")
    return record.outputs["shards_uri"] if record else cfg.data.shards_uri


def main(argv: list[str] | None = None) -> int:
    parser = flow_parser(__doc__)
    parser.add_argument("--name", help="sweep name; the same name again restores it (default: memory-<config>)")
    parser.add_argument("--shards", help="shard set to train and evaluate on")
    parser.add_argument("--pipeline", help="take the shards this full pipeline recorded (default: the config's name)")
    args = parser.parse_args(argv)
    cfg, job = start_flow(args)
    name = args.name or f"memory-{cfg.name}"
    shards = shards_for(cfg, args.shards, args.pipeline or cfg.name)
    with tracking.flow_run("tune_memory", cfg, run_name=f"{name}-{job}", tags={"geopix.ray_job": job}) as parent:
        mlflow.log_params({"sweep_name": name, "shards_uri": shards})
        result = sweep_memory(cfg, shards, name, parent.info.run_id)
        if result.best:
            mlflow.log_metrics({"best_memory_len": result.best["memory_len"], "best_memory_dim": result.best["memory_dim"],
                                f"best_{cfg.sweep.metric}": result.best[cfg.sweep.metric]})  # fmt: skip
    print(f"SWEEP {name} ({'resumed' if result.resumed else 'new'}): {len(result.rows)} trials on {shards}; "
          f"results in {result.out_uri}/ ; MLflow {tracking.run_url(parent.info.run_id)}", flush=True)  # fmt: skip
    print(results_table(result.rows, cfg.sweep.metric), flush=True)
    if result.best:
        print(f"best: K={result.best['memory_len']} dim={result.best['memory_dim']} "
              f"{cfg.sweep.metric}={result.best[cfg.sweep.metric]:.3f} ({result.best['model_uri']})", flush=True)  # fmt: skip
    return 0 if all(not r["status"].startswith("error") for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
