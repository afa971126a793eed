"""The learning bar: train both stages of the tiny preset within the time budget, then evaluate on
the held-out synthetic test split (unseen seed, held-out phrasings and appearances), for each memory
size and seed.

    eval "$(geopix stack env)"
    .venv/bin/python bench/learning_bar.py [--memory-len 8 0] [--seeds 0 1] [--budget-s 900]

Needs the tiny preset's shards (`geopix data synth --config tiny && geopix data shard --config tiny`).
Prints, per run: train wall time (both stages, Ray Train startup and model publishing included)
against the budget, and cIoU/gIoU overall, per size bucket and per phrase type against the bar
(0.55), and the stage-1 model's figures (what stage 2 adds or costs); then per memory size the mean and spread over seeds and the difference to K = 0. The
per-run evaluations and their reports are under evaluate.out_uri/<bench name>/, and the K
comparison (first seed) under …/comparison/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from geopix import ray_job, storage, tracking
from geopix.config import load_config
from geopix.evaluate.job import evaluate_model, headline
from geopix.evaluate.report import summary_groups, write_comparison
from geopix.train.run import train_stage

BAR = 0.55


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-len", type=int, nargs="+", default=None, help="memory sizes K (default: preset, 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra config overrides key=value")
    args = parser.parse_args()

    import ray

    ray.init()
    base = load_config("tiny", args.overrides)
    tracking.configure(base.tracking)
    sizes = args.memory_len if args.memory_len is not None else [base.model.memory_len, 0]
    bench = f"learning-bar-{ray_job.run_id()}"
    out = storage.join_uri(base.evaluate.out_uri, bench)
    runs = []
    for seed in args.seeds:  # seed outermost: every finished seed is a complete K comparison
        for k in sizes:
            cfg = load_config("tiny", [*args.overrides, f"model.memory_len={k}", f"train.seed={seed}"])
            tag = f"k{k}-s{seed}"
            started = time.perf_counter()
            one = train_stage(cfg, 1, run_name=f"{bench}-{tag}-stage1", register=False)
            two = train_stage(cfg, 2, init_model_uri=one.model_uri, run_name=f"{bench}-{tag}-stage2", register=False)
            train_s = time.perf_counter() - started
            result = evaluate_model(cfg, two.model_uri, name=tag, out_uri=out)
            after_stage1 = evaluate_model(cfg, one.model_uri, name=f"{tag}-stage1", out_uri=out)
            runs.append({"memory_len": k, "seed": seed, "train_s": train_s, "stage1_s": one.seconds,
                         "stage2_s": two.seconds, "summary": result.summary,
                         "stage1_summary": after_stage1.summary})
            print(row_line(runs[-1], args.budget_s), flush=True)
            print(f"  after stage 1 only: {headline(after_stage1.summary)}", flush=True)

    first = {f"K={r['memory_len']}": r["summary"] for r in runs if r["seed"] == args.seeds[0]}
    if len(first) > 1:
        write_comparison(first, storage.join_uri(out, "comparison"))
    storage.write_bytes(storage.join_uri(out, "runs.json"), json.dumps(runs, indent=2).encode())
    print()
    print(summary_table(runs, sizes))
    print(f"\nevaluations and reports: {out}/")


def row_line(run: dict, budget_s: float) -> str:
    g = summary_groups(run["summary"])
    cells = ", ".join(f"{k} {v['cIoU']:.3f}/{v['gIoU']:.3f}" for k, v in g.items())
    return (
        f"K={run['memory_len']} seed={run['seed']}: trained in {run['train_s']:.0f} s "
        f"({run['train_s'] / budget_s:.2f}× the {budget_s:.0f} s budget; stage 1 {run['stage1_s']:.0f} s, "
        f"stage 2 {run['stage2_s']:.0f} s); cIoU/gIoU {cells}"
    )


def summary_table(runs: list[dict], sizes: list[int]) -> str:
    """Mean ± spread (half the range) of cIoU and gIoU per group, per K, and the difference to K=0."""
    keys = list(dict.fromkeys(k for r in runs for k in summary_groups(r["summary"])))
    means: dict[int, dict[str, tuple[float, float]]] = {}
    lines = ["| group | " + " | ".join(f"K={k} cIoU | K={k} gIoU" for k in sizes) + " |"]
    lines.append("|---" * (1 + 2 * len(sizes)) + "|")
    for key in keys:
        cells = []
        for k in sizes:
            values = [summary_groups(r["summary"]).get(key) for r in runs if r["memory_len"] == k]
            values = [v for v in values if v and "cIoU" in v]
            for metric in ("cIoU", "gIoU"):
                xs = [v[metric] for v in values]
                if not xs:
                    cells.append("–")
                    continue
                mean = statistics.fmean(xs)
                means.setdefault(k, {})[f"{key} {metric}"] = (mean, (max(xs) - min(xs)) / 2)
                cells.append(f"{mean:.3f} ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else f"{mean:.3f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    overall = {k: means[k]["all cIoU"][0] for k in means}
    text += "\n\nbar: " + "; ".join(
        f"K={k} cIoU {means[k]['all cIoU'][0]:.3f} ({means[k]['all cIoU'][0] / BAR:.2f}× the {BAR} bar), "
        f"gIoU {means[k]['all gIoU'][0]:.3f} ({means[k]['all gIoU'][0] / BAR:.2f}×)"
        for k in means
    )
    if 0 in overall:
        for k, by_name in means.items():
            if k == 0:
                continue
            diffs = ", ".join(
                f"{name.replace(' cIoU', '')} {value[0] - means[0][name][0]:+.3f}"
                for name, value in by_name.items() if name.endswith("cIoU") and name in means[0]
            )
            text += f"\nK={k} − K=0 (cIoU): {diffs}"
    return text


if __name__ == "__main__":
    main()
