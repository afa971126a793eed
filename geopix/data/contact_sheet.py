"""Contact sheets: a grid of records with their target masks, boxes and texts drawn in.

Used to look at what a source really holds (``contact_sheet(uri, "sheet.png")``): each cell shows
the image, every target's mask in its own colour with its pixel box, a box parsed from a
grounding answer (dashed), and under the image the task, phrase type, instruction and answer.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from geopix.answer_form import parse_box_text
from geopix.data import schema
from geopix.vocabulary import ANY_SEG_RUN, IMAGE_TOKEN

TARGET_COLOURS = (
    np.array(
        [[255, 64, 64], [64, 160, 255], [255, 210, 40], [200, 80, 255], [40, 230, 120], [255, 140, 0]],
        np.float32,
    )
    / 255
)
COLUMNS = 4


def _sample(records: Iterable[Mapping[str, Any]], n: int, seed: int) -> list[Mapping[str, Any]]:
    """Up to ``n`` records spread over the tasks: a reservoir sample per task, then round robin."""
    rng = np.random.default_rng(seed)
    reservoirs: dict[str, list[Mapping[str, Any]]] = {}
    seen: dict[str, int] = {}
    for record in records:
        task = record.get("task") or "?"
        pool = reservoirs.setdefault(task, [])
        seen[task] = seen.get(task, 0) + 1
        if len(pool) < n:
            pool.append(record)
        else:
            slot = int(rng.integers(seen[task]))
            if slot < n:
                pool[slot] = record
    tasks = [t for t in schema.TASKS if t in reservoirs] + sorted(set(reservoirs) - set(schema.TASKS))
    chosen: list[Mapping[str, Any]] = []
    for k in range(n):
        for task in tasks:
            if k < len(reservoirs[task]) and len(chosen) < n:
                chosen.append(reservoirs[task][k])
    return chosen


def _image_array(record: Mapping[str, Any]) -> np.ndarray:
    from PIL import Image

    if record.get("image"):
        data = record["image"]
    else:
        from geopix import storage

        data = storage.read_bytes(record["image_uri"])
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), np.float32) / 255


def _overlay(image: np.ndarray, targets: list[Mapping[str, Any]]) -> np.ndarray:
    out = image.copy()
    for k, target in enumerate(targets):
        mask = schema.decode_mask(target["mask"]).astype(bool)
        colour = TARGET_COLOURS[k % len(TARGET_COLOURS)]
        out[mask] = 0.45 * out[mask] + 0.55 * colour
    return out


def _text(record: Mapping[str, Any], width: int) -> str:
    turns = record.get("conversation") or []
    prompt = turns[0]["text"].replace(IMAGE_TOKEN, "").strip() if turns else ""
    answer = ANY_SEG_RUN.sub("[SEG]", turns[1]["text"]) if len(turns) > 1 else ""
    head = f"{record.get('task')} · {record.get('phrase_type') or '-'} · {record.get('template_id') or '-'}"
    lines = [head] + textwrap.wrap("Q: " + prompt, width)[:3] + textwrap.wrap("A: " + answer, width)[:5]
    return "\n".join(lines)


def contact_sheet(
    source_uri_or_records: str | Iterable[Mapping[str, Any]], out_png: str | Path, n: int = 12, seed: int = 0
) -> Path:
    """Render ``n`` records (sampled with ``seed`` across tasks) into a PNG grid; returns its path."""
    from matplotlib.patches import Rectangle

    from geopix.plotting import pyplot

    plt = pyplot()

    if isinstance(source_uri_or_records, str):
        from geopix.data.source import iter_records

        records = _sample(iter_records(source_uri_or_records), n, seed)
    else:
        records = _sample(source_uri_or_records, n, seed)
    if not records:
        raise ValueError("no records to draw")
    rows = -(-len(records) // COLUMNS)
    fig_height = rows * 5.9 + 1.5  # inches; the text under the last row needs room too
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(COLUMNS * 4.2, fig_height), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, record in zip(axes.ravel(), records, strict=False):
        targets = list(record.get("targets") or [])
        ax.imshow(_overlay(_image_array(record), targets), interpolation="nearest")
        for k, target in enumerate(targets):
            x1, y1, x2, y2 = target["box"]
            colour = TARGET_COLOURS[k % len(TARGET_COLOURS)]
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colour))
        if record.get("task") == "ground":
            width, height = record["width"], record["height"]
            answer = " ".join(t["text"] for t in record["conversation"][1::2])
            for bx1, by1, bx2, by2 in parse_box_text(answer):
                ax.add_patch(
                    Rectangle(
                        (bx1 * width / 100 - 0.5, by1 * height / 100 - 0.5),
                        (bx2 - bx1) * width / 100,
                        (by2 - by1) * height / 100,
                        fill=False, lw=1.5, ls="--", ec="white",
                    )
                )  # fmt: skip
        ax.set_title(record.get("record_id", ""), fontsize=7)
        ax.text(
            0,
            -0.02,
            _text(record, 52),
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=7,
            family="monospace",
        )
    fig.subplots_adjust(
        left=0.01, right=0.99, top=1 - 0.25 / fig_height, bottom=1.9 / fig_height, wspace=0.05, hspace=0.5
    )
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
