"""The class reader: per-class presence and count maps from the vision encoder's features, summed
up per class into what the LLM reads: one token per class after the image tokens, or an addition
to the prompt's words that name the class (``class_reader_tokens``).

Why: the LLM reads 64 stride-32 image tokens, and from them it did not learn whether a class is
in the picture at all. Asked "Is there a storage tank …?", the 2026-12-06 model put the same
probability on "No" (about 0.3) whether there was one or not, on its own training pictures too,
and a linear class head on those tokens told present from absent classes at an AUC of 0.77
(docs/evaluation_history.md). Presence and count answers, and the count a "segment every X"
answer states before its seg runs, all need that reading. The reader looks where the mask decoder
does (the fine level, with the coarse level for context) and hands the LLM, per class, the
class's own learned embedding plus what its maps say: how sure it is the class is there and how
many instances it counts. The LLM then only has to match the class its question names.
Measured (docs/evaluation_history.md, 2026-12-06): maps trained only on pairs where their class
is there read presence at an AUC of 0.73; :meth:`ClassReader.image_losses` trains them from each
picture's ``class_counts`` (every class, present or not) and they read it at 0.99. The LLM did
not read the asked class's token after the image (forcing that token moved no answer); on the
words that name the class, presence answers follow the summary.

Maps are ``grid`` × ``grid`` cells (stride 8 at the tiny preset's 256 px), trained where the
class map is (:func:`complete_class_targets`): presence by BCE against each class's share of a
cell, counts by the L1 distance to each instance's share of a cell (a class's map sums to its
count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POISSON_EPS = 1e-4  # log(total + eps): an absent class's count map may sum to almost 0


class ClassReader(nn.Module):
    def __init__(
        self,
        fine_channels: int,
        coarse_channels: int,
        num_classes: int,
        hidden: int,
        grid: int,
        width: int = 32,
        on_class_words: bool = False,
        word_scale: float = 0.0,
        colours: bool = False,
    ):
        super().__init__()
        self.grid = grid
        self.word_scale = word_scale
        self.colours = colours
        self.fine = nn.Sequential(nn.Conv2d(fine_channels, width, 3, padding=1), nn.GELU())
        self.coarse = nn.Conv2d(coarse_channels, width, 1)
        self.maps = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, 2 * num_classes, 1)
        )
        # Counts start near zero (about 0.1 per class over the whole map). From softplus(0) ≈ 0.69 per
        # cell, a class would start near 700 instances at grid 32: an L1 loss in the hundreds whose
        # gradient, under global gradient clipping, shrank every other part's first steps.
        with torch.no_grad():
            self.maps[-1].bias[num_classes:] = math.log(math.expm1(0.1 / grid**2))
        # (presence, log(1 + count)[, its mean colour]) of a class → the rest of its token, or what
        # is added to the words that name it (:meth:`summaries`).
        self.summary = nn.Sequential(nn.Linear(5 if colours else 2, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        if on_class_words:  # the word itself says which class: no embedding of its own
            self.class_embeddings = None
            if not word_scale:
                # The words start as the LLM has them (the reader's input grows from zero, like the
                # image tokens' place embeddings); a random start would swamp embeddings of std 0.02.
                # (A rescaled summary keeps its random start: rescaling needs a direction.)
                nn.init.zeros_(self.summary[-1].weight)
                nn.init.zeros_(self.summary[-1].bias)
        else:
            self.class_embeddings = nn.Parameter(torch.randn(num_classes, hidden) * 0.02)

    def forward(self, feat_fine: torch.Tensor, feat_coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, C_fine, h, w] and [B, C_coarse, h', w'] → (presence logits, counts ≥ 0),
        each [B, classes, grid, grid]."""
        grid = self.grid
        x = self.fine(F.adaptive_avg_pool2d(feat_fine, grid))
        x = x + F.interpolate(self.coarse(feat_coarse), size=(grid, grid), mode="bilinear", align_corners=False)
        presence, counts = self.maps(x).chunk(2, dim=1)
        return presence, F.softplus(counts)

    @staticmethod
    def read(presence: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class [B, classes]: the most confident cell's presence logit and the summed count,
        what :meth:`summaries` carries and :meth:`image_losses` trains."""
        return presence.flatten(2).amax(-1), counts.flatten(2).sum(-1)

    def summaries(self, presence: torch.Tensor, counts: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the maps say per class [B, classes, hidden]: :meth:`read`'s presence and
        log(1 + count) (with ``colours``, also :func:`class_colours` of ``pixel_values``), through
        a small MLP."""
        most, total = self.read(presence, counts)
        read = [most.sigmoid()[..., None], torch.log1p(total)[..., None]]
        if self.colours:
            read.append(class_colours(presence, pixel_values).to(most.dtype))
        return self.summary(torch.cat(read, -1))

    def tokens(self, presence: torch.Tensor, counts: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """One token per class [B, classes, hidden]: its embedding plus its maps' summary."""
        return self.class_embeddings + self.summaries(presence, counts, pixel_values)

    def on_class_words(
        self,
        text_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        summaries: torch.Tensor,
        word_ids: list[list[list[int]]],
        asked: torch.Tensor,
    ) -> torch.Tensor:
        """``text_embeds`` [B, L, H] with each class's summary added to every token of the words
        that name it (``word_ids``: per class, the token sequences of its words) where ``asked``
        [B, L] (the prompt, not an answer: generated words are embedded without it, so training
        must not see it there either). With ``word_scale`` > 0 each added summary is rescaled to
        that many times the RMS of the word's own embedding."""
        named = named_classes(input_ids, word_ids).masked_fill(~asked, -1)  # [B, L]
        picked = summaries.gather(1, named.clamp(min=0)[..., None].expand(-1, -1, summaries.shape[-1]))
        if self.word_scale:
            # Unscaled, the summary grew to about 18× the word's norm and the word's identity faded:
            # count answers named another class than asked (docs/evaluation.md). The word's RMS is
            # the yardstick, not a path for the gradient (it would grow both without end).
            word_rms, picked_rms = rms(text_embeds.detach()), rms(picked).clamp(min=1e-6)
            picked = picked * (self.word_scale * word_rms / picked_rms).to(picked.dtype)
        return text_embeds + picked * (named >= 0)[..., None].to(picked.dtype)

    @staticmethod
    def losses(
        presence: torch.Tensor,
        counts: torch.Tensor,
        masks: torch.Tensor,
        sample: torch.Tensor,
        class_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """BCE of the presence map and the L1 distance of the count map (summed over the cells,
        averaged over the pairs) for the (sample, class) pairs whose ``masks`` are complete."""
        num_classes, grid = presence.shape[1], presence.shape[-1]
        pairs, cover, instances = complete_class_targets(masks, sample, class_ids, grid, num_classes)
        rows, channels = pairs // num_classes, pairs % num_classes
        return {
            "reader_presence": F.binary_cross_entropy_with_logits(
                presence[rows, channels].flatten(1).float(), cover.clamp(max=1)
            ),
            "reader_count": (counts[rows, channels].flatten(1).float() - instances).abs().sum(1).mean(),
        }

    @staticmethod
    def image_losses(
        presence: torch.Tensor,
        counts: torch.Tensor,
        count_sample: torch.Tensor,
        count_ids: torch.Tensor,
        count_values: torch.Tensor,
        known: torch.Tensor,
        count_loss: str = "log_l1",
    ) -> dict[str, torch.Tensor]:
        """For every class of the pictures whose ``class_counts`` are ``known`` [B] (packed as
        ``count_sample``/``count_ids``/``count_values``: the classes they hold): BCE of the most
        confident cell against whether the picture holds the class, and for the summed count
        (``count_loss``) the L1 distance of log(1 + it) to log(1 + the class's count), or the
        Poisson negative log-likelihood of the class's count given it (total − count · log total)."""
        rows = known.nonzero()[:, 0]
        truth = counts.new_zeros(known.shape[0], presence.shape[1])
        truth[count_sample, count_ids] = count_values.to(truth.dtype)
        truth = truth[rows]
        most, total = (x.float() for x in ClassReader.read(presence[rows], counts[rows]))  # [known, classes]
        return {
            "reader_image_presence": F.binary_cross_entropy_with_logits(most, (truth > 0).float()),
            "reader_image_count": (
                F.poisson_nll_loss(total, truth, log_input=False, eps=POISSON_EPS)
                if count_loss == "poisson"  # its gradient, 1 − count / total, does not fade as counts grow
                else (torch.log1p(total) - torch.log1p(truth)).abs().mean()
            ),
        }


def class_colours(presence: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, classes, 3]: per class, the mean of the picture's (normalised) pixel values over the
    presence map's cells, each cell weighted by how sure the map is that the class is there.

    Why: the LLM answers colour questions with the three commonest colour words; probes name an
    object's colour from the tokens it reads under the object's mask for about half the test
    objects, from the mean colour under the mask for 0.94 (bench/colour_probe.py). With this read,
    seeds 0-1, the answers did not move (docs/evaluation_history.md, 2026-12-07). The weights are
    detached: the presence maps are trained by their own losses, not bent to carry colour."""
    weights = presence.detach().float().sigmoid().flatten(2)  # [B, classes, g²]
    cells = F.adaptive_avg_pool2d(pixel_values.float(), presence.shape[-1]).flatten(2)  # [B, 3, g²]
    return (weights @ cells.transpose(1, 2)) / weights.sum(-1, keepdim=True).clamp(min=1e-6)


def rms(x: torch.Tensor) -> torch.Tensor:
    """The root mean square over the last axis, in float32, kept as a size-1 axis."""
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


def complete_class_targets(
    masks: torch.Tensor, sample: torch.Tensor, class_ids: torch.Tensor, side: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (sample, class) pairs of ``masks`` [T, S, S] (every instance of the class: the other
    classes are not known), and per pair over ``side`` × ``side`` cells flattened row by row
    [pairs, side²]: the share of each cell the class covers (summed over instances, so overlaps
    may exceed 1) and how many instances lie in it (each instance spread by its share of pixels,
    so a pair's row sums to its count; an empty mask counts for nothing). Pairs are ``sample ×
    num_classes + class``, sorted."""
    cover = F.adaptive_avg_pool2d(masks[:, None].float(), side).flatten(1)  # [T, side²]
    share = cover / cover.sum(1, keepdim=True).clamp(min=1e-12)
    pairs, pair_of = torch.unique(sample * num_classes + class_ids, return_inverse=True)
    zeros = cover.new_zeros(len(pairs), side * side)
    return pairs, zeros.index_add(0, pair_of, cover), zeros.index_add(0, pair_of, share)


def class_word_ids(class_names: list[str], tokenizer) -> list[list[list[int]]]:
    """Per class, the token sequences of the last word of its name (``storage_tank`` → "tank") as
    it follows a space, singular and plural ("tank", "tanks", "tankes": a form no text uses
    matches nothing): the words :meth:`ClassReader.on_class_words` marks."""
    ids = []
    for name in class_names:
        word = name.replace("_", " ").replace("-", " ").split()[-1].lower()
        forms = [tokenizer.encode(f" {form}", add_special_tokens=False) for form in (word, f"{word}s", f"{word}es")]
        ids.append([f for i, f in enumerate(forms) if f and f not in forms[:i]])
    return ids


def named_classes(input_ids: torch.Tensor, word_ids: list[list[list[int]]]) -> torch.Tensor:
    """[B, L]: the class whose word each token is part of (every token of a matched sequence), or
    −1. A word that begins another ("ship" in "shipyard") is matched too."""
    named = torch.full_like(input_ids, -1)
    length = input_ids.shape[1]
    for c, sequences in enumerate(word_ids):
        for seq in sequences:
            k = len(seq)
            if k > length:
                continue
            starts = torch.ones_like(input_ids[:, : length - k + 1], dtype=torch.bool)
            for j, token in enumerate(seq):
                starts &= input_ids[:, j : length - k + 1 + j] == token
            for j in range(k):
                named[:, j : length - k + 1 + j].masked_fill_(starts, c)
    return named
