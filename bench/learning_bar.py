"""The learning bar: train both stages of the tiny preset within the time budget, then evaluate the
stage-2 model and its stage-1 model on the held-out synthetic test split (unseen seed, held-out
phrasings and appearances), for each memory size and seed; print every bar with its figure (mean ±
spread over seeds) and PASS/FAIL, and write the same as JSON.

    eval "$(geopix stack env)"
    .venv/bin/python bench/learning_bar.py --seeds 0 1 2 --memory-len 8 0 [--budget-s 900]

Needs the tiny preset's shards (`geopix data synth --config tiny && geopix data shard --config tiny`).
Machines differ, so the script first times the plain torch loop of bench/train_throughput.py on
this machine and records it beside every run (the training-time bar holds on a machine at least
as fast as the one docs/training.md quotes). The spread is half the range over seeds. The bars
are read on the first memory size given (default: the preset's); the memory bars compare the
first K > 0 given with K = 0 (default: the preset's K and 0, or 0 and 8 when the preset has none).

Writes docs/benchmarks/learning_bar.json (``--json``) after every run, so a stopped bench keeps
what it measured: ``{"bars": [{"name", "value", "spread", "bar", "pass"}, …], "runs": [{"seed",
"memory_len", "train_seconds", "commit", <every figure>}, …]}``; the per-run evaluations and
reports are under evaluate.out_uri/<bench name>/, and the K comparison (first seed) under
…/comparison/. ``--resume learning-bar-…`` reruns a stopped bench of the same settings without
retraining the stages it finished (their evaluations run again); a run's training seconds are its
two stages' own recorded seconds, and its plain-loop figures the ones timed by the invocation that
trained each stage (…/plain-loop/<stage run>.json), so a resumed run reports what its stages took
beside what.
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
import subprocess
from pathlib import Path
from typing import Any

from train_throughput import reference_loop

from geopix import ray_job, storage, tracking
from geopix.config import add_overrides_argument, load_config
from geopix.evaluate.job import flat_metrics, headline
from geopix.evaluate.report import write_comparison

COUNTS = ("2", "3", "4", "5")  # the counting bar: answers asking for every instance, 2–5 of them
# (name, figure, comparison, threshold): issue 18's table.
BARS = (
    ("segmentation cIoU, all targets", "seg_cIoU", ">=", 0.70),
    ("segmentation gIoU, all targets", "seg_gIoU", ">=", 0.55),
    ("single-target phrases gIoU", "seg_task_refer_gIoU", ">=", 0.65),
    ("position phrases gIoU", "seg_phrase_position_gIoU", ">=", 0.45),
    ("relation phrases gIoU", "seg_phrase_relation_gIoU", ">=", 0.45),
    ("small objects gIoU", "seg_small_gIoU", ">=", 0.30),
    ("counting 2–5: masks = instances", "counting_2to5_exact", ">=", 0.60),
    ("grounding Acc@0.5", "grounding_accuracy", ">=", 0.50),
    ("VQA exact match", "vqa_accuracy", ">=", 0.60),
    ("captions CIDEr-D", "caption_CIDEr", ">=", 0.8),
    ("stage 2 cost: stage-1 cIoU − stage-2 cIoU", "stage2_cIoU_cost", "<=", 0.02),
)
# Reported beside the bars, without one.
REPORTED = (
    *((f"counting {n}: masks = instances", f"counting_{n}_exact") for n in COUNTS),
    *((f"counting {n}: stated count right", f"counting_{n}_stated_exact") for n in COUNTS),
    *((f"VQA {kind}", f"vqa_{kind}_accuracy") for kind in ("count", "presence", "colour")),
    ("captions BLEU-4", "caption_BLEU4"),
    ("stage 1 only: VQA exact match", "stage1_vqa_accuracy"),
    ("stage 1 only: grounding Acc@0.5", "stage1_grounding_accuracy"),
    ("stage 1 only: captions CIDEr-D", "stage1_caption_CIDEr"),
    ("plain torch loop samples/s (this machine)", "plain_loop_samples_per_s"),
)
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-len", type=int, nargs="+", default=None,
                        help="memory sizes K (default: the preset's and 0, or 0 and 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--resume", metavar="BENCH", default=None,
                        help="a stopped bench's name (learning-bar-…): its finished stages are kept, not retrained")
    parser.add_argument("--json", type=Path, default=Path(__file__).parents[1] / "docs/benchmarks/learning_bar.json")
    add_overrides_argument(parser)
    args = parser.parse_args()

    import ray

    ray.init()
    base = load_config("tiny", args.overrides)
    tracking.configure(base.tracking)
    preset = base.model.memory_len
    sizes = args.memory_len if args.memory_len is not None else [preset, 0] if preset else [0, 8]
    # Timed before any training starts, on an idle machine (20 steps, as bench/train_throughput.py).
    plain = reference_loop()
    print(f"plain torch loop on this machine: {plain:.1f} samples/s", flush=True)
    bench = args.resume or f"learning-bar-{ray_job.run_id()}"
    out = storage.join_uri(base.evaluate.out_uri, bench)
    commit = _commit()
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:  # seed outermost: every finished seed is a complete K comparison
        for k in sizes:
            runs.append(one_run(args.overrides, seed, k, out, plain, budget_s=args.budget_s) | {
                "commit": commit, "overrides": args.overrides})
            report = bar_report(runs, sizes, args.budget_s)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    first = {f"K={r['memory_len']}": r["summary"] for r in runs if r["seed"] == args.seeds[0]}
    if len(first) > 1:
        write_comparison(first, storage.join_uri(out, "comparison"))
    storage.write_bytes(storage.join_uri(out, "runs.json"), json.dumps(runs, indent=2).encode())
    print()
    print(bar_table(bar_report(runs, sizes, args.budget_s)))
    print(f"\nbars and figures: {args.json}\nevaluations and reports: {out}/")


def one_run(overrides: list[str], seed: int, k: int, out: str, plain: float, *, budget_s: float) -> dict[str, Any]:
    """Train both stages for one (seed, K), evaluate both models; the run's figures."""
    from geopix.evaluate.job import evaluate_model

    cfg = load_config("tiny", [*overrides, f"model.memory_len={k}", f"train.seed={seed}"])
    tag = f"k{k}-s{seed}"
    bench = out.rstrip("/").rsplit("/", 1)[-1]
    one, plain1 = train_beside(cfg, 1, f"{bench}-{tag}-stage1", out, plain)
    two, plain2 = train_beside(cfg, 2, f"{bench}-{tag}-stage2", out, plain, init_model_uri=one.model_uri)
    # Each stage's own recorded seconds, so a resumed bench reports what its finished stages took.
    train_s = one.seconds + two.seconds
    result = evaluate_model(cfg, two.model_uri, name=tag, out_uri=out)
    after_stage1 = evaluate_model(cfg, one.model_uri, name=f"{tag}-stage1", out_uri=out)
    run = {"seed": seed, "memory_len": k, "train_seconds": train_s, "stage1_seconds": one.seconds,
           "stage2_seconds": two.seconds, "model_uri": two.model_uri, "stage1_model_uri": one.model_uri,
           # Stage 1 is most of the training time; stage 2's figure differs only on a resumed bench.
           "plain_loop_samples_per_s": plain1, "stage2_plain_loop_samples_per_s": plain2}
    run |= figures(result.summary) | {f"stage1_{k}": v for k, v in figures(after_stage1.summary).items()}
    run["stage2_cIoU_cost"] = run["stage1_seg_cIoU"] - run["seg_cIoU"]
    run["summary"], run["stage1_summary"] = result.summary, after_stage1.summary
    print(f"K={k} seed={seed}: trained in {train_s:.0f} s ({train_s / budget_s:.2f}× the {budget_s:.0f} s "
          f"budget; stage 1 {one.seconds:.0f} s, stage 2 {two.seconds:.0f} s)\n  {headline(result.summary)}\n"
          f"  after stage 1 only: {headline(after_stage1.summary)}", flush=True)
    return run


def train_beside(cfg, stage: int, run_name: str, out: str, plain: float, **kwargs: Any) -> tuple[Any, float | None]:
    """Train one stage (or keep it, when a resumed bench finished it before) and the plain loop's
    samples/s timed by the invocation that trained it: this one's, or the figure recorded then
    (None for a stage trained before records were kept)."""
    from geopix.train.run import finished_run, train_stage

    record = storage.join_uri(out, "plain-loop", f"{run_name}.json")
    trained_before = finished_run(storage.join_uri(cfg.train.runs_uri, run_name)) is not None
    result = train_stage(cfg, stage, run_name=run_name, register=False, **kwargs)
    if not trained_before:
        storage.write_bytes(record, json.dumps({"plain_loop_samples_per_s": plain}).encode())
        return result, plain
    try:
        return result, json.loads(storage.read_bytes(record))["plain_loop_samples_per_s"]
    except (storage.StorageError, FileNotFoundError):
        return result, None


def figures(summary: dict[str, Any]) -> dict[str, float]:
    """Every figure of an evaluation summary by name, with the counting table flattened and the
    counting bar's pooled share (2–5 instances)."""
    out = flat_metrics(summary)
    table = summary.get("counting", {})
    for n, row in table.items():
        out |= {f"counting_{n}_{key}": float(row[key]) for key in ("answers", "masks_mean", "stated_exact")}
    pooled = [table[n] for n in COUNTS if n in table]
    answers = sum(r["answers"] for r in pooled)
    if answers:
        out["counting_2to5_exact"] = sum(r["exact"] * r["answers"] for r in pooled) / answers
    return out


def _stats(runs: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """Mean and spread (half the range) of one figure over runs, or None where no run has it."""
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return statistics.fmean(values), (max(values) - min(values)) / 2


def bar_report(runs: list[dict[str, Any]], sizes: list[int], budget_s: float) -> dict[str, Any]:
    """Every bar (mean ± spread over seeds of the first memory size, PASS/FAIL) and the runs."""
    preset = [r for r in runs if r["memory_len"] == sizes[0]]
    bars = []
    for name, key, op, threshold in (*BARS, ("training both stages (s)", "train_seconds", "<=", budget_s)):
        stats = _stats(preset, key)
        bars.append({"name": name, "figure": key, "value": stats and stats[0], "spread": stats and stats[1],
                     "bar": f"{op} {threshold:g}",
                     "pass": None if stats is None else bool(COMPARE[op](stats[0], threshold))})
    for name, key in REPORTED:
        stats = _stats(preset, key)
        bars.append({"name": name, "figure": key, "value": stats and stats[0], "spread": stats and stats[1],
                     "bar": "reported", "pass": None})
    memory = next((k for k in sizes if k > 0), None)
    if memory is not None and 0 in sizes:
        with_memory = [r for r in runs if r["memory_len"] == memory]
        bars += memory_bars(with_memory, [r for r in runs if r["memory_len"] == 0], memory)
    slim = [{k: v for k, v in r.items() if k not in ("summary", "stage1_summary")} for r in runs]
    return {"bars": bars, "runs": slim, "seeds": sorted({r["seed"] for r in runs}), "memory_lens": sizes}


def memory_bars(with_memory: list[dict], without: list[dict], k: int) -> list[dict[str, Any]]:
    """K against K = 0 over the same seeds: ahead on small objects by more than the seed spread
    (the larger of the two sizes'), and no phrase type behind by more than its spread."""
    seeds = {r["seed"] for r in with_memory} & {r["seed"] for r in without}
    a = [r for r in with_memory if r["seed"] in seeds]
    b = [r for r in without if r["seed"] in seeds]
    if not seeds:
        return []

    def difference(key: str) -> tuple[float, float] | None:
        sa, sb = _stats(a, key), _stats(b, key)
        return None if sa is None or sb is None else (sa[0] - sb[0], max(sa[1], sb[1]))

    bars = []
    small = difference("seg_small_gIoU")
    if small:
        bars.append({"name": f"memory: small gIoU, K={k} − K=0, beyond the spread", "figure": "seg_small_gIoU",
                     "value": small[0], "spread": small[1], "bar": f"> {small[1]:.3f} (spread)",
                     "pass": small[0] > small[1]})
    phrase_keys = sorted({key for r in a for key in r if key.startswith("seg_phrase_") and key.endswith("_gIoU")})
    for key in phrase_keys:
        diff = difference(key)
        if diff:
            kind = key.removeprefix("seg_phrase_").removesuffix("_gIoU")
            bars.append({"name": f"memory: {kind} phrases gIoU, K={k} − K=0, not behind", "figure": key,
                         "value": diff[0], "spread": diff[1], "bar": f">= -{diff[1]:.3f} (spread)",
                         "pass": diff[0] >= -diff[1]})
    return bars


def bar_table(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    title = (f"learning bar, tiny preset, K={report['memory_lens'][0]}, seeds {seeds} "
             f"(mean ± spread = half the range over seeds)")
    lines = [title, "", "| what | figure | bar | result |", "|---|---|---|---|"]
    for bar in report["bars"]:
        if bar["value"] is None:
            value = "–"
        else:
            value = f"{bar['value']:.3f}" + (f" ± {bar['spread']:.3f}" if len(seeds) > 1 else "")
        result = {True: "PASS", False: "FAIL", None: ""}[bar["pass"]]
        lines.append(f"| {bar['name']} | {value} | {bar['bar']} | {result} |")
    return "\n".join(lines)


def _commit() -> str:
    root = Path(__file__).parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=False)
    return (head.stdout.strip() or "unknown") + ("-dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()
