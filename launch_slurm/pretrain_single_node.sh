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
CEMENT_ARGS=${CEMENT_ARGS-recommended}
BATCH_SIZE=${BATCH_SIZE:-256}
EPOCHS=${EPOCHS:-32}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-2000}
LOGS_DIR=${LOGS_DIR:-logs}
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-slipform-1node}-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}
REPORT_TO=${REPORT_TO:-none}
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}               # extra torchrun options, word-split

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
    echo "pretrain_single_node.sh: cannot find launch_slurm/_common.sh; set SLIPFORM_DIR to the checkout" >&2
    exit 2
}
find_common
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$SLIPFORM_LAUNCH_DIR/_common.sh"
slipform_source_site_env

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
COMMIT=$(slipform_commit)
RESTART=${SLURM_RESTART_COUNT:-0}
JOB=${SLURM_JOB_ID:-none}
NODES=${SLURMD_NODENAME:-$(hostname)}
WORLD_SIZE=$NPROC

slipform_pretrain_args
# Under Slurm, USR1 requeues this job (see _common.sh); TERM waits for torchrun to wind down.
slipform_traps "${SLURM_JOB_ID:-}" "job $JOB (restart $RESTART ends here)" torchrun
slipform_pretrain_log START

# --standalone: a private rendezvous on a free local port (no MASTER_PORT clash between jobs on one node).
# "--" keeps torchrun from reading OpenCLIP's flags as its own (it rejects --logs as ambiguous).
# shellcheck disable=SC2086  # TORCHRUN_ARGS is word-split on purpose
"$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$NPROC" $TORCHRUN_ARGS \
    -m open_clip_train.main -- "${train_args[@]}" "$@" &
slipform_wait $!
slipform_pretrain_log END
exit "$rc"
