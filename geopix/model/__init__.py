"""The GeoPix model: vision encoder, projector, LLM, seg tokens, mask predictor, class memory (stage: model)."""

from geopix.model.configuration import GeoPixModelConfig
from geopix.model.generation import ChatAnswer
from geopix.model.modeling import (
    GeoPixModel,
    GeoPixOutput,
    add_geopix_tokens,
    build_model,
    count_parameters,
    mask_losses,
    model_config,
)
from geopix.model.vision import VisionEncoder, build_vision_encoder

__all__ = [
    "ChatAnswer",
    "GeoPixModel",
    "GeoPixModelConfig",
    "GeoPixOutput",
    "VisionEncoder",
    "add_geopix_tokens",
    "build_model",
    "build_vision_encoder",
    "count_parameters",
    "mask_losses",
    "model_config",
]
