#!/usr/bin/env bash
# The GPU training figure of the performance issue (>= 100,000 training images/s for the MNIST conditional
# DCGAN), in one command for a GPU host that has torch and torchvision and nothing of ours installed:
#
#     scripts/gpu-training-bench.sh [OUT_DIR]          # default: $OUT, else bench-results/
#
# It runs the training part of the benchmark on the GPU (our loop at batch 128 eager and compiled, at batches
# 1024 and 4096 compiled, against the reference DataLoader loop; random data of MNIST's shape, which times the
# same), and writes OUT_DIR/gpu-training.{json,md} and OUT_DIR/gpu.txt (nvidia-smi). About 1.5 min on an H200
# with 16 cores, most of it torch.compile. MODELS=mnist/cdcgan,bloodmnist_64/dcgan adds the 64x64 DCGAN.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench-results}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
"$python" -m benchmarks.run --parts training --device cuda --training-models "${MODELS:-mnist/cdcgan}" \
    --out "$out/gpu-training.json" | tee "$out/gpu-training.md"
