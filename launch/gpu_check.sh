#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and PyTorch (DALI and network access optional), in
# under 5 minutes: the GPU tests (pytest -m gpu), the input pipeline benchmark with DALI's mixed
# (GPU) decoder, a short end-to-end benchmark with bf16 and with fp16, and the step benchmark
# (against torchvision.models.alexnet); one JSON (<out>/gpu_check.json) and a short table.
#
#   bash launch/gpu_check.sh [OUT_DIR]        (default: $OUT when set, else runs/gpu_check)
#
# OUT_DIR receives three files: gpu_check.json (every result, the ratios and each step's status),
# gpu_check.log (all output) and gpu_tests.xml; each step's own report stays in runs/gpu_check/.
#
# Where `import nvidia.dali` fails, it sources .daliN/install.sh of the highest N present, the
# wheels staged beside the checkout, each .daliN/ folder holding part of them (installed into
# /tmp/site; no network needed). Sizes can be changed through GPU_CHECK_{BATCH,THREADS,E2E_THREADS,IMAGES,CROP,RESIZE};
# GPU_CHECK_ALLOW_CPU=1 runs the same steps on a machine without a GPU (a dry run of this script,
# small sizes, the fp16 step skipped).
set -uo pipefail
usage="usage: bash launch/gpu_check.sh [OUT_DIR]"
case ${1:-} in  # `--help` was taken for the output folder, and every step ran
  -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_check: unknown option $1 ($usage)" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "gpu_check: one OUT_DIR at most ($usage)" >&2; exit 2; }
out=${1:-${OUT:-}}
[ -z "$out" ] || out=$(realpath -m -- "$out")  # where it was started, not the checkout it moves to
cd "$(dirname "$0")/.."
work=runs/gpu_check
out=${out:-$work}
# An OUT_DIR that is a file, or cannot be written: every step ran, and the script ended with exit 0.
mkdir -p -- "$out" "$work" && : >"$out/gpu_check.log" || { echo "gpu_check: cannot write into $out" >&2; exit 2; }
rm -rf "$work"/pipeline "$work"/e2e_bf16 "$work"/e2e_fp16 "$work"/step  # never merge a stale report
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
py=python3
started=$(date +%s)
log() { echo "[gpu_check +$(($(date +%s) - started))s] $*" | tee -a "$out/gpu_check.log"; }

if $py -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  gpu=1
  batch=${GPU_CHECK_BATCH:-128} threads=${GPU_CHECK_THREADS:-8} images=${GPU_CHECK_IMAGES:-2000}
  # The pipeline comparison gives DALI and torchvision's DataLoader the same 8 threads = workers;
  # e2e asks whether the input keeps up with one GPU, so its loader gets every core, as a
  # single-GPU user's would (at 8 threads it delivered ~12,000 images/s to a ~14,000 images/s step).
  e2e_threads=${GPU_CHECK_E2E_THREADS:-$(nproc)}
  crop=${GPU_CHECK_CROP:-227} resize=${GPU_CHECK_RESIZE:-256} steps=20
  nvidia-smi -L 2>/dev/null | tee -a "$out/gpu_check.log"
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  gpu=0
  batch=${GPU_CHECK_BATCH:-16} threads=${GPU_CHECK_THREADS:-2} images=${GPU_CHECK_IMAGES:-200}
  e2e_threads=${GPU_CHECK_E2E_THREADS:-$threads}
  crop=${GPU_CHECK_CROP:-67} resize=${GPU_CHECK_RESIZE:-76} steps=2
  log "no CUDA device: dry run on the CPU (GPU_CHECK_ALLOW_CPU=1)"
else
  echo "gpu_check: PyTorch sees no CUDA device (set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)" >&2
  exit 2
fi

if ! $py -c "import nvidia.dali" 2>/dev/null; then
  staged=$(ls -d .dali[0-9]* 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$staged" ] && [ -f "$staged/install.sh" ]; then
    log "DALI missing: installing the wheels staged in .dali* ($staged/install.sh)"
    # Sourced (it exports PYTHONPATH); inside `||` its own `set -e` cannot end this script.
    . "$staged/install.sh" || log "DALI install reported an error"
    set +e
  else
    log "DALI missing and no staged wheels (.daliN/install.sh): DALI steps will fail"
  fi
fi
{
  $py - <<'EOF'
import torch
try:
    import nvidia.dali as dali
    dali_version = dali.__version__
except Exception as exc:  # noqa: BLE001
    dali_version = f"missing ({exc})"
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, DALI {dali_version}, device {name}")
EOF
} 2>&1 | tee -a "$out/gpu_check.log"

status=()
step_pid=
# Ctrl-C (or a SIGTERM) ends the check. A step runs under `timeout`, which moves itself and the
# step into a process group of their own, out of the terminal's reach: Ctrl-C stopped nothing,
# and each step after the one running still ran. The step is stopped here, and no other starts.
interrupted() {  # interrupted STATUS
  trap - INT TERM
  if [ -n "$step_pid" ]; then
    # timeout's group (the step and what it started); timeout itself if it has no group yet.
    kill -TERM -- "-$step_pid" 2>/dev/null || kill -TERM "$step_pid" 2>/dev/null
    wait "$step_pid" 2>/dev/null
  fi
  log "interrupted: the step running was stopped and no later step run; no gpu_check.json"
  exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

run_step() {  # run_step NAME SECONDS COMMAND... : records NAME=ok|failed(rc)
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  log "$name: $*"
  # SIGABRT at the limit: with PYTHONFAULTHANDLER set, a step that hangs prints every thread's stack.
  # In the background, waited for: a trap runs during `wait`, not only after the step.
  timeout -s ABRT -k 10 "$limit" "$@" > >(tee -a "$out/gpu_check.log") 2>&1 &
  step_pid=$!
  wait "$step_pid"
  local rc=$?
  step_pid=
  wait  # for the tee of its output too (a process substitution: bash 5.1 and later wait for it here)
  log "$name: exit $rc after $(($(date +%s) - t0)) s (limit $limit s)"
  if [ "$rc" = 0 ]; then
    status+=("$name=ok")
  elif [ "$name" = gpu_tests ] && [ "$rc" = 5 ]; then
    status+=("$name=none-collected")  # pytest's exit 5: no test is marked gpu yet
  else
    status+=("$name=failed($rc)")
    log "$name failed ($rc)"
  fi
}

bench=(launch/benchmark.py)
data=(--dataset imagenet-like --like-images "$images")
sizes=(data.batch_size="$batch" data.crop="$crop" data.resize="$resize" data.num_threads="$e2e_threads" model.num_classes=1000)

if [ "$gpu" = 1 ]; then
  # About 110 s on an H100, 75 of them the fp16 resume test (three short trainings under torchrun).
  run_step gpu_tests 150 $py -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/gpu_tests.xml" tests
fi
# Without --graph-only: six contenders, about 80 s on an H200 (eight took 100 s, most of it the
# settling between turns).
run_step pipeline 150 $py "${bench[@]}" pipeline "${data[@]}" --batch-size "$batch" --threads "$threads" \
  --crop "$crop" --resize "$resize" --windows 3 --batches 6 --out "$work/pipeline"
run_step e2e_bf16 75 $py "${bench[@]}" e2e "${data[@]}" --windows 3 --steps "$steps" --out "$work/e2e_bf16" \
  "${sizes[@]}" train.amp=bf16
if [ "$gpu" = 1 ]; then
  run_step e2e_fp16 75 $py "${bench[@]}" e2e "${data[@]}" --windows 3 --steps "$steps" --out "$work/e2e_fp16" \
    "${sizes[@]}" train.amp=fp16
fi
run_step step 60 $py "${bench[@]}" step --compare-torchvision --windows 3 --steps "$steps" --out "$work/step" \
  data.batch_size="$batch" data.crop="$crop" data.resize="$resize" model.num_classes=1000 train.amp="$([ "$gpu" = 1 ] && echo bf16 || echo auto)"

reports=()
rm -f "$out/gpu_check.json"
for f in "$work"/pipeline/pipeline.json "$work"/e2e_bf16/e2e.json "$work"/e2e_fp16/e2e.json "$work"/step/step.json; do
  [ -f "$f" ] && reports+=("$f")
done
checks=()
for s in "${status[@]}"; do checks+=(--check "$s"); done
if [ ${#reports[@]} -gt 0 ] && ! $py "${bench[@]}" merge "${reports[@]}" "${checks[@]}" --name gpu_check --out "$out" 2>&1 |
  tee -a "$out/gpu_check.log"; then
  status+=("merge=failed")  # no gpu_check.json: not a success
fi
log "done: ${status[*]}"
case " ${status[*]} " in *failed*) exit 1 ;; esac
exit 0
