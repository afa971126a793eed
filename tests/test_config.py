import argparse
import hashlib
import json
from pathlib import Path

import pytest

from geopix.config import ConfigError, GeoPixConfig, add_overrides_argument, list_presets, load_config


def test_presets_load_with_their_sizes():
    assert {"tiny", "full"} <= set(list_presets())
    tiny, full = load_config("tiny"), load_config("full")
    assert tiny.name == "tiny" and full.name == "full"
    assert tiny.model.vision_encoder == "efficientnet_lite0" and tiny.train.use_gpu is False
    assert full.model.vision_encoder == "clip" and full.model.llm_hidden_size == 4096
    assert full.model.llm_num_layers == 32 and full.train.precision == "bf16"


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["train.stage1.lr=5e-4", "stack.ray_num_cpus=null", "model.memory_len=4"])
    assert cfg.train.stage1.lr == pytest.approx(5e-4)
    assert cfg.stack.ray_num_cpus is None
    assert cfg.model.memory_len == 4


def test_every_set_option_adds_its_overrides():
    # The benches once took `--set` as one list: a second `--set` silently dropped the first.
    parser = argparse.ArgumentParser()
    add_overrides_argument(parser)
    args = parser.parse_args(["--set", "model.memory_len=4", "train.seed=3", "-s", "model.fine_feature_stride=16"])
    assert args.overrides == ["model.memory_len=4", "train.seed=3", "model.fine_feature_stride=16"]
    cfg = load_config("tiny", args.overrides)
    assert (cfg.model.memory_len, cfg.train.seed, cfg.model.fine_feature_stride) == (4, 3, 16)
    assert parser.parse_args([]).overrides == []  # the parse above left the default empty
    required = argparse.ArgumentParser()
    add_overrides_argument(required, required=True)
    with pytest.raises(SystemExit):
        required.parse_args([])


def test_yaml_path_and_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  batch_size: 3\n")
    cfg = load_config(path)
    assert cfg.name == "mine" and cfg.train.batch_size == 3
    assert cfg.model == GeoPixConfig().model


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lrr=1"], "train.lrr: unknown key"),
        (["train.stage2.lr=fast"], "train.stage2.lr: Input should be a valid number"),
        (["train.zero_stage=3"], "train.zero_stage"),
        (["stack.s3_port=70000"], "stack.s3_port"),
        (["noequals"], "must look like section.key=value"),
        (["train.batch_size.x=1"], "'batch_size' is a value, not a section"),
        (["train.stage2.task_weights.vqa=0"], "vqa: 0.0 is not a finite number > 0"),
    ],
)
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert expected in str(err.value)


def test_unreadable_and_malformed_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"{missing} does not exist"):
        load_config(missing)
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    with pytest.raises(ConfigError, match=f"{directory} cannot be read"):
        load_config(directory)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{broken} is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listed)
    with pytest.raises(ConfigError, match="no config file or preset named 'nope'.*tiny"):
        load_config("nope")


def test_config_hash_tracks_what_shapes_outputs():
    base = load_config("tiny")
    assert base.config_hash() == load_config("tiny").config_hash()
    assert base.config_hash() != load_config("tiny", ["model.memory_len=8"]).config_hash()
    # Where the local stack runs does not change what a step produces.
    assert base.config_hash() == load_config("tiny", ["stack.s3_port=9999"]).config_hash()
    # Training's identity ignores the sections that act after training.
    training = base.section_hash("data", "model", "train")
    assert training == load_config("tiny", ["segment.overlap=32", "evaluate.batch_size=4"]).section_hash(
        "data", "model", "train"
    )
    assert training != load_config("tiny", ["train.stage1.lr=0.1"]).section_hash("data", "model", "train")


def test_a_field_added_at_its_default_changes_no_hash():
    """A config section grown by a field whose default keeps the old behaviour (what every new
    option is) hashes as before, so runs resume and flow outputs stay current across the upgrade."""
    from pydantic import Field, create_model

    from geopix.config import ModelConfig

    grown_model = create_model("GrownModelConfig", __base__=ModelConfig, new_option=(bool, False))
    grown = create_model("GrownConfig", __base__=GeoPixConfig, model=(grown_model, Field(default_factory=grown_model)))
    tiny = load_config("tiny")
    as_before = grown.model_validate(tiny.model_dump())
    assert as_before.config_hash() == tiny.config_hash()
    assert as_before.section_hash("data", "model", "train") == tiny.section_hash("data", "model", "train")
    changed = grown.model_validate(tiny.model_dump() | {"model": tiny.model.model_dump() | {"new_option": True}})
    assert changed.config_hash() != tiny.config_hash()


def test_the_defaults_the_hash_leaves_out_are_pinned():
    """The hash leaves out values at their default, so a changed default would go unseen by it:
    this digest of every hashed default fails the suite until someone decides."""
    from geopix.config import UNHASHED_SECTIONS

    defaults = GeoPixConfig().model_dump(mode="json", exclude=set(UNHASHED_SECTIONS))
    digest = hashlib.sha256(json.dumps(defaults, sort_keys=True).encode()).hexdigest()[:16]
    assert digest == "09c9d190c1c35516", (
        f"the hashed defaults changed (digest {digest}). A new field whose default keeps what GeoPix "
        "did before: pin the new digest here. A default that changes what a config which does not set "
        "it produces: also bump HASH_DEFAULTS_VERSION in geopix/config.py, so every hash changes."
    )


def test_a_config_can_change_a_base_config(tmp_path):
    quick = load_config("quickstart")
    tiny = load_config("tiny")
    assert quick.name == "quickstart" and quick.model == tiny.model  # the same model, a shorter run
    assert quick.train.stage1.max_steps < tiny.train.stage1.max_steps
    assert quick.train.stage1.lr == tiny.train.stage1.lr  # sections merge key by key
    assert quick.pipeline.synthetic is True
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  batch_size: 3\n")
    (tmp_path / "b.yaml").write_text("base: tiny\ntrain:\n  batch_size: 5\n  log_every: 7\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.batch_size, cfg.train.log_every, cfg.model.vision_encoder) == (3, 7, "efficientnet_lite0")
    assert cfg.name == "a"  # named by its own file, never by its base
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="bases form a cycle"):
        load_config(tmp_path / "a.yaml")


def test_configs_dir_is_in_the_repo():
    assert (Path(__file__).parents[1] / "configs" / "tiny.yaml").exists()


SECRET = "wJalrXUtnFEMI/K7MDENG-example"


def test_config_errors_never_echo_a_secret():
    # A secret key with a wrong type, beside another error: the key is named, its value is not.
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"stack.s3_secret_access_key=[{SECRET}]", "train.lrr=1",
                             f"tracking.tracking_uri=https://bob:{SECRET}@mlflow.example.org"])  # fmt: skip
    text = str(err.value)
    assert SECRET not in text
    assert "stack.s3_secret_access_key" in text and "train.lrr: unknown key" in text
    assert "https://bob:<redacted>@mlflow.example.org" in text
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"stack.s3_secret_access_key.x={SECRET}"])
    assert SECRET not in str(err.value)


def test_redaction_hides_secrets_by_key_and_by_value_shape_and_nothing_else():
    from geopix.redaction import REDACTED, is_secret_key, redact_text, redact_value, shareable_env

    # By key: a precise list, not every key that mentions "token".
    for key in ("stack.s3_secret_access_key", "db.password", "a.token", "api_key", "ray_auth_token",
                "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "client_secret"):  # fmt: skip
        assert is_secret_key(key), key
        assert redact_value(key, "x1") == REDACTED
    for key in ("model.seg_token_num", "evaluate.max_new_tokens", "train.tokenizer_vocab_size",
                "stack.s3_access_key_id", "segment.keep_classes", "tracking.tracking_uri"):  # fmt: skip
        assert not is_secret_key(key), key
        assert redact_value(key, 6) == 6
    # By value shape: URI passwords (with "/" in them too) and credential query parameters.
    assert redact_text(f"https://bob:{SECRET}@mlflow.example.org/x") == f"https://bob:{REDACTED}@mlflow.example.org/x"
    assert redact_text("postgresql://u:p@ss/w@db/x") == f"postgresql://u:{REDACTED}@db/x"
    assert redact_text("https://h/run?token=abc123&page=2") == f"https://h/run?token={REDACTED}&page=2"
    assert redact_text("s3://b/k?X-Amz-Signature=deadbeef") == f"s3://b/k?X-Amz-Signature={REDACTED}"
    assert redact_text("s3://geopix-data/shards/synthetic and 127.0.0.1:9100") == (
        "s3://geopix-data/shards/synthetic and 127.0.0.1:9100")  # fmt: skip
    # Workers get settings, never credentials.
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SESSION_TOKEN": "t0ken-xyz",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9100", "AWS_REGION": "us-east-1",
           "MLFLOW_TRACKING_URI": f"https://bob:{SECRET}@mlflow", "MLFLOW_TRACKING_PASSWORD": SECRET,
           "GEOPIX_CACHE_DIR": "/tmp/c"}  # fmt: skip
    assert shareable_env(env, ("AWS_", "MLFLOW_", "GEOPIX_")) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9100", "AWS_REGION": "us-east-1", "GEOPIX_CACHE_DIR": "/tmp/c"}  # fmt: skip


def test_what_workers_are_handed_holds_no_secret():
    cfg = load_config("tiny", [f"stack.s3_secret_access_key={SECRET}",
                               f"tracking.tracking_uri=https://bob:{SECRET}@mlflow.example.org"])  # fmt: skip
    shared = cfg.for_workers()
    assert SECRET not in repr(shared)
    assert shared["tracking"]["tracking_uri"] is None  # workers use their own MLFLOW_TRACKING_URI
    assert shared["model"]["seg_token_num"] == 3 and shared["evaluate"]["max_new_tokens"] == 80
    assert GeoPixConfig.model_validate(shared).model == cfg.model  # still a config they can use
