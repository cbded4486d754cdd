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
CEMENT_ARGS=${CEMENT_ARGS-recommended}         # Cement's flags when LOSS=cement, word-split: recommended (README's
                                               # Cement section), "" (the loss's own defaults) or your own flags
BATCH_SIZE=${BATCH_SIZE:-256}                  # per rank
EPOCHS=${EPOCHS:-32}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-2000}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-4}}  # data loader workers per rank
LOGS_DIR=${LOGS_DIR:-logs}                     # OpenCLIP's --logs: checkpoints land in LOGS_DIR/RUN_NAME/checkpoints
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-slipform}-${SLURM_JOB_ID:-local}}  # stable across requeues of the job
REPORT_TO=${REPORT_TO:-none}                   # tensorboard, wandb, or both comma-separated
SRUN_ARGS=${SRUN_ARGS:-}                       # extra srun options, word-split (e.g. "--cpu-bind=cores")

# ---- shared helpers: launch_slurm/_common.sh ---------------------------------------------------------------
# Beside this file under plain bash. sbatch runs a copy of this file from slurmd's spool directory, so there
# look in SLIPFORM_DIR (the checkout), then beside the script Slurm recorded (scontrol's Command=, absolute),
# then in SUBMIT_DIR/launch_slurm.
find_common() {
    local dir script=
    for dir in "$(dirname "${BASH_SOURCE[0]}")" ${SLIPFORM_DIR:+"$SLIPFORM_DIR/launch_slurm"}; do
        [[ -f "$dir/_common.sh" ]] && SLIPFORM_LAUNCH_DIR=$(cd "$dir" && pwd) && return 0
    done
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n1 || true)
        while [[ -n "$script" && ! -f "$script" && "$script" == *" "* ]]; do script=${script% *}; done  # drop args
    fi
    for dir in ${script:+"$(dirname "$script")"} "${SLURM_SUBMIT_DIR:-.}/launch_slurm"; do
        [[ -f "$dir/_common.sh" ]] && SLIPFORM_LAUNCH_DIR=$(cd "$dir" && pwd) && return 0
    done
    echo "pretrain.sh: cannot find launch_slurm/_common.sh; set SLIPFORM_DIR to the checkout" >&2
    exit 2
}
find_common
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$SLIPFORM_LAUNCH_DIR/_common.sh"

# ---- environment ------------------------------------------------------------------------------------------
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "pretrain.sh: not inside a Slurm allocation; submit it with sbatch (or use pretrain_single_node.sh)" >&2
    exit 2
fi
slipform_source_site_env

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
JOB=$SLURM_JOB_ID
WORLD_SIZE=$SLURM_NTASKS
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
COMMIT=$(slipform_commit)
RESTART=${SLURM_RESTART_COUNT:-0}

slipform_pretrain_args
# USR1 (--signal=B:USR1@300, see _common.sh) requeues this job; TERM waits for srun to wind down.
slipform_traps "$SLURM_JOB_ID" "job $SLURM_JOB_ID (restart $RESTART ends here)" srun
slipform_pretrain_log START "master=$MASTER_ADDR:$MASTER_PORT"

# srun runs in the background so that the traps can fire while training runs. --kill-on-bad-exit: one
# crashed rank ends the step instead of leaving the others blocked in a collective until a timeout.
# shellcheck disable=SC2086  # SRUN_ARGS is word-split on purpose
srun --kill-on-bad-exit=1 $SRUN_ARGS "$PYTHON" -u -m open_clip_train.main "${train_args[@]}" "$@" &
slipform_wait $!
slipform_pretrain_log END
exit "$rc"
