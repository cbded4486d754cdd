#!/bin/bash
# ConcretePlant's offline planting at corpus scale: a Slurm array, each task planting its own slice of shards.
#
#   mkdir -p logs
#   sbatch --array=0-255 launch_slurm/plant.sh '/data/laion/{000000..231349}.tar' /data/laion-hn [slipform plant options]
#   bash launch_slurm/plant.sh --summary '/data/laion/{000000..231349}.tar' /data/laion-hn   # any time, anywhere
#
# Task I of T plants every T-th input shard starting at I (`slipform plant --task-index I --num-tasks T`), with
# one worker process per CPU of the task. Each output shard is renamed into place when complete and then
# marked by NAME.done.json, so a requeued, cancelled or failed task is fixed by submitting the same array
# again: finished shards are skipped, only what is missing is planted. The task that finds every shard done
# prints the summary of the whole corpus and writes OUT_DIR/summary.json (counts, coverage, captions per core).
# For a rerun of a subset of tasks (sbatch --array=3,17 ...) set NUM_TASKS to the original array size.
#
#SBATCH --job-name=slipform-plant
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem-per-cpu=2G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x_%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

set -euo pipefail

PYTHON=${PYTHON:-python}
SITE_ENV=${SITE_ENV:-}

SUMMARY_ONLY=0
if [[ "${1:-}" == --summary ]]; then
    SUMMARY_ONLY=1
    shift
fi
if [[ $# -lt 2 ]]; then
    echo "usage: sbatch --array=0-N plant.sh IN_SHARDS OUT_DIR [slipform plant options]" >&2
    echo "       plant.sh --summary IN_SHARDS OUT_DIR" >&2
    exit 2
fi
IN_SHARDS=$1
OUT_DIR=$2
shift 2

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
    echo "plant.sh: cannot find launch_slurm/_common.sh; set SLIPFORM_DIR to the checkout" >&2
    exit 2
}
find_common
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$SLIPFORM_LAUNCH_DIR/_common.sh"
slipform_source_site_env

# Whole-corpus summary from the NAME.done.json records. Exit 0 when every shard is done, 3 otherwise.
# With "--final-only", print nothing unless every shard is done (what a finishing array task calls).
summarize() {
    "$PYTHON" - "$IN_SHARDS" "$OUT_DIR" "$@" <<'PY'
import json, sys
from collections import Counter
from pathlib import Path
from slipform_plugin.concreteplant.offline import expand_shards, is_done, output_paths

pattern, out_dir, final_only = sys.argv[1], Path(sys.argv[2]), "--final-only" in sys.argv[3:]
shards = expand_shards([pattern])
missing = [s.name for s in shards if not is_done(s, out_dir)]
if final_only and missing:
    print(f"PLANT progress: {len(shards) - len(missing)}/{len(shards)} shards done, {len(missing)} to go")
    sys.exit(0)
counts, seconds = Counter(), 0.0
for shard in shards:
    if shard.name not in missing:
        record = json.loads(output_paths(shard, out_dir)[1].read_text())
        counts.update(record.get("counts", {}))
        seconds += float(record.get("seconds", 0.0))
samples = counts.get("samples", 0)
summary = {
    "shards": len(shards),
    "shards_done": len(shards) - len(missing),
    "missing": missing,
    "counts": dict(sorted(counts.items())),
    "coverage": (samples - counts.get("no_negative", 0)) / samples if samples else 0.0,
    # one worker process plants one shard at a time: samples per worker-second is the rate per core
    "worker_seconds": round(seconds, 2),
    "captions_per_core_second": round(samples / seconds, 1) if seconds else 0.0,
}
print(f"PLANT SUMMARY shards_done={summary['shards_done']}/{len(shards)} samples={samples} "
      f"negatives={counts.get('negatives', 0)} coverage={summary['coverage']:.4f} "
      f"captions_per_core_second={summary['captions_per_core_second']}")
print("PLANT kinds: " + ", ".join(f"{k[5:]}={v}" for k, v in sorted(counts.items()) if k.startswith("kind/")))
if missing:
    print(f"PLANT missing {len(missing)} shards: {' '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
else:
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out_dir / "summary.json")
sys.exit(3 if missing else 0)
PY
}

if [[ "$SUMMARY_ONLY" == 1 ]]; then
    summarize
    exit $?
fi

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    TASK_INDEX=${TASK_INDEX:-0}
    NUM_TASKS=${NUM_TASKS:-1}
    TASK_NAME=local
else
    TASK_INDEX=$SLURM_ARRAY_TASK_ID
    # Not SLURM_ARRAY_TASK_COUNT: a rerun of some tasks must keep the original slicing.
    NUM_TASKS=${NUM_TASKS:-$((SLURM_ARRAY_TASK_MAX + 1))}
    TASK_NAME=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
fi
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-0}}   # 0: every core of the machine
COMMIT=$(slipform_commit)

# Under Slurm, USR1 (--signal=B:USR1@120) requeues this array task; TERM waits for the planter to stop.
slipform_traps "${SLURM_JOB_ID:+$TASK_NAME}" "task $TASK_NAME (finished shards are kept)" "the planter"

slipform_log START "task=$TASK_NAME restart=${SLURM_RESTART_COUNT:-0} node=${SLURMD_NODENAME:-$(hostname)}" \
    "slice=$TASK_INDEX/$NUM_TASKS workers=$WORKERS commit=$COMMIT in=$IN_SHARDS out=$OUT_DIR"

"$PYTHON" -u -m slipform_plugin.cli plant "$IN_SHARDS" "$OUT_DIR" --task-index "$TASK_INDEX" \
    --num-tasks "$NUM_TASKS" --workers "$WORKERS" --no-progress "$@" &
slipform_wait $!

if [[ "$rc" == 0 && "$REQUEUED" == 0 && "$STOPPED" == 0 ]]; then
    summarize --final-only || true
fi
slipform_log END "task=$TASK_NAME slice=$TASK_INDEX/$NUM_TASKS exit=$rc requeued=$REQUEUED" \
    "terminated=$STOPPED commit=$COMMIT"
exit "$rc"
