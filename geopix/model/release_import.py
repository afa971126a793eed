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
from typing import Any

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


# ------------------------------------------------------------------------------ the whole checkpoint
MASK_PARTS = ("seg", "pec", "clm")
PTH_FILES = ("image_neck_rough.pth", "image_neck_detail.pth", "text_hidden_fcs.pth",
             "multiseg_scalar.pth", "multiscale_scalar.pth")  # fmt: skip


def _vlm_key(key: str) -> str | None:
    """A ``vlm/`` (transformers LLaVA) tensor → GeoPix key, for the layouts before and after
    transformers 4.52 (None: a buffer GeoPix rebuilds, such as CLIP's ``position_ids``)."""
    key = key.removeprefix("model.")
    if key.endswith("position_ids"):
        return None
    if key.startswith("vision_tower."):
        return "vision.clip." + key.removeprefix("vision_tower.").removeprefix("vision_model.")
    if m := re.match(r"multi_modal_projector\.linear_([12])\.(weight|bias)$", key):
        return f"projector.{0 if m[1] == '1' else 2}.{m[2]}"
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "llm.lm_head.weight"
    if key.startswith("language_model."):
        rest = key.removeprefix("language_model.")
        return "llm.model." + rest.removeprefix("model.")
    raise ReleaseImportError(f"vlm/: tensor {key!r} is none of the LLaVA parts GeoPix knows")


def _read_safetensors_dir(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        files = sorted(directory.glob("pytorch_model*.bin"))
        if not files:
            raise ReleaseImportError(f"{directory}: no weights (*.safetensors or pytorch_model*.bin)")
        # PyTorch's restricted loader: tensors and plain containers only, never code
        return {k: v for path in files for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    out: dict[str, torch.Tensor] = {}
    for path in files:
        out.update(load_file(str(path)))
    return out


def read_release(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a release checkpoint directory, named ``<part>/<key>`` (``vlm/…``, ``seg/…``,
    ``image_neck_rough.pth/conv1.0.weight``, ``multiseg_scalar.pth/0``, …)."""
    from pathlib import Path

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for part in ("vlm", *MASK_PARTS):
        if not (directory / part).is_dir():
            raise ReleaseImportError(f"{directory}: no {part}/ (not a GeoPix release checkpoint?)")
        tensors |= {f"{part}/{k}": v for k, v in _read_safetensors_dir(directory / part).items()}
    for name in PTH_FILES:
        path = directory / name
        if not path.exists():
            raise ReleaseImportError(f"{directory}: no {name}")
        # PyTorch's restricted loader: tensors and plain containers only, never code
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        items = enumerate(loaded) if isinstance(loaded, (list, tuple)) else loaded.items()
        for key, value in items:
            if not isinstance(value, torch.Tensor):
                raise ReleaseImportError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
            tensors[f"{name}/{key}"] = value
    return tensors


def release_state(release: Mapping[str, torch.Tensor], num_scales: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(GeoPix state dict, {dropped: reason}) for a whole release checkpoint's tensors."""
    mask = {k: v for k, v in release.items() if not k.startswith("vlm/")}
    ours, dropped = release_mask_state(mask, num_scales)
    for name, tensor in release.items():
        if name.startswith("vlm/"):
            key = _vlm_key(name.removeprefix("vlm/"))
            if key is None:
                dropped[name] = "a buffer GeoPix rebuilds"
            else:
                ours[key] = tensor
    return ours, dropped


def _json(path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReleaseImportError(f"{path}: missing") from None
    except ValueError as exc:
        raise ReleaseImportError(f"{path}: not JSON ({exc})") from None


PROCESSOR_CONFIG = "preprocessor_config.json"  # the release's CLIPImageProcessor, at the checkpoint's root
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def release_image_resample(directory, image_size: int) -> str:
    """The resampling of the release's image processor (``preprocessor_config.json``, which its
    processor reads from the checkpoint's root; CLIP's bicubic where the file is absent). Its
    mean/std must be CLIP's (GeoPix's CLIP encoder normalises with those) and its crop the vision
    tower's input size. GeoPix stretches a non-square image where the release crops its centre
    (docs/release_checkpoint.md), so square images go in exactly as the release has them."""
    from pathlib import Path

    from geopix.model.vision import CLIP_MEAN, CLIP_STD

    path = Path(directory) / PROCESSOR_CONFIG
    if not path.exists():
        return "bicubic"
    values = _json(path)
    for key, ours in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        theirs = values.get(key, ours)
        if len(theirs) != 3 or any(abs(float(a) - b) > 1e-6 for a, b in zip(theirs, ours)):
            raise ReleaseImportError(f"{path}: {key} {theirs}, GeoPix's CLIP encoder normalises with {list(ours)}")
    resample = values.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise ReleaseImportError(f"{path}: resample {resample!r}; GeoPix reads 2 (bilinear) and 3 (bicubic)")
    crop = values.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, Mapping) else crop
    if values.get("do_center_crop", True) and int(crop) != image_size:
        raise ReleaseImportError(f"{path}: crop_size {crop}, the vision tower reads {image_size} px")
    return PIL_RESAMPLE[resample]


def release_model_config(directory, tokenizer: Any, release: Mapping[str, torch.Tensor], memory_len: int = 0):
    """The :class:`GeoPixModelConfig` of a release checkpoint: its LLaVA's configs, its token ids,
    the release's mask path (``mask_decoder="release"``) and GeoPix's class memory of ``memory_len``."""
    from pathlib import Path

    from geopix.model.configuration import GeoPixModelConfig
    from geopix.vocabulary import IMAGE_TOKEN, SegVocabulary

    directory = Path(directory)
    root, vlm, seg = _json(directory / "config.json"), _json(directory / "vlm" / "config.json"), _json(directory / "seg" / "config.json")
    clm = _json(directory / "clm" / "config.json")
    text = _json(directory / "vlm" / "text" / "config.json") if (directory / "vlm" / "text").is_dir() else vlm["text_config"]
    vision = _json(directory / "vlm" / "vision" / "config.json") if (directory / "vlm" / "vision").is_dir() else vlm["vision_config"]
    vocab = SegVocabulary(int(root.get("seg_token_num", 3)), int(seg.get("image_feature_scale_num", 2)))
    seg_ids = vocab.token_ids(tokenizer)
    embed = release["vlm/language_model.model.embed_tokens.weight"] if "vlm/language_model.model.embed_tokens.weight" in release else release.get("vlm/model.language_model.embed_tokens.weight")
    if embed is None:
        raise ReleaseImportError(f"{directory}/vlm: no token embedding (language_model.model.embed_tokens.weight)")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    configured = vlm.get("image_token_index", vlm.get("image_token_id", image_token_id))
    if configured != image_token_id:
        raise ReleaseImportError(f"{directory}/vlm/config.json: image token {configured}, the tokenizer's {IMAGE_TOKEN} is {image_token_id}")
    return GeoPixModelConfig(
        text_config={**text, "vocab_size": int(embed.shape[0])},
        image_token_id=image_token_id,
        seg_token_ids=seg_ids,
        pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        vision_encoder="clip",
        vision_config=vision,
        image_size=int(vision["image_size"]),
        seg_token_num=vocab.tokens_per_scale,
        num_scales=vocab.num_scales,
        decoder_dim=int(seg.get("prompt_embed_dim", 256)),
        mask_bce_weight=float(root.get("bce_loss_weight", 2.0)),
        mask_dice_weight=float(root.get("dice_loss_weight", 0.5)),
        memory_len=memory_len,
        memory_dim=int(seg.get("prompt_embed_dim", 256)),
        num_classes=int(clm.get("num_class", 75)),
        mask_decoder="release",
        release_neck_dim=int(release["image_neck_rough.pth/conv1.0.weight"].shape[0]),
        seg_hidden_offset=-1,
        seg_token_weighting="linear",
        # As the release reads images and prompts (docs/release_checkpoint.md): OpenCV's BGR arrays,
        # its processor's resampling, LLaVA v1's system sentence.
        image_channel_order="bgr",
        image_resample=release_image_resample(directory, int(vision["image_size"])),
        chat_template=3,
        llm_pretrained=True,
        projector_pretrained=True,
    )


GEOPIX_OWN = ("class_head.", "mask_predictor.memory.")  # GeoPix's additions: they keep their start
REPORT_FILE = "import_report.json"
REPORTED_CONFIG = ("mask_decoder", "seg_hidden_offset", "seg_token_weighting", "image_size", "decoder_dim",
                   "num_classes", "memory_len", "image_channel_order", "image_resample", "chat_template")  # fmt: skip


def import_release(directory, out_dir, *, memory_len: int = 0) -> dict[str, Any]:
    """A GeoPix model directory at ``out_dir`` (local) from a release checkpoint ``directory``;
    returns the import report (also written beside the model as ``import_report.json``)."""
    import json
    from collections import Counter
    from pathlib import Path

    from transformers import AutoTokenizer

    from geopix.model.modeling import GeoPixModel

    directory = Path(directory)
    release = read_release(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ReleaseImportError(f"{directory}: no readable tokenizer at the checkpoint's root ({exc})") from None
    config = release_model_config(directory, tokenizer, release, memory_len)
    # Built on the meta device and given the release's own tensors (assign): a 7B release is held
    # once, in its own precision, not a second time in a float32 model (GeoPixModel.load casts).
    with torch.device("meta"):
        model = GeoPixModel(config)
    state, dropped = release_state(release, config.num_scales)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ReleaseImportError(f"release tensors with no GeoPix place: {', '.join(unexpected[:8])}")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ReleaseImportError(
            "shapes differ: " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5])
        )
    missing = sorted(set(expected) - set(state))
    not_own = [k for k in missing if not k.startswith(GEOPIX_OWN)]
    if not_own:
        raise ReleaseImportError(f"GeoPix parameters the release does not give: {', '.join(not_own[:8])}")
    model.load_state_dict(state, strict=False, assign=True)
    for prefix in GEOPIX_OWN:  # GeoPix's own modules, at their start (the release's output unchanged)
        if any(k.startswith(prefix) for k in missing):
            own = model.get_submodule(prefix.rstrip("."))
            own.to_empty(device="cpu")
            own.reset_parameters()
    unset = [k for k, v in model.state_dict().items() if v.is_meta]
    if unset:
        raise ReleaseImportError(f"GeoPix parameters left without a value: {', '.join(unset[:8])}")
    model.save(out_dir, tokenizer)
    reasons = Counter(dropped.values())
    report = {
        "source": str(directory),
        "release_tensors": len(release),
        "mapped": len(release) - len(dropped),
        "dropped": {reason: n for reason, n in sorted(reasons.items())},
        "dropped_tensors": sorted(dropped),
        "geopix_own_at_their_start": missing,
        "config": {k: getattr(config, k) for k in REPORTED_CONFIG},
    }
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report
