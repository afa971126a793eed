"""Image preprocessing saved with a model, so inference sees exactly what training saw.

The processor is the training input's own path (:mod:`geopix.imaging`): decode (PNG/JPEG/TIFF,
16-bit and float stretched) → resize to the model's input size → the encoder's
:class:`~geopix.imaging.ImageFormat` (channel order, [0, 1], mean/std). It is stored as
``processor/processor_config.json`` (plain JSON) beside the weights; files written before the
channel order and resampling were recorded mean RGB and bilinear.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geopix.imaging import ImageFormat, decode_image
from geopix.model.layers import local_path

PROCESSOR_FILE = "processor_config.json"


@dataclass(frozen=True)
class GeoPixProcessor:
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    channel_order: str = "rgb"
    resample: str = "bilinear"

    @classmethod
    def of(cls, image_size: int, image_format: ImageFormat) -> GeoPixProcessor:
        return cls(image_size, image_format.mean, image_format.std, image_format.channel_order, image_format.resample)

    @property
    def image_format(self) -> ImageFormat:
        return ImageFormat(self.image_mean, self.image_std, self.channel_order, self.resample)

    def image_array(self, image: Any) -> np.ndarray:
        """One image (a local path, encoded bytes, or an H×W×3 uint8 RGB array) → size×size×3 uint8."""
        if isinstance(image, (str, Path)):
            image = local_path(image, "image").read_bytes()
        if isinstance(image, (bytes, bytearray)):
            image = decode_image(bytes(image))
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 image, got shape {array.shape} {array.dtype}")
        return self.image_format.resize(array, self.image_size)

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """Images → ``pixel_values [B, 3, S, S]`` float32, normalised."""
        return self.image_format.pixel_values(np.stack([self.image_array(image) for image in images]))

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
        return cls(values["image_size"], tuple(values["image_mean"]), tuple(values["image_std"]),
                   values.get("channel_order", "rgb"), values.get("resample", "bilinear"))  # fmt: skip
