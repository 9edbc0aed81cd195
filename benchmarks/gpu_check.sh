#!/usr/bin/env bash
# The GPU check: what engram claims for CUDA, run on a machine with one CUDA GPU (<= 8 min).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # anywhere: the CPU-reachable parts, tiny
#
# One summary line per check, `gpu_check: <name>: ok|FAILED|skipped (<reason>) <figures>`;
# a failed check's log tail goes to stderr. Exit 0 when no check failed. The dry run
# runs what needs no GPU on the CPU (the mixed-precision runs, the kill-and-rerun, a
# 2-rank gloo torchrun job, the ratios at a tiny size) and reports the rest skipped.
# The logic of each check is in benchmarks/gpu_check.py; docs/benchmarks.md says more.
set -u
cd "$(dirname "$0")/.."
BIN=${ENGRAM_VENV:-.venv}/bin
PY=$BIN/python

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac

WORK=$(mktemp -d -t engram-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1
FAILED=0

# Small runs (2 experiences of split digits, one epoch): the checks are of what runs
# where, not of accuracy; the GPU adds rounds to the timed ratios only.
SIZE=(benchmark.n_experiences=2 training.epochs=1)
if [ "$DRY" = 1 ]; then
  DEV=cpu ROUNDS=1
else
  DEV=cuda ROUNDS=3
  if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device is visible to torch; use --cpu-dry-run" >&2
    exit 2
  fi
fi
QUIET=(logger=none run.quiet=true training.threads=1)

# check NAME TIMEOUT_S CMD...: runs CMD, its log in $WORK; its last stdout line: figures.
check() {
  local name=$1 limit=$2 log="$WORK/$1.log" start=$SECONDS rc
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local figures
  figures=$(grep -v '^\s*$' "$log" | tail -n 1)
  if [ "$rc" = 0 ]; then
    echo "gpu_check: $name: ok ${figures} [$((SECONDS - start)) s]"
  else
    FAILED=1
    [ "$rc" = 124 ] && figures="timed out after ${limit} s"
    echo "gpu_check: $name: FAILED (exit $rc) ${figures}"
    echo "---- $name: last lines of its log ----" >&2
    tail -n 25 "$log" >&2
  fi
}

skip() { echo "gpu_check: $1: skipped ($2)"; }

if [ "$DRY" = 1 ]; then
  skip pytest-gpu "needs CUDA: every test marked gpu skips without it"
else
  check pytest-gpu 300 "$BIN/pytest" -q -p no:randomly -m gpu tests
fi

# The main job (README: engram-train experiment=first_run) in each mixed precision; what
# its store then holds: device, precision, accuracy, skipped updates, loss scale.
for precision in bf16-mixed 16-mixed; do
  check "$precision" 120 "$PY" benchmarks/gpu_check.py train "$WORK/main-$precision" \
    --device "$DEV" --precision "$precision" -- experiment=first_run "${SIZE[@]}" "${QUIET[@]}"
done

check kill-rerun 240 "$PY" benchmarks/gpu_check.py kill-rerun "$WORK/kill" --device "$DEV" -- \
  strategy=ewc training.commit_every_iterations=3 "${SIZE[@]}" "${QUIET[@]}"

# Data-parallel under torchrun: on the GPU one rank on NCCL (NCCL refuses two ranks on one
# GPU), on the CPU two ranks on gloo, in fp16 (the ranks agree on every skipped step).
if [ "$DRY" = 1 ]; then
  skip torchrun-nccl "needs CUDA"
else
  check torchrun-nccl 120 "$BIN/torchrun" --standalone --nproc-per-node=1 \
    benchmarks/gpu_check.py nccl
fi
if [ "$DRY" = 1 ]; then
  check torchrun-gloo 180 "$PY" benchmarks/gpu_check.py train "$WORK/gloo" --ranks 2 \
    --device cpu --precision 16-mixed -- strategy=ewc_replay \
    training.commit_every_iterations=4 benchmark.n_experiences=2 training.epochs=1 "${QUIET[@]}"
else
  skip torchrun-gloo "CPU only: the dry run and tests/distributed run it"
fi

if [ "$DRY" = 1 ]; then
  skip gpu-to-cpu-resume "needs CUDA"
else
  check gpu-to-cpu-resume 180 "$PY" benchmarks/gpu_check.py resume-on-cpu "$WORK/resume" -- \
    strategy=ewc "${SIZE[@]}" "${QUIET[@]}"
fi

check persistence-overhead 180 "$PY" benchmarks/gpu_check.py persistence --device "$DEV" \
  --rounds "$ROUNDS"
check vs-avalanche 180 "$PY" benchmarks/gpu_check.py vs-avalanche --device "$DEV" \
  --rounds "$ROUNDS"

exit "$FAILED"
