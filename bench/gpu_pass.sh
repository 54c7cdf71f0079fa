#!/usr/bin/env bash
# The GPU pass in one call on a lent device machine (see README, "The GPU pass"):
#   1. carried wheels in .whl/ (liger-kernel, the Liger baseline) are installed without a network;
#   2. the op tests run with the Triton kernels compiled for the device, not interpreted;
#   3. the kernel benchmarks write CSV/Markdown (device, commit, date) into $OUT, to be committed
#      under bench/results/.
# The device gets a copy of the working tree without .git: pass the commit as DUCA_BENCH_COMMIT.
set -uo pipefail
OUT="${OUT:-/tmp/duca_gpu_pass}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-deps --no-index .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
# The native library with its CUDA part (its GPU tests compare it with the CPU library and the reference).
if command -v cmake > /dev/null && command -v nvcc > /dev/null; then
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > "$OUT/native_build.txt" 2>&1 \
        && cmake --build build >> "$OUT/native_build.txt" 2>&1 || echo "native build failed: $OUT/native_build.txt"
fi
python3 -m pytest -q -p no:cacheprovider tests/ops tests/native tests/test_advantages.py tests/test_policy_loss.py tests/test_library.py \
    > "$OUT/gpu_tests.txt" 2>&1
tail -5 "$OUT/gpu_tests.txt"
python3 bench/bench_advantages.py --sessions 16000 128000
python3 bench/bench_policy_loss.py
# fp32 inputs on tf32 tensor cores (the default; every variant gets the same switch), half the tokens.
python3 bench/bench_policy_loss.py --dtype float32 --tokens 4096
for name in advantages_triton policy_loss_cuda policy_loss_cuda_float32; do
    cp "bench/results/$name.md" "bench/results/$name.csv" "$OUT/" 2>/dev/null || echo "no results for $name"
done
