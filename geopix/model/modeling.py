"""GeoPix: vision encoder → projector → LLaMA, seg-token hidden states → mask predictor.

Built from its own :class:`~geopix.model.configuration.GeoPixModelConfig` (no hub calls; local
weight files only); :func:`build_model` makes one from the pipeline's model section and a
tokenizer. Consumes the batches of ``geopix.data.batches`` (plain tensors) and returns text, mask
and class losses separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from geopix.config import ModelConfig
from geopix.imaging import ImageFormat
from geopix.model.adapters import add_lora, add_trainable_tokens
from geopix.model.class_reader import ClassReader, complete_class_targets
from geopix.model.configuration import GeoPixModelConfig
from geopix.model.generation import GenerationMixin
from geopix.model.layers import local_path
from geopix.model.mask import MaskPredictor, SegProjection, prior_loss
from geopix.model.processor import GeoPixProcessor
from geopix.model.release_mask import ReleaseMaskPredictor
from geopix.model.vision import build_vision_encoder, lite0_weights_path
from geopix.vocabulary import IGNORE_INDEX, IMAGE_TOKEN

LOSS_WEIGHTS = {"text": 1.0, "class": 1.0}  # the mask terms' weights are in ModelConfig
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR, PROCESSOR_DIR = "tokenizer", "processor"
MASK_COLOUR_WIDTH = 64  # the mask colour reader's hidden width: 3 colour values in, the LLM's width out


@dataclass
class GeoPixOutput:
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [B, L', V] over the expanded sequence
    mask_logits: torch.Tensor | None = None  # [T, S, S]
    class_logits: torch.Tensor | None = None  # [T, C]
    attention_mask: torch.Tensor | None = None  # [B, L'] expanded
    seg_positions: torch.Tensor | None = None  # [T] shifted into the expanded sequence
    # [B] each sample's mean answer-token cross-entropy, detached (NaN where it has no labels): the
    # training loop's text loss per task; ``losses["text"]`` is the mean over all answer tokens.
    sample_text_loss: torch.Tensor | None = None


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


def build_mask_predictor(config: GeoPixModelConfig, lo_channels: int, hi_channels: int) -> nn.Module:
    """GeoPix's mask predictor, or the release's (``mask_decoder="release"``: imported checkpoints)."""
    shared = {"lo_channels": lo_channels, "hi_channels": hi_channels, "dim": config.decoder_dim,
              "num_scales": config.num_scales, "num_classes": config.num_classes,
              "memory_len": config.memory_len, "memory_dim": config.memory_dim,
              "memory_read_dropout": config.memory_read_dropout}  # fmt: skip
    if config.mask_decoder == "release":
        if config.mask_prior_weight > 0:  # the release's decoder has no 8×8 prior to supervise
            raise ValueError("mask_prior_weight > 0 needs GeoPix's mask decoder; this model has the release's")
        if config.mask_position_embedding != "linear":  # the release's decoder has its own places
            raise ValueError(f"mask_position_embedding {config.mask_position_embedding!r} needs GeoPix's mask "
                             "decoder; this model has the release's")
        return ReleaseMaskPredictor(**shared, neck_dim=config.release_neck_dim)
    return MaskPredictor(
        **shared,
        image_size=config.image_size,
        grid_stride=config.mask_grid_stride,
        fine_scale=config.fine_scale,
        position_embedding=config.mask_position_embedding,
    )


class GeoPixModel(GenerationMixin, nn.Module):
    """The whole model, built from its own :class:`GeoPixModelConfig` (random weights, unless local
    weight files are named: a vision checkpoint, a LLaMA directory, a LLaVA projector)."""

    def __init__(
        self,
        config: GeoPixModelConfig,
        *,
        vision_weights: str | Path | None = None,
        llm_weights: str | Path | None = None,
        projector_weights: str | Path | None = None,
    ):
        super().__init__()
        self.config = config
        self.image_token_id, self.seg_token_ids, self.pad_token_id = (
            config.image_token_id,
            list(config.seg_token_ids),
            config.pad_token_id,
        )
        self.vision = build_vision_encoder(config, weights=vision_weights)
        if llm_weights:  # a real LLM, then grown to the tokenizer
            self.llm = LlamaForCausalLM.from_pretrained(local_path(llm_weights, "model.llm_weights"), local_files_only=True)
            self.llm.resize_token_embeddings(config.vocab_size)
        else:
            self.llm = LlamaForCausalLM(LlamaConfig.from_dict(config.text_config))
        hidden = self.llm.config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(self.vision.token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        # [N, H], zero at the start; trained with the projector (geopix.train.stages).
        self.image_positions = (
            nn.Parameter(torch.zeros(self.vision.num_tokens(config.image_size), hidden))
            if config.image_token_positions
            else None
        )
        self.image_colours = None  # [3 k², H], zero at the start; trained with the projector
        if config.image_colour_cells:
            self.image_colours = nn.Linear(3 * config.image_colour_cells**2, hidden)
            nn.init.zeros_(self.image_colours.weight)
            nn.init.zeros_(self.image_colours.bias)
        self.seg_projection = SegProjection(
            hidden, config.decoder_dim, config.num_scales, config.seg_token_num, config.seg_token_weighting
        )
        self.mask_predictor = build_mask_predictor(config, self.vision.lo_channels, self.vision.hi_channels)
        self.class_head = nn.Linear(config.decoder_dim * config.num_scales, config.num_classes)
        self.image_class_head = (  # training's signal only: no answer reads it
            nn.Linear(hidden, config.num_classes)
            if config.image_class_map_weight > 0 or config.image_presence_weight > 0
            else None
        )
        self.class_reader = (  # per class, a token after the image tokens or its words (class_reader.py)
            ClassReader(
                self.vision.lo_channels,
                self.vision.hi_channels,
                config.num_classes,
                hidden,
                config.image_size // 8,
                on_class_words=config.class_reader_tokens == "on_class_words",
                word_scale=config.class_reader_word_scale,
                colours=config.class_reader_colours,
            )
            if config.class_reader_weight > 0 or config.class_reader_image_weight > 0
            else None
        )
        # The word after each seg run reads the mean colour under the run's mask (mask_colours);
        # the last layer starts at zero, so the option starts as the model without it (built
        # last, so the other parts draw the same initial weights with the option as without).
        self.mask_colour_reader = None
        if config.mask_colour_reader:
            self.mask_colour_reader = nn.Sequential(
                nn.Linear(3, MASK_COLOUR_WIDTH), nn.GELU(), nn.Linear(MASK_COLOUR_WIDTH, hidden)
            )
            nn.init.zeros_(self.mask_colour_reader[2].weight)
            nn.init.zeros_(self.mask_colour_reader[2].bias)
        elif config.mask_colour_word_weight > 0:
            raise ValueError("mask_colour_word_weight > 0 trains the mask colour reader: set mask_colour_reader")
        if projector_weights:
            load_projector_weights(self.projector, str(projector_weights))

    # What the weights went through lives in the config, so that save() records it.
    @property
    def stage(self) -> int:
        return self.config.stage

    @stage.setter
    def stage(self, stage: int) -> None:
        self.config.stage = stage

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names

    @class_names.setter
    def class_names(self, names: list[str]) -> None:
        self.config.class_names = list(names)

    @property
    def lora(self) -> bool:
        return self.config.lora is not None

    @property
    def trainable_token_ids(self) -> list[int]:
        return self.config.trainable_token_ids

    @property
    def new_token_ids(self) -> list[int]:
        """The rows GeoPix adds to a tokenizer: ``<image>`` and the seg tokens."""
        return sorted({self.image_token_id, *self.seg_token_ids})

    @property
    def loss_weights(self) -> dict[str, float]:
        return LOSS_WEIGHTS | {
            "mask_bce": self.config.mask_bce_weight,
            "mask_dice": self.config.mask_dice_weight,
            "mask_prior": self.config.mask_prior_weight,
            "image_class_map": self.config.image_class_map_weight,
            "image_presence": self.config.image_presence_weight,
            "reader_presence": self.config.class_reader_weight,
            "reader_count": self.config.class_reader_weight,
            "reader_image_presence": self.config.class_reader_image_weight,
            "reader_image_count": self.config.class_reader_image_weight,
            "mask_colour_word": self.config.mask_colour_word_weight,
        }

    @property
    def vocab_size(self) -> int:
        return self.llm.config.vocab_size

    @property
    def reader_tokens(self) -> int:
        """How many tokens the class reader puts after the image tokens (0: none, or on words)."""
        after_image = self.class_reader is not None and self.config.class_reader_tokens == "after_image"
        return self.config.num_classes if after_image else 0

    # ------------------------------------------------------------------ image token expansion
    def embed_multimodal(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        vision_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor,
        tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None],
    ]:
        """Replace each sample's single ``<image>`` token by its N projected image tokens (and,
        with the class reader, one token per class after them, or its summaries on the words that
        name the classes: ``class_reader_tokens``).

        Returns (inputs_embeds [B, L+N−1, H], attention_mask, labels (−100 over image tokens),
        image_pos [B], (feat_lo, feat_hi, the class reader's maps or None)). Right padding stays
        right padding: every row grows by the same N−1, so one shift per sample fixes
        ``seg_positions``. ``vision_features``: the encoder's output for ``pixel_values`` computed
        elsewhere (training's feature cache). ``prompt_mask`` [B, L]: where the reader's summaries
        may go on class words, the prompt (default: where ``labels`` are −100, everywhere without
        labels: decoding embeds its generated words apart).
        """
        if vision_features is not None:
            feat_lo, feat_hi, tokens = vision_features
        else:
            with torch.no_grad():  # frozen encoder: no graph through it
                feat_lo, feat_hi, tokens = self.vision(pixel_values)
        image_embeds = self.projector(tokens)  # [B, N, H]
        if self.image_positions is not None:
            image_embeds = image_embeds + self.image_positions
        if self.image_colours is not None:
            cells = token_cell_colours(pixel_values, image_embeds.shape[1], self.config.image_colour_cells)
            image_embeds = image_embeds + self.image_colours(cells.to(image_embeds.dtype))
        is_image = input_ids == self.image_token_id
        if not bool((is_image.sum(1) == 1).all()):
            raise ValueError(
                f"every sample needs exactly one {IMAGE_TOKEN} token, got {is_image.sum(1).tolist()}"
            )
        image_pos = is_image.float().argmax(1)
        text_embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, self.pad_token_id))
        class_maps = None
        if self.class_reader is not None:
            class_maps = self.class_reader(feat_lo, feat_hi)
            if self.reader_tokens:
                image_embeds = torch.cat([image_embeds, self.class_reader.tokens(*class_maps, pixel_values)], 1)
            else:  # on the prompt's words that name a class; answers are generated without it
                if prompt_mask is None:
                    prompt_mask = labels == IGNORE_INDEX if labels is not None else torch.ones_like(is_image)
                text_embeds = self.class_reader.on_class_words(
                    text_embeds,
                    input_ids,
                    self.class_reader.summaries(*class_maps, pixel_values),
                    self.config.class_word_ids,
                    prompt_mask,
                )
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
        return torch.stack(rows_e), torch.stack(rows_m), new_labels, image_pos, (feat_lo, feat_hi, class_maps)

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
        colour_ids: torch.Tensor | None = None,
        vision_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        targets_complete: torch.Tensor | None = None,
        class_count_sample: torch.Tensor | None = None,
        class_count_ids: torch.Tensor | None = None,
        class_count_values: torch.Tensor | None = None,
        class_counts_known: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **_: Any,  # the loader's bookkeeping keys (record_ids, tasks, ...) are ignored
    ) -> GeoPixOutput:
        embeds, mask, labels, image_pos, (feat_lo, feat_hi, class_maps) = self.embed_multimodal(
            pixel_values, input_ids, attention_mask, labels, vision_features, prompt_mask
        )
        n_img = embeds.shape[1] - input_ids.shape[1] + 1  # image tokens in place of each <image>
        n_grid = n_img - self.reader_tokens  # the reader's come last
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        out = GeoPixOutput(loss=None, attention_mask=mask)
        seg = seg_positions is not None and target_sample is not None and len(seg_positions) > 0
        if seg:
            positions = seg_positions + (seg_positions > image_pos[target_sample]).long() * (n_img - 1)
            out.seg_positions = positions
            ema = None
            if self.training and self.config.memory_ema_momentum > 0 and target_masks is not None:
                ema = (target_masks, class_ids, self.config.memory_ema_momentum)
            seg_hidden = self.seg_hidden(hidden, positions, target_sample)
            out.mask_logits, out.class_logits = self.masks_from_seg_hidden(
                seg_hidden, target_sample, feat_lo, feat_hi, ema
            )
        states = hidden
        if seg and self.mask_colour_reader is not None:
            last = positions + len(self.seg_token_ids) - 1  # the state the word after the run comes from
            states = self.with_mask_colours(hidden, last, target_sample, out.mask_logits, pixel_values)
        logits = out.logits = self.llm.lm_head(states)
        losses: dict[str, torch.Tensor] = {}
        if labels is not None and bool((labels[:, 1:] != IGNORE_INDEX).any()):  # all-masked CE is NaN
            token_ce = F.cross_entropy(
                logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
            )
            answer_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(1)
            sample_text_loss = token_ce.sum(1) / answer_tokens
            if self.config.text_loss_mean == "answer":
                losses["text"] = sample_text_loss[answer_tokens > 0].mean()
            else:
                losses["text"] = token_ce.sum() / answer_tokens.sum()
            out.sample_text_loss = sample_text_loss.detach()
        if seg:
            if target_masks is not None and self.config.match_targets:
                order = match_targets(out.mask_logits, target_masks, target_sample, self.loss_weights)
                target_masks = target_masks[order]
                class_ids = class_ids[order] if class_ids is not None else None
                colour_ids = colour_ids[order] if colour_ids is not None else None
            if target_masks is not None:
                losses.update(mask_losses(out.mask_logits, target_masks))
                if self.config.mask_prior_weight > 0:
                    priors = self.mask_predictor.prior_grids(self.seg_projection(seg_hidden)[1])
                    losses["mask_prior"] = prior_loss(priors, target_masks)
            if class_ids is not None:
                losses["class"] = F.cross_entropy(out.class_logits.float(), class_ids)
            if self.config.mask_colour_word_weight > 0 and target_masks is not None and colour_ids is not None:
                named = colour_ids != IGNORE_INDEX
                if bool(named.any()):
                    losses["mask_colour_word"] = self.mask_colour_word_loss(
                        target_masks[named], target_sample[named], colour_ids[named], pixel_values
                    )
        maps_on = self.image_class_head is not None or class_maps is not None
        if maps_on and targets_complete is not None and class_ids is not None:
            complete = targets_complete[target_sample]
            if bool(complete.any()):
                known = (target_masks[complete], target_sample[complete], class_ids[complete])
                if self.image_class_head is not None:
                    losses["image_class_map"] = self.image_class_map_loss(embeds, image_pos, n_grid, *known)
                if class_maps is not None and self.config.class_reader_weight > 0:
                    losses.update(ClassReader.losses(*class_maps, *known))
        known_counts = class_counts_known is not None and bool(class_counts_known.any())
        if class_maps is not None and self.config.class_reader_image_weight > 0 and known_counts:
            losses.update(
                ClassReader.image_losses(
                    *class_maps,
                    class_count_sample,
                    class_count_ids,
                    class_count_values,
                    class_counts_known,
                    count_loss=self.config.class_reader_count_loss,
                )
            )
        if self.config.image_presence_weight > 0 and known_counts:
            losses["image_presence"] = self.image_presence_loss(
                embeds, image_pos, n_grid, class_count_sample, class_count_ids, class_counts_known
            )
        if losses:
            out.loss = sum(self.loss_weights[k] * v for k, v in losses.items())
            out.losses = losses
        return out

    def image_class_map_loss(
        self,
        embeds: torch.Tensor,
        image_pos: torch.Tensor,
        n_img: int,
        masks: torch.Tensor,
        sample: torch.Tensor,
        class_ids: torch.Tensor,
    ) -> torch.Tensor:
        """BCE of the class head on the image tokens the LLM reads (``embeds`` at ``image_pos``)
        against each class's share of every token's cell, for the (sample, class) pairs whose
        ``masks`` [T, S, S] are every instance of the class (the other classes are not known)."""
        side = round(n_img**0.5)  # the tokens are a square grid flattened row by row
        pairs, cover, _ = complete_class_targets(masks, sample, class_ids, side, self.config.num_classes)
        target = cover.clamp(max=1)
        rows = pairs // self.config.num_classes
        tokens = image_tokens(embeds, image_pos, rows, n_img)
        channel = (pairs % self.config.num_classes)[:, None, None].expand(-1, n_img, 1)
        logits = self.image_class_head(tokens).gather(-1, channel)[..., 0]  # [pairs, N]: each pair's class
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    def image_presence_loss(
        self,
        embeds: torch.Tensor,
        image_pos: torch.Tensor,
        n_img: int,
        count_sample: torch.Tensor,
        count_ids: torch.Tensor,
        known: torch.Tensor,
    ) -> torch.Tensor:
        """BCE of the class head's most confident image token, per class, against whether the
        picture holds the class, for every class of the pictures whose ``class_counts`` are known
        (``count_sample``/``count_ids``: the classes they hold)."""
        rows = known.nonzero()[:, 0]
        tokens = image_tokens(embeds, image_pos, rows, n_img)
        logits = self.image_class_head(tokens).amax(1)  # [known, classes]
        present = torch.zeros(len(known), self.config.num_classes, device=embeds.device)
        present[count_sample, count_ids] = 1.0
        return F.binary_cross_entropy_with_logits(logits.float(), present[rows])

    def with_mask_colours(
        self,
        hidden: torch.Tensor,
        last: torch.Tensor,
        sample: torch.Tensor,
        mask_logits: torch.Tensor,
        pixel_values: torch.Tensor,
    ) -> torch.Tensor:
        """[B, L, H] final-norm hidden states with each seg run's last state (at ``last`` [T] of
        ``sample`` [T]) plus the mask colour reader's reading of the mean colour under that run's
        mask: the state the word after the run is predicted from (the masks themselves come from
        the unchanged states)."""
        colours = mask_colours(mask_logits, pixel_values[sample])
        return hidden.index_put((sample, last), self.mask_colour_reader(colours.to(hidden.dtype)), accumulate=True)

    def mask_colour_word_loss(
        self, masks: torch.Tensor, sample: torch.Tensor, colour_ids: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of the output layer on the mask colour reader's reading alone (no LLM
        state) of the mean colour under each target's true ``masks`` [T, S, S], against the colour
        word its phrase says (``colour_ids`` [T]): the reader learns every colour the phrases name,
        not only those the colour questions of the training split happen to ask. The output layer
        is read, not trained, here: the reader learns its words, the words do not move to it."""
        weight = self.llm.lm_head.weight
        reading = self.mask_colour_reader(mean_colour(masks, pixel_values[sample]).to(weight.dtype))
        return F.cross_entropy(F.linear(reading, weight.detach()).float(), colour_ids)

    def seg_hidden(self, hidden: torch.Tensor, positions: torch.Tensor, target_sample: torch.Tensor) -> torch.Tensor:
        """[B, L, H] hidden states → [T, run, H], each seg run's states (``positions``: its start)."""
        run = len(self.seg_token_ids)
        if len(positions) and int(positions.max()) + run > hidden.shape[1]:
            raise ValueError(
                f"a seg run starting at {int(positions.max())} does not fit in {hidden.shape[1]} positions"
            )
        offset = self.config.seg_hidden_offset  # 0: each seg token's own state; −1: the one before it
        index = positions[:, None] + offset + torch.arange(run, device=positions.device)  # [T, run]
        return hidden[target_sample[:, None], index]

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
            feat_lo, feat_hi, pooled, target_sample, class_probs, self.config.image_size, ema_targets
        )
        return masks, class_logits

    # ---------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """A self-contained directory: ``model.safetensors`` (every weight, adapters included),
        ``geopix_config.json`` (:class:`GeoPixModelConfig`), ``tokenizer/`` and ``processor/``. No
        pickle; loading needs none of the original weight paths."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Under DeepSpeed every parameter is a view into one flat buffer, and tied weights share one
        # storage: safetensors writes neither as is, so those are cloned; the rest is written as it
        # is (an imported 7B model is not held twice).
        state, seen = {}, set()
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            storage = value.untyped_storage()
            shared = storage.data_ptr() in seen or storage.nbytes() != value.numel() * value.element_size()
            seen.add(storage.data_ptr())
            state[key] = value.clone().contiguous() if shared or not value.is_contiguous() else value
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        clip = getattr(self.vision, "clip", None)
        self.config.text_config = self.llm.config.to_dict()  # a pretrained LLM's own, resized
        self.config.vision_config = clip.config.to_dict() if clip is not None else None
        self.config.save_pretrained(directory)
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
        config = GeoPixModelConfig.from_pretrained(directory)
        lora, token_ids = config.lora, list(config.trainable_token_ids)
        model = cls(config)
        if lora:
            add_lora(model, lora["r"], lora["alpha"])
        if token_ids:
            add_trainable_tokens(model, token_ids)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device or "cpu")), strict=True)
        return model

    def processor(self) -> GeoPixProcessor:
        """The image preprocessing this model was trained with (saved beside its weights)."""
        return GeoPixProcessor.of(self.config.image_size, self.image_format)

    @property
    def image_format(self) -> ImageFormat:
        """What its vision encoder's weights expect (training batches and the processor use it)."""
        return ImageFormat(tuple(self.vision.image_mean), tuple(self.vision.image_std),
                           self.config.image_channel_order, self.config.image_resample)  # fmt: skip

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
def token_cell_colours(pixel_values: torch.Tensor, num_tokens: int, cells: int) -> torch.Tensor:
    """[B, 3, S, S] → [B, N, 3·k²]: per image token (a square grid, row by row, as the encoders
    flatten theirs), the mean of each of its k × k cells, channel by channel."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} image tokens are not a square grid")
    pooled = F.adaptive_avg_pool2d(pixel_values.float(), side * cells)  # [B, 3, side·k, side·k]
    b = pooled.shape[0]
    grid = pooled.view(b, 3, side, cells, side, cells).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(b, num_tokens, 3 * cells * cells)


def mask_colours(mask_logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[T, S, S] mask logits and [T, 3, S', S'] pixel values → [T, 3]: each mask's mean colour, over
    the pixels it draws (probability > 0.5, as answers draw them; detached), weighted by its
    probability; a mask that draws nothing averages its probabilities over the whole picture."""
    return mean_colour(mask_logits.detach().float().sigmoid(), pixel_values)


def mean_colour(probs: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[T, S, S] mask probabilities (a true mask: 0 or 1) → [T, 3] mean colours, as :func:`mask_colours`."""
    probs = probs.float()[:, None]
    if probs.shape[-2:] != pixel_values.shape[-2:]:
        probs = F.interpolate(probs, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    drawn = probs * (probs > 0.5)
    empty = drawn.flatten(1).sum(1) == 0
    weights = torch.where(empty[:, None, None, None], probs, drawn)
    return (weights * pixel_values.float()).sum((-2, -1)) / weights.sum((-2, -1)).clamp_min(1e-6)


def image_tokens(embeds: torch.Tensor, image_pos: torch.Tensor, rows: torch.Tensor, n_img: int) -> torch.Tensor:
    """[B, L, H] embeddings → [len(rows), n_img, H]: the first ``n_img`` image tokens of each of ``rows``
    (``image_pos``: where each sample's image tokens start)."""
    return embeds[rows[:, None], image_pos[rows][:, None] + torch.arange(n_img, device=embeds.device)]


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


def model_config(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    image_token_id: int,
    seg_token_ids: list[int],
    pad_token_id: int = 0,
) -> GeoPixModelConfig:
    """The model config of the pipeline's model section: architecture fields copied, the LLM's
    and the CLIP tower's configs read from their local weights where the section names them
    (otherwise the tiny LLaMA of its sizes and a ViT-L/14). Weight paths stay out of it."""
    from transformers import CLIPVisionConfig

    if cfg.llm_weights:
        text = LlamaConfig.from_pretrained(local_path(cfg.llm_weights, "model.llm_weights"), local_files_only=True)
        text.vocab_size = vocab_size
    else:
        text = llama_config(cfg, vocab_size)
    vision = None
    if cfg.vision_encoder == "clip":
        if cfg.vision_weights:
            path = local_path(cfg.vision_weights, "model.vision_weights")
            vision = CLIPVisionConfig.from_pretrained(path, local_files_only=True).to_dict()
        else:
            vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, patch_size=14, image_size=cfg.image_size,
                                      projection_dim=768).to_dict()  # fmt: skip
    shared = {f.name for f in fields(GeoPixModelConfig)} & set(type(cfg).model_fields)
    return GeoPixModelConfig(
        **{name: getattr(cfg, name) for name in shared},
        text_config=text.to_dict(),
        vision_config=vision,
        image_token_id=image_token_id,
        seg_token_ids=list(seg_token_ids),
        pad_token_id=pad_token_id,
        llm_pretrained=bool(cfg.llm_weights),
        projector_pretrained=bool(cfg.projector_weights),
    )


def build_model(cfg: ModelConfig, tokenizer: Any, pretrained: bool = True) -> GeoPixModel:
    """A GeoPix model for ``tokenizer`` (tokens added and embeddings sized to it) from the
    pipeline's model section; ``pretrained`` reads the weights it names (local paths:
    ``geopix.weights.local_weights`` fetches S3 ones), and EfficientNet-lite0's packaged ImageNet
    weights when it names none."""
    add_geopix_tokens(tokenizer, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = model_config(
        cfg,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        seg_token_ids=cfg.seg_vocabulary.token_ids(tokenizer),
        pad_token_id=pad,
    )
    if not pretrained:
        return GeoPixModel(config)
    vision = cfg.vision_weights or (lite0_weights_path() if cfg.vision_encoder == "efficientnet_lite0" else None)
    return GeoPixModel(
        config, vision_weights=vision, llm_weights=cfg.llm_weights, projector_weights=cfg.projector_weights
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (works on the meta device)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
