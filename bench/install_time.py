"""How long `bash cluster/setup.sh` takes on a fresh checkout: uv (the default) against pip (the
baseline), each into an empty venv of its own, and whether both install the same packages.

    .venv/bin/python bench/install_time.py [--rounds 1]

Each round copies the committed tree (`git archive HEAD`) into two new directories and installs
one with GEOPIX_INSTALLER=pip, one with GEOPIX_INSTALLER=uv. Package caches stay as they are (a CI
machine that has installed once has them warm; say which you measured)."""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_checkout(root: Path) -> Path:
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(root)], input=archive, check=True)
    return root


def install(checkout: Path, installer: str) -> float:
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("GEOPIX_VENV", "VIRTUAL_ENV")}
    subprocess.run(["bash", "cluster/setup.sh"], cwd=checkout, check=True, capture_output=True,
                   env=env | {"GEOPIX_INSTALLER": installer})  # fmt: skip
    return time.perf_counter() - started


def packages(checkout: Path) -> set[str]:
    frozen = subprocess.run([str(checkout / ".venv/bin/python"), "-m", "pip", "freeze"], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    return {line for line in frozen.splitlines() if line and not line.startswith(("#", "-e ", "uv=="))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="geopix-install-") as tmp:
        for round_ in range(args.rounds):
            times, installed = {}, {}
            for installer in ("pip", "uv"):
                checkout = fresh_checkout(Path(tmp) / f"{installer}-{round_}")
                times[installer] = install(checkout, installer)
                installed[installer] = packages(checkout)
            same = installed["pip"] == installed["uv"]
            print(f"round {round_}: pip {times['pip']:.0f} s (baseline), uv {times['uv']:.0f} s = "
                  f"{times['uv'] / times['pip']:.2f}× pip; the same {len(installed['pip'])} packages: {same}")  # fmt: skip
            if not same:
                print("  only pip:", sorted(installed["pip"] - installed["uv"]))
                print("  only uv:", sorted(installed["uv"] - installed["pip"]))


if __name__ == "__main__":
    main()
