"""Shared fixtures: one real local stack (Ray head, S3 server, MLflow server) per test session.

The stack runs on free loopback ports with its state in a temporary directory, so the tests
never touch a developer's own stack; its environment is exported to this process so that
clients built from the environment (s3fs, pyarrow, GDAL, MLflow, Ray) reach it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from geopix.config import REPO_ROOT, BucketsConfig, StackConfig
from geopix.stack import Stack, config_on_free_ports


def make_stack_config(state_dir: Path, **overrides) -> StackConfig:
    return config_on_free_ports(state_dir, **({"start_timeout_s": 180} | overrides))


def geopix_cli() -> list[str]:
    """The installed `geopix` console script of this environment."""
    return [str(Path(sys.executable).parent / "geopix")]


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    """The session's stack, up; its client environment is exported into os.environ."""
    state_dir = tmp_path_factory.mktemp("stack")
    stack = Stack(make_stack_config(state_dir), BucketsConfig())
    saved = dict(os.environ)
    try:
        stack.up()
        os.environ.update(stack.client_env())
        yield stack
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.down()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
