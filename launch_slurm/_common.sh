# shellcheck shell=bash
# Shared by pretrain.sh, pretrain_single_node.sh and plant.sh: sourced, never run on its own.
#
# Each launcher finds this file with the same few lines at its top (sbatch runs a copy of the script from
# slurmd's spool directory, so "beside the script" only works under plain bash) and sets SLIPFORM_LAUNCH_DIR
# to the launch_slurm/ folder it came from. It provides:
#
#   slipform_source_site_env        source $SITE_ENV when set (NCCL/network settings, modules)
#   slipform_commit                 print the checkout's short commit, or "unknown"
#   slipform_log TAG WORDS...       one "[ISO date] TAG WORDS..." line in the job log
#   slipform_traps ID WHAT LAUNCHER USR1 requeues Slurm job ID (REQUEUED=1); TERM sets STOPPED=1 and waits
#   slipform_wait PID               wait for PID through trapped signals; sets rc to its exit status
#   slipform_pretrain_args          fill the array train_args with OpenCLIP's flags from the pretrain knobs
#                                   (with Cement's flags from CEMENT_ARGS when LOSS=cement)
#   slipform_pretrain_log START|END the START/END lines of the pretrain launchers (JOB, NODES, WORLD_SIZE...)

slipform_source_site_env() {
    if [[ -n "${SITE_ENV:-}" ]]; then
        # shellcheck source=/dev/null
        source "$SITE_ENV"
    fi
}

slipform_commit() {
    git -C "${SLIPFORM_DIR:-$SLIPFORM_LAUNCH_DIR/..}" rev-parse --short HEAD 2>/dev/null || echo unknown
}

slipform_log() {
    local tag=$1
    shift
    echo "[$(date -Is)] $tag $*"
}

# ---- preemption and time limit ----------------------------------------------------------------------------
# --signal=B:USR1@SECONDS sends USR1 to the batch shell only (without B: it would kill the ranks) that long
# before the time limit. The USR1 trap puts the job back in the queue (same job id, same log, same RUN_NAME);
# Slurm then ends the running step, and the next start resumes from the last checkpoint. (Preemption with
# PreemptMode=REQUEUE requeues the job by itself, TERM then KILL after GraceTime: it resumes the same way.)
# scancel and requeue send TERM to the batch shell as well as to the ranks: the TERM trap keeps the script
# waiting for its launcher to wind down, so that the END line and the launcher's exit code still come out.
REQUEUED=0
STOPPED=0
_SLIPFORM_REQUEUE_ID=
_SLIPFORM_REQUEUE_WHAT=
_SLIPFORM_LAUNCHER=

# shellcheck disable=SC2317  # invoked by the trap
_slipform_on_usr1() {
    if [[ -n "${SLURM_JOB_ID:-}" && -n "$_SLIPFORM_REQUEUE_ID" ]]; then
        slipform_log "USR1 received:" "requeueing $_SLIPFORM_REQUEUE_WHAT"
        REQUEUED=1
        scontrol requeue "$_SLIPFORM_REQUEUE_ID"
    fi
}

# shellcheck disable=SC2317  # invoked by the trap
_slipform_on_term() {
    STOPPED=1
    slipform_log "TERM received:" "waiting for $_SLIPFORM_LAUNCHER to stop"
}

# slipform_traps ID WHAT LAUNCHER: on USR1 requeue the Slurm job (or array task) ID, logging "requeueing WHAT";
# on TERM log "waiting for LAUNCHER to stop". Outside Slurm USR1 does nothing.
slipform_traps() {
    _SLIPFORM_REQUEUE_ID=$1
    _SLIPFORM_REQUEUE_WHAT=$2
    _SLIPFORM_LAUNCHER=$3
    trap _slipform_on_usr1 USR1
    trap _slipform_on_term TERM
}

# slipform_wait PID: the launcher runs in the background so that the traps can fire while it runs (bash defers
# traps until a foreground command returns); wait returns 128+signal when a trapped signal interrupts it while
# the launcher still runs, so wait again. Sets the global rc to the launcher's exit status.
slipform_wait() {
    local pid=$1
    rc=0
    while true; do
        wait "$pid" && rc=0 || rc=$?
        if kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        break
    done
}

# ---- the pretrain launchers -------------------------------------------------------------------------------
# The Cement settings recommended in README (the Cement section): each concreteness margin scaled by its pair's
# difficulty, mu_h 0.2, mu_b 0.1, the hard negatives in the hard-negative term only, lambda 1. They were chosen
# on the synthetic benchmark at a CPU budget (README, Evidence); CEMENT_ARGS="" gives the loss's own defaults.
SLIPFORM_RECOMMENDED_CEMENT_ARGS="--cement-hard-margin-difficulty --cement-margin-hard 0.2 --cement-margin-batch 0.1 \
--cement-hard-columns separate --cement-hard-weight 1"

slipform_pretrain_args() {
    local cement_args=${CEMENT_ARGS-recommended}
    local -a cement_words=()
    if [[ "$LOSS" == cement ]]; then
        if [[ "$cement_args" == recommended ]]; then
            cement_args=$SLIPFORM_RECOMMENDED_CEMENT_ARGS
        fi
        read -ra cement_words <<< "$cement_args"
    elif [[ -n "$cement_args" && "$cement_args" != recommended ]]; then
        echo "CEMENT_ARGS is set ('$cement_args') but LOSS=$LOSS: Cement's flags need LOSS=cement" >&2
        exit 2
    fi
    train_args=(
        --train-data "$TRAIN_DATA"
        --train-num-samples "$TRAIN_NUM_SAMPLES"
        --dataset-type "$DATASET_TYPE"
        --model "$MODEL"
        --loss "$LOSS"
        --hn "$HN"
        "${cement_words[@]}"
        --batch-size "$BATCH_SIZE"
        --epochs "$EPOCHS"
        --lr "$LR"
        --warmup "$WARMUP"
        --workers "$WORKERS"
        --device "$DEVICE"
        --logs "$LOGS_DIR"
        --name "$RUN_NAME"
        --report-to "$REPORT_TO"
        # Requeue safety: epoch_latest.pt is written to tmp.pt and renamed (never half-written), and every
        # (re)start resumes from it when it exists. Work since the last checkpoint (the last epoch) is lost on
        # a requeue: size TRAIN_NUM_SAMPLES so that an epoch is a tolerable loss.
        --save-most-recent
        --resume latest
    )
    if [[ -n "$DIST_BACKEND" ]]; then
        train_args+=(--dist-backend "$DIST_BACKEND")
    fi
}

# slipform_pretrain_log START [WORDS...] | END: reads JOB, RESTART, NODES, WORLD_SIZE, DEVICE, COMMIT, LOGS_DIR,
# RUN_NAME; END also rc, REQUEUED and STOPPED.
slipform_pretrain_log() {
    local tag=$1
    shift
    local common="job=$JOB restart=$RESTART nodes=$NODES world_size=$WORLD_SIZE"
    if [[ "$tag" == START ]]; then
        slipform_log START "$common" "$@" "device=$DEVICE commit=$COMMIT run=$LOGS_DIR/$RUN_NAME"
    else
        slipform_log END "$common exit=$rc requeued=$REQUEUED terminated=$STOPPED commit=$COMMIT"
    fi
}
