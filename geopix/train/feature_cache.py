"""Frozen vision features computed once per image as the encoder sees it (``train.vision_feature_cache_mb``).

The vision encoder is frozen, so the features of a given picture never change while the rest
trains; without the cache the tiny step spent a third of its time recomputing them
(docs/performance.md). The cache is a memo of the encoder: per picture as handed to it (after
the sample's flip or rotation), keyed by a digest of its pixel values (never by an id a dataset
might reuse), in a worker's memory, least recently used out first. Every sample gets exactly
the encoder's features (to a batched convolution's rounding).

The memo is keyed on the turned picture, not the upright one with the turn applied to its feature
maps: a CNN is not rotation-equivariant, and training on turned feature maps cost the model its
VQA answers on the held-out split (docs/evaluation_history.md, 2026-12-05).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

Features = tuple[torch.Tensor, torch.Tensor]  # (feat_lo, feat_hi) of one picture


def pixel_key(image: torch.Tensor) -> bytes:
    """A digest of one image's pixel values (any dtype, any device)."""
    data = image.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).digest()


class VisionFeatureCache:
    """``cache(pixel_values)`` → the encoder's ``(feat_lo, feat_hi, tokens)`` for a batch, the
    encoder run only on the pictures it has not kept. Tokens are rebuilt from the deeper map:
    both encoders' tokens are that map flattened row by row (geopix/model/vision.py)."""

    def __init__(self, encoder: torch.nn.Module, max_bytes: int):
        self.encoder = encoder
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[bytes, Features] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @classmethod
    def for_training(cls, encoder: torch.nn.Module, vision_feature_cache_mb: float) -> VisionFeatureCache | None:
        """The cache ``train.vision_feature_cache_mb`` asks for; None when it is 0 (off)."""
        return cls(encoder, int(vision_feature_cache_mb * 2**20)) if vision_feature_cache_mb > 0 else None

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = [pixel_key(image) for image in pixel_values]
        found: dict[bytes, Features] = {}
        for key in keys:
            if key in self.entries and key not in found:
                self.entries.move_to_end(key)
                found[key] = self.entries[key]
        new = list(dict.fromkeys(k for k in keys if k not in found))  # a picture twice in a batch: once
        self.misses += len(new)  # pictures the encoder ran on
        self.hits += len(keys) - len(new)
        if new:
            first = {key: keys.index(key) for key in new}
            lo, hi, _ = self.encoder(pixel_values[[first[key] for key in new]])
            for j, key in enumerate(new):
                found[key] = (lo[j].clone(), hi[j].clone())  # clone: a row must not pin the batch
                self._store(key, found[key])
        feat_lo = torch.stack([found[k][0] for k in keys])
        feat_hi = torch.stack([found[k][1] for k in keys])
        return feat_lo, feat_hi, feat_hi.flatten(2).transpose(1, 2)

    def _store(self, key: bytes, features: Features) -> None:
        size = _nbytes(features)
        if size > self.max_bytes:
            return
        self.entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= _nbytes(self.entries.popitem(last=False)[1])
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


def _nbytes(features: Features) -> int:
    return sum(t.numel() * t.element_size() for t in features)
