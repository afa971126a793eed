"""The mask path of the GeoPix authors' release (``mask_decoder="release"``): what a checkpoint
imported with ``geopix model import-release`` decodes masks with, computing what the release's
``seg/``, ``pec/``, ``clm/`` and neck weights compute (docs/release_checkpoint.md).

For T targets, D = ``decoder_dim`` (256 in the release), two levels::

    level 0: neck(CLIP layer −2) → 32² ─norm→ + no-mask embedding ─two-way decoder(tokens)→ 64² logits
    level 1: neck(CLIP layer −11) → 32² ─norm→ ConvT 2× → 64², gated by sigmoid(level-0 logits) + 1
             → + no-mask embedding ─two-way decoder→ 128² logits
    masks = Σ_l w_l · resize(logits_l, 128²), then resized to the model's image size

The decoder's tokens are SAM's: an IoU token, four mask tokens and the level's seg prompt, each
plus the level's embedding; positions are SAM's random-Fourier encoding (a fixed Gaussian matrix
per level); the masks are mask token 0's hypernetwork output dotted with the decoded image,
upscaled 2× to D/8 channels. The release's "class-wise memory" reduces to a per-pixel LayerNorm
of ``(1 + s) ⊙ x`` (its attention results are discarded), so that is what ``norm`` computes; GeoPix's
own class memory (``memory_len > 0``) sits after it, the identity until fine-tuning opens it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamLayerNorm, SamTwoWayTransformer

from geopix.model.layers import Float32BatchNorm2d
from geopix.model.mask import ClassMemory, read_memory

RELEASE_GRID = 32  # the release's necks resize every CLIP level to 32 × 32
MASK_TOKENS = 4  # SAM's: the first is read out, the others take part in the decoder's attention


class ReleaseNeck(nn.Module):
    """conv3×3 (+bias) → BN → ReLU → bilinear to the grid → conv3×3 (+bias) → BN → ReLU."""

    def __init__(self, in_channels: int, mid_channels: int, dim: int, grid: int = RELEASE_GRID):
        super().__init__()
        self.grid = grid
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 3, padding=1),
                                   Float32BatchNorm2d(mid_channels), nn.ReLU())  # fmt: skip
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, dim, 3, padding=1), Float32BatchNorm2d(dim), nn.ReLU())

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.conv1(feat), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return self.conv2(x)


class ReleaseFeatureNorm(nn.Module):
    """``LayerNorm_C((1 + scale) ⊙ x)`` per pixel: all the release's memory module does to features."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * (1 + self.scale)[None, :, None, None]
        return self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def fourier_positions(gaussian: torch.Tensor, size: int) -> torch.Tensor:
    """SAM's dense random-Fourier encoding of a size × size grid: [D, size, size] (sin, then cos)."""
    axis = (torch.arange(size, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / size
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    coords = torch.stack([x, y], -1) * 2 - 1  # [size, size, 2], x first
    proj = 2 * math.pi * coords @ gaussian
    return torch.cat([proj.sin(), proj.cos()], -1).permute(2, 0, 1)


class ReleaseMaskPredictor(nn.Module):
    """Same interface as :class:`geopix.model.mask.MaskPredictor`; the release's design."""

    def __init__(
        self,
        *,
        lo_channels: int,
        hi_channels: int,
        dim: int,
        neck_dim: int,
        num_scales: int,
        num_classes: int,
        memory_len: int,
        memory_dim: int,
        memory_read_dropout: float = 0.0,
    ):
        super().__init__()
        self.grids = [RELEASE_GRID * 2**s for s in range(num_scales)]  # the decoders' grids
        self.necks = nn.ModuleList(
            ReleaseNeck(hi_channels if s == 0 else lo_channels, neck_dim, dim) for s in range(num_scales)
        )
        self.norm = ReleaseFeatureNorm(dim)
        self.no_mask_embed = nn.Parameter(torch.zeros(dim))  # the dense prompt: one vector everywhere
        self.register_buffer("fourier", torch.randn(num_scales, 2, dim // 2))  # a fixed Gaussian per level
        config = SamMaskDecoderConfig(hidden_size=dim, mlp_dim=2048, num_hidden_layers=2, num_attention_heads=8,
                                      layer_norm_eps=1e-5)  # fmt: skip
        config._attn_implementation = "sdpa"  # standalone use: no PreTrainedModel sets it for us
        self.transformers = nn.ModuleList(SamTwoWayTransformer(config) for _ in range(num_scales))
        self.iou_token = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.mask_tokens = nn.Parameter(torch.randn(MASK_TOKENS, dim) * 0.02)
        self.level_embed = nn.Parameter(torch.randn(num_scales, dim) * 0.02)
        self.upsample = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2),
                                      SamLayerNorm(dim, eps=1e-6, data_format="channels_first"), nn.GELU())  # fmt: skip
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 8, 2, stride=2),
            SamLayerNorm(dim // 8, eps=1e-6, data_format="channels_first"),
            nn.GELU(),
        )
        self.hypernetwork = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                          nn.Linear(dim, dim // 8))  # fmt: skip
        self.scale_mix = nn.Parameter(torch.full((num_scales,), 1.0 / num_scales))
        self.memory = (
            ClassMemory(num_classes, num_scales, memory_len, memory_dim, dim, 8 if dim >= 128 else 4, memory_read_dropout)
            if memory_len > 0
            else None
        )

    def decode(self, image: torch.Tensor, prompt: torch.Tensor, level: int) -> torch.Tensor:
        """image [T, D, g, g], prompt [T, D] → logits [T, 2g, 2g]."""
        t, d, g, _ = image.shape
        src = image + self.no_mask_embed[None, :, None, None]
        pos = fourier_positions(self.fourier[level], g).to(src.dtype)[None].expand(t, -1, -1, -1)
        tokens = torch.cat([self.iou_token, self.mask_tokens], 0)[None].expand(t, -1, -1)
        tokens = torch.cat([tokens, prompt[:, None]], 1) + self.level_embed[level]
        queries, keys = self.transformers[level](tokens[:, None], src, pos, attention_similarity=None)
        decoded = keys[:, 0].transpose(1, 2).reshape(t, d, g, g)
        upscaled = self.output_upscaling(decoded)  # [T, D/8, 2g, 2g]
        weights = self.hypernetwork(queries[:, 0, 1])  # mask token 0 (after the IoU token)
        return torch.einsum("tc,tchw->thw", weights, upscaled)

    def forward(
        self,
        feat_lo: torch.Tensor,
        feat_hi: torch.Tensor,
        pooled: torch.Tensor,
        target_sample: torch.Tensor,
        class_probs: torch.Tensor,
        out_size: int,
        ema_targets: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pooled [T, scales, D] → (mixed logits [T, S, S], per-level logits [T, 2g_l, 2g_l])."""
        per_scale: list[torch.Tensor] = []
        for s, neck in enumerate(self.necks):
            image = self.norm(neck(feat_hi if s == 0 else feat_lo))[target_sample]
            image = read_memory(self.memory, image, class_probs, s, ema_targets)
            if per_scale:  # the finer level: upsampled, gated by the coarser level's mask
                image = self.upsample(image)
                prev = per_scale[-1][:, None]
                if prev.shape[-2:] != image.shape[-2:]:
                    prev = F.interpolate(prev, size=image.shape[-2:], mode="bilinear", align_corners=False)
                image = image * (torch.sigmoid(prev) + 1)
            per_scale.append(self.decode(image, pooled[:, s], s))
        size = per_scale[-1].shape[-1]  # mixed at the finest level's resolution, as the release does
        mixed = sum(
            w * F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            for w, logits in zip(self.scale_mix, per_scale, strict=True)
        )
        if size != out_size:
            mixed = F.interpolate(mixed[:, None], size=(out_size, out_size), mode="bilinear", align_corners=False)[:, 0]
        return mixed, per_scale
