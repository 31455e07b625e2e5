#!/usr/bin/env bash
# Run the test suite against a real ComfyUI 0.3.64, setting everything up on first use (scripts/setup_env.sh):
#   bash scripts/test.sh [pytest args...]        e.g.  bash scripts/test.sh tests/core -x
# See scripts/setup_env.sh for the environment variables (COMFYUI_PATH, COMFYUI_SRC, ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

# Default to the whole tests/ folder unless a test path (or node id) was given.
targets=(tests)
for arg in "$@"; do
  case "$arg" in -*) ;; *) if [ -e "$repo/${arg%%::*}" ] || [ -e "${arg%%::*}" ]; then targets=(); fi ;; esac
done
cd "$repo"
echo "[test.sh] pytest: COMFYUI_PATH=$COMFYUI_PATH $py -m pytest ${targets[*]} $*"
exec "$py" -m pytest "${targets[@]}" "$@"
