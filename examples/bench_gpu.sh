#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, as one script (issue 12): run it on a CUDA machine from a checkout.
#
#   bash examples/bench_gpu.sh [OUT_DIR]          # tables (Markdown) and JSON per model in OUT_DIR (default runs/gpu)
#
# ViT-B/16 at 224 px, batch 64, bf16 autocast, and the Llama-style decoder (12 layers, width 512, sequence 256,
# batch 8): end-to-end, freeze (the blocks every=2 replaces, requires_grad=False), replace (convert(every=2), no
# options) and replace-exact. On CUDA the bench reports CUDA time and torch.cuda.max_memory_allocated; the goal
# is replace <= 1.03x freeze in both, with the end-to-end ratio beside it. Then the same under torch.compile.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-runs/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
bench() {  # name, then the bench arguments
  local name=$1; shift
  bash .ci/venv python -m replace_wrap bench "$@" --device cuda --rounds 3 --steps 20 --warmup 5 --paired \
    --no-progress | tee "$out/$name.md"
}
V="--variants end-to-end,freeze,replace,replace-exact"
LLAMA="hf:llama --set num_hidden_layers=12 --set hidden_size=512 --set intermediate_size=1536 \
  --set num_attention_heads=8 --set num_key_value_heads=8 --set vocab_size=8192 --seq 256 --batch 8"
bench vitb16 vit_base_patch16_224 --size 224 --batch 64 --dtype bfloat16 $V
bench llama $LLAMA --dtype bfloat16 $V
bench vitb16-compile vit_base_patch16_224 --size 224 --batch 64 --dtype bfloat16 --compile \
  --variants end-to-end,freeze,replace
bench llama-compile $LLAMA --dtype bfloat16 --compile --variants end-to-end,freeze,replace
# the fixed cost of a replaced layer where a step is launch-bound (tiny layers; docs/benchmarks.md)
bash .ci/venv python examples/bench_overhead.py --device cuda --repeats 11 | tee "$out/overhead.md"
