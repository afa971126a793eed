#!/usr/bin/env bash
# Install GeoPix into .venv at the repository root. Run once on a fresh machine; running it again
# is fast and changes nothing unless pyproject.toml, this script or the torch choice changed.
#
#   bash cluster/setup.sh                 # CPU: torch==2.13.0, then GeoPix with dev extras
#
# GPU users swap in their CUDA build of the same torch release, e.g.
#   GEOPIX_TORCH_SPEC="torch==2.13.0" \
#   GEOPIX_TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128" bash cluster/setup.sh
# torch is installed first and is not a dependency in pyproject.toml, so pip never replaces it.
#
# The rest is installed with uv (pinned below, fetched from the package index into the venv), which
# installs the same pins in a fraction of pip's time (docs/performance.md#install); pip is the
# fallback when uv cannot be had or fails, or on request: GEOPIX_INSTALLER=pip.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GEOPIX_VENV:-$repo/.venv}"
python="${GEOPIX_PYTHON:-python3}"
torch_spec="${GEOPIX_TORCH_SPEC:-torch==2.13.0}"
torch_index="${GEOPIX_TORCH_INDEX_URL:-}"
extras="${GEOPIX_EXTRAS:-dev}"
installer="${GEOPIX_INSTALLER:-uv}"
uv_spec="uv==0.13.8"
stamp="$venv/.geopix-setup"

fingerprint() {
  {
    cat "$repo/pyproject.toml" "$repo/cluster/setup.sh"
    echo "$torch_spec|$torch_index|$extras|$installer|$("$python" -c 'import sys; print(sys.version)')"
  } | sha256sum | cut -d' ' -f1
}
want="$(fingerprint)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import geopix, torch" 2>/dev/null; then
  echo "GeoPix environment in $venv is up to date (nothing to do)."
  exit 0
fi

start=$SECONDS
if [[ ! -x "$venv/bin/python" ]]; then
  echo "Creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

installed_torch="$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ -z "$installed_torch" || "${torch_spec#torch==}" != "${installed_torch%%+*}" ]]; then
  echo "Installing $torch_spec ${torch_index:+from $torch_index }first, so nothing pulls another torch build"
  "${pip[@]}" install -q "$torch_spec" ${torch_index:+--index-url "$torch_index"}
fi

installed=""
if [[ "$installer" == "uv" ]]; then
  if "${pip[@]}" install -q "$uv_spec" && [[ -x "$venv/bin/uv" ]]; then
    echo "Installing GeoPix with [$extras] and its pinned dependencies (uv)"
    # The torch installed above satisfies every dependency that asks for torch, so uv keeps it.
    if "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --compile-bytecode -e "$repo[$extras]"; then
      installed="uv"
    else
      echo "uv could not install the project; falling back to pip" >&2
    fi
  else
    echo "uv ($uv_spec) could not be installed; falling back to pip" >&2
  fi
fi
if [[ -z "$installed" ]]; then
  echo "Installing GeoPix with [$extras] and its pinned dependencies (pip)"
  "${pip[@]}" install -q -e "$repo[$extras]"
  installed="pip"
fi
"$venv/bin/python" -c "import geopix, torch, ray, deepspeed, mlflow, rasterio; print('torch', torch.__version__, '| ray', ray.__version__)" 2>&1 | tail -1

echo "$want" > "$stamp"
echo "GeoPix installed in $venv with $installed in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1)). Activate it with: source $venv/bin/activate"
