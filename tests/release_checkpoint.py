"""The GeoPix release's mask path at test sizes: deterministic weights under the release's own
tensor names, its parts' configs, and the recorded outputs of the authors' modules
(``tests/data/release_mask_path.safetensors``).

The fixture was written by ``python tests/release_checkpoint.py --upstream <a checkout of the
authors' GeoPix repository>``, which builds their modules at these sizes (D = 256: their code fixes
it in places), loads the weights below and runs their inference's mask path on fixed inputs. Their
code is imported from that checkout at run time and is not part of GeoPix; the tests need only the
recorded fixture.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "data" / "release_mask_path.safetensors"
SIZES = {"dim": 256, "clip_hidden": 32, "llm_hidden": 64, "neck_mid": 512, "patches": 24, "targets": 2}
MEMORY = {"num_class": 75, "num_level": 2, "memory_len": 64, "memory_dim": 64}  # the release's: its code fixes them


def fixture_tensor(name: str, shape: list[int]) -> torch.Tensor:
    """The same values for the same name and shape, on any machine (seeded by the name)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.long)
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=generator)
    normish = ".1." in name or "norm" in name or leaf == "scale"  # BN/LN affine parameters, the prescale
    if normish and leaf == "weight" and len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    if "scalar" in name:  # the release's token and level weights: positive, near their 1/n start
        return 0.2 + 0.3 * torch.rand(shape, generator=generator)
    if "gaussian" in name:
        return torch.randn(shape, generator=generator)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=generator) / fan_in**0.5


PART_CONFIGS = {
    "seg": {"model_type": "mask_predictor", "image_feature_scale_num": 2, "prompt_embed_dim": SIZES["dim"],
            "mask_decoder_transformer_depth": 2},
    "pec": {"model_type": "prompt_encoder", "prompt_embed_dim": SIZES["dim"], "vit_patch_size": 14,
            "resize_vision_tower_size": 448},
    "clm": {"model_type": "clm", **MEMORY, "feature_h": 32, "feature_w": 32, "output_dim": SIZES["dim"],
            "memory_fuser_type": "conv3d"},
}  # fmt: skip


def fixture_inputs() -> dict[str, torch.Tensor]:
    """The seg runs' hidden states (the ones that predicted each seg token) and CLIP layers −2 and −11."""
    g = torch.Generator().manual_seed(7)
    n, p, c = SIZES["targets"], SIZES["patches"] ** 2, SIZES["clip_hidden"]
    return {
        "seg_hidden": torch.randn(n, 6, SIZES["llm_hidden"], generator=g),
        "layer_m2": torch.randn(1, p, c, generator=g),
        "layer_m11": torch.randn(1, p, c, generator=g),
    }


def _upstream_masks(upstream: Path) -> tuple[torch.Tensor, dict[str, dict[str, list[int]]]]:
    """Build the authors' modules, load fixture weights, run their inference's mask path."""
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(upstream))
    import model.modelling_GeoPix as geopix_module  # the authors' checkout, at run time only
    from model.mask_predictor import MaskPredictorConfig, MaskPredictorModel
    from model.memory import ClasswiseLearnableMemoryConfig, ClasswiseLearnableMemoryModel
    from model.prompt_encoder import PromptEncoderConfig, PromptEncoderModel

    d = SIZES["dim"]
    parts = {
        "seg": MaskPredictorModel(MaskPredictorConfig(**PART_CONFIGS["seg"])),
        "pec": PromptEncoderModel(PromptEncoderConfig(**PART_CONFIGS["pec"])),
        "clm": ClasswiseLearnableMemoryModel(ClasswiseLearnableMemoryConfig(**PART_CONFIGS["clm"])),
        "image_neck_rough.pth": geopix_module.ImageNeck(SIZES["clip_hidden"], SIZES["neck_mid"], d),
        "image_neck_detail.pth": geopix_module.ImageNeck(SIZES["clip_hidden"], SIZES["neck_mid"], d),
        "text_hidden_fcs.pth": nn.Sequential(nn.Linear(SIZES["llm_hidden"], SIZES["llm_hidden"]), nn.ReLU(),
                                             nn.Linear(SIZES["llm_hidden"], d)),
    }  # fmt: skip
    shapes: dict[str, dict[str, list[int]]] = {}
    for part, module in parts.items():
        state = module.state_dict()
        shapes[part] = {k: list(v.shape) for k, v in state.items()}
        module.load_state_dict({k: fixture_tensor(f"{part}/{k}", list(v.shape)) for k, v in state.items()})
        module.eval()
    shapes["multiseg_scalar.pth"] = {str(i): [] for i in range(3)}
    shapes["multiscale_scalar.pth"] = {str(i): [] for i in range(2)}
    multiseg = [fixture_tensor(f"multiseg_scalar.pth/{i}", []) for i in range(3)]
    multiscale = [fixture_tensor(f"multiscale_scalar.pth/{i}", []) for i in range(2)]

    inputs = fixture_inputs()
    with torch.no_grad():  # GeoPixForConditinalGeneration.inference from its hidden states on
        hidden = parts["text_hidden_fcs.pth"](inputs["seg_hidden"]).view(SIZES["targets"], 2, 3, d)
        prompts = sum(multiseg[i] * hidden[:, :, i] for i in range(3))
        sparse, dense, image_pe = parts["pec"](prompts)
        features = torch.stack([inputs["layer_m2"], inputs["layer_m11"]], 0).flatten(1, 2).permute(0, 2, 1)
        features = features.reshape(2, -1, SIZES["patches"], SIZES["patches"])
        levels = [parts["image_neck_rough.pth"](features[0][None])[0], parts["image_neck_detail.pth"](features[1][None])[0]]
        out, previous = 0, None
        for level in range(2):
            embeds = levels[level][None]
            first, _ = parts["seg"](img_embeds=embeds, image_pe=image_pe, sparse_embeddings=sparse,
                                    dense_embeddings=dense, previous_masks=previous, level=level)  # fmt: skip
            obj = F.interpolate(first.float(), size=(128, 128), mode="bilinear", align_corners=False)
            embeds = parts["clm"](img_embeds=embeds, obj_masks=obj, class_idx=[74], img_feature_level=level)
            previous, _ = parts["seg"](img_embeds=embeds, image_pe=image_pe, sparse_embeddings=sparse,
                                       dense_embeddings=dense, previous_masks=previous, level=level)  # fmt: skip
            out = out + multiscale[level] * F.interpolate(previous.float(), (128, 128), mode="bilinear",
                                                          align_corners=False)  # fmt: skip
    return out[:, 0], shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", type=Path, required=True, help="a checkout of the authors' GeoPix repository")
    args = parser.parse_args()
    from safetensors.torch import save_file

    masks, shapes = _upstream_masks(args.upstream)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file({**fixture_inputs(), "masks": masks.contiguous()}, str(FIXTURE), metadata={"shapes": json.dumps(shapes)})
    print(f"{FIXTURE}: masks {tuple(masks.shape)}, {sum(len(v) for v in shapes.values())} release tensors")


if __name__ == "__main__":
    main()
