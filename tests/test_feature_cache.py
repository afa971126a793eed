"""Training's vision feature cache: each upright image's frozen features computed once, flips and
rotations applied to the feature maps, the identity exactly the encoder's output, memory bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geopix.config import load_config
from geopix.data.augment import TRANSFORM_BY_NAME, TRANSFORMS
from geopix.data.batches import iter_batches
from geopix.data.tokenizer import corpus_texts, train_tokenizer
from geopix.model import build_model
from geopix.train.feature_cache import VisionFeatureCache, transform_maps, undo_transform_maps
from geopix.train.stages import set_stage
from tests.records import SEG_VOCAB, make_record
from tests.test_model import SIZE, SMALL


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Four images; each also under a second record id, so augmentation turns it another way."""
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


def batches(records, tokenizer, *, augment: bool, epoch: int = 0, batch_size: int = 4) -> list[dict]:
    return list(iter_batches(records, tokenizer, image_size=SIZE, batch_size=batch_size, max_length=None,
                             augment=augment, seed=3, epoch=epoch, seg_vocab=SEG_VOCAB, chat_template=2))  # fmt: skip


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to a batched convolution's rounding (another batch, other kernels: ~2e-5)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


class EncoderCalls:
    """Counts the images the vision encoder runs on."""

    def __init__(self, encoder: torch.nn.Module):
        self.images = 0
        encoder.register_forward_hook(lambda module, args, out: setattr(self, "images", self.images + len(args[0])))


def test_feature_maps_turn_as_the_image_does():
    """The torch maps follow Transform.image (the pixels, masks and text of a sample) exactly, and
    the undo is its inverse: a wrong axis order would put a sample's features under other targets."""
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3))  # not square: an axis mix-up shows
    maps = torch.from_numpy(image).permute(2, 0, 1)
    for transform in TRANSFORMS:
        turned = transform_maps(transform, maps)
        assert torch.equal(turned, torch.from_numpy(np.ascontiguousarray(transform.image(image))).permute(2, 0, 1))
        assert torch.equal(undo_transform_maps(transform, turned), maps), transform.name


def test_each_upright_image_is_encoded_once_and_turned_with_its_sample(model, records, tokenizer):
    calls = EncoderCalls(model.vision)
    cache = VisionFeatureCache(model.vision, 2**30)
    seen = set()
    for epoch in range(3):
        for batch in batches(records, tokenizer, augment=True, epoch=epoch):
            seen.update(batch["transforms"])
            feat_lo, feat_hi, tokens = cache(batch["pixel_values"], batch["transforms"])
            with torch.no_grad():
                direct_lo, direct_hi, direct_tokens = model.vision(batch["pixel_values"])
            for i, name in enumerate(batch["transforms"]):
                transform = TRANSFORM_BY_NAME[name]
                with torch.no_grad():
                    upright = model.vision(undo_transform_maps(transform, batch["pixel_values"][i])[None])
                close(feat_lo[i], transform_maps(transform, upright[0][0]))
                close(feat_hi[i], transform_maps(transform, upright[1][0]))
                if transform.name == "identity":  # exactly the encoder's own features
                    close(feat_lo[i], direct_lo[i])
                    close(feat_hi[i], direct_hi[i])
                    close(tokens[i], direct_tokens[i])
    assert len(seen - {"identity"}) >= 2, seen  # the check above covered real turns
    # 4 images under 8 record ids and 3 epochs: the encoder (hooked, so the direct calls above count
    # too) ran on each image once for the cache, the rest were the test's own calls.
    direct = 3 * len(records) * 2  # the batch call and the upright call per sample
    assert calls.images - direct == 4 and len(cache.entries) == 4
    assert cache.stats()["hit_rate"] == pytest.approx(1 - 4 / (3 * len(records)))


def test_losses_and_gradients_with_the_cache_equal_those_without(model, records, tokenizer):
    batch = batches(records, tokenizer, augment=False, batch_size=8)[0]
    grads = []
    for cache in (None, VisionFeatureCache(model.vision, 2**30)):
        model.zero_grad(set_to_none=True)
        features = cache(batch["pixel_values"], batch["transforms"]) if cache else None
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
    cache(batch["pixel_values"], batch["transforms"])
    assert len(cache.entries) == 2 and cache.bytes <= 2 * one and cache.evictions == 2
    again = cache(batch["pixel_values"][:1], batch["transforms"][:1])  # evicted first: computed again
    assert calls.images == 4 + 1
    close(again[0][0], direct[0][0])
    tiny = VisionFeatureCache(model.vision, one - 1)  # smaller than one image: nothing kept, still right
    close(tiny(batch["pixel_values"], batch["transforms"])[1], direct[1])
    assert not tiny.entries and tiny.bytes == 0
