"""cluster/setup.sh: a second run on an installed environment is fast and changes nothing."""

import os
import subprocess
import sys
from pathlib import Path


def pip_freeze() -> str:
    return subprocess.run(
        [sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout


def test_second_setup_run_changes_nothing(repo_root):
    venv = Path(sys.executable).parent.parent
    env = os.environ | {"GEOPIX_VENV": str(venv)}
    subprocess.run(["bash", "cluster/setup.sh"], cwd=repo_root, env=env, check=True, capture_output=True)
    before = pip_freeze()
    again = subprocess.run(
        ["bash", "cluster/setup.sh"], check=False, cwd=repo_root, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert "up to date (nothing to do)" in again.stdout
    assert pip_freeze() == before
