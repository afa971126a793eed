"""GeoPix: vision encoder → projector → LLaMA, seg-token hidden states → mask predictor.

Built from :class:`~geopix.config.ModelConfig` only (no hub calls). Consumes the batches of
:mod:`geopix.data.loader` and returns text, mask and class losses separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from geopix.config import ModelConfig
from geopix.data.loader import IGNORE_INDEX
from geopix.data.schema import IMAGE_TOKEN
from geopix.data.tokenizer import seg_tokens
from geopix.model.mask import MaskPredictor, SegProjection
from geopix.model.vision import build_vision_encoder

LOSS_WEIGHTS = {"text": 1.0, "mask_bce": 2.0, "mask_dice": 0.5, "class": 1.0}
LORA_TARGETS = ("q_proj", "v_proj")
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_DIR = "model.safetensors", "geopix_config.json", "tokenizer"


@dataclass
class GeoPixOutput:
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [B, L', V] over the expanded sequence
    mask_logits: torch.Tensor | None = None  # [T, S, S]
    class_logits: torch.Tensor | None = None  # [T, C]
    attention_mask: torch.Tensor | None = None  # [B, L'] expanded
    seg_positions: torch.Tensor | None = None  # [T] shifted into the expanded sequence


@dataclass
class ChatAnswer:
    text: str
    masks: torch.Tensor  # [runs, S, S] bool, one per complete [SEG0]… run
    class_probs: torch.Tensor  # [runs, C]


def llama_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.llm_hidden_size,
        intermediate_size=cfg.llm_intermediate_size,
        num_hidden_layers=cfg.llm_num_layers,
        num_attention_heads=cfg.llm_num_heads,
        num_key_value_heads=cfg.llm_num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


class GeoPixModel(nn.Module):
    """The whole model. ``image_token_id``/``seg_token_ids`` come from the tokenizer it is built with."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab_size: int,
        image_token_id: int,
        seg_token_ids: list[int],
        pad_token_id: int = 0,
        pretrained_vision: bool = True,
    ):
        super().__init__()
        if cfg.memory_ema_momentum > 0 and cfg.memory_dim != cfg.decoder_dim:
            raise ValueError(
                "memory_ema_momentum needs memory_dim == decoder_dim (features are written as slots)"
            )
        self.cfg = cfg
        self.image_token_id, self.seg_token_ids, self.pad_token_id = (
            image_token_id,
            list(seg_token_ids),
            pad_token_id,
        )
        self.vision = build_vision_encoder(cfg, pretrained=pretrained_vision)
        if cfg.llm_weights:  # a real LLM from a local directory, then grown to the tokenizer
            self.llm = LlamaForCausalLM.from_pretrained(cfg.llm_weights, local_files_only=True)
            self.llm.resize_token_embeddings(vocab_size)
        else:
            self.llm = LlamaForCausalLM(llama_config(cfg, vocab_size))
        hidden = self.llm.config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(self.vision.token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.seg_projection = SegProjection(hidden, cfg.decoder_dim, cfg.num_scales, cfg.seg_token_num)
        self.mask_predictor = MaskPredictor(
            lo_channels=self.vision.lo_channels,
            hi_channels=self.vision.hi_channels,
            dim=cfg.decoder_dim,
            image_size=cfg.image_size,
            num_scales=cfg.num_scales,
            num_classes=cfg.num_classes,
            memory_len=cfg.memory_len,
            memory_dim=cfg.memory_dim,
        )
        self.class_head = nn.Linear(cfg.decoder_dim * cfg.num_scales, cfg.num_classes)
        # No loader for LLaVA projector weights yet: a random projector must train in stage 1.
        self.projector_pretrained = False
        self.stage: int = 0  # 0 = everything trainable (set_stage picks a policy)
        self.lora = False

    # ------------------------------------------------------------------ image token expansion
    def embed_multimodal(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, torch.Tensor]
    ]:
        """Replace each sample's single ``<image>`` token by its N projected image tokens.

        Returns (inputs_embeds [B, L+N−1, H], attention_mask, labels (−100 over image tokens),
        image_pos [B], (feat_lo, feat_hi)). Right padding stays right padding: every row grows by
        the same N−1, so one shift per sample fixes ``seg_positions``.
        """
        with torch.no_grad():  # frozen encoder: no graph through it
            feat_lo, feat_hi, tokens = self.vision(pixel_values)
        image_embeds = self.projector(tokens)  # [B, N, H]
        is_image = input_ids == self.image_token_id
        if not bool((is_image.sum(1) == 1).all()):
            raise ValueError(
                f"every sample needs exactly one {IMAGE_TOKEN} token, got {is_image.sum(1).tolist()}"
            )
        image_pos = is_image.float().argmax(1)
        text_embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, self.pad_token_id))
        b, n = image_embeds.shape[:2]
        rows_e, rows_m, rows_l = [], [], []
        for i in range(b):  # B is small; a loop is clearer than a scatter
            p = int(image_pos[i])
            rows_e.append(torch.cat([text_embeds[i, :p], image_embeds[i], text_embeds[i, p + 1 :]]))
            ones = attention_mask.new_ones(n)
            rows_m.append(torch.cat([attention_mask[i, :p], ones, attention_mask[i, p + 1 :]]))
            if labels is not None:
                rows_l.append(
                    torch.cat([labels[i, :p], labels.new_full((n,), IGNORE_INDEX), labels[i, p + 1 :]])
                )
        new_labels = torch.stack(rows_l) if labels is not None else None
        return torch.stack(rows_e), torch.stack(rows_m), new_labels, image_pos, (feat_lo, feat_hi)

    # -------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        seg_positions: torch.Tensor | None = None,
        target_sample: torch.Tensor | None = None,
        target_masks: torch.Tensor | None = None,
        class_ids: torch.Tensor | None = None,
        **_: Any,  # the loader's bookkeeping keys (record_ids, tasks, ...) are ignored
    ) -> GeoPixOutput:
        embeds, mask, labels, image_pos, (feat_lo, feat_hi) = self.embed_multimodal(
            pixel_values, input_ids, attention_mask, labels
        )
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = self.llm.lm_head(hidden)
        losses: dict[str, torch.Tensor] = {}
        if labels is not None and bool((labels[:, 1:] != IGNORE_INDEX).any()):  # all-masked CE is NaN
            losses["text"] = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        out = GeoPixOutput(loss=None, logits=logits, attention_mask=mask)
        if seg_positions is not None and target_sample is not None and len(seg_positions):
            n_img = embeds.shape[1] - input_ids.shape[1] + 1
            positions = seg_positions + (seg_positions > image_pos[target_sample]).long() * (n_img - 1)
            out.seg_positions = positions
            ema = None
            if self.training and self.cfg.memory_ema_momentum > 0 and target_masks is not None:
                ema = (target_masks, class_ids, self.cfg.memory_ema_momentum)
            out.mask_logits, out.class_logits = self.predict_masks(
                hidden, positions, target_sample, feat_lo, feat_hi, ema
            )
            if target_masks is not None:
                losses.update(mask_losses(out.mask_logits, target_masks))
            if class_ids is not None:
                losses["class"] = F.cross_entropy(out.class_logits.float(), class_ids)
        if losses:
            out.loss = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
            out.losses = losses
        return out

    def predict_masks(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        target_sample: torch.Tensor,
        feat_lo: torch.Tensor,
        feat_hi: torch.Tensor,
        ema_targets: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits [T, S, S] and class logits [T, C] from the hidden states of each seg run."""
        run = len(self.seg_token_ids)
        index = positions[:, None] + torch.arange(run, device=positions.device)  # [T, run]
        seg_hidden = hidden[target_sample[:, None], index]  # [T, run, H]
        _, pooled = self.seg_projection(seg_hidden)
        # The class loss's gradient is kept out of the prompt (GEOPIX.md §1: it collapsed size ranks),
        # and the memory reads with the head's own soft prediction, in training as at inference.
        class_logits = self.class_head(pooled.flatten(1).detach())
        class_probs = class_logits.softmax(-1).detach()
        masks, _ = self.mask_predictor(
            feat_lo, feat_hi, pooled, target_sample, class_probs, self.cfg.image_size, ema_targets
        )
        return masks, class_logits

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def chat(
        self,
        pixel_values: torch.Tensor,
        instructions: list[str],
        tokenizer: Any,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[ChatAnswer]:
        """Answer one instruction per image (``<image>`` is prepended when missing): text, one mask
        per complete seg run, and the class head's distribution per run.

        First version: samples are decoded one after another and every step recomputes the whole
        sequence (no KV cache); fine for the tiny preset, not for 7B.
        """
        from geopix.data.tokenizer import prompt_text

        was_training = self.training
        self.eval()
        answers = []
        for i, instruction in enumerate(instructions):
            text = instruction if IMAGE_TOKEN in instruction else f"{IMAGE_TOKEN}\n{instruction}"
            ids = tokenizer.encode(prompt_text(text), add_special_tokens=False)
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id, *ids]
            prompt_len = len(ids)
            image = pixel_values[i : i + 1]
            for _ in range(max_new_tokens):
                input_ids = torch.tensor([ids], device=image.device)
                logits = self(image, input_ids, torch.ones_like(input_ids)).logits[0, -1].float()
                if do_sample:
                    probs = (logits / max(temperature, 1e-5)).softmax(-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(logits.argmax())
                ids.append(token)
                if token == tokenizer.eos_token_id:
                    break
            answers.append(self.segment_answer(image, ids, prompt_len, tokenizer))
        self.train(was_training)
        return answers

    @torch.no_grad()
    def segment_answer(
        self, image: torch.Tensor, ids: list[int], prompt_len: int, tokenizer: Any
    ) -> ChatAnswer:
        """Masks and class distributions for the complete seg runs of ``ids[prompt_len:]``."""
        run = self.seg_token_ids
        starts = [p for p in range(prompt_len, len(ids) - len(run) + 1) if ids[p : p + len(run)] == run]
        text = tokenizer.decode(ids[prompt_len:], skip_special_tokens=False)
        text = text.replace(tokenizer.eos_token or "", "").strip()
        size = self.cfg.image_size
        if not starts:
            empty = torch.zeros(0, size, size, dtype=torch.bool)
            return ChatAnswer(text, empty, torch.zeros(0, self.cfg.num_classes))
        input_ids = torch.tensor([ids], device=image.device)
        out = self(
            image,
            input_ids,
            torch.ones_like(input_ids),
            seg_positions=torch.tensor(starts, device=image.device),
            target_sample=torch.zeros(len(starts), dtype=torch.long, device=image.device),
        )
        return ChatAnswer(text, out.mask_logits.sigmoid().cpu() > 0.5, out.class_logits.softmax(-1).cpu())

    # ------------------------------------------------------------------------- stage policies
    def set_stage(self, stage: Literal[1, 2]) -> None:
        """Trainable parameters of a training stage (GEOPIX.md §2, our design).

        Stage 1: vision and LLM frozen except the token embeddings and output rows; the projector is
        frozen only when it was loaded pretrained. An LLM with random weights (tiny) trains whole.
        Stage 2: LoRA (r 8, α 16, q/v) on a frozen LLM + embeddings/output rows, projector, seg
        projection, mask predictor, memory and class head.
        """
        random_llm = not self.cfg.llm_weights
        if stage == 2 and not self.lora:
            add_lora(self)
        self.requires_grad_(False)
        for module in (self.seg_projection, self.mask_predictor, self.class_head):
            module.requires_grad_(True)
        self.llm.get_input_embeddings().requires_grad_(True)
        self.llm.get_output_embeddings().requires_grad_(True)
        if stage == 1:
            self.projector.requires_grad_(random_llm or not self.projector_pretrained)
            if random_llm:
                self.llm.requires_grad_(True)
        elif stage == 2:
            self.projector.requires_grad_(True)
            for name, param in self.llm.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)
        else:
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.vision.requires_grad_(False)
        self.stage = stage

    # ---------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """A directory with ``model.safetensors``, ``geopix_config.json`` and ``tokenizer/``; no pickle."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_FILE))
        meta = {
            "model": self.cfg.model_dump(mode="json"),
            "vocab_size": self.llm.get_input_embeddings().num_embeddings,
            "image_token_id": self.image_token_id,
            "seg_token_ids": self.seg_token_ids,
            "pad_token_id": self.pad_token_id,
            "lora": self.lora,
            "stage": self.stage,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> GeoPixModel:
        """Inverse of :meth:`save` (JSON + safetensors only)."""
        from safetensors.torch import load_model

        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        cfg = ModelConfig.model_validate(meta["model"])
        model = cls(
            cfg,
            vocab_size=meta["vocab_size"],
            image_token_id=meta["image_token_id"],
            seg_token_ids=meta["seg_token_ids"],
            pad_token_id=meta["pad_token_id"],
            pretrained_vision=False,  # every weight comes from the file
        )
        if meta["lora"]:
            add_lora(model)
        load_model(model, str(directory / WEIGHTS_FILE), strict=True)
        model.stage = meta["stage"]
        return model


# ------------------------------------------------------------------------------------- helpers
def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-target BCE (pixel mean) and Dice, each averaged over targets."""
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    probs = logits.sigmoid().flatten(1)
    flat = targets.flatten(1)
    dice = 1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)
    return {"mask_bce": bce.mean(), "mask_dice": dice.mean()}


def add_lora(model: GeoPixModel, r: int = 8, alpha: int = 16) -> None:
    """LoRA adapters (peft) injected in place into the LLM's q/v projections."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS)), model.llm)
    model.lora = True


def add_geopix_tokens(tokenizer: Any, cfg: ModelConfig) -> None:
    """Add ``<image>`` and the seg tokens as special tokens (no-op when present, as in the tiny BPE)."""
    wanted = [IMAGE_TOKEN, *seg_tokens(cfg.seg_token_num, cfg.num_scales)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )


def build_model(cfg: ModelConfig, tokenizer: Any, pretrained_vision: bool = True) -> GeoPixModel:
    """A GeoPix model for ``tokenizer`` (tokens added and embeddings sized to it)."""
    add_geopix_tokens(tokenizer, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GeoPixModel(
        cfg,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        seg_token_ids=[
            tokenizer.convert_tokens_to_ids(t) for t in seg_tokens(cfg.seg_token_num, cfg.num_scales)
        ],
        pad_token_id=pad,
        pretrained_vision=pretrained_vision,
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (works on the meta device)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
