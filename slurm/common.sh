# shellcheck shell=bash
# Shared helper of slurm/aipo_*.sh: environment, virtual environment, defaults, and the
# preemption loop. Sourced, never run. Every setting can be overridden from the environment of
# `sbatch` (sbatch exports the caller's environment by default):
#
#   AIPO_ROOT       repository root (default: the sbatch submit directory, else this file's parent)
#   AIPO_SETUP      a bash file sourced here and in every task of every stage, before anything runs
#                   (module load, conda/venv activation); with it AIPO_VENV defaults to none
#   AIPO_VENV       virtual environment to activate (default: $AIPO_ROOT/.venv; "none": use PATH as is)
#   AIPO_PYTHON     the stages' interpreter or wrapper (default: the driver's python; e.g. "python3"
#                   inside a container image given by AIPO_SRUN_ARGS="--container-image=...")
#   RECIPE          recipe YAML for `aipo-mp run` (each script sets its own default)
#   RUN_DIR         run directory: round outputs, run_state.json, logs (default: $AIPO_ROOT/runs/<name>)
#   NODES           nodes the run uses (default: the allocation's, SLURM_JOB_NUM_NODES)
#   GPUS_PER_NODE   ranks per node (default: the allocation's tasks per node)
#   AIPO_ARGS       extra `aipo-mp run` overrides, space-separated key=value (e.g. "rounds.num_rounds=5")
#   AIPO_SRUN_ARGS  extra srun flags for every stage (e.g. "--mpi=pmix --gpu-bind=none", or pyxis'
#                   "--container-image=IMG --container-mounts=/scratch:/scratch")
#   AIPO_REQUEUE    1 (default): requeue the job when the run was stopped after the warning signal; 0: just exit
#
# Sizes of the allocation itself come from the #SBATCH lines; override them on the command line:
#   sbatch --nodes=32 --time=24:00:00 slurm/aipo_123b.sh
#
# Preemption and time limits. The scripts ask for `--signal=B:USR1@SECONDS`: Slurm sends SIGUSR1
# to this batch shell SECONDS before the time limit (and `scancel --batch --signal=USR1 JOBID`
# does the same by hand). The shell forwards SIGUSR1/SIGTERM to `aipo-mp run`, whose launcher
# forwards them through srun to the running stage; the trainer finishes its step, saves a
# checkpoint and exits; `aipo-mp run` then exits with AIPO_EXIT_STOPPED (75) and this shell calls
# `scontrol requeue $SLURM_JOB_ID`. The requeued job (same id, SLURM_RESTART_COUNT + 1) reruns
# the script, and `aipo-mp run` resumes at the first unfinished stage (a sampling or reward stage
# at its first unfinished shard), training from its latest checkpoint. Any other exit code ends
# the job with that code.
#
# Cancel vs preemption. Only the warning signal (USR1) leads to a requeue. A plain `scancel`
# (SIGTERM to the shell and every step, SIGKILL KillWait seconds later) leaves the job CANCELLED:
# the stage saves what it can in that time, `aipo-mp run` exits 75, and this shell does not
# requeue. A preemption without a warning (PreemptMode=REQUEUE or CANCEL: SIGTERM, then SIGKILL
# after GraceTime) behaves the same here; Slurm itself requeues the job for PreemptMode=REQUEUE,
# and the run then resumes from its finished stages, shards and last checkpoint.

AIPO_EXIT_STOPPED=75  # must equal aipo_mp.errors.EXIT_STOPPED

aipo_log() { printf '[%s aipo] %s\n' "$(date '+%F %T')" "$*"; }

aipo_die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# aipo_setup NAME: resolve paths, activate the venv, set defaults. NAME names the default RUN_DIR.
aipo_setup() {
    local name=$1
    if [ -z "${AIPO_ROOT:-}" ]; then
        if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/slurm/common.sh" ]; then
            AIPO_ROOT=$SLURM_SUBMIT_DIR
        else
            AIPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
        fi
    fi
    [ -f "$AIPO_ROOT/slurm/common.sh" ] || aipo_die "AIPO_ROOT=$AIPO_ROOT is not the aipo_mp repository; submit from its root or set AIPO_ROOT"
    export AIPO_ROOT
    cd "$AIPO_ROOT" || aipo_die "cannot cd to $AIPO_ROOT"

    if [ -n "${AIPO_SETUP:-}" ]; then
        [ -f "$AIPO_SETUP" ] || aipo_die "AIPO_SETUP=$AIPO_SETUP is not a file"
        AIPO_SETUP=$(cd "$(dirname "$AIPO_SETUP")" && pwd)/$(basename "$AIPO_SETUP")
        export AIPO_SETUP # the launcher sources it in every task too
        # shellcheck disable=SC1090
        source "$AIPO_SETUP" || aipo_die "sourcing AIPO_SETUP=$AIPO_SETUP failed"
        AIPO_VENV=${AIPO_VENV:-none}
    fi
    AIPO_VENV=${AIPO_VENV:-$AIPO_ROOT/.venv}
    if [ "$AIPO_VENV" != none ]; then
        [ -f "$AIPO_VENV/bin/activate" ] || aipo_die "no virtual environment at AIPO_VENV=$AIPO_VENV (run 'make setup' in $AIPO_ROOT, or set AIPO_VENV; AIPO_VENV=none uses PATH as is)"
        # shellcheck disable=SC1091
        source "$AIPO_VENV/bin/activate"
    fi
    if command -v aipo-mp >/dev/null 2>&1; then
        AIPO_CMD=(aipo-mp)
    else
        AIPO_CMD=(python -m aipo_mp.cli)
    fi

    [ -n "${RECIPE:-}" ] || aipo_die "RECIPE is not set"
    [ -f "$RECIPE" ] || aipo_die "recipe not found: $RECIPE (paths are relative to $AIPO_ROOT)"
    RUN_DIR=${RUN_DIR:-$AIPO_ROOT/runs/$name}
    NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
    if [ -z "${GPUS_PER_NODE:-}" ]; then
        # "8(x4)" -> 8; without an allocation: 1
        GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
        GPUS_PER_NODE=${GPUS_PER_NODE%%(*}
    fi
    export RECIPE RUN_DIR NODES GPUS_PER_NODE

    # Library defaults; each can be overridden from the environment.
    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP/SP overlap ordering
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # weights come from local paths in the recipe

    aipo_log "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "nodes=$NODES ranks/node=$GPUS_PER_NODE recipe=$RECIPE run_dir=$RUN_DIR python=$(command -v python)"
}

# aipo_run_rounds [overrides...]: `aipo-mp run $RECIPE OVERRIDES --launcher slurm` with RUN_DIR,
# the sizes, AIPO_ARGS and the given overrides, under aipo_run_requeue. (--launcher comes last:
# argparse takes no key=value positionals after an option.)
aipo_run_rounds() {
    local extra=()
    if [ -n "${AIPO_ARGS:-}" ]; then
        read -r -a extra <<<"$AIPO_ARGS"
    fi
    aipo_run_requeue "${AIPO_CMD[@]}" run "$RECIPE" \
        "output.dir=$RUN_DIR" "cluster.nodes=$NODES" "cluster.nproc_per_node=$GPUS_PER_NODE" \
        "${extra[@]}" "$@" --launcher slurm
}

_AIPO_TRAPS=0
_AIPO_WARNED=0 # a USR1 (the time-limit or preemption warning) arrived: a stop then means requeue
_AIPO_CHILD=

_aipo_forward() {
    _AIPO_TRAPS=$((_AIPO_TRAPS + 1))
    [ "$1" = USR1 ] && _AIPO_WARNED=1
    if [ -n "$_AIPO_CHILD" ] && kill -0 "$_AIPO_CHILD" 2>/dev/null; then
        aipo_log "batch shell got SIG$1: forwarding to pid $_AIPO_CHILD"
        kill -s "$1" "$_AIPO_CHILD" 2>/dev/null || true
    else
        aipo_log "batch shell got SIG$1 (no child running)"
    fi
}

# aipo_run_requeue CMD...: run CMD in the background, forward SIGUSR1/SIGTERM to it, wait for it
# through any number of signals, and requeue this job when it exits with AIPO_EXIT_STOPPED.
# Exits the shell with CMD's exit code (0 after a requeue).
aipo_run_requeue() {
    trap '_aipo_forward USR1' USR1
    trap '_aipo_forward TERM' TERM
    "$@" &
    _AIPO_CHILD=$!
    local status=0 seen again
    while :; do
        seen=$_AIPO_TRAPS
        if wait "$_AIPO_CHILD"; then status=0; else status=$?; fi
        [ "$seen" = "$_AIPO_TRAPS" ] && break # the child ended
        # A trapped signal interrupted `wait`. If the child ended meanwhile, one more `wait`
        # returns its real status (127 if the first wait had already collected it).
        if ! kill -0 "$_AIPO_CHILD" 2>/dev/null; then
            if wait "$_AIPO_CHILD"; then again=0; else again=$?; fi
            [ "$again" != 127 ] && status=$again
            break
        fi
    done
    _AIPO_CHILD=
    if [ "$status" = "$AIPO_EXIT_STOPPED" ]; then
        if [ "$_AIPO_WARNED" != 1 ]; then
            aipo_log "run stopped by SIGTERM without a warning signal (scancel?): not requeued; resubmit to resume"
            exit "$AIPO_EXIT_STOPPED"
        fi
        if [ "${AIPO_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
            aipo_log "run stopped by a signal and saved; requeueing job $SLURM_JOB_ID"
            trap - TERM # Slurm ends this shell once the job is requeued
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            aipo_log "scontrol requeue failed: resubmit this script to resume"
        else
            aipo_log "run stopped by a signal and saved; rerun this script to resume"
        fi
        exit "$AIPO_EXIT_STOPPED"
    fi
    aipo_log "run finished with exit code $status"
    exit "$status"
}
