"""Image arrays as every GeoPix stage reads them: decoding (PNG/JPEG/TIFF, 16-bit and float
stretched), resizing to the model's square input, and an encoder's input format (channel order,
normalisation).

Training batches (:mod:`geopix.data.batches`) and the model's processor both go through here, so
an image is the same array on every path.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

# The vision encoders' input normalisation (ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNEL_ORDERS = ("rgb", "bgr")
RESAMPLINGS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class ImageFormat:
    """How an H×W×3 uint8 RGB image becomes a vision encoder's input: resampled to the square
    input size, its channels in the order the weights were trained on, scaled to [0, 1] and
    normalised. GeoPix trains RGB and bilinear; the authors' release was trained and answers on
    OpenCV's BGR arrays resized bicubically (docs/release_checkpoint.md), which its imported
    model keeps."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "rgb"
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel order {self.channel_order!r}: expected one of {CHANNEL_ORDERS}")
        if self.resample not in RESAMPLINGS:
            raise ValueError(f"resampling {self.resample!r}: expected one of {RESAMPLINGS}")

    def resize(self, image: np.ndarray, size: int) -> np.ndarray:
        return resize_image(image, size, self.resample)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """[B, S, S, 3] uint8 RGB → ``pixel_values [B, 3, S, S]`` float32."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        if self.channel_order == "bgr":
            pixels = pixels.flip(1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return pixels.sub_(mean).div_(std)


class UndecodableImage(ValueError):
    """Bytes that no decoder reads as an image (the message says which decoder refused and why)."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded PNG/JPEG/TIFF bytes → H×W×3 uint8 RGB.

    Palette, grey, alpha and CMYK images are converted by Pillow; 16-bit and float images are
    stretched from their 2nd–98th percentile to 0–255 (the usual display stretch for remote
    sensing); multi-band TIFFs Pillow cannot open are read with rasterio (first three bands).
    EXIF orientation is ignored on purpose: masks are stored in the pixel order of the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _pil_to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_to_rgb(data)
        raise UndecodableImage(str(exc)) from None


def _pil_to_rgb(image) -> np.ndarray:
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _stretch(np.asarray(image)[None])
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _tiff_to_rgb(data: bytes) -> np.ndarray:
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as memfile, memfile.open() as dataset:
            bands = dataset.read(indexes=list(range(1, min(3, dataset.count) + 1)))
    except (RasterioError, OSError, ValueError) as exc:
        raise UndecodableImage(f"TIFF: {exc}") from None
    return _stretch(bands)


def _stretch(bands: np.ndarray) -> np.ndarray:
    """[C, H, W] any dtype → H×W×3 uint8; one or two bands become grey."""
    if bands.dtype != np.uint8:
        values = bands.astype(np.float32)
        low, high = np.percentile(values, (2, 98))
        scale = 255.0 / (high - low) if high > low else 0.0
        bands = np.clip((values - low) * scale, 0, 255).astype(np.uint8)
    if bands.shape[0] < 3:
        bands = np.repeat(bands[:1], 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(bands[:3], 0, -1))


GEOPIX_IMAGE_FORMAT = ImageFormat()  # what GeoPix's own models read: RGB, bilinear, ImageNet statistics


def resize_image(image: np.ndarray, size: int, resample: str = "bilinear") -> np.ndarray:
    """H×W×3 uint8 → size×size×3 (``resample``: "bilinear" or "bicubic"). Non-square images are
    stretched, not cropped or padded, so that boxes written in text (fractions of the image) and
    masks stay in the image's own frame."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    return np.asarray(Image.fromarray(image).resize((size, size), filters[resample]))


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """N×H×W → N×size×size, nearest neighbour at pixel centres (labels stay binary)."""
    _, height, width = masks.shape
    if (height, width) == (size, size):
        return masks
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return masks[:, rows[:, None], cols[None, :]]
