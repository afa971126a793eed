"""`geopix chat`: one image and one instruction → the answer, its masks and a PNG overlay.

The overlay is drawn at the image's own resolution: each mask (predicted at the model's input size)
is resized back with nearest-neighbour sampling, filled in its own colour with its outline, and
labelled with the class head's most likely class and its probability.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geopix.data.contact_sheet import TARGET_COLOURS
from geopix.model.generation import ChatAnswer
from geopix.model.modeling import GeoPixModel
from geopix.vocabulary import ANY_SEG_RUN


@dataclass
class ChatResult:
    instruction: str
    answer: ChatAnswer
    class_names: list[str]
    image_shape: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        masks = []
        for k, (mask, probs) in enumerate(zip(self.answer.masks, self.answer.class_probs, strict=True)):
            top = int(probs.argmax())
            masks.append(
                {
                    "index": k,
                    "class": self.class_names[top],
                    "class_probability": round(float(probs[top]), 4),
                    "area_fraction": round(float(mask.float().mean()), 5),
                }
            )
        return {"instruction": self.instruction, "answer": self.answer.text,
                "stated_count": self.answer.stated_count, "masks": masks}  # fmt: skip


def chat_image(
    model: GeoPixModel,
    tokenizer: Any,
    processor: Any,
    image: Any,
    instruction: str,
    **generation: Any,
) -> tuple[ChatResult, np.ndarray]:
    """Answer ``instruction`` about one image (path, s3:// URI, bytes or H×W×3 uint8).

    Returns the result and the image as H×W×3 uint8 at its own resolution (for the overlay)."""
    from geopix.data.images import decode_image
    from geopix.storage import read_bytes

    if isinstance(image, (str, Path)):
        image = read_bytes(str(image))
    array = decode_image(bytes(image)) if isinstance(image, (bytes, bytearray)) else np.asarray(image)
    device = next(model.parameters()).device
    dtype = next(model.projector.parameters()).dtype
    pixels = processor([array]).to(device=device, dtype=dtype)
    answer = model.chat(pixels, [instruction], tokenizer, **generation)[0]
    return ChatResult(instruction, answer, model.class_names, array.shape[:2]), array


def overlay_png(image: np.ndarray, result: ChatResult, path: str | Path) -> Path:
    """Write the image with every mask of ``result`` drawn in (fill, outline, class label)."""
    from PIL import Image

    from geopix.plotting import pyplot

    plt = pyplot()

    height, width = image.shape[:2]
    shown = image.astype(np.float32) / 255
    fig_width = 7.0
    fig, ax = plt.subplots(figsize=(fig_width, fig_width * height / width + 0.9), dpi=120)
    summary = result.as_dict()["masks"]
    for k, mask in enumerate(result.answer.masks):
        full = np.asarray(
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
        ) > 0
        colour = TARGET_COLOURS[k % len(TARGET_COLOURS)]
        shown[full] = 0.5 * shown[full] + 0.5 * colour
        if full.any():
            ax.contour(full, levels=[0.5], colors=[colour], linewidths=1.2)
            ys, xs = np.nonzero(full)
            label = f"{k}: {summary[k]['class']} {summary[k]['class_probability']:.2f}"
            ax.text(xs.min(), max(ys.min() - 4, 0), label, color="white", fontsize=8, va="bottom",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    ax.imshow(shown, interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    runs = itertools.count()
    answer = ANY_SEG_RUN.sub(lambda _: f"⟨mask {next(runs)}⟩", result.answer.text)  # long runs → labels
    title = f"Q: {result.instruction}\nA: {answer}"
    ax.set_title(title if len(title) < 240 else title[:237] + "…", fontsize=8, loc="left", wrap=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def run_chat(
    model_uri: str,
    image: str,
    instruction: str,
    out: str | Path,
    *,
    device: str = "cpu",
    answer_json: str | Path | None = None,
    **generation: Any,
) -> dict[str, Any]:
    """Load a saved model (local or S3), answer, write the overlay PNG (and JSON); return the summary."""
    from geopix.storage import local_copy

    model, tokenizer, processor = GeoPixModel.load_pretrained(local_copy(model_uri), device=device)
    result, array = chat_image(model, tokenizer, processor, image, instruction, **generation)
    summary = result.as_dict() | {"overlay": str(overlay_png(array, result, out))}
    if answer_json:
        Path(answer_json).write_text(json.dumps(summary, indent=2))
    return summary


