"""Shared fixtures: one real local stack (Ray head, S3 server, MLflow server) per test session.

The stack runs on free loopback ports with its state in a temporary directory, so the tests
never touch a developer's own stack; its environment is exported to this process so that
clients built from the environment (s3fs, pyarrow, GDAL, MLflow, Ray) reach it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from geopix.config import REPO_ROOT, BucketsConfig, StackConfig
from geopix.stack import Stack, config_on_free_ports

# Ray reads RAY_AUTH_MODE once, when it is first imported, so the session stack's token settings
# are exported before any test module imports ray; the stack writes the token there on `up`.
SESSION_STACK_DIR = Path(tempfile.mkdtemp(prefix="geopix-stack-"))
atexit.register(shutil.rmtree, SESSION_STACK_DIR, ignore_errors=True)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(Stack(StackConfig(state_dir=SESSION_STACK_DIR)).ray_token_path)
# Models fetched from S3 are cached per session: the tests' prefixes are reused by every run.
os.environ["GEOPIX_CACHE_DIR"] = str(SESSION_STACK_DIR / "cache")


def make_stack_config(state_dir: Path, **overrides) -> StackConfig:
    return config_on_free_ports(state_dir, **({"start_timeout_s": 180} | overrides))


# The session's stack: nothing of it outlives the session, so `down` need not save its objects;
# four logical CPUs on this 2-core machine, so that two flows at once (the lease tests: each holds a
# model actor and its readers) can both be scheduled.
SESSION_STACK = {"persist_s3": False, "ray_num_cpus": 4}


def geopix_cli() -> list[str]:
    """The installed `geopix` console script of this environment."""
    return [str(Path(sys.executable).parent / "geopix")]


@pytest.fixture(scope="session")
def stack() -> Stack:
    """The session's stack, up; its client environment is exported into os.environ."""
    stack = Stack(make_stack_config(SESSION_STACK_DIR, **SESSION_STACK), BucketsConfig())
    saved = dict(os.environ)
    try:
        stack.up()
        os.environ.update(stack.client_env())
        yield stack
    finally:
        # A driver still connected when its cluster stops is ended by Ray with exit code 1.
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        os.environ.clear()
        os.environ.update(saved)
        stack.down()


@pytest.fixture(scope="session")
def ray_cluster(stack):
    """This test process connected to the stack's Ray head as a driver."""
    import ray

    ray.init(address=stack.client_env()["RAY_ADDRESS"], log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


SMALL_SOURCE = "s3://geopix-data/tests/small/source"
SMALL_SHARDS = "s3://geopix-data/tests/small/shards"


@pytest.fixture(scope="session")
def small_shards(stack, ray_cluster) -> str:
    """One small synthetic shard set (64-px chips; 40 train, 6 val, 4 test images) that the
    training and sweep tests train and evaluate on: generated and sharded once per session."""
    from geopix.config import DataConfig
    from geopix.data.shard import shard_sources
    from geopix.data.synth import generate_chips
    from geopix.vocabulary import SegVocabulary

    generate_chips(SMALL_SOURCE, seed=0, chip_size=64, train_images=40, val_images=6, test_images=4,
                   test_seed_offset=1000, seg_vocab=SegVocabulary(), progress=False)  # fmt: skip
    shard_sources([SMALL_SOURCE], SMALL_SHARDS, DataConfig(chip_size=64), seg_vocab=SegVocabulary(), overwrite=True)
    return SMALL_SHARDS


@pytest.fixture(scope="session")
def segment_model(stack, ray_cluster, tmp_path_factory) -> tuple:
    """(config, model directory) of the segmentation tests (tests/test_segment.py, tests/test_stac.py):
    the tiny model is fitted once per session, however many of those modules run."""
    from tests.test_segment import fit_segment_model, segment_config

    cfg = segment_config()
    return cfg, fit_segment_model(cfg, tmp_path_factory.mktemp("segment-model"))
