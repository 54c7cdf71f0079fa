#!/usr/bin/env bash
# Builds .gpu_carry/ for the GPU pass's train stage (bench/gpu_pass.sh): a tiny random Llama with
# SmolLM2's tokenizer (the GPU image has no GGUF model package) and omegaconf (not in the image; it needs
# only PyYAML, which transformers brings). Git ignores the folder; name it in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpu_carry/" .git/info/exclude 2> /dev/null || echo "/.gpu_carry/" >> .git/info/exclude
rm -rf .gpu_carry && mkdir -p .gpu_carry/site
.venv/bin/python -c "
from duca_fast.rollout.models import build_tiny_model_dir
build_tiny_model_dir('.gpu_carry/tiny_model', hidden_size=64, num_layers=2)
"
site=$(.venv/bin/python -c "import omegaconf, os; print(os.path.dirname(omegaconf.__file__))")
cp -r "$site" .gpu_carry/site/
find .gpu_carry -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu_carry
