#!/usr/bin/env bash
# The GPU pass in one call on a lent device machine (see docs/benchmarks.md, "On a GPU"):
#   1. carried wheels in .whl/ (liger-kernel, the Liger baseline) are installed without a network;
#   2. the native library is built with its CUDA part (ptxas reports kept);
#   3. the op tests run with the Triton kernels compiled for the device, not interpreted (pytest-xdist
#      workers when it is installed: compiling the kernels is CPU work);
#   4. the kernel benchmarks write CSV/Markdown (device, commit, date), to be committed under bench/results/.
# Every stage has its own time limit, so one slow stage cannot take the others' results with it; the
# results are packed into $OUT/results.tgz after each stage (a device machine returns at most 8 files).
# The device gets a copy of the working tree without .git: pass the commit as DUCA_BENCH_COMMIT.
# Stage limits (seconds) can be set: GPU_PASS_TEST_S, GPU_PASS_BENCH_S; GPU_PASS_FP32=1 adds the fp32 bench.
# GPU_PASS_STAGES picks stages (default: all but fp32): native tests train hian bf16 objectives multiturn fp32.
# The train stage needs .gpu_carry (bench/gpu_carry.sh builds it here: the GPU image has neither the GGUF
# model package nor omegaconf); name it in the device call's carry.
set -uo pipefail
OUT="${OUT:-/tmp/duca_gpu_pass}"
TEST_S="${GPU_PASS_TEST_S:-200}"
BENCH_S="${GPU_PASS_BENCH_S:-160}"
FP32="${GPU_PASS_FP32:-0}"  # 1: also the fp32 (tf32) policy-loss bench (about 2 more minutes)
STAGES=" ${GPU_PASS_STAGES:-native tests train hian bf16 objectives multiturn$([[ $FP32 == 1 ]] && echo ' fp32')} "
want() { [[ $STAGES == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -x /usr/local/cuda/bin/nvcc ]] && export PATH="$PATH:/usr/local/cuda/bin"
start=$SECONDS
stamp() { echo "== $1 ($((SECONDS - start)) s)"; }

pack() {
    local files=()
    for f in bench/results/advantages_triton.* bench/results/policy_loss_cuda*.* bench/results/objectives_cuda*.* \
        build/kernels/ptxas_sm*.md; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) && tar czf "$OUT/results.tgz" "${files[@]}"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-deps --no-index .whl/*.whl \
        || { python3 -m pip install --quiet --no-deps --no-index --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/site"; }
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
    python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))"
    nvcc --version | tail -2
} 2>&1 | tee "$OUT/device.txt"

stamp "native library (CMake, CUDA part when nvcc is found)"
if want native && command -v cmake > /dev/null; then
    timeout 240 bash -c 'cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build' \
        > "$OUT/native_build.txt" 2>&1 || echo "native build failed: see native_build.txt"
    tail -3 "$OUT/native_build.txt"
fi
pack

stamp "op tests, kernels compiled for the device"
workers=()
python3 -c "import xdist" 2> /dev/null && workers=(-n 8)
if want tests; then
    timeout "$TEST_S" python3 -m pytest -q -rfE -p no:cacheprovider "${workers[@]}" --timeout 150 \
        tests/ops tests/native tests/test_advantages.py tests/test_policy_loss.py tests/test_library.py \
        tests/train/test_offload.py \
        > "$OUT/gpu_tests.txt" 2>&1
    echo "pytest exit $?"
    tail -15 "$OUT/gpu_tests.txt"
fi

if want train; then
    # 3 steps of the demo config on CUDA: transformers engine (no vLLM in the image), Triton kernels, LoRA,
    # on a tiny random Llama with SmolLM2's tokenizer (.gpu_carry/tiny_model); the optimizer state leaves
    # the GPU between updates (optim.offload_state: optim/offloaded_mib in the metrics).
    stamp "training loop, 3 steps of the demo config (hf engine)"
    if [[ -d .gpu_carry/tiny_model ]]; then
        PYTHONPATH="$PYTHONPATH:$PWD/.gpu_carry/site" timeout 150 python3 -c \
            "import sys; from duca_fast.cli import main; sys.exit(main(sys.argv[1:]))" train \
            --config configs/demo.yaml model.path=.gpu_carry/tiny_model rollout.engine=hf steps=3 \
            optim.offload_state=true eval_before_after=false checkpoint_every=0 run_dir="$OUT/train_run" \
            > "$OUT/train.txt" 2>&1
        echo "train exit $?"
        tail -4 "$OUT/train.txt"
        [[ -f $OUT/train_run/metrics.jsonl ]] && cp "$OUT/train_run/metrics.jsonl" "$OUT/train_metrics.jsonl"
        rm -rf "$OUT/train_run"
    else
        echo "no .gpu_carry/tiny_model: run bench/gpu_carry.sh here and carry .gpu_carry"
    fi
fi

want hian && stamp "HIAN advantages" && timeout 120 python3 bench/bench_advantages.py --sessions 16000 128000 2>&1 | tail -8 | tee "$OUT/bench_log.txt"
pack
want bf16 && stamp "fused policy loss, bf16" && timeout "$BENCH_S" python3 bench/bench_policy_loss.py 2>&1 | tail -25 | tee -a "$OUT/bench_log.txt"
pack
want objectives && stamp "objectives, bf16" && timeout 100 python3 -m bench.bench_objectives 2>&1 | tail -12 | tee -a "$OUT/bench_log.txt"
pack
# A third of the tokens carry loss, in alternating 64-token turns (our dialogues' layout).
want multiturn && stamp "fused policy loss, bf16, multi-turn mask" && timeout "$BENCH_S" python3 bench/bench_policy_loss.py --loss-share 0.33 --name policy_loss_cuda_multiturn \
    --only liger_chunked,liger_triton_logits,naive_torch 2>&1 | tail -12 | tee -a "$OUT/bench_log.txt"
pack
if want fp32; then
    # fp32 inputs on tf32 tensor cores (the default; every variant gets the same switch), half the tokens.
    stamp "fused policy loss, fp32 (tf32)"
    timeout "$BENCH_S" python3 bench/bench_policy_loss.py --dtype float32 --tokens 4096 2>&1 | tail -25 \
        | tee -a "$OUT/bench_log.txt"
    pack
fi
stamp "done"
