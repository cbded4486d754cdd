"""``slipform bench-loss``: forward+backward peak memory and time of contrastive losses against batch size.

Every (implementation, N) measurement runs in its own subprocess, so that one run's allocations cannot hide
another's peak:

- CPU: the child sets ``MALLOC_MMAP_THRESHOLD_`` (glibc then returns freed large blocks to the OS, so RSS
  follows live memory) and reports ``ru_maxrss`` minus the RSS measured after the inputs were created;
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation after the inputs were created.

Time is the median of ``--repeats`` forward+backward calls after one warm-up call (no warm-up above
``--warmup-max`` pairs, where one call takes minutes). Throughput counts ``8 N^2 D`` FLOPs for every
implementation (the O(N D)-memory floor; the naive loss does 6 N^2 D, so its figure is an upper bound on
the useful work). The machine's fp32 (or ``--dtype``) matmul rate is measured before and after the sweep, in
a subprocess as well, for comparison.

Implementations: ``clip`` (OpenCLIP's ``ClipLoss``), ``reference``, ``chunked``, and on CUDA ``triton`` and
``infcl`` (Inf-CL's ``cal_inf_loss`` in both directions, when the ``inf_cl`` package is installed).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
ALL_IMPLS = ("clip", "reference", "chunked", "triton", "infcl")


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes: expected positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipform bench-loss", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=_parse_sizes("1024,2048,4096,8192,16384"),
        help="comma-separated batch sizes N (default 1024,...,16384)",
    )
    parser.add_argument("--dim", type=int, default=512, help="feature width D")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--impls", default="auto", help=f"comma-separated subset of {','.join(ALL_IMPLS)} (auto: all that can run)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward calls per point and round")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the whole sweep, interleaving implementations in time"
    )
    parser.add_argument("--warmup-max", type=int, default=16384, help="no warm-up call above this N")
    parser.add_argument("--scale", type=float, default=50.0, help="logit scale s")
    parser.add_argument("--margins", action="store_true", help="Cement margins on (mu_b = 0.2) for our paths")
    parser.add_argument("--block-rows", type=int, default=None, help="chunked path: rows per tile (default: its own)")
    parser.add_argument("--block-cols", type=int, default=None, help="chunked path: columns per tile")
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help="skip points whose estimated peak exceeds this (default: 70%% of RAM / GPU memory)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_loss_out"), help="directory for CSV and PNG")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    return parser


# ----------------------------------------------------------------------------------------------- children


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _loss_function(impl: str, args: argparse.Namespace):
    margins = {"margin_batch": 0.2, "difficulty_offset": 0.0} if args.margins else {}
    if impl == "clip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        return lambda x, y, s: clip_loss(x, y, s)
    if impl == "infcl":
        from inf_cl import cal_inf_loss

        return lambda x, y, s: (cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s)) / 2
    from slipform_plugin.kernels import cement_loss, chunked

    if args.block_rows:
        chunked.DEFAULT_BLOCK_ROWS = args.block_rows
    if args.block_cols:
        chunked.DEFAULT_BLOCK_COLS = args.block_cols
    return lambda x, y, s: cement_loss(x, y, s, impl=impl, check_finite=False, **margins)


def _worker(args: argparse.Namespace) -> int:
    """One measurement in this (fresh) process; prints one JSON line."""
    import resource

    import torch

    job = json.loads(args.worker)
    device = torch.device(job["device"])
    dtype = getattr(torch, args.dtype)
    if job["impl"] == "matmul":
        size, dim = 2048, args.dim
        left = torch.randn(size, dim, device=device, dtype=dtype)
        right = torch.randn(dim, size, device=device, dtype=dtype)
        times = []
        for _ in range(args.repeats * 5 + 1):
            start = time.perf_counter()
            for _ in range(10):
                left @ right
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rate = 10 * 2 * size * size * dim / statistics.median(times[1:]) / 1e9
        print(json.dumps({"gflops": rate}))
        return 0
    num, dim = job["n"], args.dim
    generator = torch.Generator(device="cpu").manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(num, dim, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(num, dim, generator=generator), dim=1)
    image = image.to(device=device, dtype=dtype).requires_grad_()
    text = text.to(device=device, dtype=dtype).requires_grad_()
    scale = torch.tensor(args.scale, device=device, requires_grad=True)
    loss_fn = _loss_function(job["impl"], args)

    def step() -> float:
        image.grad = text.grad = scale.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(image, text, scale)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        del loss
        return elapsed

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    if num <= args.warmup_max:
        step()
    for _ in range(args.repeats):
        times.append(step())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"seconds": statistics.median(times), "all_seconds": times, "peak_bytes": max(peak, 0)}))
    return 0


# ----------------------------------------------------------------------------------------------- parent


def _run_child(args: argparse.Namespace, job: dict, raw_argv: list[str]) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed large blocks go back to the OS: RSS tracks live memory
    command = [sys.executable, "-m", "slipform_plugin.kernels.bench", *raw_argv, "--worker", json.dumps(job)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s"}
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {result.returncode}: {last[:200]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _estimate_bytes(impl: str, num: int, dim: int, itemsize: int) -> float:
    """Rough peak above the inputs, used only to skip points that cannot fit."""
    if impl in ("clip", "reference"):
        return 5.0 * num * num * 4  # logits, softmax, gradient and temporaries
    return 4.0 * num * dim * (4 + itemsize) + 64 * 2**20  # fp32 gradients and copies, plus the tiles


def _resolve_impls(text: str, device: str) -> list[str]:
    if text == "auto":
        impls = ["clip", "reference", "chunked"]
        if device == "cuda":
            if importlib.util.find_spec("triton") is not None:
                impls.append("triton")
            if importlib.util.find_spec("inf_cl") is not None:
                impls.append("infcl")
        return impls
    impls = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [impl for impl in impls if impl not in ALL_IMPLS]
    if unknown:
        raise SystemExit(f"--impls: expected names from {','.join(ALL_IMPLS)}, got {','.join(unknown)}")
    if device != "cuda" and {"triton", "infcl"} & set(impls):
        raise SystemExit("--impls: triton and infcl need --device cuda (a GPU), got device cpu")
    return impls


def _memory_budget(device: str) -> float:
    if device == "cuda":
        import torch

        return 0.7 * torch.cuda.get_device_properties(0).total_memory
    return 0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(row["impl"] for row in rows):
        points = [row for row in rows if row["impl"] == impl and row["seconds"] != ""]
        if not points:
            continue
        sizes = [row["n"] for row in points]
        ax_mem.plot(sizes, [row["peak_mib"] for row in points], marker="o", label=impl)
        ax_time.plot(sizes, [row["seconds"] for row in points], marker="o", label=impl)
    for axis, label in ((ax_mem, "peak memory above inputs (MiB)"), (ax_time, "forward+backward median (s)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark sweep; returns 0 when every requested point ran (skipped points are not failures)."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    if args.worker:
        return _worker(args)
    if args.repeats < 1 or args.rounds < 1:
        raise SystemExit(f"--repeats/--rounds: expected >= 1, got {args.repeats}/{args.rounds}")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = _resolve_impls(args.impls, device)
    budget = args.memory_budget_gib * 2**30 if args.memory_budget_gib else _memory_budget(device)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)

    # Rounds interleave the implementations in time, so that a load change on a shared machine hits all alike;
    # the matmul rate is measured before the first round and after every round.
    rates = []
    matmul = _run_child(args, {"impl": "matmul", "n": 0, "device": device}, raw_argv)
    rates += [matmul["gflops"]] if "gflops" in matmul else []
    print(f"{args.dtype} matmul rate: {matmul.get('gflops', float('nan')):.1f} GFLOP/s")
    results: dict[tuple[str, int], list[dict]] = {}
    header = f"{'round':<6}{'impl':<10}{'N':>8}{'peak MiB':>12}{'median s':>11}{'GFLOP/s':>10}  note"
    print(header)
    print("-" * len(header))
    for round_index in range(args.rounds):
        for num in args.sizes:
            for impl in impls:
                estimate = _estimate_bytes(impl, num, args.dim, itemsize)
                if estimate > budget:
                    result = {
                        "error": f"skipped: estimated {estimate / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
                    }
                else:
                    result = _run_child(args, {"impl": impl, "n": num, "device": device}, raw_argv)
                results.setdefault((impl, num), []).append(result)
                if "error" in result:
                    print(f"{round_index:<6}{impl:<10}{num:>8}{'-':>12}{'-':>11}{'-':>10}  {result['error']}")
                else:
                    gflops = 8.0 * num * num * args.dim / result["seconds"] / 1e9
                    peak = result["peak_bytes"] / 2**20
                    print(f"{round_index:<6}{impl:<10}{num:>8}{peak:>12.1f}{result['seconds']:>11.3f}{gflops:>10.1f}")
                sys.stdout.flush()
        matmul = _run_child(args, {"impl": "matmul", "n": 0, "device": device}, raw_argv)
        rates += [matmul["gflops"]] if "gflops" in matmul else []
        print(f"{args.dtype} matmul rate after round {round_index}: {matmul.get('gflops', float('nan')):.1f} GFLOP/s")
    matmul_rate = statistics.median(rates) if rates else float("nan")
    rows: list[dict] = []
    failures = 0
    for num in args.sizes:
        for impl in impls:
            row = {"impl": impl, "n": num, "dim": args.dim, "dtype": args.dtype, "device": device}
            good = [result for result in results[(impl, num)] if "error" not in result]
            errors = [result["error"] for result in results[(impl, num)] if "error" in result]
            failures += sum(not error.startswith("skipped") for error in errors)
            if good:
                calls = [value for result in good for value in result["all_seconds"]]
                seconds = statistics.median(calls)
                gflops = 8.0 * num * num * args.dim / seconds / 1e9
                row.update(
                    peak_mib=round(max(result["peak_bytes"] for result in good) / 2**20, 1),
                    seconds=round(seconds, 4),
                    gflops=round(gflops, 3),
                    all_seconds=" ".join(f"{value:.3f}" for value in calls),
                    note="; ".join(dict.fromkeys(errors)),
                )
            else:
                row.update(peak_mib="", seconds="", gflops="", all_seconds="", note="; ".join(dict.fromkeys(errors)))
            row["matmul_gflops"] = round(matmul_rate, 3)
            row["fraction_of_matmul"] = round(row["gflops"] / matmul_rate, 3) if row["gflops"] != "" else ""
            rows.append(row)
    print(f"\nall rounds: {args.dtype} matmul rates {', '.join(f'{rate:.1f}' for rate in rates)} GFLOP/s")
    print(f"{'impl':<10}{'N':>8}{'peak MiB':>12}{'median s':>11}{'GFLOP/s':>10}  note")
    for row in rows:
        if row["seconds"] == "":
            print(f"{row['impl']:<10}{row['n']:>8}{'-':>12}{'-':>11}{'-':>10}  {row['note']}")
        else:
            print(
                f"{row['impl']:<10}{row['n']:>8}{row['peak_mib']:>12.1f}{row['seconds']:>11.3f}{row['gflops']:>10.1f}"
            )
    _summarise(rows, matmul_rate)

    csv_path = args.out / "bench_loss.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"loss fwd+bwd, D={args.dim}, {args.dtype}, {device}" + (", margins" if args.margins else "")
    _plot(rows, args.out / "bench_loss.png", title)
    print(f"wrote {csv_path} and {args.out / 'bench_loss.png'}")
    return 1 if failures else 0


def _summarise(rows: list[dict], matmul_rate: float) -> None:
    """Ratios against ClipLoss at each N where both ran, and each path's share of the matmul rate."""
    by_key = {(row["impl"], row["n"]): row for row in rows if row["seconds"] != ""}
    print(f"\nmedian matmul rate {matmul_rate:.1f} GFLOP/s; ratios against clip (memory, time), share of matmul:")
    for (impl, num), row in sorted(by_key.items(), key=lambda item: (item[0][1], item[0][0])):
        clip = by_key.get(("clip", num))
        ratio = ""
        if clip and impl != "clip":
            memory = clip["peak_mib"] / row["peak_mib"] if row["peak_mib"] else float("inf")
            ratio = f"memory clip/{impl} = {memory:.1f}x, time {impl}/clip = {row['seconds'] / clip['seconds']:.2f}"
        print(f"  {impl:<10}N={num:<7} {row['gflops'] / matmul_rate:6.1%} of matmul  {ratio}")


if __name__ == "__main__":
    sys.exit(main())
