"""The model's own config: everything that fixes a GeoPix model's architecture and token ids.

As transformers' ``LlavaConfig`` is for LLaVA, this is what :class:`~geopix.model.GeoPixModel` is
built from and what a saved model directory holds (``geopix_config.json``). It knows nothing of
the pipeline: where pretrained weights lie and how training adapts them are the pipeline config's
(:class:`geopix.config.ModelConfig`), which :func:`~geopix.model.build_model` turns into one of
these. A model records here what its weights went through (pretrained LLM/projector, LoRA,
trainable token rows, stage), so loading rebuilds the same modules and training keeps its policy.

Format 1 (GeoPix before this class existed: the pipeline's ``ModelConfig`` dump plus token ids
and the LLM's config) is read by :meth:`GeoPixModelConfig.from_dict` too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from geopix.imaging import ImageFormat
from geopix.vocabulary import SegVocabulary

CONFIG_FILE = "geopix_config.json"
FORMAT_VERSION = 2


@dataclass
class GeoPixModelConfig:
    text_config: dict[str, Any]  # the LLaMA's ``LlamaConfig`` (its dict), vocabulary size included
    image_token_id: int
    seg_token_ids: list[int]  # one run: seg_token_num × num_scales ids
    pad_token_id: int = 0
    vision_encoder: str = "efficientnet_lite0"  # or "clip"
    vision_config: dict[str, Any] | None = None  # CLIP's ``CLIPVisionConfig`` (its dict)
    image_size: int = 256
    fine_feature_stride: int = 16  # EfficientNet-lite0's finer level (4, 8 or 16)
    seg_token_num: int = SegVocabulary.tokens_per_scale
    num_scales: int = SegVocabulary.num_scales
    decoder_dim: int = 64
    mask_grid_stride: int = 16
    fine_scale: str = "full"  # scales after the first: "full" (transformer) or "light" (readout)
    mask_position_embedding: str = "linear"  # "fourier", "linear_fourier": the decoder's places (geopix.config)
    match_targets: bool = True  # several runs paired with their targets by Hungarian matching
    mask_bce_weight: float = 2.0
    mask_dice_weight: float = 0.5
    mask_prior_weight: float = 0.0  # BCE of each scale's 8×8 prior against the target's coarse mask
    image_class_map_weight: float = 0.0  # BCE of a per-image-token class map (geopix.config); 0: no head
    image_presence_weight: float = 0.0  # BCE of the class map's most confident token vs presence (geopix.config)
    class_reader_weight: float = 0.0  # the class reader's map losses (geopix.config); 0: no reader
    class_reader_image_weight: float = 0.0  # its picture-level losses from class_counts (geopix.config)
    class_reader_tokens: str = "after_image"  # or "on_class_words" (geopix.config)
    class_reader_count_loss: str = "log_l1"  # or "poisson" (geopix.config)
    class_reader_word_scale: float = 0.0  # on_class_words: the summary × word RMS; 0: as it is (geopix.config)
    text_loss_mean: str = "token"  # or "answer": each answer's mean token loss weighs the same
    memory_len: int = 8
    memory_dim: int = 64
    num_classes: int = 8
    memory_ema_momentum: float = 0.0
    memory_read_dropout: float = 0.0  # training only: a target's read left out with this probability
    class_names: list[str] = field(default_factory=list)  # the class head's classes, in order
    # Per class, the token sequences of the words that name it (geopix.model.class_reader.class_word_ids).
    class_word_ids: list[list[list[int]]] = field(default_factory=list)
    chat_template: int = 1  # geopix.chat_template's version it was trained with (1: saved before versions)
    image_token_positions: bool = False  # a learned embedding per image-token place (geopix.config)
    class_reader_colours: bool = False  # each class's summary also carries its mean colour (geopix.config)
    image_colour_cells: int = 0  # k: each image token also reads its k × k cells' mean colour (geopix.config)
    mask_colour_reader: bool = False  # the word after a seg run reads its mask's mean colour (geopix.config)
    mask_colour_word_weight: float = 0.0  # the reader alone names the colour a target's phrase says (geopix.config)
    # The authors' release decodes differently (imported checkpoints, docs/release_checkpoint.md):
    mask_decoder: str = "geopix"  # or "release" (geopix/model/release_mask.py)
    release_neck_dim: int = 512  # the release necks' middle width
    seg_hidden_offset: int = 0  # −1: a seg token's prompt is the hidden state that predicted it
    seg_token_weighting: str = "softmax"  # or "linear": free weights of a scale's seg tokens
    image_channel_order: str = "rgb"  # "bgr": the release's weights read OpenCV's arrays (geopix.imaging)
    image_resample: str = "bilinear"  # or "bicubic", as the release's CLIP processor resizes
    # What the weights went through (training's stage policy reads these; loading rebuilds adapters).
    llm_pretrained: bool = False
    projector_pretrained: bool = False
    lora: dict[str, int] | None = None  # {"r": …, "alpha": …} once LoRA is in the LLM
    trainable_token_ids: list[int] = field(default_factory=list)  # rows trained as peft deltas
    stage: int = 0  # the last training stage set (0: none)

    def __post_init__(self) -> None:
        if self.memory_ema_momentum > 0 and self.memory_dim != self.decoder_dim:
            raise ValueError("memory_ema_momentum needs memory_dim == decoder_dim (features are written as slots)")
        if len(self.seg_token_ids) != self.seg_vocabulary.run_length:
            raise ValueError(f"{len(self.seg_token_ids)} seg token ids for a run of {self.seg_vocabulary.run_length} "
                             f"(seg_token_num × num_scales: {self.seg_vocabulary.run})")  # fmt: skip
        if self.mask_decoder not in ("geopix", "release"):
            raise ValueError(f"mask_decoder {self.mask_decoder!r}: expected 'geopix' or 'release'")
        if self.class_reader_tokens not in ("after_image", "on_class_words"):
            raise ValueError(f"class_reader_tokens {self.class_reader_tokens!r}: expected 'after_image' or 'on_class_words'")
        if self.class_reader_count_loss not in ("log_l1", "poisson"):
            raise ValueError(f"class_reader_count_loss {self.class_reader_count_loss!r}: expected 'log_l1' or 'poisson'")
        if self.seg_hidden_offset not in (0, -1):
            raise ValueError(f"seg_hidden_offset {self.seg_hidden_offset!r}: expected 0 or -1")
        ImageFormat(channel_order=self.image_channel_order, resample=self.image_resample)  # checks both
        if not self.class_names:
            self.class_names = [f"class_{k}" for k in range(self.num_classes)]

    @property
    def seg_vocabulary(self) -> SegVocabulary:
        return SegVocabulary(self.seg_token_num, self.num_scales)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    # ---------------------------------------------------------------------------- save / load
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GeoPixModelConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{directory}: not a GeoPix model directory (no {CONFIG_FILE})")
        return cls.from_dict(json.loads(path.read_text()), str(path))

    @classmethod
    def from_dict(cls, saved: dict[str, Any], source: str = CONFIG_FILE) -> GeoPixModelConfig:
        """A saved config of any format GeoPix has written (``source`` names it in errors)."""
        version = saved.get("format_version")
        if version == 1:
            saved = _from_format_1(saved)
        elif version != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {version!r}; this GeoPix reads 1 and {FORMAT_VERSION}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - names - {"format_version"})
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (written by a newer GeoPix?)")
        return cls(**{k: v for k, v in saved.items() if k in names})


def saved_model_config(model_uri: str) -> GeoPixModelConfig:
    """The config of a saved model directory, local or in S3, without reading its weights (its
    class names, input size, seg tokens: what a run with the model checks its data against)."""
    from geopix import storage

    uri = storage.join_uri(model_uri, CONFIG_FILE)
    try:
        saved = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, storage.StorageError):
        raise ValueError(f"{model_uri}: not a GeoPix model (no {CONFIG_FILE})") from None
    return GeoPixModelConfig.from_dict(saved, uri)


def _from_format_1(saved: dict[str, Any]) -> dict[str, Any]:
    """Format 1 → this class's fields: the pipeline's model section held the architecture, and
    whether an LLM/projector was pretrained was whether the config named its weights."""
    model = saved["model"]
    shared = {f.name for f in fields(GeoPixModelConfig)} & set(model)
    return {
        **{k: model[k] for k in shared},
        "text_config": {**saved["llm_config"], "vocab_size": saved["vocab_size"]},
        "vision_config": saved.get("vision_config"),
        "image_token_id": saved["image_token_id"],
        "seg_token_ids": saved["seg_token_ids"],
        "pad_token_id": saved["pad_token_id"],
        "class_names": saved.get("class_names") or [],
        "llm_pretrained": bool(model.get("llm_weights")),
        "projector_pretrained": bool(model.get("projector_weights")),
        "lora": {"r": model["lora_rank"], "alpha": model["lora_alpha"]} if saved["lora"] else None,
        "trainable_token_ids": saved.get("trainable_token_ids") or [],
        "stage": saved["stage"],
    }
