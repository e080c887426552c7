#!/usr/bin/env bash
# Training (and eNTK) benchmarks on one GPU, JAX against PyTorch on the same GPU (issue 14).
#
#   bash benchmarks/bench_gpu.sh [OUTDIR]
#
# Needs jax with CUDA (pip install -U "jax[cuda12]") and a CUDA torch build in the
# active environment. Every ratio is measured in one process, rounds interleaved
# (benchmarks/bench_perf.py). Fill the results into benchmarks/RESULTS.md,
# section "Performance (issue 14)", table "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
OUT=${1:-/tmp/bench_gpu}
mkdir -p "$OUT"
python - <<'PY'
import jax, torch
assert jax.default_backend() == "gpu", f"JAX sees no GPU (backend {jax.default_backend()})"
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("JAX", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.get_device_name())
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
# ResNet18-CIFAR FT step, batch 128: conv=lax (what auto picks on GPU) and patches
python -m benchmarks.bench_perf resnet --batch 128 --rounds 5 --reps 20 --epoch --epoch-steps 10 \
  --torch-device cuda --json "$OUT/resnet128.json" | tee "$OUT/resnet128.txt"
# toy MLP FT: the library's epoch (50 steps in one program) and a lone step
python -m benchmarks.bench_perf mlp --rounds 5 --reps 200 --torch-device cuda \
  --json "$OUT/mlp.json" | tee "$OUT/mlp.txt"
# matmul rate and the HP / sweep parts of the training benchmark (JAX only)
python -m benchmarks.bench_train --parts dot,hp --json "$OUT/bench_train.json" | tee "$OUT/bench_train.txt"
# eNTK benchmark (issue 14 item 3), when present
if [ -f benchmarks/bench_ntk.py ]; then
  python -m benchmarks.bench_ntk --outdir "$OUT/ntk" | tee "$OUT/ntk.txt"
fi
echo "results in $OUT"
