"""The tiny preset's tokenizer and the chat template every GeoPix model is trained with.

A real model (LLaVA/Vicuna from a local path) brings its own tokenizer; the model package adds
``<image>`` and the seg tokens to it. The tiny preset has no pretrained LLM, so it trains a small
byte-level BPE on the instruction corpus here and saves it beside the model (GEOPIX.md §1).

Whatever the tokenizer, the training input (:mod:`geopix.data.batches`) needs only this interface:
``encode(text, add_special_tokens=False)`` (or ``__call__``), ``convert_tokens_to_ids``,
``pad_token_id``, ``eos_token_id`` and, when it has one, ``bos_token_id``.

The chat template itself (LLaVA v1 / Vicuna style) is :mod:`geopix.chat_template`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from geopix.chat_template import EOS_TOKEN, chat_text
from geopix.vocabulary import IMAGE_TOKEN, SegVocabulary

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
UNK_TOKEN = "<unk>"

def corpus_texts(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The conversations of ``records`` as the model will read them: the BPE's training corpus."""
    for record in records:
        conversation = record.get("conversation") or []
        if conversation:
            yield chat_text(conversation)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2000,
    *,
    seg_vocab: SegVocabulary,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` with pad/bos/eos/unk, ``<image>`` and ``seg_vocab``'s tokens.

    The image and seg tokens are special tokens of the ``tokenizers`` model, which are split
    off before byte-level pre-tokenisation: ``"it is [SEG0][SEG1]."`` and ``"a[SEG0]b"`` each give
    one id per seg token, never a merge with the text around it. ``__call__``/``encode`` prepend
    ``<s>`` (as LLaMA tokenizers do); the loader encodes pieces with ``add_special_tokens=False``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    segs = seg_vocab.tokens
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, *segs]
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # Every byte is in the vocabulary, so no text ever maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, *segs],
        padding_side="right",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write the tokenizer into a local directory (``tokenizer.json`` + config); no hub involved."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Read a tokenizer saved by :func:`save_tokenizer`; only local files, never a hub lookup."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
