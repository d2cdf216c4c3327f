#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in a few minutes under their own timeouts (10 minutes in all):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. tests/test_gpu.py: the model on CUDA against CPU (logits and every gradient), and the
#    megatron and megatron-sp plans at TP=2 over torch's fake process group on CUDA, fp32 and
#    bf16, so that the packed q|k|v heads reach CUDA's SDPA kernels through DTensor's CUDA
#    sharding rules, with the collectives the CPU run issues; decoding compiled and replayed as
#    CUDA graphs against eager; examples/train.py's training step with the Blocks compiled under
#    bf16 autocast against eager (test_compiled_bf16_training_on_cuda).
# 2. benchmarks/decode_roofline.py on the GPU at TP=1 in bf16, eager, compiled and compiled
#    with CUDA graphs (mode="reduce-overhead"), for GPT-2 124M and for a GPT-2-XL-sized model
#    (random weights), against the bandwidth the same run measures.
# 3. int8 weight-only decoding (dtensor_gpt.int8: int8 Linear weights with per-channel scales,
#    bf16 activations) on the GPU at TP=1 beside bf16, eager, compiled and with CUDA graphs:
#    tokens as its own eager ("tokens as eager") and tokens/s against its roofline (int8 bytes).
#
# Needs a Python with torch>=2.13 built for CUDA and this package's dependencies (PYTHON,
# default python3); on an older torch the TP tests skip, saying why. The package itself is used
# from this checkout. Run on an H200 on 2026-11-30 (figures in the README's Generating section; step 3, added since, has not run on a GPU yet). Writes each step's log to OUT_DIR
# (default: gpu-check-logs) and exits non-zero if a step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-gpu-check-logs}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run it under its own timeout, log it, remember a failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout --kill-after 10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name: FAILED (exit $rc; 124 is the timeout)"; status=1; }
}

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2
"$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')" | tee "$OUT/device.log"

step gpu-tests 300 "$PYTHON" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider
step decode-int8 120 "$PYTHON" benchmarks/decode_roofline.py --device cuda --tp 1 --dtypes bf16 int8 --batches 1 16 --config gpt2 --compile-modes default reduce-overhead
step decode-gpt2-xl 180 "$PYTHON" benchmarks/decode_roofline.py --device cuda --tp 1 --dtypes bf16 --batches 1 --config gpt2-xl --new 64 --compile-modes default reduce-overhead
exit $status
