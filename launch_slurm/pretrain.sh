#!/bin/bash
# Multi-node Slipform pretraining under Slurm: one task per GPU, every rank started by srun.
#
#   mkdir -p logs    # Slurm opens --output before this script runs: a missing folder fails the job silently
#   TRAIN_DATA='/data/laion/{00000..41455}.tar' TRAIN_NUM_SAMPLES=400000000 \
#       sbatch --nodes=4 launch_slurm/pretrain.sh --model ViT-B-32 --precision amp_bf16
#
# Every knob below is an environment variable with a default (sbatch exports the environment); #SBATCH lines
# are overridden on the sbatch command line; anything after the script name goes to OpenCLIP unchanged.
# CPU (tests, laptops): DEVICE=cpu sbatch --gpus-per-node=0 --ntasks-per-node=2 launch_slurm/pretrain.sh ...
#
#SBATCH --job-name=slipform-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x_%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail

# ---- knobs ------------------------------------------------------------------------------------------------
PYTHON=${PYTHON:-python}                       # the interpreter of the environment where slipform is installed
SITE_ENV=${SITE_ENV:-}                         # a file to source first: NCCL/network settings, modules (site_env.example.sh)
DEVICE=${DEVICE:-cuda}                         # cuda | cpu (cpu: gloo backend, request no GPUs)
DIST_BACKEND=${DIST_BACKEND:-}                 # empty: OpenCLIP picks nccl on cuda, gloo on cpu
TRAIN_DATA=${TRAIN_DATA:?set TRAIN_DATA to the WebDataset shard pattern (brace ranges allowed)}
TRAIN_NUM_SAMPLES=${TRAIN_NUM_SAMPLES:?set TRAIN_NUM_SAMPLES (samples per epoch; an epoch is also the checkpoint interval)}
DATASET_TYPE=${DATASET_TYPE:-webdataset}
MODEL=${MODEL:-ViT-B-32}
LOSS=${LOSS:-cement}                           # Slipform's --loss (clip: OpenCLIP's own ClipLoss)
HN=${HN:-concreteplant}                        # Slipform's --hn hard-negative generator (none: off)
BATCH_SIZE=${BATCH_SIZE:-256}                  # per rank
EPOCHS=${EPOCHS:-32}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-2000}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-4}}  # data loader workers per rank
LOGS_DIR=${LOGS_DIR:-logs}                     # OpenCLIP's --logs: checkpoints land in LOGS_DIR/RUN_NAME/checkpoints
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-slipform}-${SLURM_JOB_ID:-local}}  # stable across requeues of the job
REPORT_TO=${REPORT_TO:-none}                   # tensorboard, wandb, or both comma-separated
SRUN_ARGS=${SRUN_ARGS:-}                       # extra srun options, word-split (e.g. "--cpu-bind=cores")

# ---- environment ------------------------------------------------------------------------------------------
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "pretrain.sh: not inside a Slurm allocation; submit it with sbatch (or use pretrain_single_node.sh)" >&2
    exit 2
fi
if [[ -n "$SITE_ENV" ]]; then
    # shellcheck source=/dev/null
    source "$SITE_ENV"
fi

case "$DEVICE" in
    cuda)
        if [[ -z "${SLURM_GPUS_ON_NODE:-}" || "${SLURM_GPUS_ON_NODE}" == 0 ]]; then
            echo "pretrain.sh: DEVICE=cuda but the job holds no GPUs; pass --gpus-per-node=N, or DEVICE=cpu" >&2
            exit 2
        fi
        ;;
    cpu)
        DIST_BACKEND=${DIST_BACKEND:-gloo}
        # One rank per task shares the node's cores: keep each rank to its own CPUs.
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
        ;;
    *)
        echo "pretrain.sh: DEVICE must be cuda or cpu, got '$DEVICE'" >&2
        exit 2
        ;;
esac

# Rendezvous for torch.distributed's env:// init: the first node of the job, and a port derived from the job
# id so that two jobs sharing a node never collide (requeues keep the id, hence the port).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}  # 10000-29999: below Linux's ephemeral range
export MASTER_ADDR MASTER_PORT
WORLD_SIZE=$SLURM_NTASKS
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
COMMIT=$(git -C "${SLIPFORM_DIR:-${SLURM_SUBMIT_DIR:-.}}" rev-parse --short HEAD 2>/dev/null || echo unknown)
RESTART=${SLURM_RESTART_COUNT:-0}

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
    # Requeue safety: epoch_latest.pt is written to tmp.pt and renamed (never half-written), and every
    # (re)start resumes from it when it exists.
    --save-most-recent
    --resume latest
)
[[ -n "$DIST_BACKEND" ]] && train_args+=(--dist-backend "$DIST_BACKEND")

# ---- preemption and time limit ----------------------------------------------------------------------------
# --signal=B:USR1@300 sends USR1 to this batch shell only (without B: it would kill the ranks) 300 s before
# the time limit. The trap puts the job back in the queue (same job id, same log, same RUN_NAME); Slurm then
# ends the running step, and the next start resumes from epoch_latest.pt. (Preemption with
# PreemptMode=REQUEUE requeues the job by itself, TERM then KILL after GraceTime: it resumes the same way.)
# Work since the last checkpoint (the last epoch) is lost: size TRAIN_NUM_SAMPLES so that an epoch is a
# tolerable loss.
REQUEUED=0
# shellcheck disable=SC2317  # invoked by the trap
requeue_job() {
    echo "[$(date -Is)] USR1 received: requeueing job $SLURM_JOB_ID (restart $RESTART ends here)"
    REQUEUED=1
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue_job USR1
# scancel and requeue send TERM to this shell as well as to the ranks: keep waiting for srun to wind down so
# that the END line and srun's exit code still come out.
STOPPED=0
trap 'STOPPED=1; echo "[$(date -Is)] TERM received: waiting for srun to stop"' TERM

echo "[$(date -Is)] START job=$SLURM_JOB_ID restart=$RESTART nodes=$NODES world_size=$WORLD_SIZE" \
    "master=$MASTER_ADDR:$MASTER_PORT device=$DEVICE commit=$COMMIT run=$LOGS_DIR/$RUN_NAME"

# srun runs in the background so that the trap can fire while training runs (bash defers traps until a
# foreground command returns). --kill-on-bad-exit: one crashed rank ends the step instead of leaving the
# others blocked in a collective until a timeout.
# shellcheck disable=SC2086  # SRUN_ARGS is word-split on purpose
srun --kill-on-bad-exit=1 $SRUN_ARGS "$PYTHON" -u -m open_clip_train.main "${train_args[@]}" "$@" &
SRUN_PID=$!
rc=0
while true; do
    wait "$SRUN_PID" && rc=0 || rc=$?
    # wait returns 128+signal when a trapped signal interrupts it while srun still runs: wait again.
    if kill -0 "$SRUN_PID" 2>/dev/null; then
        continue
    fi
    break
done

echo "[$(date -Is)] END job=$SLURM_JOB_ID restart=$RESTART nodes=$NODES world_size=$WORLD_SIZE" \
    "exit=$rc requeued=$REQUEUED terminated=$STOPPED commit=$COMMIT"
exit "$rc"
