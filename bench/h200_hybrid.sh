#!/usr/bin/env bash
# On an NVIDIA machine (CUDA build of torch, kt-core installed with the README's command minus the
# CPU pin): build a synthetic Qwen3-30B-A3B-shaped checkpoint once, then print tokens/s for
# all-CPU, hybrid (half of the experts in host RAM) and all-GPU as JSON lines.
#   LAYERS=8 bash bench/h200_hybrid.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS="${LAYERS:-8}"
MODEL="${MODEL:-${KT_CACHE_DIR:-$HOME/.cache/kt-core}/models/bench-qwen3-30b-a3b-${LAYERS}l-v32000}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
kt devices
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  kt synth arch=qwen3_moe preset=qwen3-30b-a3b layers="$LAYERS" vocab=32000 tokenizer=mistral out="$MODEL"
fi
python bench/gpu_hybrid.py --model "$MODEL" --device cuda "$@"
