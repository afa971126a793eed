"""The GeoPix authors' released checkpoint → GeoPix weights: every upstream tensor mapped to the
GeoPix parameter that computes the same, or dropped with the reason (docs/release_checkpoint.md).

This module maps the mask path (``seg/``, ``pec/``, ``clm/``, the necks, ``text_hidden_fcs`` and the
two scalar lists) onto :class:`~geopix.model.release_mask.ReleaseMaskPredictor` and the seg
projection; the release's vision tower, projector and LLM (``vlm/``) are transformers modules
whose weights GeoPix's ``vision.clip``, ``projector`` and ``llm`` take under their own names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# The release's unused parts, and why nothing of them can reach an answer.
DROPPED = (
    (r"^seg/mask_decoder\.output_hypernetworks_mlps\.[1-9]\d*\.",
     "a mask token's hypernetwork other than the first: the release reads out one mask (multimask off)"),
    (r"^seg/mask_decoder\.iou_prediction_head\.", "the IoU prediction: computed and discarded by the release"),
    (r"^pec/prompt_encoder\.(point_embeddings|not_a_point_embed|mask_downscaling)\.",
     "point, box and mask prompts: the release never gives any"),
    (r"^clm/(memory_encoder|learnable_memory|memory_fuser)\.",
     "the class memory's slots, encoder and fuser: they feed only attention results the release discards"),
    (r"^clm/memory_attention\.layers\.0\.(self_attn|self_attn_pos|cross_attn_image|cross_attn_image_pos|linear1|linear2|norm1|norm2|norm3)\.",
     "the memory layer's attention and MLP: the release discards their results (its output is the normalised input)"),
)  # fmt: skip

_TRANSFORMER_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "norm3": "layer_norm3",
                        "norm4": "layer_norm4", "norm_final_attn": "layer_norm_final_attn"}  # fmt: skip


class ReleaseImportError(ValueError):
    """A release checkpoint that cannot be imported; the message names the file and tensor."""


def _dropped(name: str) -> str | None:
    for pattern, reason in DROPPED:
        if re.match(pattern, name):
            return reason
    return None


def _transformer_key(rest: str) -> str:
    parts = rest.split(".")
    return ".".join(_TRANSFORMER_RENAMES.get(p, p) for p in parts)


def _mask_key(name: str) -> str | None:
    """Upstream ``<part>/<key>`` → GeoPix state-dict key (None: not a mask-path tensor)."""
    part, key = name.split("/", 1)
    if part == "seg":
        key = key.removeprefix("mask_decoder.")
        if m := re.match(r"transformer\.(\d+)\.(.+)$", key):
            return f"mask_predictor.transformers.{m[1]}.{_transformer_key(m[2])}"
        if m := re.match(r"output_hypernetworks_mlps\.0\.layers\.(\d)\.(weight|bias)$", key):
            return f"mask_predictor.hypernetwork.{2 * int(m[1])}.{m[2]}"
        simple = {"iou_token.weight": "iou_token", "mask_tokens.weight": "mask_tokens", "level_embed.weight": "level_embed",
                  "pe1.positional_encoding_gaussian_matrix": "fourier.1"}  # fmt: skip
        if key in simple:
            return f"mask_predictor.{simple[key]}"
        if m := re.match(r"(upsample_2x|output_upscaling)\.([01])\.(weight|bias)$", key):
            module = "upsample" if m[1] == "upsample_2x" else "output_upscaling"
            return f"mask_predictor.{module}.{m[2]}.{m[3]}"
    if part == "pec":
        simple = {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": "fourier.0",
                  "prompt_encoder.no_mask_embed.weight": "no_mask_embed"}  # fmt: skip
        return f"mask_predictor.{simple[key]}" if key in simple else None
    if part == "clm":
        simple = {"memory_attention.layers.0.scale": "norm.scale", "memory_attention.norm.weight": "norm.norm.weight",
                  "memory_attention.norm.bias": "norm.norm.bias"}  # fmt: skip
        return f"mask_predictor.{simple[key]}" if key in simple else None
    if part in ("image_neck_rough.pth", "image_neck_detail.pth"):  # rough: CLIP layer −2, level 0
        return f"mask_predictor.necks.{0 if 'rough' in part else 1}.{key}"
    if part == "text_hidden_fcs.pth":
        return f"seg_projection.mlp.{key}"
    return None


def release_mask_state(
    release: Mapping[str, torch.Tensor], num_scales: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(GeoPix tensors, {dropped upstream tensor: reason}) from the release's mask-path tensors,
    named ``<part>/<key>`` (``seg/mask_decoder.iou_token.weight``, ``multiseg_scalar.pth/0``, …).
    Every tensor is mapped or dropped with its reason; one neither is an error naming it."""
    ours: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    fourier: dict[int, torch.Tensor] = {}
    unknown = []
    for name, tensor in release.items():
        part = name.split("/", 1)[0]
        if part in ("multiseg_scalar.pth", "multiscale_scalar.pth"):
            continue
        reason = _dropped(name)
        if reason is not None:
            dropped[name] = reason
            continue
        key = _mask_key(name)
        if key is None:
            unknown.append(name)
        elif key.startswith("mask_predictor.fourier."):
            fourier[int(key.rsplit(".", 1)[1])] = tensor
        elif key.endswith(("mask_predictor.iou_token", "mask_predictor.no_mask_embed")) and tensor.dim() == 2:
            ours[key] = tensor[0] if key.endswith("no_mask_embed") else tensor
        else:
            ours[key] = tensor
    if unknown:
        raise ReleaseImportError(f"release tensors GeoPix does not know: {', '.join(sorted(unknown)[:8])}")
    if sorted(fourier) != list(range(num_scales)):
        raise ReleaseImportError(f"positional encodings for levels {sorted(fourier)}; the release has {num_scales}")
    ours["mask_predictor.fourier"] = torch.stack([fourier[s] for s in range(num_scales)])
    for part, key, size in (("multiseg_scalar.pth", "seg_projection.token_logits", None),
                            ("multiscale_scalar.pth", "mask_predictor.scale_mix", num_scales)):  # fmt: skip
        values = [release[n].reshape(()) for n in sorted((n for n in release if n.startswith(part + "/")),
                                                          key=lambda n: int(n.rsplit("/", 1)[1]))]  # fmt: skip
        if not values:
            raise ReleaseImportError(f"{part}: missing")
        weights = torch.stack(values).float()
        # the token weights are shared by the levels upstream; GeoPix keeps a row per level
        ours[key] = weights if size else weights[None].repeat(num_scales, 1)
    return ours, dropped
