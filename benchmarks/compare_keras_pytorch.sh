#!/usr/bin/env bash
# Side-by-side CPU training step: rts-tf (Keras) against segmentation-models-pytorch, same architecture.
#
# A copy of ../shared/bench/keras_vs_pytorch_step/compare.sh (read-only there) with three changes:
#   * the Keras side is always this project's benchmarks/train_step.py (the shared keras_step.py passes a
#     band count where build_segmenter now takes band names), parsed step by step like the PyTorch side;
#   * OUTPUT_STRIDE [16] is the Keras DeepLab encoders' output stride (smp's stock DeepLabV3 uses 8,
#     its DeepLabV3Plus 16);
#   * the PyTorch side runs this folder's copy of smp_step.py, which also prints each step's CPU time, and
#     the summary gives the ratio of CPU seconds per step too (the steadier figure on a shared machine).
#
# usage: compare_keras_pytorch.sh ARCH ENCODER ROUNDS   (from the project root)
#   ARCH     unet | unetpp | deeplabv3 | deeplabv3plus   (the project's names)
#   ENCODER  resnet34 | resnet18
#   ROUNDS   rounds; each runs the Keras benchmark and smp_step.py once, in separate processes,
#            alternating which goes first (odd rounds Keras first, even rounds PyTorch first)
# environment (defaults in brackets):
#   BATCH [8]  SIZE [256]  WARMUP [1]  STEPS [3]  VARIANT [matched|stock] (smp side)  OUTPUT_STRIDE [16]
#   the loss is the project's focal loss on both sides
#   TORCH_OMP_WAIT_POLICY [PASSIVE]  OMP_WAIT_POLICY of the PyTorch process only; empty = torch's default
#   KERAS_PY [.venv/bin/python of the project]  TORCH_PY [${TMPDIR:-/tmp}/torchvenv/bin/python]
#   PROJECT [the current folder]  LOGDIR [${TMPDIR:-/tmp}/p3-ARCH-ENCODER-<time>]
#   PYTHONPATH, TF_ENABLE_ONEDNN_OPTS etc. pass through to the Keras process unchanged.
# prints per round the median s/step of each side, then the pooled medians (all timed steps of all
# rounds) and the ratio Keras/PyTorch (> 1: Keras slower). Full logs stay in LOGDIR.
set -euo pipefail

if [[ $# -ne 3 ]]; then
    sed -n "2,26p" "$0"
    exit 2
fi
ARCH=$1 ENCODER=$2 ROUNDS=$3
BATCH=${BATCH:-8} SIZE=${SIZE:-256} WARMUP=${WARMUP:-1} STEPS=${STEPS:-3} LOSS=focal OUTPUT_STRIDE=${OUTPUT_STRIDE:-16}
VARIANT=${VARIANT:-matched} KERAS=project TORCH_OMP_WAIT_POLICY=${TORCH_OMP_WAIT_POLICY-PASSIVE}
KERAS_PY=${KERAS_PY:-$PWD/.venv/bin/python} TORCH_PY=${TORCH_PY:-${TMPDIR:-/tmp}/torchvenv/bin/python}
PROJECT=${PROJECT:-$PWD}
HERE=$PROJECT/benchmarks
LOGDIR=${LOGDIR:-${TMPDIR:-/tmp}/p3-$ARCH-$ENCODER-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOGDIR"

case $ARCH in unet|unetpp|deeplabv3|deeplabv3plus) ;; *) echo "unknown ARCH $ARCH" >&2; exit 2;; esac

common=(--arch "$ARCH" --encoder "$ENCODER" --size "$SIZE" --batch "$BATCH" --steps "$STEPS")
run_keras() {  # $1 log file
    (cd "$PROJECT" && "$KERAS_PY" benchmarks/train_step.py "${common[@]}" --warmup "$WARMUP" \
        --output-stride "$OUTPUT_STRIDE") >"$1" 2>&1
}
run_torch() {  # $1 log file
    local policy=(env -u OMP_WAIT_POLICY)
    [[ -n $TORCH_OMP_WAIT_POLICY ]] && policy=(env OMP_WAIT_POLICY="$TORCH_OMP_WAIT_POLICY")
    (cd "$HERE" && "${policy[@]}" "$TORCH_PY" smp_step.py "${common[@]}" --warmup "$WARMUP" --loss "$LOSS" \
        --variant "$VARIANT" --threads 2) >"$1" 2>&1
}
run_side() {  # $1 keras|torch, $2 round
    local log="$LOGDIR/round$2-$1.log"
    if ! "run_$1" "$log"; then
        echo "round $2: the $1 run failed; last lines of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
}

echo "p3 compare: $ARCH / $ENCODER, ${SIZE} px x 10 bands, batch $BATCH, $WARMUP warm-up + $STEPS timed steps," \
     "loss $LOSS, smp variant $VARIANT, Keras output stride $OUTPUT_STRIDE, TF_ENABLE_ONEDNN_OPTS=${TF_ENABLE_ONEDNN_OPTS-unset}," \
     "PyTorch OMP_WAIT_POLICY=${TORCH_OMP_WAIT_POLICY:-default}," \
     "$ROUNDS rounds; logs in $LOGDIR"
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2)); then run_side keras "$round"; run_side torch "$round"
    else run_side torch "$round"; run_side keras "$round"; fi
done

"$TORCH_PY" - "$LOGDIR" "$ARCH" "$ROUNDS" "$KERAS" <<'EOF'
import re, statistics, sys
logdir, arch, rounds, keras_mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
step = re.compile(rf"^\s+{arch} step \d+/\d+\s+([\d.]+) s")
cpu_step = re.compile(rf"^\s+{arch} step \d+/\d+\s+[\d.]+ s\s+cpu\s+([\d.]+) s")
summary = re.compile(rf"^\s+{arch}\s+([\d.]+) s/step")

def times(side, r, pattern=step):
    lines = open(f"{logdir}/round{r}-{side}.log").read().splitlines()
    return [float(m.group(1)) for m in map(pattern.match, lines) if m]

pooled = {"keras": [], "torch": []}
print(f"{'round':>5}  {'Keras s/step':>13}  {'PyTorch s/step':>14}  {'Keras/PyTorch':>13}")
for r in range(1, rounds + 1):
    medians = {}
    for side in pooled:
        values = times(side, r)
        if not values:
            sys.exit(f"no timings for {side} in round {r}: see {logdir}/round{r}-{side}.log")
        pooled[side] += values
        medians[side] = statistics.median(values)
    print(f"{r:>5}  {medians['keras']:13.3f}  {medians['torch']:14.3f}  {medians['keras'] / medians['torch']:13.2f}")
cpu = {side: [v for r in range(1, rounds + 1) for v in times(side, r, cpu_step)] for side in pooled}
if all(cpu.values()):
    kc, tc = statistics.median(cpu["keras"]), statistics.median(cpu["torch"])
    print(f"pooled median CPU time: Keras {kc:.3f} s/step, PyTorch {tc:.3f} s/step; Keras/PyTorch = {kc / tc:.2f}")
k, t = statistics.median(pooled["keras"]), statistics.median(pooled["torch"])
what = "steps"
print(f"pooled median: Keras {k:.3f} s/step ({len(pooled['keras'])} {what}), "
      f"PyTorch {t:.3f} s/step ({len(pooled['torch'])} steps); Keras/PyTorch = {k / t:.2f}")
for r in (1,):
    onednn = [l.split("] ", 1)[-1] for l in open(f"{logdir}/round{r}-keras.log") if "oneDNN" in l]
    print("TF oneDNN message:", onednn[0] if onednn else "none printed (oneDNN custom ops off)")
EOF
