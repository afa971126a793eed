"""The chat template every GeoPix model is trained and answers with (LLaVA v1 / Vicuna style,
without a system prompt)::

    USER: <image>\\n[refer] the car on the left ASSISTANT: Sure, it is [SEG0]…[SEG5].</s>USER: … ASSISTANT: …</s>

Training batches, the tokenizer corpus and the model's generation all render turns through here,
so the prompt of generation is exactly the prompt of training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

EOS_TOKEN = "</s>"  # LLaMA's end of sequence; ends every assistant turn

# The template's pieces. A user turn is encoded as one piece `USER: {text} ASSISTANT:` and its
# answer as ` {text}` + eos, so the prompt of generation is exactly the prompt of training.
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = " ASSISTANT:"


def prompt_text(user_text: str) -> str:
    """One user turn as the model sees it, up to where the assistant starts answering."""
    return f"{USER_PREFIX}{user_text}{ASSISTANT_PREFIX}"


def assistant_turn_text(assistant_text: str) -> str:
    """One assistant turn without its eos (training batches append the eos id)."""
    return f" {assistant_text}"


def chat_text(conversation: Sequence[Mapping[str, Any]], eos: str = EOS_TOKEN) -> str:
    """A whole conversation rendered with the template (for the tokenizer corpus and for reading)."""
    parts = []
    for turn in conversation:
        if turn["role"] == "user":
            parts.append(prompt_text(turn["text"]))
        else:
            parts.append(assistant_turn_text(turn["text"]) + eos)
    return "".join(parts)
