"""Weights a config names, as local files: fetched before a model is built.

The model package reads local files only. What a config names — ``model.vision_weights``,
``model.llm_weights``, ``model.projector_weights`` — may be S3 prefixes; they are fetched here into
the local cache (``storage.local_copy``: once, refreshed by ETag, refused without the ``_SUCCESS``
marker of a finished upload), as a published model directory is with ``storage.local_copy`` itself.
"""

from __future__ import annotations

from geopix import storage
from geopix.config import ModelConfig

WEIGHT_KEYS = ("vision_weights", "llm_weights", "projector_weights")


def local_weights(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every S3 weight location replaced by its local copy (local ones as they are)."""
    fetched = {
        key: str(storage.local_copy(getattr(cfg, key)))
        for key in WEIGHT_KEYS
        if getattr(cfg, key) and storage.is_s3_uri(getattr(cfg, key))
    }
    return cfg.model_copy(update=fetched)
