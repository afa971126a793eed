"""Image preprocessing saved with a model, so inference sees exactly what training saw.

The processor is the training input's own path (:mod:`geopix.imaging`): decode (PNG/JPEG/TIFF,
16-bit and float stretched) → bilinear resize to the model's input size → scale to [0, 1] →
normalise with the vision encoder's mean/std. It is stored as ``processor/processor_config.json``
(plain JSON) beside the weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geopix.imaging import decode_image, resize_image
from geopix.model.layers import local_path

PROCESSOR_FILE = "processor_config.json"


@dataclass(frozen=True)
class GeoPixProcessor:
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def image_array(self, image: Any) -> np.ndarray:
        """One image (a local path, encoded bytes, or an H×W×3 uint8 array) → size×size×3 uint8."""
        if isinstance(image, (str, Path)):
            image = local_path(image, "image").read_bytes()
        if isinstance(image, (bytes, bytearray)):
            image = decode_image(bytes(image))
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 image, got shape {array.shape} {array.dtype}")
        return resize_image(array, self.image_size)

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """Images → ``pixel_values [B, 3, S, S]`` float32, normalised."""
        arrays = np.stack([self.image_array(image) for image in images])
        pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return pixels.sub_(mean).div_(std)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROCESSOR_FILE).write_text(json.dumps(asdict(self), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GeoPixProcessor:
        path = Path(directory) / PROCESSOR_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no processor config")
        values = json.loads(path.read_text())
        return cls(values["image_size"], tuple(values["image_mean"]), tuple(values["image_std"]))
