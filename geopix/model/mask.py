"""Seg projection, class-wise memory and the two-scale mask predictor (GEOPIX.md §1).

Data flow for T targets (packed over the batch, ``target_sample[T]`` says which image):

    seg hidden [T, scales·tokens, H] ─SegProjection→ prompts [T, scales, tokens, D], pooled [T, scales, D]
    feat (scale s) ─neck_s→ [T, D, g_s, g_s] (+ x/y channels) ─ClassMemory read→ ─SAM two-way decoder→
    logits_s (+ 8×8 spatial prior) ; scale s+1 features are gated by sigmoid(logits_s)+1
    masks = Σ_s w_s · resize(logits_s, S)

With ``fine_scale="light"`` the scales after the first skip the two-way transformer: their
logits are a hypernetwork readout of the gated fine features, driven by the first scale's decoded
mask token and the scale's own prompt (SAM's upscaled-embedding readout), and their neck's second
conv is pointwise. The transformer over a per-target 64² grid and the 3×3 conv at 64² were most of
a tiny training step (``bench/train_step_profile.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamTwoWayTransformer

from geopix.model.layers import Float32BatchNorm2d

PRIOR_SIZE = 8  # the coarse spatial prior's grid (GEOPIX.md §1)


class SegProjection(nn.Module):
    """LLM hidden → hidden → D, reshaped per scale; a learnable softmax-weighted sum per scale
    (``weighting="linear"``: the weights as they are, as the authors' release has them)."""

    def __init__(self, llm_hidden: int, dim: int, num_scales: int, tokens_per_scale: int, weighting: str = "softmax"):
        super().__init__()
        if weighting not in ("softmax", "linear"):
            raise ValueError(f"seg token weighting {weighting!r}: expected 'softmax' or 'linear'")
        self.num_scales, self.tokens, self.weighting = num_scales, tokens_per_scale, weighting
        self.mlp = nn.Sequential(
            nn.Linear(llm_hidden, llm_hidden), nn.ReLU(inplace=True), nn.Linear(llm_hidden, dim)
        )
        start = 0.0 if weighting == "softmax" else 1.0 / tokens_per_scale  # uniform at init either way
        self.token_logits = nn.Parameter(torch.full((num_scales, tokens_per_scale), start))

    def forward(self, seg_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, scales·tokens, H] → (prompts [T, scales, tokens, D], pooled [T, scales, D])."""
        prompts = self.mlp(seg_hidden).reshape(seg_hidden.shape[0], self.num_scales, self.tokens, -1)
        weights = (self.token_logits.softmax(-1) if self.weighting == "softmax" else self.token_logits)[None, :, :, None]
        return prompts, (prompts * weights).sum(2)


class ClassMemory(nn.Module):
    """``M[class, scale] ∈ R^{K×d}`` read by cross-attention of image features, gated by tanh(α).

    The class comes from a distribution ``class_probs [T, C]`` (the class head's own prediction),
    so the read is a soft mixture of class memories, never a hard-coded index. The attention's
    output projection starts at zero, so a fresh memory is the identity and only enters through
    learning; the gate starts open (α = 1) so that it can: the output projection's gradient (the
    features' loss gradient times the read before it) is there from the first step. With α = 0 at
    the start instead, only α had a gradient, against a read of random slots that carries no
    consistent sign: after a whole tiny-preset stage α was still ~3e-4 and the memory never
    entered (docs/evaluation_history.md, bench/memory_probe.py).

    The slots read are ``M = learned + ema``: ``learned`` is a parameter (the gradient write);
    ``ema`` is a buffer holding the optional EMA write. Keeping the EMA part out of the parameter
    matters under DeepSpeed/mixed precision: the optimizer owns fp32 master copies of parameters and
    would overwrite an in-place write at its next step; a buffer is left alone, and the training
    loop averages it over data-parallel ranks with the other buffers (``geopix.train.loop.sync_buffers``).
    """

    def __init__(
        self, num_classes: int, num_scales: int, slots: int, mem_dim: int, dim: int, heads: int, read_dropout: float = 0.0
    ):
        super().__init__()
        self.read_dropout = read_dropout  # training only (geopix.config: memory_read_dropout)
        self.learned = nn.Parameter(torch.empty(num_classes, num_scales, slots, mem_dim))
        self.register_buffer("ema", torch.empty(num_classes, num_scales, slots, mem_dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, kdim=mem_dim, vdim=mem_dim, batch_first=True)
            for _ in range(num_scales)
        )
        self.gate = nn.Parameter(torch.empty(num_scales))  # α per scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The start: random slots, no EMA write, and the identity (zero output projections behind
        an open gate), learnable from the first step (above)."""
        with torch.no_grad():
            self.learned.normal_(0, 0.02)
            self.ema.zero_()
            self.norm.reset_parameters()
            for attn in self.attn:
                attn._reset_parameters()
                nn.init.zeros_(attn.out_proj.weight)
                nn.init.zeros_(attn.out_proj.bias)
            self.gate.fill_(1.0)

    @property
    def slots(self) -> torch.Tensor:
        """The memory as read: ``[C, scales, K, d]``."""
        return self.learned + self.ema

    @torch.no_grad()
    def openness(self) -> dict[str, float]:
        """How far the read is let in, per scale: the gate tanh(α) and the norm of the output
        projection it multiplies (both 0 ⇒ the memory changes nothing). Training logs these."""
        out = {}
        for s, attn in enumerate(self.attn):
            out[f"memory/gate_{s}"] = float(torch.tanh(self.gate[s]))
            out[f"memory/out_proj_norm_{s}"] = float(attn.out_proj.weight.norm())
        return out

    def forward(self, feats: torch.Tensor, class_probs: torch.Tensor, scale: int) -> torch.Tensor:
        """feats [T, D, g, g] → same shape, ``feats + tanh(α_s) · attn(feats, mixed slots)``."""
        t, d, h, w = feats.shape
        memory = (self.learned[:, scale] + self.ema[:, scale]).to(feats.dtype)
        slots = torch.einsum("tc,ckm->tkm", class_probs.to(feats.dtype), memory)
        queries = self.norm(feats.flatten(2).transpose(1, 2))
        read, _ = self.attn[scale](queries, slots, slots, need_weights=False)
        read = read.transpose(1, 2).reshape(t, d, h, w)
        gate = torch.tanh(self.gate[scale]).to(feats.dtype)
        if self.training and self.read_dropout > 0:
            # Some targets train without the read, so the decoder cannot leave a whole size of
            # object to the memory (the probe found small objects lost without it).
            gate = gate * (torch.rand(t, 1, 1, 1, device=feats.device) >= self.read_dropout).to(feats.dtype)
        return feats + gate * read

    @torch.no_grad()
    def ema_write(
        self, feats: torch.Tensor, masks: torch.Tensor, class_ids: torch.Tensor, scale: int, momentum: float
    ) -> None:
        """Move every slot of each target's class towards its masked-pooled feature (EMA).

        feats [T, D, g, g] (D == memory dim), masks [T, S, S] in {0, 1}. Targets whose mask is empty
        at this grid are skipped. Written into ``ema`` so that ``M = learned + ema`` follows
        ``M ← m·M + (1−m)·f`` exactly while ``learned`` keeps training by gradient.
        """
        small = F.adaptive_avg_pool2d(masks[:, None].to(feats.dtype), feats.shape[-2:])
        area = small.flatten(1).sum(1)
        pooled = (feats * small).flatten(2).sum(2) / area.clamp_min(1e-6)[:, None]
        for vec, cls, a in zip(pooled.float(), class_ids.tolist(), area.tolist(), strict=True):
            if a > 0:
                target = vec - self.learned[cls, scale].float()
                self.ema[cls, scale].mul_(momentum).add_((1 - momentum) * target)


def read_memory(
    memory: ClassMemory | None,
    image: torch.Tensor,
    class_probs: torch.Tensor,
    scale: int,
    ema_targets: tuple[torch.Tensor, torch.Tensor, float] | None,
) -> torch.Tensor:
    """A scale's features after the class memory (if any), EMA-writing it first when asked
    (``ema_targets`` = (target masks [T, S, S], class ids [T], momentum))."""
    if memory is None:
        return image
    if ema_targets is not None:
        memory.ema_write(image.detach(), *ema_targets[:2], scale, ema_targets[2])
    return memory(image, class_probs, scale)


def coord_channels(size: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    """[batch, 2, size, size] normalised x/y in [−1, 1] (pixel centres)."""
    axis = (torch.arange(size, device=like.device, dtype=like.dtype) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y])[None].expand(batch, -1, -1, -1)


class FourierPosition(nn.Module):
    """x/y grid [B, 2, g, g] → [B, dim, g, g]: sin and cos of 2π·(x, y)·B for fixed Gaussian
    frequencies B [2, dim/2] (SAM's random-Fourier place encoding). Unlike a linear map of x/y,
    its dot product with a query can peak at one place. B is a saved buffer, so a loaded model
    reads the places it was trained with."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"a Fourier place encoding needs an even decoder_dim, got {dim}")
        self.register_buffer("frequencies", torch.randn(2, dim // 2))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * torch.einsum("bchw,cd->bdhw", coords, self.frequencies.to(coords.dtype))
        return torch.cat([angles.sin(), angles.cos()], 1)


class LinearAndFourierPosition(nn.Module):
    """The linear place embedding plus a learned 1×1 projection of :class:`FourierPosition`'s
    features, the projection zero at init: training starts from the linear embedding and adds
    peaked places only as far as the loss asks for them."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Conv2d(2, dim, 1)
        self.fourier = FourierPosition(dim)
        self.project = nn.Conv2d(dim, dim, 1, bias=False)
        nn.init.zeros_(self.project.weight)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.linear(coords) + self.project(self.fourier(coords))


# The decoder's place embeddings by ``mask_position_embedding`` (geopix.config): each built from the
# decoder width and called on the x/y grid.
PLACE_EMBEDDINGS = {
    "linear": lambda dim: nn.Conv2d(2, dim, 1),
    "fourier": FourierPosition,
    "linear_fourier": LinearAndFourierPosition,
}


def place_embedding(kind: str, dim: int) -> nn.Module:
    """The place embedding named ``kind`` for a decoder of width ``dim``; an unknown name is refused."""
    if kind not in PLACE_EMBEDDINGS:
        raise ValueError(f"mask_position_embedding {kind!r}: expected one of {', '.join(map(repr, PLACE_EMBEDDINGS))}")
    return PLACE_EMBEDDINGS[kind](dim)


class ImageNeck(nn.Module):
    """conv3×3 → BN → ReLU → resize to the grid → (concat x/y) → conv k×k → BN → ReLU (k = 3, or
    1 where the grid is finer than the features and a 3×3 there would only smooth the resize)."""

    def __init__(self, in_channels: int, dim: int, grid: int, second_kernel: int = 3):
        super().__init__()
        self.grid = grid
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, dim, 3, padding=1, bias=False), Float32BatchNorm2d(dim), nn.ReLU()
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(dim + 2, dim, second_kernel, padding=second_kernel // 2, bias=False),
            Float32BatchNorm2d(dim),
            nn.ReLU(),
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.conv1(feat), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return self.conv2(torch.cat([x, coord_channels(self.grid, x.shape[0], x)], 1))


def zero_prior(dim: int) -> nn.Linear:
    """prompt [T, D] → an 8×8 grid of logits, zero at init so it enters only through learning."""
    prior = nn.Linear(dim, PRIOR_SIZE * PRIOR_SIZE)
    nn.init.zeros_(prior.weight)
    nn.init.zeros_(prior.bias)
    return prior


def add_prior(logits: torch.Tensor, prior: nn.Linear, prompt: torch.Tensor) -> torch.Tensor:
    """logits [T, g, g] + the prompt's 8×8 prior, bilinearly resized to g × g."""
    grid = prior(prompt).reshape(len(prompt), 1, PRIOR_SIZE, PRIOR_SIZE)
    return logits + F.interpolate(grid, size=logits.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def prior_loss(priors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE of the priors [T, scales, 8, 8] against each target's [T, S, S] area fraction per 8×8
    cell, averaged: every scale's prior is told where its target lies."""
    coarse = F.adaptive_avg_pool2d(targets[:, None].float(), PRIOR_SIZE).expand_as(priors)
    return F.binary_cross_entropy_with_logits(priors.float(), coarse)


class ScaleDecoder(nn.Module):
    """SAM-style decoding of one scale: a learned mask token and the pooled seg prompt attend
    two-way with the image (transformers' ``SamTwoWayTransformer``); a hypernetwork MLP of the mask
    token's output dotted with the image embedding gives the logits; a zero-initialised 8×8 prior
    predicted from the prompt is added (it tells the decoder *where*)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, depth: int, position_embedding: str = "linear"):
        super().__init__()
        config = SamMaskDecoderConfig(
            hidden_size=dim, mlp_dim=mlp_dim, num_hidden_layers=depth, num_attention_heads=heads
        )
        config._attn_implementation = "sdpa"  # standalone use: no PreTrainedModel sets it for us
        self.transformer = SamTwoWayTransformer(config)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.hyper = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        # The place each image feature has in the attention, from its x/y (geopix.config).
        self.pos = place_embedding(position_embedding, dim)
        self.prior = zero_prior(dim)

    def forward(self, image: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [T, D, g, g], prompt [T, D] → (logits [T, g, g], decoded mask token [T, D])."""
        t, d, g, _ = image.shape
        tokens = torch.cat([self.mask_token.expand(t, -1, -1), prompt[:, None]], 1)[:, None]  # [T,1,2,D]
        pos = self.pos(coord_channels(g, t, image))
        queries, keys = self.transformer(tokens, image, pos, attention_similarity=None)
        embed = keys[:, 0].transpose(1, 2).reshape(t, d, g, g) + image  # skip keeps local detail
        logits = torch.einsum("td,tdhw->thw", self.hyper(queries[:, 0, 0]), embed) / math.sqrt(d)
        return add_prior(logits, self.prior, prompt), queries[:, 0, 0]


class ReadoutDecoder(nn.Module):
    """A fine scale without a transformer: ``hyper([coarse mask token, prompt]) · image`` plus a
    zero-initialised 8×8 prior from the prompt. The coarse scale's decoded mask token already
    knows which object; this scale only reads where its finer features agree."""

    def __init__(self, dim: int):
        super().__init__()
        self.hyper = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.prior = zero_prior(dim)

    def forward(self, image: torch.Tensor, prompt: torch.Tensor, coarse_token: torch.Tensor) -> torch.Tensor:
        """image [T, D, g, g], prompt and coarse_token [T, D] → logits [T, g, g]."""
        d = image.shape[1]
        weights = self.hyper(torch.cat([coarse_token, prompt], -1))
        return add_prior(torch.einsum("td,tdhw->thw", weights, image) / math.sqrt(d), self.prior, prompt)


class MaskPredictor(nn.Module):
    """Two (``num_scales``) coarse-to-fine scales with class memory and a learnable scale mix.

    Scale 0 reads the deeper feature level on a grid of S/``grid_stride``; each next scale reads the finer level
    on a grid twice as large, gated by ``sigmoid(previous logits) + 1``, and is decoded by a
    two-way transformer of its own (``fine_scale="full"``) or, behind a pointwise second neck conv,
    read out with scale 0's decoded mask token (``"light"``).
    """

    def __init__(
        self,
        *,
        lo_channels: int,
        hi_channels: int,
        dim: int,
        image_size: int,
        grid_stride: int = 16,
        num_scales: int,
        num_classes: int,
        memory_len: int,
        memory_dim: int,
        memory_read_dropout: float = 0.0,
        fine_scale: str = "full",
        position_embedding: str = "linear",
    ):
        super().__init__()
        if fine_scale not in ("full", "light"):
            raise ValueError(f"fine_scale {fine_scale!r}: expected 'full' or 'light'")
        light = fine_scale == "light"
        heads = 8 if dim >= 128 else 4
        mlp_dim = 2048 if dim >= 256 else 4 * dim
        base = max(image_size // grid_stride, PRIOR_SIZE)
        self.grids = [base * 2**s for s in range(num_scales)]
        self.necks = nn.ModuleList(
            ImageNeck(hi_channels if s == 0 else lo_channels, dim, g, 1 if light and s > 0 else 3)
            for s, g in enumerate(self.grids)
        )
        self.decoders = nn.ModuleList(
            ReadoutDecoder(dim) if light and s > 0 else ScaleDecoder(dim, heads, mlp_dim, 2, position_embedding)
            for s in range(num_scales)
        )
        self.scale_mix = nn.Parameter(torch.full((num_scales,), 1.0 / num_scales))
        self.memory = (
            ClassMemory(num_classes, num_scales, memory_len, memory_dim, dim, heads, memory_read_dropout)
            if memory_len > 0
            else None
        )

    def prior_grids(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [T, scales, D] → each scale's 8×8 prior logits [T, scales, 8, 8] (what
        :func:`add_prior` adds to that scale's logits)."""
        grids = [decoder.prior(pooled[:, s]) for s, decoder in enumerate(self.decoders)]
        return torch.stack(grids, 1).reshape(len(pooled), len(grids), PRIOR_SIZE, PRIOR_SIZE)

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
        """pooled [T, scales, D] → (mixed logits [T, S, S], per-scale logits [T, g_s, g_s]).

        ``ema_targets`` = (target masks [T, S, S], class ids [T], momentum): EMA-write the memory.
        """
        per_scale: list[torch.Tensor] = []
        mixed = 0
        coarse_token = None
        for s, (neck, decoder) in enumerate(zip(self.necks, self.decoders, strict=True)):
            image = neck(feat_hi if s == 0 else feat_lo)[target_sample]  # per target
            if per_scale:  # coarse-to-fine gating by the previous scale's mask
                prev = F.interpolate(
                    per_scale[-1][:, None], size=image.shape[-2:], mode="bilinear", align_corners=False
                )
                image = image * (torch.sigmoid(prev) + 1)
            image = read_memory(self.memory, image, class_probs, s, ema_targets)
            if isinstance(decoder, ReadoutDecoder):
                logits = decoder(image, pooled[:, s], coarse_token)
            else:
                logits, token = decoder(image, pooled[:, s])
                if s == 0:  # what a light fine scale reads out with
                    coarse_token = token
            per_scale.append(logits)
            up = F.interpolate(
                logits[:, None], size=(out_size, out_size), mode="bilinear", align_corners=False
            )
            mixed = mixed + self.scale_mix[s] * up[:, 0]
        return mixed, per_scale
