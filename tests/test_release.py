"""The release's mask path in GeoPix gives the masks the authors' modules give (recorded fixture)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from geopix.model.mask import SegProjection
from geopix.model.release_import import ReleaseImportError, release_mask_state
from geopix.model.release_mask import ReleaseMaskPredictor
from tests.release_checkpoint import FIXTURE, SIZES, fixture_tensor


@pytest.fixture(scope="module")
def fixture():
    with safe_open(str(FIXTURE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        shapes = json.loads(f.metadata()["shapes"])
    release = {f"{part}/{k}": fixture_tensor(f"{part}/{k}", shape) for part, keys in shapes.items() for k, shape in keys.items()}
    return tensors, release


def geopix_mask_path(release: dict[str, torch.Tensor]) -> tuple[SegProjection, ReleaseMaskPredictor, dict[str, str]]:
    d = SIZES["dim"]
    projection = SegProjection(SIZES["llm_hidden"], d, 2, 3, weighting="linear")
    predictor = ReleaseMaskPredictor(lo_channels=SIZES["clip_hidden"], hi_channels=SIZES["clip_hidden"], dim=d,
                                     neck_dim=SIZES["neck_mid"], num_scales=2, num_classes=4, memory_len=0,
                                     memory_dim=8)  # fmt: skip
    state, dropped = release_mask_state(release, num_scales=2)
    prefixes = {"seg_projection.": projection, "mask_predictor.": predictor}
    for prefix, module in prefixes.items():
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)  # every GeoPix parameter comes from the release
    assert all(k.startswith(tuple(prefixes)) for k in state)
    return projection.eval(), predictor.eval(), dropped


def test_imported_mask_path_gives_the_authors_masks(fixture):
    recorded, release = fixture
    projection, predictor, dropped = geopix_mask_path(release)
    grid = SIZES["patches"]

    def level(x: torch.Tensor) -> torch.Tensor:  # [1, patches, C] → [1, C, g, g], row-major patches
        return x.transpose(1, 2).reshape(1, -1, grid, grid)

    with torch.no_grad():
        _, pooled = projection(recorded["seg_hidden"])
        masks, per_level = predictor(level(recorded["layer_m11"]), level(recorded["layer_m2"]), pooled,
                                     torch.zeros(SIZES["targets"], dtype=torch.long), None, out_size=128)  # fmt: skip
    assert [tuple(p.shape[-2:]) for p in per_level] == [(64, 64), (128, 128)]
    expected = recorded["masks"]
    assert expected.abs().max() > 1  # not a degenerate fixture
    torch.testing.assert_close(masks, expected, atol=1e-5, rtol=1e-5)  # measured: 1e-6
    assert ((masks > 0) == (expected > 0)).float().mean() > 0.999
    # what was left out, and why
    assert any("learnable_memory" in name for name in dropped)
    assert all(reason for reason in dropped.values())


def test_every_release_tensor_is_mapped_or_dropped_with_a_reason(fixture):
    _, release = fixture
    state, dropped = release_mask_state(release, num_scales=2)
    scalars = [n for n in release if "scalar" in n]
    # one GeoPix tensor per upstream tensor, except: the 2 levels' Fourier matrices → 1 stacked
    # buffer, the 3 + 2 scalars → 2 tensors
    assert len(state) - 1 - 2 + len(dropped) == len(release) - 2 - len(scalars)
    with pytest.raises(ReleaseImportError, match="seg/mask_decoder.something_new"):
        release_mask_state({**release, "seg/mask_decoder.something_new": torch.zeros(1)}, num_scales=2)


# ------------------------------------------------------------------ a whole model with the release's decoder
@pytest.fixture(scope="module")
def release_model():
    """A tiny CLIP + LLaMA GeoPix model decoding masks the release's way (random weights)."""
    from dataclasses import replace

    from transformers import CLIPVisionConfig

    from geopix.config import load_config
    from geopix.data.tokenizer import corpus_texts, train_tokenizer
    from geopix.model import GeoPixModel
    from geopix.model.modeling import add_geopix_tokens, model_config
    from tests.records import SEG_VOCAB, make_record

    records = [make_record(i, size=56, class_id=i % 3) for i in range(4)]
    tokenizer = train_tokenizer(corpus_texts(records), vocab_size=300, seg_vocab=SEG_VOCAB)
    cfg = load_config("tiny", ["model.vision_encoder=clip", "model.image_size=56", "model.llm_hidden_size=64",
                               "model.llm_num_layers=2", "model.llm_intermediate_size=128", "model.memory_len=0"]).model  # fmt: skip
    add_geopix_tokens(tokenizer, cfg)
    config = model_config(cfg, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          seg_token_ids=cfg.seg_vocabulary.token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=11, num_attention_heads=4,
                              patch_size=14, image_size=56).to_dict()  # fmt: skip
    # The release's decoder has no 8×8 prior for the preset's prior term to train, and its own places.
    config = replace(config, vision_config=vision, mask_decoder="release", release_neck_dim=32, decoder_dim=64,
                     seg_hidden_offset=-1, seg_token_weighting="linear", chat_template=2,
                     mask_prior_weight=0.0, mask_position_embedding="linear")  # fmt: skip
    torch.manual_seed(0)
    return GeoPixModel(config), tokenizer, records


def test_a_release_decoder_model_trains_chats_in_batches_and_reloads(release_model, tmp_path):
    from geopix.data.batches import iter_batches
    from geopix.model import GeoPixModel
    from tests.records import SEG_VOCAB

    model, tokenizer, records = release_model
    batch = next(iter(iter_batches(records, tokenizer, image_size=56, batch_size=4, max_length=None, augment=False,
                                   seed=0, seg_vocab=SEG_VOCAB, chat_template=2)))  # fmt: skip
    model.train()
    out = model(**batch)
    assert out.mask_logits.shape == (4, 56, 56) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.mask_predictor.transformers[0].layers[0].self_attn.q_proj.weight.grad is not None
    model.zero_grad()
    pixels = batch["pixel_values"][:2]
    prompts = [r["conversation"][0]["text"] for r in records[:2]]
    batched = model.chat(pixels, prompts, tokenizer, max_new_tokens=12)
    alone = [model.chat(pixels[i : i + 1], prompts[i : i + 1], tokenizer, max_new_tokens=12)[0] for i in range(2)]
    assert [a.text for a in batched] == [a.text for a in alone]
    forced = model.answer_forced(pixels, prompts[0], "Sure, it is {seg}.", tokenizer)
    model.save(tmp_path / "m", tokenizer)
    again = GeoPixModel.load(tmp_path / "m")
    assert again.config.mask_decoder == "release" and again.config.seg_hidden_offset == -1
    reloaded = again.answer_forced(pixels, prompts[0], "Sure, it is {seg}.", tokenizer)
    for a, b in zip(forced, reloaded, strict=True):
        torch.testing.assert_close(a.mask_probs, b.mask_probs)


def test_options_of_geopix_decoder_are_refused_for_a_release_decoder(release_model):
    """The release's decoder has no 8×8 prior and its own places: asking for either is an error, not ignored."""
    from dataclasses import replace

    from geopix.model.modeling import build_mask_predictor

    config = release_model[0].config
    for option, value in (("mask_prior_weight", 1.0), ("mask_position_embedding", "fourier")):
        with pytest.raises(ValueError, match=f"{option}.*release's"):
            build_mask_predictor(replace(config, **{option: value}), lo_channels=32, hi_channels=32)
    assert isinstance(build_mask_predictor(config, lo_channels=32, hi_channels=32), ReleaseMaskPredictor)


def test_a_release_decoder_model_generates_the_masks_of_its_forward_pass(release_model):
    """With ``seg_hidden_offset = −1`` a seg token's prompt is the hidden state before it: the masks
    of a seg run the model writes while generating (from the states kept during decoding) are the
    masks of the same answer teacher-forced (one forward pass)."""
    import copy

    from geopix.data.batches import iter_batches
    from tests.records import SEG_VOCAB

    model, tokenizer, records = release_model
    model = copy.deepcopy(model)
    batch = next(iter(iter_batches(records, tokenizer, image_size=56, batch_size=4, max_length=None, augment=False,
                                   seed=0, seg_vocab=SEG_VOCAB, chat_template=2)))  # fmt: skip
    prompts = [r["conversation"][0]["text"] for r in records]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(12):  # until every answer writes a seg run (a few dozen steps)
        for _ in range(5):
            model.train()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        answers = model.chat(batch["pixel_values"], prompts, tokenizer, max_new_tokens=24)
        if all(len(a.masks) for a in answers):
            break
    assert all(len(a.masks) for a in answers), [a.text for a in answers]
    run_text = tokenizer.decode(model.seg_token_ids, skip_special_tokens=False)
    for i, answer in enumerate(answers):
        [forced] = model.answer_forced(batch["pixel_values"][i : i + 1], prompts[i], answer.text.replace(run_text, "{seg}"), tokenizer)
        assert forced.text == answer.text
        torch.testing.assert_close(answer.mask_probs, forced.mask_probs, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ a tiny checkpoint in the release's layout
def release_image_processor():
    """The release's image processor at the tiny size: transformers' CLIP processor with its
    defaults (bicubic shortest-side resize, centre crop, CLIP mean/std), on PIL as the release ran it."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


def write_tiny_release(directory, shapes: dict[str, dict[str, list[int]]]) -> None:
    """A checkpoint directory as the release has it: ``vlm/`` (a tiny LLaVA saved by transformers,
    with ``vision/`` and ``text/`` configs), ``seg/``, ``pec/``, ``clm/`` (safetensors + config), the
    ``.pth`` files, the root config and tokenizer. Mask-path sizes are the fixture's (D = 256, CLIP
    width 32, LLM width 64); the memory slots, which the release never reads, are cut small."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from geopix.config import load_config
    from geopix.data.tokenizer import corpus_texts, train_tokenizer
    from geopix.model.modeling import add_geopix_tokens
    from tests.records import SEG_VOCAB, make_record
    from tests.release_checkpoint import PART_CONFIGS

    tokenizer = train_tokenizer(corpus_texts([make_record(i, size=56) for i in range(4)]), vocab_size=300, seg_vocab=SEG_VOCAB)
    add_geopix_tokens(tokenizer, load_config("tiny").model)
    tokenizer.save_pretrained(str(directory))
    release_image_processor().save_pretrained(str(directory))
    vision = CLIPVisionConfig(hidden_size=SIZES["clip_hidden"], intermediate_size=64, num_hidden_layers=11,
                              num_attention_heads=4, patch_size=14, image_size=56)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=SIZES["llm_hidden"], intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>")))  # fmt: skip
    llava.save_pretrained(str(directory / "vlm"))
    for sub, cfg in (("vision", vision), ("text", text)):
        cfg.save_pretrained(str(directory / "vlm" / sub))
    (directory / "config.json").write_text(json.dumps({"seg_token_num": 3, "image_feature_scale_num": 2,
                                                       "bce_loss_weight": 2.0, "dice_loss_weight": 0.5}))  # fmt: skip
    for part, keys in shapes.items():
        tensors = {k: fixture_tensor(f"{part}/{k}", [1] * len(v) if "learnable_memory" in k else v) for k, v in keys.items()}
        if part.endswith(".pth"):
            torch.save(list(tensors.values()) if "scalar" in part else tensors, directory / part)
        else:
            (directory / part).mkdir()
            save_file(tensors, str(directory / part / "model.safetensors"))
            (directory / part / "config.json").write_text(json.dumps(PART_CONFIGS[part]))


def test_import_release_accounts_for_every_tensor_and_the_model_answers(fixture, tmp_path):
    from geopix.model import GeoPixModel
    from geopix.model.release_import import import_release
    from geopix.model.release_mask import ReleaseMaskPredictor

    with safe_open(str(FIXTURE), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    write_tiny_release(tmp_path / "release", shapes)
    report = import_release(tmp_path / "release", tmp_path / "geopix")
    assert report["mapped"] + len(report["dropped_tensors"]) == report["release_tensors"]
    assert report["geopix_own_at_their_start"] == ["class_head.bias", "class_head.weight"]
    assert any("discards" in reason for reason in report["dropped"])
    model = GeoPixModel.load(tmp_path / "geopix")
    assert isinstance(model.mask_predictor, ReleaseMaskPredictor) and model.config.seg_hidden_offset == -1
    _, release = fixture
    state, _ = release_mask_state(release, num_scales=2)
    torch.testing.assert_close(model.mask_predictor.transformers[1].layers[0].self_attn.q_proj.weight,
                               state["mask_predictor.transformers.1.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "geopix" / "tokenizer"))
    pixels = torch.randn(2, 3, 56, 56)
    answers = model.answer_forced(pixels, "<image>\n[refer] the ship", "Sure, it is {seg}.", tokenizer)
    assert [a.masks.shape for a in answers] == [(1, 56, 56)] * 2
    chat = model.chat(pixels, ["<image>\n[refer] the ship"] * 2, tokenizer, max_new_tokens=8)
    assert len(chat) == 2


def test_an_imported_model_reads_images_and_prompts_as_the_release_does(fixture, tmp_path):
    """The release feeds its CLIP processor OpenCV's BGR arrays and prompts with LLaVA v1's system
    sentence: an imported model's processor gives the release processor's pixels for the BGR array
    of the same square image, and its prompt opens with the sentence."""
    import numpy as np

    from geopix.chat_template import SYSTEM_SENTENCE
    from geopix.model import GeoPixModel
    from geopix.model.release_import import import_release

    with safe_open(str(FIXTURE), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    write_tiny_release(tmp_path / "release", shapes)
    report = import_release(tmp_path / "release", tmp_path / "geopix")
    assert report["config"] | {"image_channel_order": "bgr", "image_resample": "bicubic", "chat_template": 3} == report["config"]
    model, tokenizer, processor = GeoPixModel.load_pretrained(tmp_path / "geopix")
    rgb = np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # what cv2.imread gives the release
    theirs = release_image_processor()(images=bgr, return_tensors="pt").pixel_values
    torch.testing.assert_close(processor([rgb]), theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(processor([bgr]), theirs, atol=1e-2)  # the channel order matters
    prompt = tokenizer.decode(model.prompt_ids("[refer] the ship", tokenizer))
    assert prompt.count(SYSTEM_SENTENCE) == 1 and prompt.index(SYSTEM_SENTENCE) < prompt.index("USER: <image>")


def test_an_imported_model_gives_the_text_logits_of_the_releases_llava(fixture, tmp_path):
    """The release's text comes from its ``vlm/``, a transformers LLaVA (the authors' subclass adds
    only a second read of the vision tower for the masks): the imported model's next-token logits
    for an image and a prompt are LLaVA's own, run from the same files."""
    from transformers import LlavaForConditionalGeneration

    from geopix.model import GeoPixModel
    from geopix.model.release_import import import_release

    with safe_open(str(FIXTURE), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    write_tiny_release(tmp_path / "release", shapes)
    import_release(tmp_path / "release", tmp_path / "geopix")
    model, tokenizer, _ = GeoPixModel.load_pretrained(tmp_path / "geopix")
    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "release" / "vlm"), local_files_only=True).eval()
    pixels = torch.randn(2, 3, 56, 56)
    prompt = model.prompt_ids("[refer] the ship on the left", tokenizer)
    image_at = prompt.index(model.image_token_id)
    expanded = prompt[:image_at] + [model.image_token_id] * model.vision.num_tokens(56) + prompt[image_at + 1 :]
    with torch.no_grad():
        ours = model(pixels, torch.tensor([prompt] * 2), torch.ones(2, len(prompt), dtype=torch.long)).logits[:, -1]
        theirs = llava(input_ids=torch.tensor([expanded] * 2), pixel_values=pixels).logits[:, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def test_a_release_processor_geopix_cannot_reproduce_is_named(tmp_path):
    from geopix.model.release_import import PROCESSOR_CONFIG, ReleaseImportError, release_image_resample

    assert release_image_resample(tmp_path, 56) == "bicubic"  # no processor file: CLIP's own
    processor = release_image_processor()
    processor.resample = 2
    processor.save_pretrained(str(tmp_path))
    assert release_image_resample(tmp_path, 56) == "bilinear"
    with pytest.raises(ReleaseImportError, match=f"{PROCESSOR_CONFIG}: crop_size 56, the vision tower reads 336"):
        release_image_resample(tmp_path, 336)
    processor.image_mean = [0.485, 0.456, 0.406]
    processor.save_pretrained(str(tmp_path))
    with pytest.raises(ReleaseImportError, match=f"{PROCESSOR_CONFIG}: image_mean"):
        release_image_resample(tmp_path, 56)


def test_cli_imports_a_release_to_s3_and_chats_with_it(fixture, stack, tmp_path):
    import subprocess

    import numpy as np

    from geopix import storage
    from tests.conftest import geopix_cli
    from tests.records import png_bytes

    with safe_open(str(FIXTURE), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    write_tiny_release(tmp_path / "release", shapes)
    out = "s3://geopix-checkpoints/tests/release-import"
    imported = subprocess.run([*geopix_cli(), "model", "import-release", str(tmp_path / "release"), "--out", out,
                               "--overwrite"], check=False, capture_output=True, text=True)  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert "dropped" in imported.stdout and storage.is_finished(out)
    report = json.loads(storage.read_bytes(f"{out}/import_report.json"))
    assert report["config"]["mask_decoder"] == "release"
    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)))
    chat = subprocess.run([*geopix_cli(), "chat", "--model", out, "--image", str(image), "--instruction",
                           "[refer] the ship", "--out", str(tmp_path / "overlay.png"), "--max-new-tokens", "8"],
                          check=False, capture_output=True, text=True)  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert (tmp_path / "overlay.png").exists()


@pytest.mark.parametrize("layout", ["before 4.52", "after 4.52"])
def test_vlm_keys_of_both_transformers_layouts_map_to_the_same_geopix_keys(layout):
    from geopix.model.release_import import _vlm_key

    old = {"vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "vision.clip.encoder.layers.0.mlp.fc1.weight",
           "multi_modal_projector.linear_2.bias": "projector.2.bias",
           "language_model.model.layers.1.self_attn.q_proj.weight": "llm.model.layers.1.self_attn.q_proj.weight",
           "language_model.lm_head.weight": "llm.lm_head.weight"}  # fmt: skip
    new = {"model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": old["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"],
           "model.multi_modal_projector.linear_2.bias": "projector.2.bias",
           "model.language_model.layers.1.self_attn.q_proj.weight": "llm.model.layers.1.self_attn.q_proj.weight",
           "lm_head.weight": "llm.lm_head.weight"}  # fmt: skip
    for key, ours in (old if layout == "before 4.52" else new).items():
        assert _vlm_key(key) == ours
    assert _vlm_key("vision_tower.vision_model.embeddings.position_ids") is None
    with pytest.raises(ReleaseImportError, match="something_else"):
        _vlm_key("something_else.weight")


# ------------------------------------------------------------------------------ the pipeline on an imported model
IMPORTED = "s3://geopix-checkpoints/tests/release-imported"


@pytest.fixture(scope="module")
def imported(fixture, small_shards, tmp_path_factory) -> str:
    """The tiny release imported with GeoPix's class memory (8 slots), published in S3 by the CLI."""
    from typer.testing import CliRunner

    from geopix.cli import app

    root = tmp_path_factory.mktemp("release")
    with safe_open(str(FIXTURE), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    write_tiny_release(root, shapes)
    done = CliRunner().invoke(app, ["model", "import-release", str(root), "--out", IMPORTED, "--memory-len", "8", "--overwrite"])
    assert done.exit_code == 0, done.output
    return IMPORTED


def test_an_imported_model_evaluates_and_segments_scenes_in_batches(imported, small_shards):
    """`geopix eval` and batch segmentation take an imported model as they take a trained one:
    its own input size (56 px here, the shards' chips are 64), format and prompt, 4 at a time."""
    from geopix.config import load_config
    from geopix.data import synth
    from geopix.evaluate.job import evaluate_model
    from geopix.infer.segment import segment_scenes

    cfg = load_config("tiny", ["evaluate.batch_size=4", "evaluate.max_new_tokens=12", "segment.batch_size=4",
                               "segment.overlap=0", "segment.max_new_tokens=12", "tracking.system_metrics=false",
                               "tracking.experiment=geopix-tests-release"])  # fmt: skip
    result = evaluate_model(cfg, imported, shards_uri=small_shards, split="test", name="release-imported",
                            out_uri="s3://geopix-checkpoints/tests/evals")  # fmt: skip
    summary = result.summary
    assert summary["records"] > 4 and summary["failed"] == 0, summary.get("failures")
    assert summary["segmentation"]["overall"]["targets"] > 0
    scenes = "s3://geopix-scenes/tests/release"
    synth.generate_scene(scenes, "scene-r", 112, seed=4, progress=False)
    [scene] = segment_scenes(cfg, imported, [f"{scenes}/scene-r/image.tif"], "s3://geopix-predictions/tests/release",
                             overwrite=True, progress=False)  # fmt: skip
    assert scene.status == "done", (scene.reason, scene.detail)
    assert scene.windows + scene.windows_nodata == 4 and scene.windows >= 1  # 112² in 56-px windows


def test_stage_2_fine_tunes_an_imported_model_and_learns_its_memory(imported, small_shards):
    """`train --stage 2 --init-model <imported>` on Ray Train + DeepSpeed (2 workers): the model
    keeps the release's architecture, input format and prompt (not the config's), trains LoRA on its
    pretrained LLM, and GeoPix's memory, an identity at import, is learned into use."""
    from geopix import storage
    from geopix.data.shard_set import read_manifest
    from geopix.model import GeoPixModel
    from geopix.train.run import train_stage
    from tests.test_train import small_config

    cfg = small_config("train.stage2.max_steps=4", "train.stage2.warmup_steps=1", "train.stage2.lr=1e-2",
                       "train.checkpoint_every=100", "tracking.experiment=geopix-tests-release")  # fmt: skip
    result = train_stage(cfg, 2, shards_uri=small_shards, init_model_uri=imported, register=False)
    before = GeoPixModel.load(storage.local_copy(imported))
    after = GeoPixModel.load(storage.local_copy(result.model_uri))
    config = after.config
    assert (config.mask_decoder, config.image_size, config.image_channel_order, config.chat_template) == ("release", 56, "bgr", 3)
    assert config.num_classes == before.config.num_classes != cfg.model.num_classes
    names = {c["id"]: c["name"] for c in read_manifest(small_shards)["classes"]}
    assert [after.class_names[i] for i in names] == list(names.values())
    assert after.lora and config.stage == 2
    assert torch.equal(after.vision.clip.embeddings.patch_embedding.weight, before.vision.clip.embeddings.patch_embedding.weight)
    for memory in (before, after):
        out = [attn.out_proj.weight for attn in memory.mask_predictor.memory.attn]
        assert all(bool((w == 0).all()) for w in out) == (memory is before)  # zero at import, learned after
