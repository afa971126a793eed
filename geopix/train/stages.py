"""The two training stages' policies: which of the model's parameters train (GEOPIX.md §2)."""

from __future__ import annotations

from typing import Literal

from geopix.config import ModelConfig
from geopix.model.adapters import add_lora, add_trainable_tokens
from geopix.model.modeling import GeoPixModel


def set_stage(model: GeoPixModel, stage: Literal[1, 2], policy: ModelConfig | None = None) -> None:
    """Trainable parameters of a training stage (GEOPIX.md §2, our design).

    Stage 1: vision and LLM frozen except the rows of the tokens GeoPix adds (embedding and
    output); the projector is frozen only when it was loaded pretrained. An LLM with random
    weights (tiny) trains whole. Stage 2: LoRA (q/v) on a frozen LLM + the new token rows,
    projector, seg projection, mask predictor, memory and class head; a random LLM again trains
    whole (its LoRA adapters alongside).
    With a pretrained LLM, "the new rows" are peft ``TrainableTokens`` deltas of just those rows
    (``new_token_rows_only``, default); otherwise the whole embedding and output matrices train.
    ``policy``: the pipeline's model section, for the LoRA rank/alpha and ``new_token_rows_only``
    (its defaults when None); whether the LLM/projector were pretrained is the model's own record.
    """
    policy = policy or ModelConfig()
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    random_llm = not model.config.llm_pretrained
    if stage == 2 and not model.lora:
        add_lora(model, policy.lora_rank, policy.lora_alpha)
    rows_only = not random_llm and policy.new_token_rows_only
    if rows_only and not model.trainable_token_ids:
        add_trainable_tokens(model, model.new_token_ids)
    model.requires_grad_(False)
    for module in (model.seg_projection, model.mask_predictor, model.class_head, model.mask_colour_reader):
        if module is not None:
            module.requires_grad_(True)
    for name, param in model.llm.named_parameters():
        if "trainable_tokens_delta" in name:
            param.requires_grad_(True)
    if not rows_only:
        model.llm.get_input_embeddings().requires_grad_(True)
        model.llm.get_output_embeddings().requires_grad_(True)
    if stage == 1:
        model.projector.requires_grad_(random_llm or not model.config.projector_pretrained)
        if random_llm:
            model.llm.requires_grad_(True)
    else:
        model.projector.requires_grad_(True)
        for name, param in model.llm.named_parameters():
            # LoRA adapts a pretrained LLM; a random one (tiny) has nothing to preserve and
            # trains whole, or it could not learn stage 2's text tasks (captions, VQA, boxes).
            if "lora_" in name or random_llm:
                param.requires_grad_(True)
    # Trained when the projector is.
    for companion in (model.image_positions, model.image_colours, model.image_class_head, model.class_reader):
        if companion is not None:
            companion.requires_grad_(model.projector[0].weight.requires_grad)
    model.vision.requires_grad_(False)
    model.stage = stage
