"""Training's vision feature cache: each picture's frozen features computed once as the encoder sees
it, every sample exactly the encoder's output, gradients unchanged, memory bounded."""

from __future__ import annotations

import pytest
import torch

from geopix.config import load_config
from geopix.data.batches import iter_batches
from geopix.data.tokenizer import corpus_texts, train_tokenizer
from geopix.model import build_model
from geopix.train.feature_cache import VisionFeatureCache
from geopix.train.stages import set_stage
from tests.records import SEG_VOCAB, make_record
from tests.test_model import SIZE, SMALL


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Four images, each under two record ids (as a picture's segmentation and caption records are)."""
    base = [make_record(i, class_id=i % 3) for i in range(4)]
    return base + [dict(r, record_id=r["record_id"] + "-again") for r in base]


@pytest.fixture(scope="module")
def tokenizer(records):
    return train_tokenizer(corpus_texts(records), vocab_size=300, seg_vocab=SEG_VOCAB)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = build_model(load_config("tiny", SMALL).model, tokenizer)
    set_stage(model, 1)
    return model


def batches(records, tokenizer, *, augment: bool, epoch: int = 0, batch_size: int = 4, turn_per_image: bool = False) -> list[dict]:
    return list(iter_batches(records, tokenizer, image_size=SIZE, batch_size=batch_size, max_length=None,
                             augment=augment, seed=3, epoch=epoch, seg_vocab=SEG_VOCAB, chat_template=2,
                             turn_per_image=turn_per_image))  # fmt: skip


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to a batched convolution's rounding (another batch, other kernels: ~2e-5)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


class EncoderCalls:
    """Counts the images the vision encoder runs on."""

    def __init__(self, encoder: torch.nn.Module):
        self.images = 0
        encoder.register_forward_hook(lambda module, args, out: setattr(self, "images", self.images + len(args[0])))


def test_each_picture_is_encoded_once_and_every_sample_gets_the_encoders_features(model, records, tokenizer):
    calls = EncoderCalls(model.vision)
    cache = VisionFeatureCache(model.vision, 2**30)
    pictures, samples, direct_images = set(), 0, 0
    for epoch in range(3):
        for batch in batches(records, tokenizer, augment=True, epoch=epoch, turn_per_image=True):
            pictures.update(zip(batch["image_ids"], batch["transforms"], strict=True))
            samples += len(batch["transforms"])
            feat_lo, feat_hi, tokens = cache(batch["pixel_values"])
            with torch.no_grad():
                direct = model.vision(batch["pixel_values"])
            direct_images += len(batch["transforms"])
            for got, expected in zip((feat_lo, feat_hi, tokens), direct, strict=True):
                close(got, expected)
    assert len({turn for _, turn in pictures} - {"identity"}) >= 2, pictures  # real turns were covered
    # 4 images under 8 record ids, 3 epochs: the encoder (hooked, so the test's direct calls count
    # too) ran once per (image, turn) for the cache: two records of an image share their turn.
    assert calls.images - direct_images == len(pictures) == len(cache.entries) < samples
    assert cache.stats()["hit_rate"] == pytest.approx(1 - len(pictures) / samples)


def test_losses_and_gradients_with_the_cache_equal_those_without(model, records, tokenizer):
    batch = batches(records, tokenizer, augment=False, batch_size=8)[0]
    grads = []
    for cache in (None, VisionFeatureCache(model.vision, 2**30)):
        model.zero_grad(set_to_none=True)
        features = cache(batch["pixel_values"]) if cache else None
        out = model(**batch, vision_features=features)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if cache is None:
            losses = {k: float(v) for k, v in out.losses.items()}
    assert {k: float(v) for k, v in out.losses.items()} == pytest.approx(losses, rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_cache_stays_within_its_bound_and_recomputes_what_it_evicted(model, records, tokenizer):
    batch = batches(records[:4], tokenizer, augment=False)[0]
    with torch.no_grad():
        direct = model.vision(batch["pixel_values"])
    one = sum(t[0].numel() * t.element_size() for t in direct[:2])  # one image's two maps
    cache = VisionFeatureCache(model.vision, 2 * one)
    calls = EncoderCalls(model.vision)
    cache(batch["pixel_values"])
    assert len(cache.entries) == 2 and cache.bytes <= 2 * one and cache.evictions == 2
    again = cache(batch["pixel_values"][:1])  # evicted first: computed again
    assert calls.images == 4 + 1
    close(again[0][0], direct[0][0])
    tiny = VisionFeatureCache(model.vision, one - 1)  # smaller than one image: nothing kept, still right
    close(tiny(batch["pixel_values"])[1], direct[1])
    assert not tiny.entries and tiny.bytes == 0
