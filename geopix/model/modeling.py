"""GeoPix: vision encoder → projector → LLaMA, seg-token hidden states → mask predictor.

Built from :class:`~geopix.config.ModelConfig` only (no hub calls). Consumes the batches of
:mod:`geopix.data.batches` and returns text, mask and class losses separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from geopix.config import ModelConfig
from geopix.model.adapters import add_lora, add_trainable_tokens
from geopix.model.generation import GenerationMixin
from geopix.model.layers import local_path
from geopix.model.mask import MaskPredictor, SegProjection
from geopix.model.processor import GeoPixProcessor
from geopix.model.vision import build_vision_encoder
from geopix.vocabulary import IGNORE_INDEX, IMAGE_TOKEN

LOSS_WEIGHTS = {"text": 1.0, "class": 1.0}  # the mask terms' weights are in ModelConfig
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "geopix_config.json"
TOKENIZER_DIR, PROCESSOR_DIR = "tokenizer", "processor"


@dataclass
class GeoPixOutput:
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [B, L', V] over the expanded sequence
    mask_logits: torch.Tensor | None = None  # [T, S, S]
    class_logits: torch.Tensor | None = None  # [T, C]
    attention_mask: torch.Tensor | None = None  # [B, L'] expanded
    seg_positions: torch.Tensor | None = None  # [T] shifted into the expanded sequence


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


class GeoPixModel(GenerationMixin, nn.Module):
    """The whole model. ``image_token_id``/``seg_token_ids`` come from the tokenizer it is built with."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab_size: int,
        image_token_id: int,
        seg_token_ids: list[int],
        pad_token_id: int = 0,
        pretrained: bool = True,
        llm_config: dict[str, Any] | None = None,
        vision_config: dict[str, Any] | None = None,
    ):
        """``pretrained``: read the weights the config names (vision, LLM, projector). ``load`` passes
        False plus the saved ``llm_config``/``vision_config``, since its file holds every weight."""
        super().__init__()
        if cfg.memory_ema_momentum > 0 and cfg.memory_dim != cfg.decoder_dim:
            raise ValueError(
                "memory_ema_momentum needs memory_dim == decoder_dim (features are written as slots)"
            )
        if len(seg_token_ids) != cfg.seg_vocabulary.run_length:
            raise ValueError(f"{len(seg_token_ids)} seg token ids for a run of {cfg.seg_vocabulary.run_length} "
                             f"(model.seg_token_num × model.num_scales: {cfg.seg_vocabulary.run})")  # fmt: skip
        self.cfg = cfg
        self.image_token_id, self.seg_token_ids, self.pad_token_id = (
            image_token_id,
            list(seg_token_ids),
            pad_token_id,
        )
        self.vision = build_vision_encoder(cfg, pretrained=pretrained, config=vision_config)
        if llm_config is not None:  # load(): the saved architecture, weights from our own file
            self.llm = LlamaForCausalLM(LlamaConfig(**llm_config))
        elif cfg.llm_weights and pretrained:  # a real LLM, then grown to the tokenizer
            self.llm = LlamaForCausalLM.from_pretrained(local_path(cfg.llm_weights, "model.llm_weights"), local_files_only=True)
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
            grid_stride=cfg.mask_grid_stride,
            num_scales=cfg.num_scales,
            num_classes=cfg.num_classes,
            memory_len=cfg.memory_len,
            memory_dim=cfg.memory_dim,
        )
        self.class_head = nn.Linear(cfg.decoder_dim * cfg.num_scales, cfg.num_classes)
        self.projector_pretrained = bool(cfg.projector_weights)
        if cfg.projector_weights and pretrained:
            load_projector_weights(self.projector, cfg.projector_weights)
        self.stage: int = 0  # 0 = everything trainable (set_stage picks a policy)
        self.lora = False
        self.trainable_token_ids: list[int] = []  # rows trained through peft TrainableTokens
        # Names of the class head's classes (the training data's catalog); saved with the model.
        self.class_names: list[str] = [f"class_{k}" for k in range(cfg.num_classes)]

    @property
    def new_token_ids(self) -> list[int]:
        """The rows GeoPix adds to a tokenizer: ``<image>`` and the seg tokens."""
        return sorted({self.image_token_id, *self.seg_token_ids})

    @property
    def loss_weights(self) -> dict[str, float]:
        return LOSS_WEIGHTS | {"mask_bce": self.cfg.mask_bce_weight, "mask_dice": self.cfg.mask_dice_weight}

    @property
    def vocab_size(self) -> int:
        return self.llm.config.vocab_size

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
            if target_masks is not None and self.cfg.match_targets:
                order = match_targets(out.mask_logits, target_masks, target_sample, self.loss_weights)
                target_masks = target_masks[order]
                class_ids = class_ids[order] if class_ids is not None else None
            if target_masks is not None:
                losses.update(mask_losses(out.mask_logits, target_masks))
            if class_ids is not None:
                losses["class"] = F.cross_entropy(out.class_logits.float(), class_ids)
        if losses:
            out.loss = sum(self.loss_weights[k] * v for k, v in losses.items())
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
        if len(positions) and int(positions.max()) + run > hidden.shape[1]:
            raise ValueError(
                f"a seg run starting at {int(positions.max())} does not fit in {hidden.shape[1]} positions"
            )
        index = positions[:, None] + torch.arange(run, device=positions.device)  # [T, run]
        seg_hidden = hidden[target_sample[:, None], index]  # [T, run, H]
        return self.masks_from_seg_hidden(seg_hidden, target_sample, feat_lo, feat_hi, ema_targets)

    def masks_from_seg_hidden(
        self,
        seg_hidden: torch.Tensor,
        target_sample: torch.Tensor,
        feat_lo: torch.Tensor,
        feat_hi: torch.Tensor,
        ema_targets: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, run, H] final-norm hidden states of seg runs → (mask logits [T, S, S], class logits)."""
        _, pooled = self.seg_projection(seg_hidden)
        # The class loss's gradient is kept out of the prompt (GEOPIX.md §1: it collapsed size ranks),
        # and the memory reads with the head's own soft prediction, in training as at inference.
        class_logits = self.class_head(pooled.flatten(1).detach())
        class_probs = class_logits.float().softmax(-1).detach()
        masks, _ = self.mask_predictor(
            feat_lo, feat_hi, pooled, target_sample, class_probs, self.cfg.image_size, ema_targets
        )
        return masks, class_logits

    def sync_memory(self) -> None:
        """Average the memory's EMA part over data-parallel ranks. A collective: the training loop
        calls it on every rank after each step when ``memory_ema_momentum > 0``."""
        if self.mask_predictor.memory is not None:
            self.mask_predictor.memory.sync_ema()

    # ---------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """A self-contained directory: ``model.safetensors`` (every weight, adapters included),
        ``geopix_config.json`` (our config + the LLM's and vision encoder's architecture),
        ``tokenizer/`` and ``processor/``. No pickle; loading needs none of the original weight paths."""
        from safetensors.torch import save_file


        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Cloned: under DeepSpeed every parameter is a view into one flat buffer, which safetensors
        # refuses to write as is.
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        clip = getattr(self.vision, "clip", None)
        meta = {
            "format_version": 1,
            "model": self.cfg.model_dump(mode="json"),
            "vocab_size": self.vocab_size,
            "image_token_id": self.image_token_id,
            "seg_token_ids": self.seg_token_ids,
            "pad_token_id": self.pad_token_id,
            "lora": self.lora,
            "trainable_token_ids": self.trainable_token_ids,
            "stage": self.stage,
            "class_names": self.class_names,
            "llm_config": self.llm.config.to_diff_dict(),
            "vision_config": clip.config.to_diff_dict() if clip is not None else None,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        self.processor().save_pretrained(directory / PROCESSOR_DIR)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> GeoPixModel:
        """Inverse of :meth:`save` (JSON + safetensors only), from a local directory (a published
        one in S3: ``storage.local_copy`` first)."""
        from safetensors.torch import load_file

        directory = local_path(directory, "model directory")
        config_path = directory / CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{directory}: not a GeoPix model directory (no {CONFIG_FILE})")
        meta = json.loads(config_path.read_text())
        cfg = ModelConfig.model_validate(meta["model"])
        model = cls(
            cfg,
            vocab_size=meta["vocab_size"],
            image_token_id=meta["image_token_id"],
            seg_token_ids=meta["seg_token_ids"],
            pad_token_id=meta["pad_token_id"],
            pretrained=False,  # every weight comes from the file
            llm_config=meta.get("llm_config"),
            vision_config=meta.get("vision_config"),
        )
        if meta["lora"]:
            add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        if meta.get("trainable_token_ids"):
            add_trainable_tokens(model, meta["trainable_token_ids"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device or "cpu")), strict=True)
        model.stage = meta["stage"]
        model.class_names = meta.get("class_names", model.class_names)
        return model

    def processor(self) -> GeoPixProcessor:
        """The image preprocessing this model was trained with (saved beside its weights)."""
        return GeoPixProcessor(self.cfg.image_size, tuple(self.vision.image_mean), tuple(self.vision.image_std))

    @classmethod
    def load_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu"
    ) -> tuple[GeoPixModel, Any, Any]:
        """(model in eval mode on ``device``, tokenizer, processor) from a saved local directory."""
        from transformers import AutoTokenizer

        local = local_path(directory, "model directory")
        model = cls.load(local, device=device).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(local / TOKENIZER_DIR), local_files_only=True)
        return model, tokenizer, GeoPixProcessor.from_pretrained(local / PROCESSOR_DIR)


# ------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def match_targets(
    logits: torch.Tensor, targets: torch.Tensor, target_sample: torch.Tensor, weights: dict[str, float]
) -> torch.Tensor:
    """For each sample with several seg runs, the assignment of its targets to its runs that
    minimises the mask loss (Hungarian, as DETR does for sets); returns the target order [T].

    The order in which an answer lists several instances (e.g. "each ship") is not something the
    image determines, so supervising the k-th run with the k-th target teaches every run the blur
    of all of them; matching lets each run commit to one instance."""
    from scipy.optimize import linear_sum_assignment

    order = torch.arange(len(targets), device=targets.device)
    for sample in target_sample.unique():
        index = (target_sample == sample).nonzero().flatten()
        if len(index) < 2:
            continue
        probs = logits[index].float().sigmoid().flatten(1)  # [n, P]
        truth = targets[index].float().flatten(1)  # [n, P]
        dice = 1 - (2 * probs @ truth.T + 1) / (probs.sum(1)[:, None] + truth.sum(1)[None] + 1)
        eps = 1e-6
        bce = -(truth @ torch.log(probs + eps).T + (1 - truth) @ torch.log(1 - probs + eps).T).T / probs.shape[1]
        cost = weights["mask_bce"] * bce + weights["mask_dice"] * dice  # [runs, targets]
        runs, chosen = linear_sum_assignment(cost.cpu().numpy())
        order[index[torch.as_tensor(runs, device=index.device)]] = index[torch.as_tensor(chosen, device=index.device)]
    return order


def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-target BCE (pixel mean) and Dice, each averaged over targets."""
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    probs = logits.sigmoid().flatten(1)
    flat = targets.flatten(1)
    dice = 1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)
    return {"mask_bce": bce.mean(), "mask_dice": dice.mean()}


def load_projector_weights(projector: nn.Sequential, path: str) -> None:
    """LLaVA's 2-layer projector weights into ``projector`` (Linear → GELU → Linear).

    Accepts a ``.safetensors`` file, a ``mm_projector.bin`` (read with ``weights_only=True``: tensors
    only, never arbitrary objects) or a directory holding one. Key forms understood: LLaVA's
    ``model.mm_projector.{0,2}.*`` and transformers' ``multi_modal_projector.linear_{1,2}.*``.
    """
    file = local_path(path, "model.projector_weights")
    if file.is_dir():
        candidates = [file / n for n in ("mm_projector.safetensors", "model.safetensors", "mm_projector.bin")]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no mm_projector.safetensors / model.safetensors / mm_projector.bin")
        file = found[0]
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    names = {"0": ("mm_projector.0.", "multi_modal_projector.linear_1."),
             "2": ("mm_projector.2.", "multi_modal_projector.linear_2.")}
    picked = {}
    for index, prefixes in names.items():
        for key, value in state.items():
            for prefix in prefixes:
                if prefix in key:
                    picked[f"{index}.{key.split(prefix, 1)[1]}"] = value
    missing = set(projector.state_dict()) - set(picked)
    if missing:
        raise ValueError(f"{path}: projector weights lack {sorted(missing)} (keys seen: {sorted(state)[:6]}…)")
    try:
        projector.load_state_dict(picked, strict=True)
    except RuntimeError as error:  # shape mismatch: say which sizes were expected
        raise ValueError(f"{path}: projector weights do not fit this model: {error}") from None


def add_geopix_tokens(tokenizer: Any, cfg: ModelConfig) -> None:
    """Add ``<image>`` and the seg tokens as special tokens (no-op when present, as in the tiny BPE)."""
    wanted = [IMAGE_TOKEN, *cfg.seg_vocabulary.tokens]
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )


def build_model(cfg: ModelConfig, tokenizer: Any, pretrained: bool = True) -> GeoPixModel:
    """A GeoPix model for ``tokenizer`` (tokens added and embeddings sized to it)."""
    add_geopix_tokens(tokenizer, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GeoPixModel(
        cfg,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        seg_token_ids=cfg.seg_vocabulary.token_ids(tokenizer),
        pad_token_id=pad,
        pretrained=pretrained,
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (works on the meta device)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
