#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: gets a ComfyUI and a virtual environment with its requirements
# and this pack installed, on first use. Afterwards: $py (the venv's python), $repo, $comfyui_version and
# COMFYUI_PATH exported. Environment (all optional):
#   COMFYUI_VERSION         which ComfyUI to fetch: 0.33.0 (default, the newest supported) or 0.3.64 (the oldest)
#   COMFYUI_PATH            an existing ComfyUI checkout (must hold main.py); its version names the venv
#   COMFYUI_SRC             otherwise fetch ComfyUI from here: a .tar.gz path or a git URL (tag v$COMFYUI_VERSION)
#   CONCEPTSPLIT_CACHE      cache folder (default ~/.cache/comfyui-conceptsplit)
#   CONCEPTSPLIT_VENV       virtual environment (default $CONCEPTSPLIT_CACHE/venv-<ComfyUI version>)
#   CONCEPTSPLIT_TORCH_SPEC pip spec used when the venv has no torch (default "torch==2.14.1 torchvision==0.29.1")
#   PYTHON                  interpreter that creates the venv (default python3)
# Each ComfyUI version gets its own venv (their requirements differ). A second run skips every install whose
# inputs (ComfyUI requirements, pyproject.toml, this script) are unchanged.
set -euo pipefail

comfyui_version=${COMFYUI_VERSION:-0.33.0}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CONCEPTSPLIT_CACHE:-$HOME/.cache/comfyui-conceptsplit}
src=${COMFYUI_SRC:-https://github.com/comfyanonymous/ComfyUI}
torch_spec=${CONCEPTSPLIT_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
# ComfyUI imports torchaudio (since 0.19.3 `import comfy.sd` fails without it; 0.3.64 prints import tracebacks).
# This release imports beside torch 2.14.1 when installed without its own pinned torch (--no-deps).
torchaudio_spec=${CONCEPTSPLIT_TORCHAUDIO_SPEC:-torchaudio==2.11.1}
say() { echo "[setup] $*"; }

# --- ComfyUI ----------------------------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/main.py" ]; then
  comfy=$(cd "$COMFYUI_PATH" && pwd)
  say "ComfyUI: using COMFYUI_PATH=$comfy"
else
  [ -n "${COMFYUI_PATH:-}" ] && say "COMFYUI_PATH=$COMFYUI_PATH has no main.py; using COMFYUI_SRC instead"
  comfy=$cache/comfyui-$comfyui_version/ComfyUI
  if [ -f "$comfy/main.py" ]; then
    say "ComfyUI: reusing $comfy"
  else
    say "ComfyUI: fetching v$comfyui_version from $src"
    mkdir -p "$cache"
    staging=$(mktemp -d "$cache/staging.XXXXXX")
    trap 'rm -rf "$staging"' EXIT
    case "$src" in
      *.tar.gz|*.tgz) tar xzf "$src" -C "$staging" ;;
      *) git clone -q --depth 1 --branch "v$comfyui_version" "$src" "$staging/ComfyUI" ;;
    esac
    main=$(find "$staging" -maxdepth 2 -name main.py -print -quit)
    [ -n "$main" ] || { echo "[setup] no main.py in $src" >&2; exit 1; }
    got=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$(dirname "$main")/comfyui_version.py" 2>/dev/null || true)
    if [ -n "$got" ] && [ "$got" != "$comfyui_version" ]; then
      echo "[setup] $src holds ComfyUI $got, not $comfyui_version: set COMFYUI_VERSION=$got or point COMFYUI_SRC" \
        "at a $comfyui_version tarball" >&2
      exit 2
    fi
    mkdir -p "$(dirname "$comfy")"
    # Move into place only once complete, so an interrupted fetch is never mistaken for a checkout.
    mv "$(dirname "$main")" "$comfy"
    rm -rf "$staging"
    trap - EXIT
  fi
fi
# Never commit ComfyUI: refuse a checkout inside this repo.
case "$comfy/" in "$repo"/*) echo "[setup] ComfyUI must live outside the repo ($comfy)" >&2; exit 2;; esac
found=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py" 2>/dev/null || true)
comfyui_version=${found:-$comfyui_version}
say "ComfyUI version: $comfyui_version"

# --- virtual environment ------------------------------------------------------------------------------
venv=${CONCEPTSPLIT_VENV:-$cache/venv-$comfyui_version}
if [ ! -x "$venv/bin/python" ]; then
  say "venv: creating $venv"
  mkdir -p "$(dirname "$venv")"
  "${PYTHON:-python3}" -m venv "$venv"
else
  say "venv: reusing $venv"
fi
py=$venv/bin/python
stamp=$venv/.conceptsplit-installed
want=$(cat "$comfy/requirements.txt" "$repo/pyproject.toml" "${BASH_SOURCE[0]}" 2>/dev/null \
  | { echo "$torch_spec $torchaudio_spec"; cat; } | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import torch, torchaudio, pytest" 2>/dev/null; then
  say "deps: up to date (stamp $stamp)"
else
  if "$py" -c "import torch" 2>/dev/null; then
    say "deps: torch already installed, keeping it"
  else
    say "deps: installing $torch_spec"
    # shellcheck disable=SC2086  # the spec is a list of requirements
    "$py" -m pip install -q $torch_spec
  fi
  if ! "$py" -c "import torchaudio" 2>/dev/null; then
    say "deps: installing $torchaudio_spec (without its pinned torch)"
    "$py" -m pip install -q --no-deps "$torchaudio_spec"
  fi
  say "deps: installing ComfyUI requirements (without torch, torchvision, torchaudio)"
  reqs=$venv/.comfyui-requirements-no-torch.txt
  grep -vE '^(torch|torchvision|torchaudio)([<>=~ ;]|$)' "$comfy/requirements.txt" | grep -vE '^\s*(#|$)' > "$reqs"
  # server.py imports requests (app/frontend_management.py), which 0.3.64's requirements.txt does not list.
  "$py" -m pip install -q -r "$reqs" requests
  say "deps: installing the pack with its test extra"
  if grep -qE '^test *=' "$repo/pyproject.toml" 2>/dev/null && "$py" -m pip install -q -e "$repo[test]"; then
    :
  elif [ "${CI:-}" = "true" ]; then
    echo "[setup] pip install -e '$repo[test]' failed; on CI the packaging must work" >&2; exit 1
  else
    echo "[setup] pip install -e '$repo[test]' failed: the pack's pyproject.toml must install" >&2; exit 1
  fi
  echo "$want" > "$stamp"
fi

export COMFYUI_PATH=$comfy
