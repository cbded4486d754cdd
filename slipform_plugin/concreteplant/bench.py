"""ConcretePlant throughput, K=3: online (one process, as in one DataLoader worker) and offline (all cores).

    python -m slipform_plugin.concreteplant.bench [--sugarcrepe-dir ../shared/data/sugarcrepe] [--captions 16000]

Captions are SugarCrepe's positives, repeated to ``--captions`` (keys differ, so negatives differ). Online:
``ConcretePlant.plant`` on batches of ``--online-batch`` captions in this process after a warm-up, with one
BLAS thread. Offline: ``slipform plant`` over shards written to a temporary directory, ``--workers``
processes (default: all cores); both the end-to-end rate (worker start-up included) and the steady rate
(captions over the busiest worker's time inside shards) are printed.

Wall-clock rates depend on what else runs on the machine (the load average is printed with them); the CPU
rates (captions per CPU-second of the process, times the worker count offline) are what an otherwise idle
machine would give. Not a test: nothing is asserted.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # one core per process, as in a DataLoader worker

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402


def load_captions(directory: str, count: int) -> list[str]:
    from slipform_plugin.concreteplant.evaluate import load_sugarcrepe

    captions = sorted({caption for pairs in load_sugarcrepe(directory).values() for caption, _ in pairs})
    return [captions[i % len(captions)] for i in range(count)]


def bench_online(captions: list[str], batch: int, k: int) -> tuple[float, float]:
    from slipform_plugin.concreteplant import ConcretePlant

    plant = ConcretePlant(num_negatives=k)
    plant.plant(captions[:batch], [f"warm{i}" for i in range(batch)])  # loads spaCy and the norms
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        plant.plant(chunk, [f"{start + i}" for i in range(len(chunk))])
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return len(captions) / wall, len(captions) / cpu


def bench_offline(captions: list[str], shards: int, workers: int, k: int) -> tuple[float, float, float]:
    import webdataset as wds

    from slipform_plugin.concreteplant import offline

    with tempfile.TemporaryDirectory(prefix="slipform-bench-") as tmp:
        in_dir, out_dir = Path(tmp, "in"), Path(tmp, "out")
        in_dir.mkdir()
        per_shard = -(-len(captions) // shards)
        for s in range(shards):
            with wds.TarWriter(str(in_dir / f"shard-{s:05d}.tar")) as writer:
                for i, caption in enumerate(captions[s * per_shard : (s + 1) * per_shard]):
                    writer.write({"__key__": f"{s:05d}{i:07d}", "txt": caption, "jpg": b"\xff\xd8not-an-image"})
        started = time.perf_counter()
        code = offline.main([str(in_dir), str(out_dir), "--num", str(k), "--workers", str(workers), "--no-progress"])
        wall = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"slipform plant exited with {code}")
        busy: dict = defaultdict(float)
        cpu: dict = defaultdict(float)
        for done in out_dir.glob(f"*{offline.DONE_SUFFIX}"):
            record = json.loads(done.read_text())
            busy[record.get("worker", 0)] += record["seconds"]
            cpu[record.get("worker", 0)] += record["cpu_seconds"]
    per_worker_cpu_rate = len(captions) / sum(cpu.values())  # captions per CPU-second of one worker
    return len(captions) / wall, len(captions) / max(busy.values()), per_worker_cpu_rate * len(cpu)


def offline_cores() -> int:
    from slipform_plugin.concreteplant.offline import available_cores

    return available_cores()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sugarcrepe-dir", default="../shared/data/sugarcrepe")
    parser.add_argument("--captions", type=int, default=16000, help="captions per measurement")
    parser.add_argument("--online-batch", type=int, default=256, help="captions per plant() call online")
    parser.add_argument("--workers", type=int, default=0, help="offline processes (default: all cores)")
    parser.add_argument("--shards", type=int, default=0, help="offline shards (default: 4 per worker)")
    parser.add_argument("--num", type=int, default=3, help="K")
    parser.add_argument("--skip-online", action="store_true")
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args(argv)
    workers = args.workers or offline_cores()
    captions = load_captions(args.sugarcrepe_dir, args.captions)
    print(f"{len(captions)} captions, K={args.num}, {os.cpu_count()} cores, load average {os.getloadavg()}")
    if not args.skip_online:
        rate, cpu_rate = bench_online(captions, args.online_batch, args.num)
        print(
            f"online  (one process, batches of {args.online_batch}): {rate:,.0f} captions/s wall, "
            f"{cpu_rate:,.0f} captions per CPU-second (target >= 800)"
        )
    if not args.skip_offline:
        wall, steady, cpu_rate = bench_offline(captions, args.shards or 4 * workers, workers, args.num)
        print(
            f"offline ({workers} workers): {wall:,.0f} captions/s wall end to end, {steady:,.0f} captions/s wall "
            f"steady, {cpu_rate:,.0f} captions/s from CPU time ({workers} x per-worker rate) (target >= 1,500)"
        )
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
