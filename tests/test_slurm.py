"""The Slurm launchers on a real two-node Slurm cluster (tests/slurm_cluster.py) started on this machine.

1. ``pretrain.sh`` on CPU runs on both nodes with world size 2, logs START/END and writes a checkpoint;
2. a USR1 during training requeues the job, which restarts, resumes from its checkpoint and completes;
3. a rank that crashes makes the job FAILED with a non-zero exit code;
4. ``plant.sh`` as an array job plants every shard exactly once; a rerun after one task was cancelled
   plants only what was missing;
plus the real ``--time``/``--signal=B:USR1@T`` path (Slurm itself signals the batch shell, the trap requeues)
and ``pretrain_single_node.sh`` (torchrun) under sbatch.

Run with ``pytest -m slurm tests/test_slurm.py``. Needs root and Debian's slurmctld/slurmd/slurm-client/munge
(installed with apt-get when missing); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, ensure_slurm

from slipform_plugin.recommended import RECOMMENDED_CEMENT_FLAGS

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "launch_slurm" / "pretrain.sh"
PLANT = ROOT / "launch_slurm" / "plant.sh"
PYTHON = sys.executable
#: Two nodes, one rank each, no GPUs: the CPU override of pretrain.sh.
CPU_SBATCH = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0")
SAMPLES = 64  # 4 shards of 16: 4 steps of 8 per rank and epoch, about 3 s an epoch here
JOB_TIMEOUT = 240.0


def _is_repo_commit(commit: str) -> bool:
    """Whether ``commit`` is HEAD or one of its ancestors (HEAD may move while a job runs)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:  # not a git checkout (an sdist): the script says so
        return commit == "unknown"
    check = ["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, "HEAD"]
    return subprocess.run(check, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_slurm()
    if reason is not None:
        print(f"\nSKIP Slurm tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    # Not under pytest's 0700 tmp dirs: munged wants every directory above its socket searchable.
    root = Path(tempfile.mkdtemp(prefix="slipform-slurm-"))
    with SlurmCluster(root, nodes=2, cpus_per_node=2) as slurm:
        yield slurm
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The submission directory: sbatch's --output=logs/%x_%j.out needs logs/ to exist beforehand."""
    path = tmp_path_factory.mktemp("slurm_work")
    (path / "logs").mkdir()
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("slurm_shards")
    result = subprocess.run(
        [PYTHON, "-m", "slipform_plugin.cli", "make-shards", str(out), "--num", str(SAMPLES), "--shard-size", "16"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"--train-data '([^']+)'", result.stdout)
    assert match, result.stdout
    return match.group(1)


def _pretrain_env(shards: str, **overrides: str) -> dict[str, str]:
    env = {
        "PYTHON": PYTHON,
        "DEVICE": "cpu",
        "TRAIN_DATA": shards,
        "TRAIN_NUM_SAMPLES": str(SAMPLES),
        "MODEL": "slipform-tiny",
        "BATCH_SIZE": "8",
        "EPOCHS": "2",
        "WARMUP": "1",
        "WORKERS": "1",
        "SLIPFORM_DIR": str(ROOT),
    }
    env.update(overrides)
    return env


def _slurm_log(workdir: Path, job_name: str, job_id: str) -> str:
    return (workdir / "logs" / f"{job_name}_{job_id}.out").read_text(errors="replace")


def _wait_nodes_idle(cluster, timeout: float = 60.0, settle: float = 3.0) -> None:
    """Wait until every node of the cluster has reported the idle state (sinfo) for ``settle`` seconds in a row,
    or fail the test naming the states. slurmctld marks a node idle a moment before its slurmd has finished the
    previous run of the same job id; a requeued start in that moment is refused ("already killed")."""
    deadline = time.monotonic() + timeout
    idle_since = None
    while True:
        lines = cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.splitlines()
        states = [line.split() for line in lines if line.strip()]
        if states and all(state == "idle" for _, state in states):
            idle_since = idle_since if idle_since is not None else time.monotonic()
            if time.monotonic() - idle_since >= settle:
                return
        else:
            idle_since = None
        assert time.monotonic() < deadline, f"nodes not idle after {timeout} s: {states}"
        time.sleep(0.25)


def _lines(log: str, tag: str) -> list[str]:
    return [line for line in log.splitlines() if f"] {tag} job=" in line]


def _checkpoint_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def test_pretrain_completes_on_two_nodes(cluster, workdir, shards):
    name = "pretrain-ok"
    job = cluster.sbatch(f"--job-name={name}", *CPU_SBATCH, str(PRETRAIN), "--seed", "3", cwd=workdir,
                         env=_pretrain_env(shards))  # fmt: skip
    (record,) = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = _slurm_log(workdir, name, job)
    assert record["JobState"] == "COMPLETED", log[-3000:]
    assert record["ExitCode"] == "0:0"
    assert record["NumNodes"] == "2" and record["NodeList"] == "node[1-2]"
    # Each slurmd launched one task of the training step: the ranks really ran on both nodes.
    for node in ("node1", "node2"):
        assert f"launch task StepId={job}.0 " in cluster.slurmd_log(node), node

    (start,) = _lines(log, "START")
    (end,) = _lines(log, "END")
    assert "nodes=node1,node2" in start and "world_size=2" in start
    assert _is_repo_commit(re.search(r"commit=(\S+)", start).group(1)), start
    assert "restart=0" in start and "device=cpu" in start
    assert "exit=0" in end and "world_size=2" in end

    run_dir = workdir / "logs" / f"{name}-{job}"
    out_log = (run_dir / "out.log").read_text()
    assert "world_size: 2" in out_log
    assert "seed: 3" in out_log  # "$@" reached OpenCLIP
    # The script's defaults: ConcretePlant's negatives reached Cement's loss (K=3 per caption).
    assert "  hn: concreteplant" in out_log
    assert re.search(r"hn_text_features \[8, 3, \d+\]", out_log), "no hard negatives reached the loss"
    assert "Slipform: loss=cement" in out_log  # the plugin was active, not a silent --loss-dist-impl
    # CEMENT_ARGS' default, the README's recommendation, reached the loss.
    assert "cement_hard_columns: separate" in out_log and "cement_hard_weight: 1.0" in out_log
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "epoch_2.pt").is_file()
    assert _checkpoint_epoch(checkpoints / "epoch_latest.pt") == 2
    assert not (checkpoints / "tmp.pt").exists()


def test_usr1_requeues_and_resumes(cluster, workdir, shards):
    name = "pretrain-requeue"
    epochs = 4
    job = cluster.sbatch(f"--job-name={name}", *CPU_SBATCH, str(PRETRAIN), cwd=workdir,
                         env=_pretrain_env(shards, EPOCHS=str(epochs), HN="none"))  # fmt: skip
    latest = workdir / "logs" / f"{name}-{job}" / "checkpoints" / "epoch_latest.pt"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not latest.exists():
        state = cluster.job(job)["JobState"]
        assert state in {"PENDING", "RUNNING", "CONFIGURING"}, (state, _slurm_log(workdir, name, job)[-3000:])
        assert time.monotonic() < deadline, "no checkpoint before the timeout"
        time.sleep(0.25)
    # What --signal=B:USR1@T delivers before the time limit: USR1 to the batch shell only.
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    # The trap requeues: same job id, Restarts=1, pending until its begin time (about 2 minutes after a
    # requeue); moving the start time to now is the test's only shortcut.
    deadline = time.monotonic() + 60
    while True:
        record = cluster.job(job)
        if record["Restarts"] == "1" and record["JobState"] == "PENDING":
            break
        assert time.monotonic() < deadline, f"not requeued: {record['JobState']} restarts={record['Restarts']}"
        time.sleep(0.25)
    # Release the requeued job only once both nodes are idle again: the killed step of the first run can keep
    # a node busy for a moment, and a start then fails before the script runs (seen in CI and once here).
    _wait_nodes_idle(cluster)
    cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")

    (record,) = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = _slurm_log(workdir, name, job)
    assert record["JobState"] == "COMPLETED", (record, log[-3000:], cluster.slurmd_log("node1")[-2000:])
    assert record["ExitCode"] == "0:0" and record["Restarts"] == "1"
    assert "USR1 received: requeueing job" in log
    starts, ends = _lines(log, "START"), _lines(log, "END")
    assert len(starts) == 2 and "restart=0" in starts[0] and "restart=1" in starts[1]
    assert len(ends) == 2 and "requeued=1" in ends[0] and "exit=0" in ends[1] and "restart=1" in ends[1]
    resumed = re.findall(r"=> resuming checkpoint '[^']*epoch_latest\.pt' \(epoch (\d+)\)", log)
    assert resumed, log[-3000:]
    assert 1 <= int(resumed[0]) < epochs
    # The restart ran only the remaining epochs, and finished the run.
    second_run = log[log.index(starts[1]) :]
    assert "Start epoch 0" not in second_run and f"Start epoch {resumed[0]}" in second_run
    assert _checkpoint_epoch(latest) == epochs


CRASH_WRAPPER = """\
#!/bin/bash
# PYTHON for pretrain.sh: rank {rank} runs the trainer through crash_rank.py, the others run it as is.
if [[ "${{SLURM_PROCID:-0}}" == "{rank}" ]]; then
    exec "{python}" "{crasher}" "$@"
fi
exec "{python}" "$@"
"""

CRASHER = """\
# Run `python -m open_clip_train.main ARGS` with train_one_epoch raising on this rank, after the process
# group is up: the other ranks are left waiting in a collective.
import runpy
import sys

import open_clip_train.train as train


def crash(*args, **kwargs):
    raise RuntimeError("injected crash on this rank")


train.train_one_epoch = crash
argv = [a for a in sys.argv[1:] if a != "-u"]
assert argv[:2] == ["-m", "open_clip_train.main"], argv
sys.argv = ["open_clip_train.main", *argv[2:]]
runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
"""


def test_crashing_rank_fails_the_job(cluster, workdir, shards, tmp_path):
    crasher = tmp_path / "crash_rank.py"
    crasher.write_text(CRASHER)
    wrapper = tmp_path / "python_crash_rank1"
    wrapper.write_text(CRASH_WRAPPER.format(rank=1, python=PYTHON, crasher=crasher))
    wrapper.chmod(0o755)
    name = "pretrain-crash"
    job = cluster.sbatch(f"--job-name={name}", *CPU_SBATCH, str(PRETRAIN), cwd=workdir,
                         env=_pretrain_env(shards, PYTHON=str(wrapper), HN="none"))  # fmt: skip
    (record,) = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = _slurm_log(workdir, name, job)
    assert record["JobState"] == "FAILED", log[-3000:]
    assert record["ExitCode"] != "0:0" and record["Restarts"] == "0"
    assert "RuntimeError: injected crash on this rank" in log
    (end,) = _lines(log, "END")
    exit_code = int(re.search(r"exit=(\d+)", end).group(1))
    assert exit_code != 0
    assert record["ExitCode"].split(":")[0] == str(exit_code)  # the job's exit code is srun's


PLANT_SHARDS = 6
PLANT_TASKS = 3


def _plant_state(out_dir: Path) -> dict[str, tuple[int, str]]:
    """shard name -> (mtime_ns of the planted shard, its done record) for every finished shard."""
    state = {}
    for done in sorted(out_dir.glob("*.tar.done.json")):
        shard = out_dir / done.name.removesuffix(".done.json")
        if shard.is_file():
            state[shard.name] = (shard.stat().st_mtime_ns, done.read_text())
    return state


def _written_now(log: str) -> int:
    (match,) = re.findall(r"shards: \d+ \((\d+) written now", log)
    return int(match)


def test_plant_array_plants_each_shard_once(cluster, workdir, tmp_path):
    import tarfile

    source = tmp_path / "in"
    subprocess.run(
        [PYTHON, "-m", "slipform_plugin.cli", "make-shards", str(source), "--num", str(16 * PLANT_SHARDS),
         "--shard-size", "16", "--seed", "7"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pattern = str(source / f"shard-{{00000..{PLANT_SHARDS - 1:05d}}}.tar")
    out_dir = tmp_path / "planted"
    env = {"PYTHON": PYTHON, "SLIPFORM_DIR": str(ROOT)}
    argv = (f"--array=0-{PLANT_TASKS - 1}", "--cpus-per-task=1", "--mem-per-cpu=100", str(PLANT), pattern, str(out_dir))

    # First run: task 2 is cancelled as soon as it runs (while it still loads spaCy).
    first = cluster.sbatch("--job-name=plant", *argv, cwd=workdir, env=env)
    deadline = time.monotonic() + JOB_TIMEOUT
    task2_log = workdir / "logs" / f"plant_{first}_2.out"
    while not (task2_log.exists() and "START task=" in task2_log.read_text()):
        assert time.monotonic() < deadline, cluster.jobs(first)
        time.sleep(0.2)
    cluster.run("scancel", f"{first}_2")
    records = {r["ArrayTaskId"]: r for r in cluster.wait(first, timeout=JOB_TIMEOUT)}
    assert records["0"]["JobState"] == records["1"]["JobState"] == "COMPLETED", records
    assert records["2"]["JobState"] == "CANCELLED", records["2"]
    before = _plant_state(out_dir)
    slice2 = {f"shard-{i:05d}.tar" for i in range(2, PLANT_SHARDS, PLANT_TASKS)}
    assert set(before) >= {f"shard-{i:05d}.tar" for i in range(PLANT_SHARDS)} - slice2
    missing = {f"shard-{i:05d}.tar" for i in range(PLANT_SHARDS)} - set(before)
    assert missing, "task 2 finished before it was cancelled: nothing left to test"
    assert not (out_dir / "summary.json").exists()
    planted_first = sum(_written_now(_slurm_log(workdir, "plant", f"{first}_{i}")) for i in (0, 1))

    # Rerun of the same array: only the missing shards are planted, the finished ones are left alone.
    second = cluster.sbatch("--job-name=plant", *argv, cwd=workdir, env=env)
    records = cluster.wait(second, timeout=JOB_TIMEOUT)
    assert [r["JobState"] for r in records] == ["COMPLETED"] * PLANT_TASKS, records
    logs = [_slurm_log(workdir, "plant", f"{second}_{i}") for i in range(PLANT_TASKS)]
    assert sum(_written_now(log) for log in logs) == len(missing)
    after = _plant_state(out_dir)
    assert set(after) == {f"shard-{i:05d}.tar" for i in range(PLANT_SHARDS)}
    for name, state in before.items():
        assert after[name] == state, f"{name} was planted again"
    # Exactly once: tasks 0 and 1 wrote their own four shards in the first run, the rerun wrote only the
    # missing ones (its write count equals the number missing), and no shard finished before was rewritten.
    assert planted_first == PLANT_SHARDS - len(slice2)

    # Every planted shard is its input plus one hn.json per sample.
    for i in range(PLANT_SHARDS):
        with (
            tarfile.open(source / f"shard-{i:05d}.tar") as original,
            tarfile.open(out_dir / f"shard-{i:05d}.tar") as planted,
        ):
            names_in = set(original.getnames())
            names_out = set(planted.getnames())
        keys = {name.split(".", 1)[0] for name in names_in}
        assert names_out == names_in | {f"{key}.hn.json" for key in keys}
        assert len(keys) == 16

    # The task that found the corpus complete printed the summary and wrote summary.json.
    summaries = [line for log in logs for line in log.splitlines() if line.startswith("PLANT SUMMARY")]
    assert summaries and all(f"shards_done={PLANT_SHARDS}/{PLANT_SHARDS}" in s for s in summaries), summaries
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["shards_done"] == PLANT_SHARDS and summary["missing"] == []
    assert summary["counts"]["samples"] == 16 * PLANT_SHARDS
    print(
        f"\nplanting rate in this test: {summary['captions_per_core_second']} captions per core-second "
        "(tiny shards: dominated by loading spaCy)"
    )


def test_time_limit_signal_requeues(cluster, workdir, tmp_path):
    """The real path of --signal=B:USR1@T: Slurm itself signals the batch shell before the time limit."""
    # Ranks that only wait (no trainer needed here); they would print "rank got USR1" if the signal reached them.
    idle = tmp_path / "python_idle"
    idle.write_text('#!/bin/bash\ntrap "echo rank got USR1" USR1\nsleep 300 & wait $!\n')
    idle.chmod(0o755)
    name = "pretrain-timelimit"
    env = _pretrain_env("unused-{0..1}.tar", PYTHON=str(idle))
    # A one-minute limit, signal 50 s before it: Slurm checks limits about every 30 s, so USR1 comes 10-40 s in.
    job = cluster.sbatch(f"--job-name={name}", *CPU_SBATCH, "--time=00:01:00", "--signal=B:USR1@50", str(PRETRAIN),
                         cwd=workdir, env=env)  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        record = cluster.job(job)
        if record["Restarts"] == "1":
            break
        assert record["JobState"] in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING"}, record["JobState"]
        assert time.monotonic() < deadline, f"no requeue before the time limit: {record['JobState']}"
        time.sleep(0.5)
    cluster.run("scancel", job)
    cluster.wait(job, timeout=60)
    log = _slurm_log(workdir, name, job)
    assert "USR1 received: requeueing job" in log
    (end,) = _lines(log, "END")
    assert "requeued=1" in end
    assert "rank got USR1" not in log  # B: signals the batch shell only, never the ranks
    assert "DUE TO TIME LIMIT" not in log


def test_single_node_torchrun_completes(cluster, workdir, shards):
    name = "pretrain-1node"
    single_node = ROOT / "launch_slurm" / "pretrain_single_node.sh"
    env = _pretrain_env(shards, NPROC="2", EPOCHS="1", HN="none")
    # No SLIPFORM_DIR, submitted from outside the checkout: sbatch runs a spool copy of the script, which finds
    # launch_slurm/_common.sh through the script path Slurm recorded (scontrol's Command=).
    del env["SLIPFORM_DIR"]
    job = cluster.sbatch(f"--job-name={name}", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0",
                         str(single_node), cwd=workdir, env=env)  # fmt: skip
    (record,) = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = _slurm_log(workdir, name, job)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-3000:]
    (start,) = _lines(log, "START")
    (end,) = _lines(log, "END")
    assert "world_size=2" in start and "exit=0" in end
    assert _is_repo_commit(re.search(r"commit=(\S+)", start).group(1)), start
    run_dir = workdir / "logs" / f"{name}-{job}"
    assert "world_size: 2" in (run_dir / "out.log").read_text()
    assert _checkpoint_epoch(run_dir / "checkpoints" / "epoch_latest.pt") == 1


# ----------------------------------------------------------------------------------------------------------------
# Without a cluster: the launchers and their shared launch_slurm/_common.sh under plain bash.

LAUNCHERS = sorted((ROOT / "launch_slurm").glob("*.sh"))


def test_launchers_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, "-x", *map(str, LAUNCHERS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_single_node_outside_slurm_uses_common(tmp_path):
    """Under plain bash the script sources _common.sh beside it: train args, START/END lines, the exit code."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/bash\necho "launched: $*"\nexit 3\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(fake), "DEVICE": "cpu", "NPROC": "2"}
    env |= {"TRAIN_DATA": "data-{0..1}.tar", "TRAIN_NUM_SAMPLES": "8", "PYTHON": PYTHON}
    single_node = ROOT / "launch_slurm" / "pretrain_single_node.sh"
    result = subprocess.run(["bash", str(single_node), "--seed", "3"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 3, result.stderr
    (start,), (end,) = _lines(result.stdout, "START"), _lines(result.stdout, "END")
    assert "job=none" in start and "world_size=2" in start and "device=cpu" in start
    assert _is_repo_commit(re.search(r"commit=(\S+)", start).group(1)), start
    assert "exit=3 requeued=0 terminated=0" in end
    (launched,) = [line for line in result.stdout.splitlines() if line.startswith("launched: ")]
    assert "--nproc-per-node=2 -m open_clip_train.main -- --train-data data-{0..1}.tar" in launched
    assert "--save-most-recent --resume latest --dist-backend gloo --seed 3" in launched

    # A copy without its checkout (what sbatch runs, minus Slurm's record of the original) says what is missing.
    copy = tmp_path / "copy.sh"
    copy.write_text(single_node.read_text())
    result = subprocess.run(["bash", str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "cannot find launch_slurm/_common.sh; set SLIPFORM_DIR" in result.stderr


def _launched_args(tmp_path: Path, **knobs: str) -> subprocess.CompletedProcess:
    """Run pretrain_single_node.sh under plain bash with a fake torchrun that prints its arguments."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/bash\necho "launched: $*"\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TORCHRUN": str(fake), "DEVICE": "cpu", "NPROC": "1", "PYTHON": PYTHON}
    env |= {"TRAIN_DATA": "data-{0..1}.tar", "TRAIN_NUM_SAMPLES": "8", **knobs}
    single_node = ROOT / "launch_slurm" / "pretrain_single_node.sh"
    return subprocess.run(["bash", str(single_node), "--seed", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)  # fmt: skip


RECOMMENDED = " ".join(RECOMMENDED_CEMENT_FLAGS)


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({}, f"--loss cement --hn concreteplant {RECOMMENDED} --batch-size"),  # the README's recommendation
        ({"CEMENT_ARGS": "recommended"}, f"--hn concreteplant {RECOMMENDED} --batch-size"),
        ({"CEMENT_ARGS": ""}, "--loss cement --hn concreteplant --batch-size"),  # the loss's own defaults
        ({"CEMENT_ARGS": "--cement-hard-weight 2"}, "--hn concreteplant --cement-hard-weight 2 --batch-size"),
        ({"LOSS": "clip", "HN": "none"}, "--loss clip --hn none --batch-size"),  # no Cement flags for another loss
    ],
)
def test_cement_args_reach_the_trainer_only_for_cement(tmp_path, knobs, expected):
    result = _launched_args(tmp_path, **knobs)
    assert result.returncode == 0, result.stderr
    (launched,) = [line for line in result.stdout.splitlines() if line.startswith("launched: ")]
    assert expected in launched, launched
    assert launched.endswith("--seed 3"), launched  # "$@" last: a flag given there wins over CEMENT_ARGS


def test_cement_args_for_another_loss_are_refused(tmp_path):
    result = _launched_args(tmp_path, LOSS="infonce", CEMENT_ARGS="--cement-hard-weight 2")
    assert result.returncode == 2
    assert "CEMENT_ARGS is set ('--cement-hard-weight 2') but LOSS=infonce" in result.stderr
