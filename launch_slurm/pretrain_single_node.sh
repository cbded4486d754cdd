#!/bin/bash
# Single-node Slipform pretraining with torchrun: one process per GPU on this node.
#
# Under Slurm:   mkdir -p logs && TRAIN_DATA=... TRAIN_NUM_SAMPLES=... sbatch launch_slurm/pretrain_single_node.sh
# On a machine:  TRAIN_DATA=... TRAIN_NUM_SAMPLES=... bash launch_slurm/pretrain_single_node.sh --model ViT-B-32
#
# Same knobs as pretrain.sh (environment variables with defaults, "$@" passed to OpenCLIP), plus NPROC.
# CPU: DEVICE=cpu NPROC=2 bash launch_slurm/pretrain_single_node.sh ... (or sbatch --gpus-per-node=0).
#
#SBATCH --job-name=slipform-pretrain-1node
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x_%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail

# ---- knobs (as in pretrain.sh) --------------------------------------------------------------------------
PYTHON=${PYTHON:-python}
SITE_ENV=${SITE_ENV:-}
DEVICE=${DEVICE:-cuda}                         # cuda | cpu
DIST_BACKEND=${DIST_BACKEND:-}
TRAIN_DATA=${TRAIN_DATA:?set TRAIN_DATA to the WebDataset shard pattern (brace ranges allowed)}
TRAIN_NUM_SAMPLES=${TRAIN_NUM_SAMPLES:?set TRAIN_NUM_SAMPLES (samples per epoch; an epoch is also the checkpoint interval)}
DATASET_TYPE=${DATASET_TYPE:-webdataset}
MODEL=${MODEL:-ViT-B-32}
LOSS=${LOSS:-cement}
HN=${HN:-concreteplant}
BATCH_SIZE=${BATCH_SIZE:-256}
EPOCHS=${EPOCHS:-32}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-2000}
LOGS_DIR=${LOGS_DIR:-logs}
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-slipform-1node}-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}
REPORT_TO=${REPORT_TO:-none}
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}               # extra torchrun options, word-split

if [[ -n "$SITE_ENV" ]]; then
    # shellcheck source=/dev/null
    source "$SITE_ENV"
fi

# Processes on this node: one per GPU of the allocation (or of the machine), NPROC to override.
if [[ "$DEVICE" == cpu ]]; then
    NPROC=${NPROC:-1}
    DIST_BACKEND=${DIST_BACKEND:-gloo}
elif [[ "$DEVICE" == cuda ]]; then
    if [[ -z "${NPROC:-}" ]]; then
        if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
            NPROC=$SLURM_GPUS_ON_NODE
        else
            NPROC=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
        fi
    fi
    if [[ -z "$NPROC" || "$NPROC" == 0 ]]; then
        echo "pretrain_single_node.sh: DEVICE=cuda but no GPU found; set NPROC or DEVICE=cpu" >&2
        exit 2
    fi
else
    echo "pretrain_single_node.sh: DEVICE must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
fi
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
WORKERS=${WORKERS:-$(( CPUS / NPROC > 1 ? CPUS / NPROC - 1 : 1 ))}  # leave each rank's main process a core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}
TORCHRUN=${TORCHRUN:-$(dirname "$(command -v "$PYTHON")")/torchrun}
[[ -x "$TORCHRUN" ]] || TORCHRUN=torchrun
COMMIT=$(git -C "${SLIPFORM_DIR:-${SLURM_SUBMIT_DIR:-.}}" rev-parse --short HEAD 2>/dev/null || echo unknown)
RESTART=${SLURM_RESTART_COUNT:-0}
JOB=${SLURM_JOB_ID:-none}
NODE=${SLURMD_NODENAME:-$(hostname)}

train_args=(
    --train-data "$TRAIN_DATA"
    --train-num-samples "$TRAIN_NUM_SAMPLES"
    --dataset-type "$DATASET_TYPE"
    --model "$MODEL"
    --loss "$LOSS"
    --hn "$HN"
    --batch-size "$BATCH_SIZE"
    --epochs "$EPOCHS"
    --lr "$LR"
    --warmup "$WARMUP"
    --workers "$WORKERS"
    --device "$DEVICE"
    --logs "$LOGS_DIR"
    --name "$RUN_NAME"
    --report-to "$REPORT_TO"
    --save-most-recent
    --resume latest
)
[[ -n "$DIST_BACKEND" ]] && train_args+=(--dist-backend "$DIST_BACKEND")

# ---- preemption (see pretrain.sh) -------------------------------------------------------------------------
REQUEUED=0
# shellcheck disable=SC2317  # invoked by the trap
requeue_job() {
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        echo "[$(date -Is)] USR1 received: requeueing job $SLURM_JOB_ID (restart $RESTART ends here)"
        REQUEUED=1
        scontrol requeue "$SLURM_JOB_ID"
    fi
}
trap requeue_job USR1
STOPPED=0
trap 'STOPPED=1; echo "[$(date -Is)] TERM received: waiting for torchrun to stop"' TERM

echo "[$(date -Is)] START job=$JOB restart=$RESTART nodes=$NODE world_size=$NPROC device=$DEVICE" \
    "commit=$COMMIT run=$LOGS_DIR/$RUN_NAME"

# --standalone: a private rendezvous on a free local port (no MASTER_PORT clash between jobs on one node).
# "--" keeps torchrun from reading OpenCLIP's flags as its own (it rejects --logs as ambiguous).
# shellcheck disable=SC2086  # TORCHRUN_ARGS is word-split on purpose
"$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$NPROC" $TORCHRUN_ARGS \
    -m open_clip_train.main -- "${train_args[@]}" "$@" &
LAUNCHER_PID=$!
rc=0
while true; do
    wait "$LAUNCHER_PID" && rc=0 || rc=$?
    if kill -0 "$LAUNCHER_PID" 2>/dev/null; then
        continue
    fi
    break
done

echo "[$(date -Is)] END job=$JOB restart=$RESTART nodes=$NODE world_size=$NPROC exit=$rc requeued=$REQUEUED" \
    "terminated=$STOPPED commit=$COMMIT"
exit "$rc"
