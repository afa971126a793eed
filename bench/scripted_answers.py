"""Answers scripted through a model's LM head, for benches of models with random weights: a random
LLM writes no seg run, so a forward hook makes each decoding step's argmax the script's next token
(each ``lm_head`` call of ``chat`` is one decoding step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def script_answers(model: Any, script: Sequence[int]) -> tuple[Any, Callable[[], None]]:
    """Hook ``model.llm.lm_head`` so that decoding step n answers ``script[n]`` (its last token past
    the end). Returns (the hook's handle, ``reset``: start the script again, once per ``chat``)."""
    import torch

    step = {"n": 0}

    def force(_module, _inputs, output):
        boost = torch.zeros(output.shape[-1], device=output.device, dtype=output.dtype)
        boost[script[min(step["n"], len(script) - 1)]] = 1e4
        step["n"] += 1
        return output + boost

    return model.llm.lm_head.register_forward_hook(force), lambda: step.update(n=0)
