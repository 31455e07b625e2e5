#!/usr/bin/env bash
# The headless demo through the real ComfyUI server, setting everything up on first use (scripts/setup_env.sh):
#   bash scripts/demo.sh                                   tiny random-weight models built in code (no downloads)
#   bash scripts/demo.sh --checkpoint v2-1_768-ema-pruned.safetensors --v-prediction \
#        --adapter dog.safetensors=dog --adapter cat.safetensors=cat --prompt "a dog and a cat on a sofa"
# Writes the images into --out (default ./out/demo) and prints where. `--help` lists every option.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$repo"
exec "$py" scripts/demo.py "$@"
