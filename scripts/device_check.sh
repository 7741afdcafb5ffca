#!/usr/bin/env bash
# GPU validation of vesselfast in one prepared run (docs/GPU.md).
#
#   bash scripts/device_check.sh --stage-data     here, once: copy the real-data subset into .device_data/
#                                                 (git-ignored; name it in the device tool's `carry`)
#   bash scripts/device_check.sh                  on a lent GPU machine, from the repo copy: every step below,
#                                                 each writing to $OUT as it goes (a timeout keeps what finished)
#   bash scripts/device_check.sh --skip 07,08     the same without the steps named (a re-run within a lease)
#   bash scripts/device_check.sh --dry-run        on any machine: every step it would take, with its syntax and
#                                                 paths checked, plus what runs without a GPU (a build without
#                                                 CUDA, the collection of the CUDA tests); CI runs this
#
# Steps in order of value and their time budgets (seconds). The whole script keeps within a deadline
# (VESSELFAST_DEVICE_DEADLINE, default 580 s from its start; give the device tool timeout_s=600): a step gets at most what is left, less 20 s
# for copying results, and is skipped when under 20 s are left, so the device tool's own limit never cuts
# the copying of the training's metrics.
#   01 environment (nvidia-smi, torch, nvcc)                                     10
#   02 build the extension with CUDA against the machine's torch                150
#   03 vesselfast info                                                            10
#   04 the CUDA / Triton tests (pytest -m cuda)                                  120
#   05 vesselfast train --preset gpu-short on DRIVE + CHASE_DB1 -> OCTA-500 3M   480
#   06 bench ops on CUDA: eager, the fused kernels, copy floor (no compile)       60
#   07 bench generator / sampling / segmenter on CUDA (bf16)                      60
#   08 bench ops at 16M with the torch.compile baselines                          60
set -u

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
STAGE=0
SKIP=","
OUT_DIR="${OUT:-$ROOT/out/device_check}"
DATA="${VESSELFAST_DEVICE_DATA:-$ROOT/.device_data}"
SHARED="${VESSELFAST_SHARED_DATA:-$ROOT/../shared/data}"
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stage-data) STAGE=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    --skip) SKIP=",$2,"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown option $1 (use --dry-run, --stage-data, --out DIR, --data DIR, --skip 05,07)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
say() { echo "[device_check] $*" | tee -a "$SUMMARY"; }

# The real-data subset the gpu-short preset trains on (about 52 MB, under the tool's 64 MiB with the repo).
SUBSET=(fundus/DRIVE/training fundus/CHASE_DB1/training octa/OCTA-500_3M/train octa/OCTA-500_3M/test)

if [ "$STAGE" = 1 ]; then
  for part in "${SUBSET[@]}"; do
    [ -d "$SHARED/$part" ] || { echo "device_check.sh: $SHARED/$part not found; set VESSELFAST_SHARED_DATA" >&2; exit 2; }
    mkdir -p "$DATA/$part"
    cp -r "$SHARED/$part/." "$DATA/$part/"
  done
  grep -qx '/.device_data/' .git/info/exclude 2>/dev/null || echo '/.device_data/' >> .git/info/exclude
  say "staged $(du -sh "$DATA" | cut -f1) of real data in $DATA (carry it: carry=[\".device_data\"])"
  exit 0
fi

# The device tool brings back at most 8 files from $OUT: every step appends to one steps.log; the
# training's run directory (checkpoints) stays outside $OUT and only its metrics, stages and log come back.
LOG="$OUT_DIR/steps.log"
RUN_DIR="${VESSELFAST_DEVICE_RUN:-/tmp/vesselfast_device_run}"

# step NAME BUDGET COMMAND...: run (or, dry, show) one step under a time limit, appending to steps.log; never
# fatal. The limit is the smaller of BUDGET and what the deadline leaves (less 20 s for the copying).
T_START=$(date +%s)
DEADLINE="${VESSELFAST_DEVICE_DEADLINE:-580}"
step() {
  local name="$1" budget="$2"
  shift 2
  if [ "$DRY" = 1 ]; then
    say "would run $name (budget ${budget}s): $*"
    return 0
  fi
  case "$SKIP" in *",${name%%_*},"*) say "$name: skipped (--skip)"; return 0 ;; esac
  local t0 rc left
  t0=$(date +%s)
  left=$(( DEADLINE - (t0 - T_START) - 20 ))
  if [ "$left" -lt 20 ]; then
    say "$name: skipped, ${left} s left before the deadline"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "===== $name (limit ${budget}s): $*" >> "$LOG"
  PYTHONUNBUFFERED=1 timeout --kill-after=10 "$budget" "$@" >> "$LOG" 2>&1
  rc=$?
  say "$name: exit $rc after $(( $(date +%s) - t0 )) s$([ "$rc" = 124 ] && echo ' (time limit: what finished is kept)')"
  return 0
}

TRAIN_ARGS=(--preset gpu-short --device cuda
            --source "$DATA/fundus/DRIVE" "$DATA/fundus/CHASE_DB1" --target "$DATA/octa/OCTA-500_3M"
            --out "$RUN_DIR")

if [ "$DRY" = 1 ]; then
  say "dry run: checking the script, its paths and what runs without a GPU"
  bash -n "$0" || { say "syntax error in $0"; exit 1; }
  for f in setup.py csrc/vesselfast.cpp csrc/cuda/ops_cuda.cpp benchmarks/test_bench_ops.py \
           benchmarks/test_bench_generator.py benchmarks/test_bench_sampling.py benchmarks/test_bench_segmenter.py; do
    [ -f "$f" ] || { say "missing $f"; exit 1; }
  done
  "$PY" -c "from vesselfast.pipeline.config import resolve; resolve('gpu-short', overrides={'device': 'cuda'})" \
    || { say "the gpu-short preset does not resolve"; exit 1; }
  say "preset gpu-short resolves"
  if [ -d "$DATA" ]; then
    "$PY" -m vesselfast data check "$DATA/octa/OCTA-500_3M" --role target > "$OUT_DIR/data_check.log" 2>&1 \
      && say "staged data in $DATA passes vesselfast data check" || { say "staged data fails the check"; exit 1; }
  else
    say "no staged data in $DATA yet (bash scripts/device_check.sh --stage-data makes it)"
  fi
  tmp=$(mktemp -d)
  if VESSELFAST_NO_CUDA=1 "$PY" setup.py -q build_ext --build-temp "$tmp/temp" --build-lib "$tmp/lib" \
       > "$OUT_DIR/build_cpu.log" 2>&1; then
    say "extension builds without CUDA ($(ls "$tmp"/lib/vesselfast/_C*.so 2>/dev/null | wc -l) module)"
  else
    say "the CPU build failed (build_cpu.log)"; rm -rf "$tmp"; exit 1
  fi
  rm -rf "$tmp"
  n=$("$PY" -m pytest --collect-only -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>/dev/null | grep -c '::')
  [ "$n" -ge 1 ] || { say "no CUDA tests collected"; exit 1; }
  say "collected $n CUDA test(s) (pytest -m cuda)"
fi

[ "$DRY" = 1 ] || : > "$LOG"
step 01_env 10 bash -c 'nvidia-smi; '"$PY"' -c "import torch, triton; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), triton.__version__); from torch.utils import cpp_extension as ce; print(\"CUDA_HOME\", ce.CUDA_HOME)"; nvcc --version'
# CUDA_HOME: the environment's, else torch's own search (CUDA_PATH, nvcc on PATH, /usr/local/cuda);
# VESSELFAST_FORCE_CUDA makes a build that found no toolkit fail here instead of skipping the CUDA kernels.
step 02_build 150 env VESSELFAST_FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
step 03_info 10 "$PY" -m vesselfast info
step 04_tests 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
step 05_train 480 "$PY" -m vesselfast train "${TRAIN_ARGS[@]}"
if [ "$DRY" = 0 ]; then
  for f in metrics.json stages.json train.log; do
    [ -f "$RUN_DIR/$f" ] && cp "$RUN_DIR/$f" "$OUT_DIR/train_$f"
  done
fi
step 06_bench_ops 60 "$PY" -m vesselfast bench ops --device cuda --sizes 1M,4M,16M --no-compile \
  --json "$OUT_DIR/bench_ops.json"
step 07_bench_models 60 "$PY" -m vesselfast bench generator sampling segmenter --device cuda --no-compile \
  --json "$OUT_DIR/bench_models.json"
step 08_bench_ops_compile 60 "$PY" -m vesselfast bench ops --device cuda --sizes 16M \
  --json "$OUT_DIR/bench_ops_compile.json"
say "done"
exit 0
