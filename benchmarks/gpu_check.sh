#!/usr/bin/env bash
# The GPU check: one command, for when a GPU is lent (250 s on one H200, 2026-11-26; results in launch/README.md).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default: a new folder under /tmp
#
# 1. Training with launch/gpu.yaml (EfficientNet-Lite0, 224 px, 6,000 Fashion-MNIST images,
#    fine-tuning, 2 epochs) in fp32, bf16 and fp16: images/s of the last epoch, and bf16/fp16 against fp32.
# 2. Kill and resume on the GPU: a bf16 run SIGKILLed once its first epoch is saved, then --resume;
#    it must finish all its epochs with the first epoch's row unchanged.
# 3. fmtl export of the bf16 run (the parity gate: onnxruntime must agree with PyTorch), then the
#    exported model on onnxruntime's CUDA provider against its CPU provider on 512 test images.
# 4. fmtl infer with the CUDA provider (the default when onnxruntime has it) on 256 sample images.
#
# On a machine without a usable GPU it says "no GPU" and exits 0: nothing else in fmtl needs one.
# Any failed step makes the exit status non-zero; the summary at the end lists every step.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${1:-$(mktemp -d /tmp/fmtl-gpu-check.XXXXXX)}
mkdir -p "$OUT"
DATA=(--model efficientnet_lite0 --image-size 224 --max-train-samples 6000 --max-eval-samples 1000
      --strategy finetune --batch-size 128 --quiet)
FAILED=0
SUMMARY=()

say() { echo "gpu_check: $*"; }
record() { SUMMARY+=("$1"); say "$1"; }
fail() { FAILED=1; record "FAIL $*"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    say "no GPU (nvidia-smi finds none): nothing to check on this machine"
    exit 0
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    say "no GPU usable by torch (torch.cuda.is_available() is False; a CPU-only torch build?): nothing to check"
    exit 0
fi
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1); output in $OUT"

launch() {  # launch SECONDS PRECISION RUN_DIR [more train options]: accelerate launch with launch/gpu.yaml, timed out
    local limit=$1 precision=$2 run=$3
    shift 3
    timeout "$limit" "$BIN/accelerate" launch --config_file launch/gpu.yaml --mixed_precision "$precision" \
        fmtl/train.py "${DATA[@]}" --output "$run" "$@"
}

last_rate() {  # images/s of the last epoch in a run's results.csv
    "$PY" -c "import csv, sys; print(list(csv.DictReader(open(sys.argv[1])))[-1]['images_per_s'])" "$1/results.csv"
}

# ---- 1. fp32, bf16, fp16 training throughput
declare -A RATE
for precision in no bf16 fp16; do
    run="$OUT/train-$precision"
    if launch 150 "$precision" "$run" --epochs 2 >"$run.log" 2>&1; then
        RATE[$precision]=$(last_rate "$run")
        record "ok   train $precision: ${RATE[$precision]} images/s (last epoch)"
    else
        fail "train $precision (exit $?): see $run.log"; tail -5 "$run.log"
    fi
done
for precision in bf16 fp16; do
    if [[ -n "${RATE[no]:-}" && -n "${RATE[$precision]:-}" ]]; then
        ratio=$("$PY" -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "${RATE[$precision]}" "${RATE[no]}")
        record "     $precision against fp32: $ratio"
    fi
done

# ---- 2. kill and resume on the GPU
run="$OUT/killed"
# its own session and process group (setsid), so one signal reaches the launcher and the training process
setsid "$BIN/accelerate" launch --config_file launch/gpu.yaml --mixed_precision bf16 \
    fmtl/train.py "${DATA[@]}" --output "$run" --epochs 3 >"$run.log" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do  # up to 120 s for the first epoch's state
    [[ -f "$run/state/trainer.json" ]] && break
    sleep 0.1
done
if [[ -f "$run/state/trainer.json" ]]; then
    kill -KILL -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    first_row=$(sed -n 2p "$run/results.csv")
    if launch 200 bf16 "$run" --resume "$run" --epochs 3 >>"$run.log" 2>&1 \
        && [[ $(($(wc -l <"$run/results.csv") - 1)) -eq 3 ]] && [[ $(sed -n 2p "$run/results.csv") == "$first_row" ]]; then
        record "ok   kill after epoch 1 and --resume: 3 epochs, epoch 1 unchanged"
    else
        fail "kill and resume: see $run.log"; tail -5 "$run.log"
    fi
else
    kill -KILL -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    fail "kill and resume: no state saved within 120 s, see $run.log"; tail -5 "$run.log"
fi

# ---- 3. export (PyTorch parity gate), then onnxruntime CUDA against CPU
model="$OUT/lite0.onnx"
if [[ -f "$OUT/train-bf16/model.safetensors" ]] && timeout 180 "$BIN/fmtl" export --onnx "$OUT/train-bf16" -o "$model" \
        >"$OUT/export.log" 2>&1; then
    record "ok   export with the parity gate: $(grep -i parity "$OUT/export.log" | head -1)"
    if timeout 120 "$PY" - "$model" >"$OUT/cuda-parity.log" 2>&1 <<'PYTHON'
import sys

import numpy as np

from fmtl.runtime.classifier import Classifier
from fmtl.training.data import load_dataset

images = load_dataset("fashion-mnist", "test").images[:512].numpy()
cpu = Classifier(sys.argv[1], providers=["CPUExecutionProvider"])
cuda = Classifier(sys.argv[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
used = cuda.session.get_providers()[0]
if used != "CUDAExecutionProvider":
    sys.exit(f"onnxruntime here has no CUDA provider (it used {used}): install onnxruntime-gpu")
a, b = cpu.predict_proba(images, 64), cuda.predict_proba(images, 64)
agree = float((a.argmax(1) == b.argmax(1)).mean())
diff = float(np.abs(a - b).max())
print(f"CUDA against CPU on {len(images)} images: top-1 agreement {agree:.4f}, max |dprob| {diff:.2e}")
sys.exit(0 if agree >= 0.995 and diff < 1e-2 else 1)
PYTHON
    then
        record "ok   onnxruntime $(tail -1 "$OUT/cuda-parity.log")"
    else
        fail "onnxruntime CUDA parity: $(tail -1 "$OUT/cuda-parity.log")"
    fi
else
    fail "export: see $OUT/export.log"; tail -5 "$OUT/export.log" 2>/dev/null
fi

# ---- 4. fmtl infer with the CUDA provider
if [[ -f "$model" ]]; then
    "$BIN/fmtl" samples "$OUT/samples" -n 256 >/dev/null 2>&1
    provider=$("$PY" -c "import sys; from fmtl.runtime.classifier import Classifier
print(Classifier(sys.argv[1]).session.get_providers()[0])" "$model" 2>/dev/null)
    if [[ "$provider" == CUDAExecutionProvider ]] && timeout 120 "$BIN/fmtl" infer "$OUT/samples" -m "$model" \
            --format jsonl -o "$OUT/infer.jsonl" --quiet 2>"$OUT/infer.log" && [[ $(wc -l <"$OUT/infer.jsonl") -eq 256 ]]; then
        record "ok   fmtl infer on $provider: 256 rows"
    else
        fail "fmtl infer (provider ${provider:-none}): see $OUT/infer.log"
    fi
fi

echo
say "summary"
printf '  %s\n' "${SUMMARY[@]}"
exit $FAILED
