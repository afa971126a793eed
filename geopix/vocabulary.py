"""The token conventions records, batches and the model share: the image token, the labels that
are not supervised, and the seg-token vocabulary — how an answer stands for a mask.

An answer holds one *run* per target, ``[SEG0][SEG1]…[SEG{n-1}]`` with n = ``tokens_per_scale`` ×
``num_scales`` (3 × 2 by default, GEOPIX.md §1): the mask decoder reads ``tokens_per_scale`` prompt
tokens per scale from the run's hidden states. This is the one definition of it: the generator
and the importers write runs with it, sharding checks records against it, the tokenizer and the
model add its tokens, and answers are read with it. A run's vocabulary is its config's
``model.seg_vocabulary``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"  # where the image's tokens go in a prompt (a record's first user turn starts with it)
IGNORE_INDEX = -100  # the label of a token that is not supervised (prompts, padding)

# Any run of seg tokens, whatever its vocabulary: for showing and normalising answer text.
ANY_SEG_RUN = re.compile(r"(\[SEG\d+\])+")


@dataclass(frozen=True)
class SegVocabulary:
    tokens_per_scale: int = 3
    num_scales: int = 2

    def __post_init__(self):
        if self.tokens_per_scale < 1 or self.num_scales < 1:
            raise ValueError(f"a seg vocabulary needs at least 1 token per scale and 1 scale, not {self}")

    @property
    def run_length(self) -> int:
        return self.tokens_per_scale * self.num_scales

    @property
    def tokens(self) -> list[str]:
        """``[SEG0]…[SEG{n-1}]``: the tokens a tokenizer must hold, in run order."""
        return [f"[SEG{i}]" for i in range(self.run_length)]

    @property
    def run(self) -> str:
        """The text of one run: what an answer writes for each target."""
        return "".join(self.tokens)

    def count_runs(self, text: str) -> tuple[int, list[str]]:
        """(complete runs, problems) in ``text``: a broken or partial run is a problem, not a run."""
        problems = []
        leftover = text.replace(self.run, "")
        if ANY_SEG_RUN.search(leftover):
            problems.append(f"seg tokens outside a complete {self.run} run")
        return text.count(self.run), problems

    def token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the run's tokens in ``tokenizer``; a clear error when it lacks any of them."""
        ids = [tokenizer.convert_tokens_to_ids(token) for token in self.tokens]
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(self.tokens, ids, strict=True) if i is None or (unk is not None and i == unk)]
        if missing:
            raise ValueError(f"tokenizer lacks the seg tokens {missing}; add them as special tokens first")
        return ids


def seg_run_starts(ids: Sequence[int], run_ids: Sequence[int]) -> list[int]:
    """Start indices of the complete, non-overlapping runs ``run_ids`` in the token ids ``ids``."""
    ids, run = list(ids), list(run_ids)
    starts, p = [], 0
    while True:
        try:  # jump to the next run's first token (a C-level search, not a step per token)
            p = ids.index(run[0], p)
        except ValueError:
            return starts
        if ids[p : p + len(run)] == run:
            starts.append(p)
            p += len(run)
        else:
            p += 1
