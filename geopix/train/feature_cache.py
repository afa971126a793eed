"""Frozen vision features computed once per image (``train.vision_feature_cache_mb``).

The vision encoder is frozen, so an image's features never change while the rest trains; a third
of the tiny step went into recomputing them every epoch (docs/performance.md). The cache keeps
each image's features in its upright orientation, keyed by a hash of the upright pixels (never by
an id a dataset might reuse), in a worker's memory with least-recently-used eviction.

Augmentation turns a sample's image by one of the 8 flips/rotations of the square
(geopix/data/augment.py). The cache undoes that on the pixels to find the upright image, and gives
the sample the same flip/rotation applied to the upright image's feature maps. That is
augmentation in feature space: a CNN is not equivariant to rotation, so T(E(x)) is not E(T(x)),
and the learning bar compares the two (docs/evaluation.md). With the identity transform the
features are exactly E(x).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from geopix.data.augment import TRANSFORM_BY_NAME, Transform


def transform_maps(transform: Transform, maps: torch.Tensor) -> torch.Tensor:
    """[..., H, W] tensors flipped/rotated as :meth:`Transform.image` does an H×W(×C) array."""
    if transform.swap:
        maps = maps.transpose(-1, -2)
    if transform.flip_x:
        maps = maps.flip(-1)
    if transform.flip_y:
        maps = maps.flip(-2)
    return maps


def undo_transform_maps(transform: Transform, maps: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`transform_maps`: the upright [..., H, W] tensors."""
    if transform.flip_y:
        maps = maps.flip(-2)
    if transform.flip_x:
        maps = maps.flip(-1)
    if transform.swap:
        maps = maps.transpose(-1, -2)
    return maps


def pixel_key(upright: torch.Tensor) -> bytes:
    """A digest of one upright image's pixel values (any dtype, any device)."""
    data = upright.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).digest()


class VisionFeatureCache:
    """``cache(pixel_values, transforms)`` → the encoder's ``(feat_lo, feat_hi, tokens)`` for a batch.

    ``transforms`` are the batch's transform names (``batch["transforms"]``). Tokens are rebuilt
    from the (transformed) deeper map: both encoders' tokens are that map flattened row by row
    (geopix/model/vision.py).
    """

    def __init__(self, encoder: torch.nn.Module, max_bytes: int):
        self.encoder = encoder
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @torch.no_grad()
    def __call__(
        self, pixel_values: torch.Tensor, transforms: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(transforms) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(transforms)} transform names")
        steps = [TRANSFORM_BY_NAME[name] for name in transforms]
        upright = [undo_transform_maps(t, image) for t, image in zip(steps, pixel_values, strict=True)]
        keys = [pixel_key(image) for image in upright]
        found: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in keys:
            if key in self.entries and key not in found:
                self.entries.move_to_end(key)
                found[key] = self.entries[key]
        new = list(dict.fromkeys(k for k in keys if k not in found))  # an image twice in a batch: once
        self.misses += len(new)  # images the encoder ran on
        self.hits += len(keys) - len(new)
        if new:
            first = {key: keys.index(key) for key in new}
            lo, hi, _ = self.encoder(torch.stack([upright[first[key]] for key in new]))
            for j, key in enumerate(new):
                found[key] = (lo[j].clone(), hi[j].clone())  # clone: a row must not pin the batch
                self._store(key, found[key])
        feat_lo = torch.stack([transform_maps(t, found[k][0]) for t, k in zip(steps, keys, strict=True)])
        feat_hi = torch.stack([transform_maps(t, found[k][1]) for t, k in zip(steps, keys, strict=True)])
        return feat_lo.contiguous(), feat_hi.contiguous(), feat_hi.flatten(2).transpose(1, 2)

    def _store(self, key: bytes, features: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in features)
        if size > self.max_bytes:
            return
        self.entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (lo, hi) = self.entries.popitem(last=False)
            self.bytes -= lo.numel() * lo.element_size() + hi.numel() * hi.element_size()
            self.evictions += 1

    def stats(self) -> dict[str, float]:
        """Counters for metrics (``feature_cache/…``)."""
        looked_up = self.hits + self.misses
        return {
            "hit_rate": self.hits / looked_up if looked_up else 0.0,
            "images": len(self.entries),
            "mb": self.bytes / 2**20,
            "evictions": self.evictions,
        }
