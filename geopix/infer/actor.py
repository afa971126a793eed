"""The model as a Ray Data actor: what evaluation's and batch segmentation's actor pools share."""

from __future__ import annotations

from typing import Any

from geopix.config import GeoPixConfig


class ModelActor:
    """Loads one published model once per actor (``threads`` torch threads, on ``device``); a
    subclass answers each batch Ray Data hands it with ``self.model``."""

    def __init__(self, model_uri: str, config: dict[str, Any], threads: int, device: str):
        import torch

        from geopix.model.modeling import GeoPixModel
        from geopix.storage import local_copy

        torch.set_num_threads(threads)
        self.config = GeoPixConfig.model_validate(config)
        self.model, self.tokenizer, self.processor = GeoPixModel.load_pretrained(local_copy(model_uri), device=device)
        self.device = device
        self.dtype = next(self.model.projector.parameters()).dtype
