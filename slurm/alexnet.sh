#!/bin/bash
# Distributed AlexNet training under Slurm: one torchrun per node (through srun), c10d rendezvous
# on the first node of the allocation.
#
#   sbatch slurm/alexnet.sh [--config FILE] [key=value ...]
#   sbatch --nodes=4 slurm/alexnet.sh --config launch/configs/imagenet_8gpu_dp.yaml data.root=/data/imagenet
#
# Submit from the repository root (or set ALEXNET_REPO). The #SBATCH lines below are defaults;
# options on the sbatch command line override them, e.g. a CPU-only partition:
#   sbatch --gpus-per-node=0 --cpus-per-task=8 slurm/alexnet.sh
#
# Workers per node: the GPUs Slurm gave the job on the node; without GPUs, one gloo worker per
# CPU of the task (--cpus-per-task), each with OMP_NUM_THREADS=1. ALEXNET_NPROC_PER_NODE
# overrides both.
#
# Preemption and time limits: Slurm sends SIGUSR1 to this script 120 s before the time limit
# (--signal=B:USR1@120; `scancel --signal=USR1 --batch JOBID` does the same by hand), and
# SIGTERM on preemption or cancellation. Either one creates the stop file that every worker
# polls; the workers agree on a step, write a checkpoint and exit. After SIGUSR1 the script
# requeues the job, unless rank 0 marked the run completed (the stop file's name + ".completed":
# it ended before the request took effect); the job keeps its id, so the run folder (named after
# the config and the job id) is found again and `checkpoint.resume=auto` continues where it
# stopped. A SIGUSR1 that reaches the workers and not this script (`scancel --signal=USR1`
# without --batch, --signal=USR1@N without B:) is requeued the same way: rank 0 leaves the stop's
# reason beside the stop file (".stopped"). After SIGTERM, Slurm
# decides: it requeues a preempted job (PreemptMode=REQUEUE with --requeue), not a cancelled one.
#
# Environment knobs (all optional): ALEXNET_REPO (the checkout), ALEXNET_PYTHON (interpreter with
# torch; default python3), ALEXNET_NPROC_PER_NODE, ALEXNET_MAX_RESTARTS (torchrun restarts of a
# crashed worker group inside one job; default 0), ALEXNET_RDZV_PORT (default 20000 + job id
# mod 10000), ALEXNET_STOP_FILE (default $SLURM_SUBMIT_DIR/.alexnet-stop-JOBID; must be on a
# file system every node sees).
#SBATCH --job-name=alexnet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

die() {
    echo "alexnet.sh: error: $*" >&2
    exit 2
}
say() { echo "alexnet.sh: $(date '+%F %T') $*" >&2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "submit me with sbatch (SLURM_JOB_ID is not set)"
[[ $SLURM_JOB_ID =~ ^[1-9][0-9]*$ ]] || die "SLURM_JOB_ID must be a job number; got '$SLURM_JOB_ID'"

# sbatch runs a copy of this script from its spool folder, so the checkout is found through the
# environment, the submit folder, or the path the job was submitted with.
find_repo() {
    local candidate words i
    for candidate in "${ALEXNET_REPO:-}" "${SLURM_SUBMIT_DIR:-}"; do
        if [[ -n $candidate && -f $candidate/launch/train.py ]]; then
            echo "$candidate"
            return 0
        fi
    done
    # scontrol prints "Command=<script> <args...>": try each prefix of words as the script path.
    candidate=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n1)
    read -r -a words <<<"$candidate"
    candidate=""
    for ((i = 0; i < ${#words[@]}; i++)); do
        candidate+=${candidate:+ }${words[$i]}
        if [[ -f $candidate && -f $(dirname "$candidate")/../launch/train.py ]]; then
            (cd "$(dirname "$candidate")/.." && pwd)
            return 0
        fi
    done
    return 1
}
# A value given and wrong is said, not passed over for the submit folder's checkout.
[[ -z ${ALEXNET_REPO:-} || -f $ALEXNET_REPO/launch/train.py ]] ||
    die "ALEXNET_REPO=$ALEXNET_REPO holds no launch/train.py (set it to the checkout's root)"
repo=$(find_repo) || die "cannot find the alexnet checkout: submit from its root or set ALEXNET_REPO=/path/to/checkout"
# The checkout's own package, not an installed copy of another checkout: python puts only the
# script's folder (launch/) on the path, so `alexnet` came from wherever pip had installed it.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

python=${ALEXNET_PYTHON:-python3}
command -v "$python" >/dev/null || die "no Python interpreter '$python' on this node (set ALEXNET_PYTHON)"

# sbatch, salloc and srun set it; a script run outside Slurm gets one line, not `set -u`'s.
[[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set: submit with sbatch (or run inside salloc)"
# The rendezvous host is the allocation's first node, never a silent localhost.
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#nodes[@]} -ge 1 && -n ${nodes[0]} ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no node"
head_node=${nodes[0]}
# Outside Linux's ephemeral range (32768-60999); a requeued job keeps its id and so its port.
port=${ALEXNET_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
# Checked here: torchrun's traceback came once per node, and port 0 on several nodes hung.
[[ $port =~ ^[1-9][0-9]{0,4}$ && $port -le 65535 ]] ||
    die "ALEXNET_RDZV_PORT must be a port number in [1, 65535]; got '$port'"
restarts=${ALEXNET_MAX_RESTARTS:-0}
[[ $restarts =~ ^(0|[1-9][0-9]{0,5})$ ]] || die "ALEXNET_MAX_RESTARTS must be a whole number >= 0; got '$restarts'"
# Only 1 (or yes, true) prints the launch instead of running it: a leftover ALEXNET_DRY_RUN=0,
# passed on by sbatch from the submitting shell, made a job that trained nothing and COMPLETED.
case ${ALEXNET_DRY_RUN:-} in
"" | 0 | no | false) dry_run=no ;;
1 | yes | true) dry_run=yes ;;
*) die "ALEXNET_DRY_RUN must be 1 (print the launch and exit) or 0; got '$ALEXNET_DRY_RUN'" ;;
esac

# The config file, found here: a wrong path (a relative one, submitted from another folder) failed
# on every node after the queue wait, each with torchrun's report.
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[$i]} in
    --config) config=${args[$((i + 1))]:-} ;;
    --config=*) config=${args[$i]#--config=} ;;
    *) continue ;;
    esac
    if [[ -n $config && ! -f $config ]]; then
        hint=""
        if [[ $config != /* && -f $repo/$config ]]; then
            hint="; the checkout has $repo/$config: give that path, or submit from the checkout's root"
        fi
        die "--config $config: no such file (relative to $PWD, the submit folder)$hint"
    fi
done

cpus=${SLURM_CPUS_PER_TASK:-1}
gpus=${SLURM_GPUS_ON_NODE:-0}
if [[ -n ${ALEXNET_NPROC_PER_NODE:-} ]]; then
    nproc=$ALEXNET_NPROC_PER_NODE
elif [[ $gpus =~ ^[0-9]+$ && $gpus -gt 0 ]]; then
    nproc=$gpus
else
    nproc=$cpus
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "workers per node must be a positive integer; got '$nproc'"
# CPU threads per worker: the task's CPUs shared among its workers.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / nproc > 0 ? cpus / nproc : 1))}
# A fresh rendezvous store for each round of workers (hosted by rank 0), not the one torchrun's
# agents share by default: each node's agent counts its own restarts, so with ALEXNET_MAX_RESTARTS
# on several nodes a restarted group never formed again (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

export ALEXNET_STOP_FILE=${ALEXNET_STOP_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.alexnet-stop-$SLURM_JOB_ID}
completed_marker=$ALEXNET_STOP_FILE.completed # rank 0 writes it when the run ends for good
stopped_marker=$ALEXNET_STOP_FILE.stopped     # and this one after a stop request, with its reason
# A requeued job starts without the request that stopped it.
rm -f "$ALEXNET_STOP_FILE" "$completed_marker" "$stopped_marker"
# Tried now, not at the signal: a stop file that cannot be made then left the job to its time limit.
{ : >"$ALEXNET_STOP_FILE" && rm -f "$ALEXNET_STOP_FILE"; } 2>/dev/null ||
    die "cannot create the stop file $ALEXNET_STOP_FILE (ALEXNET_STOP_FILE; by default in the submit folder): its folder must exist, be writable here and be seen by every node"

stop_signal=""
# shellcheck disable=SC2317 # called by the traps below
request_stop() {
    stop_signal=$1
    say "got SIG$1: asking every worker to stop at the next step and write a checkpoint"
    # Under `set -e` a failure here ended this script and left the workers running unparented.
    : >"$ALEXNET_STOP_FILE" ||
        say "cannot create the stop file $ALEXNET_STOP_FILE: the workers go on until Slurm ends the job"
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${#nodes[@]} node(s) ${nodes[*]}:" \
    "$nproc worker(s) per node, rendezvous $head_node:$port, checkout $repo"
say "train.py arguments: $*"

# One task per node; each runs torchrun for that node's workers. The node with SLURM_NODEID 0 is
# the first of the node list and hosts the rendezvous store (is_host), so hosting does not
# depend on how the node resolves its own name. The bash -c text is constant: every value
# arrives as an argument. torchrun ignores SIGUSR1 (inherited through exec), which Slurm sends to
# every process of the step for `scancel --signal=USR1` without --batch or --signal=USR1@N
# without B:: it has no handler and died of it (exit 138, the job not requeued) while the
# workers, which install their own, were writing their checkpoint.
# shellcheck disable=SC2016 # $SLURM_NODEID is expanded by the task's shell, on its node
launch=(
    srun --nodes="${#nodes[@]}" --ntasks="${#nodes[@]}" --ntasks-per-node=1 --cpus-per-task="$cpus"
    --kill-on-bad-exit=1
    bash -c 'trap "" USR1; exec "$1" -m torch.distributed.run --rdzv_conf="is_host=$((SLURM_NODEID == 0))" "${@:2}"' bash
    "$python"
    --nnodes="${#nodes[@]}"
    --nproc_per_node="$nproc"
    --rdzv_backend=c10d
    --rdzv_endpoint="$head_node:$port"
    --rdzv_id="$SLURM_JOB_ID"
    --max-restarts="$restarts"
    "$repo/launch/train.py" "$@"
)
if [[ $dry_run == yes ]]; then
    say "dry run (ALEXNET_DRY_RUN=$ALEXNET_DRY_RUN), OMP_NUM_THREADS=$OMP_NUM_THREADS" \
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" \
        "PYTHONPATH=$(printf '%q' "$PYTHONPATH"):$(printf ' %q' "${launch[@]}")"
    exit 0
fi
"${launch[@]}" &
srun_pid=$!

# A trapped signal interrupts `wait`; keep waiting until srun itself has ended.
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?
trap - USR1 TERM
run_completed=no
[[ -e $completed_marker ]] && run_completed=yes
stopped_by=$(cat "$stopped_marker" 2>/dev/null || true)
rm -f "$ALEXNET_STOP_FILE" "$completed_marker" "$stopped_marker"

case "$stop_signal/$status" in
    /0)
        # A SIGUSR1 sent to the job step reached the workers and not this script: requeued as
        # the script's own would be (the run folder is named after the job id, so a new job
        # would start another run).
        if [[ $run_completed == yes || $stopped_by != *SIGUSR1* ]]; then
            say "training ended with exit status 0${stopped_by:+ ($stopped_by)}"
            exit 0
        fi
        say "the workers got SIGUSR1 directly ($stopped_by; scancel --signal=USR1 without --batch?)"
        ;;
    /*)
        say "training ended with exit status $status"
        exit "$status"
        ;;
    TERM/*)
        # Preemption or cancellation: Slurm ends the job itself and requeues a preempted --requeue
        # job (PreemptMode=REQUEUE); the workers have written a checkpoint if KillWait allowed it.
        say "stopped by SIGTERM (exit status $status): requeueing, if any, is Slurm's decision"
        exit "$status"
        ;;
    USR1/0)
        # Requeue unless the run is known to be complete: a marker missed (written on another
        # node, hidden by a network file system's cache) costs one short job with nothing to
        # train, where requeueing only on a "stopped" marker could end an unfinished run.
        if [[ $run_completed == yes ]]; then
            say "training ended (all epochs or train.max_steps) before the SIGUSR1 stop request took effect: not requeued"
            exit 0
        fi
        ;;
    *)
        say "stop requested by SIGUSR1, but training failed (exit status $status): not requeued"
        exit "$status"
        ;;
esac
say "workers stopped with a checkpoint after SIGUSR1: requeueing job $SLURM_JOB_ID"
if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
fi
say "scontrol requeue $SLURM_JOB_ID failed (requeue not allowed here?):" \
    "resubmit with the same run.name to continue from the checkpoint"
exit 3
