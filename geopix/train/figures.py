"""Pictures of a training run: loss curves and predicted masks on training samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geopix.data.contact_sheet import TARGET_COLOURS
from geopix.plotting import pyplot


@torch.no_grad()
def training_overlays(model: Any, batch: Mapping[str, Any], count: int, dtype: torch.dtype, path: Path) -> Path:
    """The first ``count`` targets of ``batch``: image, ground truth outline, prediction fill, IoU."""
    from geopix.data.batches import to_device

    plt = pyplot()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = model(**to_device(dict(batch), device, dtype))
    model.train(was_training)
    if out.mask_logits is None:
        raise ValueError("the overlay batch has no targets")
    predicted = (out.mask_logits.float() > 0).cpu().numpy()
    truth = batch["target_masks"].numpy() > 0.5
    mean = np.asarray(model.vision.image_mean)[:, None, None]
    std = np.asarray(model.vision.image_std)[:, None, None]
    count = min(count, len(predicted))
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.6), squeeze=False)
    for k, ax in enumerate(axes[0]):
        sample = int(batch["target_sample"][k])
        image = np.clip(batch["pixel_values"][sample].float().numpy() * std + mean, 0, 1).transpose(1, 2, 0)
        colour = TARGET_COLOURS[k % len(TARGET_COLOURS)]
        shown = image.copy()
        shown[predicted[k]] = 0.45 * shown[predicted[k]] + 0.55 * colour
        ax.imshow(shown)
        ax.contour(truth[k], levels=[0.5], colors=["white"], linewidths=1.0, linestyles="dashed")
        iou = (predicted[k] & truth[k]).sum() / max((predicted[k] | truth[k]).sum(), 1)
        task = batch["tasks"][sample] if "tasks" in batch else ""
        ax.set_title(f"{task} · IoU {iou:.2f}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle("training samples: prediction (fill) vs ground truth (dashed)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path, title: str
) -> Path:
    """One panel per loss term (step → value), stages or runs as separate lines."""
    plt = pyplot()
    keys = sorted({key for series in histories.values() for key in series})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, series in histories.items():
            points = series.get(key) or []
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=label)
        ax.set_title(key.removeprefix("loss/"), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
