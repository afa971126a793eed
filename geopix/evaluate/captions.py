"""Caption metrics: corpus BLEU-4 and CIDEr-D, computed by pycocoevalcap's scorers (the COCO caption
evaluation code). Its PTB tokenizer needs Java, so captions are tokenised here instead: lower case,
punctuation removed, split on white space — what the PTB tokenizer does to plain English captions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_PUNCTUATION = re.compile(r"[^\w\s]|_")


def caption_tokens(text: str) -> str:
    """The caption as space-separated lower-case tokens without punctuation."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of one predicted caption per id against its reference captions.

    Returns ``{"BLEU-4": …, "CIDEr": …, "captions": n}``; an empty prediction scores 0 on its own
    terms (it still counts in the corpus). CIDEr's document frequencies come from the references
    of this corpus, as in the COCO evaluation, so it needs more than one image to mean anything.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        missing = sorted(set(references) ^ set(predictions))[:5]
        raise ValueError(f"predictions and references cover different ids, e.g. {missing}")
    if not predictions:
        return {"captions": 0}
    gts = {k: [caption_tokens(r) for r in references[k]] for k in predictions}
    if any(not refs for refs in gts.values()):
        raise ValueError("every caption needs at least one reference")
    # An empty hypothesis breaks the scorers' n-gram counting; a token that is in no reference
    # scores the same (no matches) and keeps its length at one.
    res = {k: [caption_tokens(v) or "<empty>"] for k, v in predictions.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(cider), "captions": len(predictions)}
