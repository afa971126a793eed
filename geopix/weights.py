"""Weights a config names, as local files: fetched before a model is built or loaded.

The model package reads local files only. What a config names — ``model.vision_weights``,
``model.llm_weights``, ``model.projector_weights`` — and a published model's directory may be S3
prefixes; they are fetched here into the local cache (``storage.local_copy``: once, refreshed by
ETag, refused without the ``_SUCCESS`` marker of a finished upload).
"""

from __future__ import annotations

from pathlib import Path

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


def local_model_dir(uri: str | Path) -> Path:
    """A saved model directory (local, or an S3 prefix of a finished upload) as a local path."""
    return storage.local_copy(uri)
