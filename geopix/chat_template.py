"""The chat template every GeoPix model is trained and answers with (LLaVA v1 / Vicuna style,
without a system prompt)::

    USER: <image>\\n[refer] the car on the left ASSISTANT: Sure, it is [SEG0]…[SEG5].</s>USER: … ASSISTANT: …</s>

Training batches, the tokenizer corpus and the model's generation all render turns through here,
so the prompt of generation is exactly the prompt of training.

Versions (a model records the one it was trained with, ``GeoPixModelConfig.chat_template``):

1. as above: the answer follows ``ASSISTANT:``.
2. the task tag of the instruction is said again where the answer starts, as part of the prompt::

       USER: <image>\\n[caption] Write a detailed description … ASSISTANT: [caption] A harbour with …</s>

   The tag decides the answer's form (a caption, "Sure, it is [SEG…]", a box, a short VQA answer),
   and a small LLM reads it best right where it starts to write. Trained on a few phrasings per
   task, the tiny model chose the form from the sentence instead: held-out phrasings got captions
   answered like segmentations and count questions answered "Yes, there …" (docs/evaluation_history.md).
   The tag is the user's own, so nothing is added that the instruction does not say; an
   instruction without a tag is rendered as in version 1.
3. version 1 after LLaVA v1's system sentence, once at the start of a conversation: the
   authors' release was trained and answers with it (``geopix model import-release`` sets it)::

       A chat between a curious human and … questions. USER: <image>\n[refer] … ASSISTANT: …</s>
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

EOS_TOKEN = "</s>"  # LLaMA's end of sequence; ends every assistant turn

# The template's pieces. A user turn is encoded as one piece `USER: {text} ASSISTANT:` and its
# answer as ` {text}` + eos, so the prompt of generation is exactly the prompt of training.
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = " ASSISTANT:"
VERSIONS = (1, 2, 3)
# LLaVA v1's system sentence (version 3), followed by one space and the first user turn.
SYSTEM_SENTENCE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# A task tag ("[refer]", "[Visual Question Answering]") opening a line of the instruction (the
# first line is "<image>").
_TASK_TAG = re.compile(r"^[ \t]*(\[[^\]\n]+\])", re.MULTILINE)


def task_tag(user_text: str) -> str | None:
    """The task tag the instruction opens with, or None."""
    found = _TASK_TAG.search(user_text)
    return found.group(1) if found else None


def prompt_text(user_text: str, version: int = 1, first: bool = True) -> str:
    """One user turn as the model sees it, up to where the assistant starts answering
    (``first``: the conversation's first turn, which version 3 opens with the system sentence)."""
    if version not in VERSIONS:
        raise ValueError(f"chat template version {version!r}; GeoPix has {list(VERSIONS)}")
    text = f"{USER_PREFIX}{user_text}{ASSISTANT_PREFIX}"
    if version == 3 and first:
        text = f"{SYSTEM_SENTENCE} {text}"
    tag = task_tag(user_text) if version == 2 else None
    return f"{text} {tag}" if tag else text


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
