"""Answering: text and masks from a GeoPix model, decoded with a KV cache or teacher-forced.

:class:`GenerationMixin` gives :class:`~geopix.model.modeling.GeoPixModel` its answering methods
(as transformers' ``GenerationMixin`` does for its models): ``chat`` decodes a batch of
instructions token by token and turns every complete seg run into a mask; ``answer_forced`` and
``segment_answer`` take a given answer and need one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from geopix.answer_form import boxes_from_masks, stated_count
from geopix.chat_template import assistant_turn_text, prompt_text
from geopix.vocabulary import IMAGE_TOKEN, seg_run_starts


@dataclass
class ChatAnswer:
    text: str
    masks: torch.Tensor  # [runs, S, S] bool, one per complete [SEG0]… run
    class_probs: torch.Tensor  # [runs, C]
    mask_probs: torch.Tensor | None = None  # [runs, S, S] float: the mask probabilities ``masks`` thresholds

    @property
    def stated_count(self) -> int | None:
        """How many instances the text says it lists ("There are 3 …:"), None where it says not;
        ``len(masks)`` is how many it does list."""
        return stated_count(self.text)

    @classmethod
    def from_logits(cls, text: str, mask_logits: torch.Tensor, class_logits: torch.Tensor) -> ChatAnswer:
        probs = mask_logits.float().sigmoid().cpu()
        return cls(text, probs > 0.5, class_logits.float().softmax(-1).cpu(), probs)


class GenerationMixin:
    """Answering methods of :class:`~geopix.model.modeling.GeoPixModel` (they use its LLM, its
    multimodal embedding, its mask predictor and ``seg_token_ids``)."""

    def prompt_ids(self, instruction: str, tokenizer: Any) -> list[int]:
        """Token ids of one user turn up to where the answer starts (``<image>`` added when missing)."""
        text = instruction if IMAGE_TOKEN in instruction else f"{IMAGE_TOKEN}\n{instruction}"
        ids = tokenizer.encode(prompt_text(text, self.config.chat_template), add_special_tokens=False)
        return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids

    @torch.no_grad()
    def chat(
        self,
        pixel_values: torch.Tensor,
        instructions: list[str],
        tokenizer: Any,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[ChatAnswer]:
        """Answer one instruction per image: text, one mask per complete seg run, and the class
        head's distribution per run.

        The batch is decoded together: prompts are left-padded, the LLM keeps a KV cache, and the
        final-norm hidden state of every generated token is kept, so the seg runs' masks need no
        second pass through the LLM. Greedy by default; ``do_sample`` draws with ``temperature``
        and nucleus ``top_p``.
        """
        if len(instructions) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(instructions)} instructions")
        was_training = self.training
        self.eval()
        device = pixel_values.device
        prompts = [self.prompt_ids(text, tokenizer) for text in instructions]
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):  # left padding: every row's last prompt token is at −1
            input_ids[i, width - len(ids) :] = torch.tensor(ids, device=device)
            attention[i, width - len(ids) :] = 1
        embeds, attention, _, _, (feat_lo, feat_hi, _) = self.embed_multimodal(
            pixel_values.to(self.projector[0].weight.dtype), input_ids, attention, None
        )
        positions = (attention.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.llm.config)
        out = self.llm.model(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True
        )
        next_position = positions[:, -1:] + 1
        logits = self.llm.lm_head(out.last_hidden_state[:, -1]).float()
        eos = tokenizer.eos_token_id
        tokens: list[list[int]] = [[] for _ in prompts]
        # Each row's hidden states from its last prompt token on: entry j + 1 is generated token j's,
        # entry j the one that predicted it (a release model's seg prompts, seg_hidden_offset = −1).
        hidden: list[list[torch.Tensor]] = [[out.last_hidden_state[i, -1]] for i in range(len(prompts))]
        # Masks of the runs the colour reader already decoded, by row and run start, for the answers.
        run_masks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in prompts]
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            token = sample_next(logits, do_sample, temperature, top_p, generator)
            token = token.masked_fill(finished, self.pad_token_id)
            for i in (~finished).nonzero()[:, 0].tolist():
                tokens[i].append(int(token[i]))
            finished |= token == eos
            if bool(finished.all()):
                break
            # Feed the new token: its hidden state (for seg runs) and the next logits.
            attention = torch.cat([attention, (~finished).long()[:, None]], 1)
            out = self.llm.model(
                inputs_embeds=self.llm.get_input_embeddings()(token[:, None]),
                attention_mask=attention,
                position_ids=next_position,
                cache=cache,
                use_cache=True,
            )
            next_position = next_position + 1
            for i in (~finished).nonzero()[:, 0].tolist():
                hidden[i].append(out.last_hidden_state[i, -1])
            states = out.last_hidden_state[:, -1:]
            if self.mask_colour_reader is not None:
                states = self._with_run_colours(
                    states, tokens, hidden, finished, pixel_values, feat_lo, feat_hi, run_masks
                )
            logits = self.llm.lm_head(states[:, 0]).float()
        run_text = tokenizer.decode(self.seg_token_ids, skip_special_tokens=False)
        answers = [
            self._answer(i, tokens[i], hidden[i], feat_lo, feat_hi, tokenizer, run_text, run_masks[i])
            for i in range(len(prompts))
        ]
        self.train(was_training)
        return answers

    def _with_run_colours(
        self,
        states: torch.Tensor,
        tokens: list[list[int]],
        hidden: list[list[torch.Tensor]],
        finished: torch.Tensor,
        pixel_values: torch.Tensor,
        feat_lo: torch.Tensor,
        feat_hi: torch.Tensor,
        run_masks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]],
    ) -> torch.Tensor:
        """[B, 1, H] states of the tokens just fed, where a token ends a seg run with the mask colour
        reader's reading of that run's mask added (``with_mask_colours``, as training reads it). The
        runs' (mask logits, class logits) go into ``run_masks`` so the answers need not decode them again."""
        run = len(self.seg_token_ids)
        rows = [i for i in (~finished).nonzero()[:, 0].tolist() if tokens[i][-run:] == self.seg_token_ids]
        if not rows:
            return states
        starts = [len(tokens[i]) - run for i in rows]
        seg_hidden = torch.stack([self._run_hidden(hidden[i], p) for i, p in zip(rows, starts)])
        sample = torch.tensor(rows, device=states.device)
        masks, class_logits = self.masks_from_seg_hidden(seg_hidden, sample, feat_lo, feat_hi)
        for k, (i, p) in enumerate(zip(rows, starts)):
            run_masks[i][p] = (masks[k], class_logits[k])
        last = torch.zeros_like(sample)
        return self.with_mask_colours(states, last, sample, masks, pixel_values)

    def _run_hidden(self, hidden: list[torch.Tensor], start: int) -> torch.Tensor:
        """[run, H] states a seg run's mask is decoded from, the run's first token being generated
        token ``start`` (``hidden[j + 1]`` is generated token j's state, ``hidden[j]`` the one that
        predicted it: a release model's seg prompts, ``seg_hidden_offset`` = −1)."""
        first = 1 + self.config.seg_hidden_offset + start
        return torch.stack(hidden[first : first + len(self.seg_token_ids)])

    def _answer(
        self,
        sample: int,
        tokens: list[int],
        hidden: list[torch.Tensor],
        feat_lo: torch.Tensor,
        feat_hi: torch.Tensor,
        tokenizer: Any,
        run_text: str,
        run_masks: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> ChatAnswer:
        """Text and one mask per complete seg run of one generated answer (``run_text``: a run as
        the tokenizer decodes it; ``run_masks``: runs already decoded, by start)."""
        text = decoded_answer(tokens, tokenizer)
        starts = seg_run_starts(tokens, self.seg_token_ids)
        if not starts:
            return self._answer_without_masks(text)
        missing = [p for p in starts if p not in run_masks]
        if missing:
            seg_hidden = torch.stack([self._run_hidden(hidden, p) for p in missing])
            target_sample = torch.full((len(missing),), sample, dtype=torch.long, device=seg_hidden.device)
            masks, class_logits = self.masks_from_seg_hidden(seg_hidden, target_sample, feat_lo, feat_hi)
            run_masks = {**run_masks, **dict(zip(missing, zip(masks, class_logits)))}
        masks = torch.stack([run_masks[p][0] for p in starts])
        class_logits = torch.stack([run_masks[p][1] for p in starts])
        return _boxed(ChatAnswer.from_logits(text, masks, class_logits), run_text)

    def _answer_without_masks(self, text: str) -> ChatAnswer:
        size = self.config.image_size
        return ChatAnswer(
            text, torch.zeros(0, size, size, dtype=torch.bool), torch.zeros(0, self.config.num_classes), torch.zeros(0, size, size)
        )

    @torch.no_grad()
    def answer_forced(
        self, pixel_values: torch.Tensor, instruction: str, answer: str, tokenizer: Any
    ) -> list[ChatAnswer]:
        """Every image answered with the given ``answer`` text (``{seg}`` marks each seg run) to one
        ``instruction``, teacher-forced: one forward pass for the whole batch instead of token-by-token
        decoding. Where greedy decoding would write the same answer, the masks are the same (up to
        floating-point summation order), since a causal LLM's hidden state at a token depends only
        on the tokens before it."""
        was_training = self.training
        self.eval()
        run_text = tokenizer.decode(self.seg_token_ids, skip_special_tokens=False)
        answer_ids = tokenizer.encode(assistant_turn_text(answer.replace("{seg}", run_text)), add_special_tokens=False)
        prompt = self.prompt_ids(instruction, tokenizer)
        starts = [len(prompt) + p for p in seg_run_starts(answer_ids, self.seg_token_ids)]
        if not starts:
            raise ValueError(f"forced answer {answer!r} has no {{seg}} run")
        device, batch = pixel_values.device, len(pixel_values)
        input_ids = torch.tensor([prompt + answer_ids] * batch, device=device)
        out = self(
            pixel_values.to(self.projector[0].weight.dtype),
            input_ids,
            torch.ones_like(input_ids),
            prompt_mask=prompt_mask(input_ids, len(prompt)),  # the answer's words, embedded as generated
            seg_positions=torch.tensor(starts * batch, device=device),
            target_sample=torch.arange(batch, device=device).repeat_interleave(len(starts)),
        )
        text = decoded_answer(answer_ids, tokenizer)
        k = len(starts)
        answers = [
            _boxed(
                ChatAnswer.from_logits(text, out.mask_logits[i * k : (i + 1) * k], out.class_logits[i * k : (i + 1) * k]),
                run_text,
            )
            for i in range(batch)
        ]
        self.train(was_training)
        return answers

    @torch.no_grad()
    def segment_answer(
        self, image: torch.Tensor, ids: list[int], prompt_len: int, tokenizer: Any
    ) -> ChatAnswer:
        """Masks and class distributions for the complete seg runs of a given answer ``ids[prompt_len:]``
        (teacher-forced: one pass over the whole sequence)."""
        run = self.seg_token_ids
        starts = [prompt_len + p for p in seg_run_starts(ids[prompt_len:], run)]
        text = decoded_answer(ids[prompt_len:], tokenizer)
        if not starts:
            return self._answer_without_masks(text)
        input_ids = torch.tensor([ids], device=image.device)
        out = self(
            image,
            input_ids,
            torch.ones_like(input_ids),
            prompt_mask=prompt_mask(input_ids, prompt_len),
            seg_positions=torch.tensor(starts, device=image.device),
            target_sample=torch.zeros(len(starts), dtype=torch.long, device=image.device),
        )
        return ChatAnswer.from_logits(text, out.mask_logits, out.class_logits)


def _boxed(answer: ChatAnswer, run_text: str) -> ChatAnswer:
    """The answer whose boxes stated after seg runs are the runs' mask boxes (geopix.answer_form)."""
    answer.text = boxes_from_masks(answer.text, run_text, answer.masks.numpy())
    return answer


def prompt_mask(input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[B, L]: True on the first ``prompt_len`` tokens of prompt + answer ids. Teacher-forced
    answers pass it so that the model embeds the answer's words as training and decoding do (the
    class reader's summaries go on the prompt's words only), without labels and their text loss."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, :prompt_len] = True
    return mask


def decoded_answer(tokens: list[int], tokenizer: Any) -> str:
    """An answer's tokens as text, seg tokens kept, the end-of-sequence token dropped."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return text.replace(tokenizer.eos_token or "\0", "").strip()


def sample_next(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of ``logits [B, V]``: argmax, or a draw with temperature and nucleus top-p."""
    if not do_sample:
        return logits.argmax(-1)
    probs = (logits / max(temperature, 1e-5)).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
