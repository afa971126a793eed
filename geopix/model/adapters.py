"""peft adapters GeoPix puts into its LLM: LoRA on the attention projections, and trainable rows
of the tokens it adds. Training decides when (geopix.train.stages); a saved model records which
it has, so loading rebuilds the same modules before reading the weights."""

from __future__ import annotations

import warnings

from torch import nn

LORA_TARGETS = ("q_proj", "v_proj")


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16) -> None:
    """LoRA adapters (peft) injected in place into the LLM's q/v projections."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS))
    with warnings.catch_warnings():  # peft warns when a second adapter kind joins the model; intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model.llm)
    model.config.lora = {"r": r, "alpha": alpha}


def add_trainable_tokens(model: nn.Module, token_ids: list[int]) -> None:
    """peft ``TrainableTokens`` on the embedding and output layers: only ``token_ids``' rows train
    (a small delta per layer), the pretrained matrices stay frozen and out of the optimizer."""
    from peft import TrainableTokensConfig, inject_adapter_in_model

    config = TrainableTokensConfig(token_indices=list(token_ids), target_modules=["embed_tokens", "lm_head"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model.llm, adapter_name="geopix_tokens")
    model.config.trainable_token_ids = list(token_ids)
