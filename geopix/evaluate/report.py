"""The evaluation report: Markdown tables + PNGs (scores per size bucket and phrase type, the best and
worst referring cases drawn over their images), and the side-by-side comparison of several models."""

from __future__ import annotations

import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from geopix import storage
from geopix.config import GeoPixConfig
from geopix.data import schema
from geopix.evaluate.metrics import BUCKETS, OUTCOMES
from geopix.plotting import pyplot

REPORT_FILE = "report.md"
SCORES_PNG = "scores.png"
BEST_PNG = "best_cases.png"
WORST_PNG = "worst_cases.png"
COMPARISON_FILE = "comparison.md"
COMPARISON_PNG = "comparison.png"
TRUTH_COLOUR = (1.0, 0.9, 0.0)  # outline
PREDICTED_COLOUR = (1.0, 0.0, 0.85)  # fill: magenta stands out on the scenes' reds, greens and blues



def _table(groups: Mapping[str, Mapping[str, Any]], label: str, names: Mapping[str, str] | None = None) -> str:
    keys = ["targets", "cIoU", "gIoU", "P@0.5", "P@0.7", "P@0.9", "answered"]
    lines = [f"| {label} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for group, values in groups.items():
        cells = [
            str(values.get(k, "")) if k == "targets" else (f"{values[k]:.3f}" if k in values else "–")
            for k in keys
        ]
        lines.append(f"| {(names or {}).get(group, group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _outcome_table(groups: Mapping[str, Mapping[str, Any]], label: str) -> str:
    """Share of targets per outcome (see metrics.outcome) and the predicted/true area ratio."""
    lines = [f"| {label} | " + " | ".join(OUTCOMES) + " | area ratio |", "|---" * (len(OUTCOMES) + 2) + "|"]
    for group, values in groups.items():
        if "outcomes" not in values:
            continue
        ratio = values.get("area_ratio")
        cells = [f"{values['outcomes'][o]:.2f}" for o in OUTCOMES] + [f"{ratio:.2f}" if ratio else "–"]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- one model
def write_report(
    summary: dict[str, Any], rows: list[dict[str, Any]], shards_uri: str, split: str, out_uri: str, cfg: GeoPixConfig
) -> Path:
    """Write the report into a local directory (returned) and copy it to ``out_uri``."""
    local = Path(tempfile.mkdtemp(prefix="geopix-report-"))
    seg = summary["segmentation"]
    names = seg.get("class_names", {})
    parts = [
        f"# Evaluation {summary['name']}",
        (f"Model `{summary['model_uri']}` on split `{split}` of `{shards_uri}`: {summary['records']} records "
        f"({', '.join(f'{k} {v}' for k, v in sorted(summary['records_by_task'].items()))}), "
        f"{summary['failed']} failed, {summary['seconds']:.0f} s."),
    ]
    if seg["overall"].get("targets"):
        scores_png(seg, local / SCORES_PNG)
        parts += [
            "## Segmentation (segment and refer records, one row per target)",
            _table({"all": seg["overall"]}, "set"),
            ("### By size bucket (ground-truth area: small < "
            f"{cfg.evaluate.small_max_area} px ≤ medium < {cfg.evaluate.medium_max_area} px ≤ large)"),
            _table(seg["by_bucket"], "bucket"),
            "### By phrase type",
            _table(seg["by_phrase_type"], "phrase type"),
            "### By class",
            _table(seg["by_class"], "class", names),
            f"Masks beyond the number of targets: {seg['extra_masks']}.",
            "### What happened to each target",
            ("Share of targets whose answer gave no mask (too few seg runs), an empty mask, a mask "
            "elsewhere (IoU 0), a partial mask (IoU < 0.5) or a hit (IoU ≥ 0.5); area ratio = "
            "predicted / true pixels over answered targets (> 1: masks too large)."),
            _outcome_table({"all": seg["overall"], **seg["by_bucket"], **seg["by_phrase_type"]}, "targets"),
            f"![scores]({SCORES_PNG})",
        ]
        best, worst = pick_cases(rows, cfg.evaluate.report_cases)
        images = _images(shards_uri, split, {r["record_id"] for r, _ in best + worst})
        if best:
            cases_png(best, images, names, local / BEST_PNG, "Best referring cases")
            cases_png(worst, images, names, local / WORST_PNG, "Worst referring cases")
            parts += [
                "## Cases, best and worst of each size bucket (yellow outline: ground truth, magenta: prediction)",
                f"![best]({BEST_PNG})",
                f"![worst]({WORST_PNG})",
            ]
    grounding, captions, vqa = summary["grounding"], summary["captions"], summary["vqa"]
    text = ["| task | records | score |", "|---|---|---|"]
    if grounding["records"]:
        text.append(f"| grounding (box IoU ≥ {cfg.evaluate.grounding_iou}) | {grounding['records']} | "
                    f"{grounding['accuracy']:.3f} |")
        for bucket, group in grounding.get("by_bucket", {}).items():
            text.append(f"| grounding, {bucket} objects | {group['records']} | {group['accuracy']:.3f} |")
    if captions.get("captions"):
        text.append(f"| captions BLEU-4 | {captions['captions']} | {captions['BLEU-4']:.3f} |")
        text.append(f"| captions CIDEr | {captions['captions']} | {captions['CIDEr']:.3f} |")
    if vqa["records"]:
        text.append(f"| VQA exact match | {vqa['records']} | {vqa['accuracy']:.3f} |")
        for kind, group in vqa.get("by_kind", {}).items():
            text.append(f"| VQA exact match, {kind} questions | {group['records']} | {group['accuracy']:.3f} |")
    if len(text) > 2:
        parts += ["## Text tasks", "\n".join(text)]
    if summary.get("counting"):
        rows = ["| instances asked for | answers | masks given (mean) | exactly that many masks | count stated right |",
                "|---|---|---|---|---|"]  # fmt: skip
        rows += [f"| {n} | {c['answers']} | {c['masks_mean']:.2f} | {c['exact']:.2f} | {c['stated_exact']:.2f} |"
                 for n, c in summary["counting"].items()]  # fmt: skip
        parts += ["## Counting (answers to \"segment every X\")", "\n".join(rows)]
    if summary["failures"]:
        parts += ["## Records that failed", *(f"- `{f['record_id']}`: {f['error']}" for f in summary["failures"])]
    (local / REPORT_FILE).write_text("\n\n".join(parts) + "\n")
    storage.upload_directory(local, out_uri, marker=False)  # the evaluation publishes _SUCCESS
    return local


def scores_png(seg: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    panels = [("size bucket", seg["by_bucket"]), ("phrase type", seg["by_phrase_type"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    for ax, (title, groups) in zip(axes, panels, strict=True):
        labels = list(groups)
        x = np.arange(len(labels))
        for offset, metric, colour in ((-0.2, "cIoU", "#3a6ea5"), (0.2, "gIoU", "#f2a541")):
            values = [groups[g].get(metric, 0) for g in labels]
            ax.bar(x + offset, values, 0.4, label=metric, color=colour)
        ax.set_xticks(x, [f"{g}\n(n={groups[g]['targets']})" for g in labels], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"by {title}")
        ax.grid(axis="y", alpha=0.3)
    overall = seg["overall"]
    axes[0].axhline(overall["cIoU"], color="#3a6ea5", ls="--", lw=0.8)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Segmentation: cIoU {overall['cIoU']:.3f}, gIoU {overall['gIoU']:.3f} "
                 f"over {overall['targets']} targets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pick_cases(rows: list[dict[str, Any]], count: int):
    """The best and worst single-target referring answers, (row, target) pairs by IoU, taken
    evenly from each size bucket (else the best would all be large and the worst all small)."""
    best, worst = [], []
    per_bucket = max(count // len(BUCKETS), 1)
    for bucket in BUCKETS:
        cases = [
            (r, r["targets"][0]) for r in rows
            if not r.get("error") and r["task"] == "refer" and len(r["targets"] or []) == 1
            and r["targets"][0]["area"] and r["targets"][0]["bucket"] == bucket
        ]
        cases.sort(key=lambda c: (c[1]["iou"], c[0]["record_id"]))
        low = cases[:per_bucket]
        worst += low
        best += [c for c in reversed(cases[-per_bucket:]) if c not in low]
    return best, worst


def _images(shards_uri: str, split: str, record_ids: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(image, ground-truth masks) of the given records, read back from the shards."""
    from geopix.data.images import TRUTH_COLUMNS, decode_targets, record_image
    from geopix.data.shard_set import read_records

    if not record_ids:
        return {}
    rows = read_records(shards_uri, split, record_ids=record_ids, columns=TRUTH_COLUMNS)
    return {row["record_id"]: (record_image(row), decode_targets(row)[0]) for row in rows}


def cases_png(cases, images: dict[str, tuple[np.ndarray, np.ndarray]], names: Mapping[str, str], path: Path, title: str) -> None:
    plt = pyplot()
    cols = min(3, len(cases))
    rows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (row, target) in zip(axes.flat, cases):
        if row["record_id"] not in images:
            continue
        image, truths = images[row["record_id"]]
        shown = image.astype(np.float32) / 255
        k, paired = target["target"], target.get("mask_index", target["target"])
        predicted = (
            schema.decode_mask(row["predicted_masks"][paired]).astype(bool)
            if 0 <= paired < len(row["predicted_masks"]) else None
        )
        if predicted is not None:
            shown[predicted] = 0.45 * shown[predicted] + 0.55 * np.array(PREDICTED_COLOUR)
        ax.imshow(shown, interpolation="nearest")
        if k < len(truths) and truths[k].any():
            ax.contour(truths[k], levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.4)
        phrase = row["instruction"].split("]", 1)[-1].strip()
        label = names.get(str(target["class_id"]), str(target["class_id"]))
        ax.set_title(
            "\n".join(textwrap.wrap(phrase, 46)[:3])
            + f"\n{label}, {target['bucket']} ({target['area']} px), {row['phrase_type']}: IoU {target['iou']:.2f}",
            fontsize=7.5, loc="left",
        )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------- comparison
def summary_groups(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A summary's segmentation groups in one flat mapping: all, each bucket, each phrase type."""
    seg = summary["segmentation"]
    return {"all": seg["overall"]} | {b: seg["by_bucket"][b] for b in BUCKETS if b in seg["by_bucket"]} | {
        f"phrase: {k}": v for k, v in seg["by_phrase_type"].items()
    }


def write_comparison(summaries: Mapping[str, dict[str, Any]], out_uri: str) -> Path:
    """Side by side: overall, per bucket and per phrase type cIoU/gIoU of each labelled summary,
    with the difference of each to the first. Returns the local directory (also copied to ``out_uri``)."""
    local = Path(tempfile.mkdtemp(prefix="geopix-compare-"))
    labels = list(summaries)
    base = labels[0]
    table = {label: summary_groups(s) for label, s in summaries.items()}
    keys = list(dict.fromkeys(k for t in table.values() for k in t))
    head = "| group | " + " | ".join(f"{label} cIoU / gIoU" for label in labels)
    head += "".join(f" | Δ {label} − {base}" for label in labels[1:]) + " |"
    lines = [head, "|---" * (1 + len(labels) + len(labels) - 1) + "|"]
    for key in keys:
        cells = []
        for label in labels:
            v = table[label].get(key, {})
            cells.append(f"{v['cIoU']:.3f} / {v['gIoU']:.3f}" if "cIoU" in v else "–")
        for label in labels[1:]:
            a, b = table[label].get(key, {}), table[base].get(key, {})
            cells.append(f"{a['cIoU'] - b['cIoU']:+.3f} / {a['gIoU'] - b['gIoU']:+.3f}" if "cIoU" in a and "cIoU" in b else "–")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    sources = "\n".join(f"- **{label}**: `{s['model_uri']}` ({s['name']})" for label, s in summaries.items())
    text = f"# Comparison\n\n{sources}\n\n" + "\n".join(lines) + f"\n\n![comparison]({COMPARISON_PNG})\n"
    (local / COMPARISON_FILE).write_text(text)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(keys) * len(labels)), 4))
    x = np.arange(len(keys))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [table[label].get(k, {}).get("cIoU", 0) for k in keys]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, [k.replace("phrase: ", "") for k in keys], fontsize=8, rotation=20)
    ax.set_ylabel("cIoU")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("cIoU overall, per size bucket and per phrase type")
    fig.tight_layout()
    fig.savefig(local / COMPARISON_PNG, dpi=110)
    plt.close(fig)
    storage.upload_directory(local, out_uri, marker=False)  # the evaluation publishes _SUCCESS
    return local
