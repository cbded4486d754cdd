"""``slipform bench-loss``: forward+backward peak memory and time of contrastive losses against batch size.

Every (implementation, N) measurement runs in its own subprocess, so that one run's allocations cannot hide
another's peak:

- CPU: the child sets ``MALLOC_MMAP_THRESHOLD_`` (glibc then returns freed large blocks to the OS, so RSS
  follows live memory) and reports ``ru_maxrss`` minus the RSS measured after the inputs were created;
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation after the inputs were created.

Time is the median of ``--repeats`` forward+backward calls after one warm-up call (no warm-up above
``--warmup-max`` pairs, where one call takes minutes). Throughput counts ``8 N^2 D`` FLOPs for every
implementation (the O(N D)-memory floor; the naive loss does 6 N^2 D, so its figure is an upper bound on
the useful work), plus ``8 N K D`` for the ``K = --hn-num`` hard-negative columns of our paths; the margins'
element-wise work (a sigmoid per in-batch logit) is not counted, so it shows as a lower rate. The machine's
fp32 (or ``--dtype``) matmul rate is measured before and after the sweep, in a subprocess as well, for
comparison.

Margins: ``--margins on`` runs our paths (reference, chunked, triton) as Cement with ``--margin-hard`` and
``--margin-batch``; ``--margins both`` runs each of them twice, side by side in time, as rows ``IMPL``
(margins at zero: InfoNCE) and ``IMPL+margins`` on the same inputs, and prints the ratio. ``--hn-num K`` adds
K hard-negative columns per row (random features, concreteness scores uniform in [0, 1], about a quarter
masked out) to both rows; ``clip`` and ``infcl`` take no hard negatives and run without them.

Implementations: ``clip`` (OpenCLIP's ``ClipLoss``), ``reference``, ``chunked``, and on CUDA ``triton`` and
``infcl`` (Inf-CL's ``cal_inf_loss`` in both directions, when the ``inf_cl`` package is installed).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
ALL_IMPLS = ("clip", "reference", "chunked", "triton", "infcl")
#: Implementations of ``cement_loss``: the only ones that take margins and hard negatives.
CEMENT_IMPLS = ("reference", "chunked", "triton")
MARGIN_MODES = ("off", "on", "both")
WIDTH = 18  # the impl column of the tables: "reference+margins"
#: Fraction of hard negatives masked out with --hn-num (rows with fewer real negatives, as in planted data).
HN_MASKED_FRACTION = 0.25


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
    parser.add_argument(
        "--margins",
        nargs="?",
        const="on",
        default="off",
        choices=MARGIN_MODES,
        help="Cement margins on our paths: off, on (also a bare --margins), or both: rows IMPL and IMPL+margins",
    )
    # Defaults: Cement's documented ones (slipform_plugin.losses.CEMENT_DEFAULTS).
    parser.add_argument("--margin-hard", type=float, default=0.10, help="mu_h with margins on (default 0.10)")
    parser.add_argument("--margin-batch", type=float, default=0.05, help="mu_b with margins on (default 0.05)")
    parser.add_argument(
        "--hn-num",
        type=int,
        default=0,
        help="K hard negatives per row for our paths, margins on and off alike (random scores and mask; default 0)",
    )
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


def _loss_function(impl: str, args: argparse.Namespace, margins_on: bool):
    """``fn(image, text, scale, hard, scores, mask) -> loss``; ``clip`` and ``infcl`` ignore the last three."""
    if impl == "clip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        return lambda x, y, s, *_: clip_loss(x, y, s)
    if impl == "infcl":
        from inf_cl import cal_inf_loss

        return lambda x, y, s, *_: (cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s)) / 2
    from slipform_plugin.kernels import cement_loss, chunked

    if args.block_rows:
        chunked.DEFAULT_BLOCK_ROWS = args.block_rows
    if args.block_cols:
        chunked.DEFAULT_BLOCK_COLS = args.block_cols
    margins = {"margin_hard": args.margin_hard, "margin_batch": args.margin_batch} if margins_on else {}
    return lambda x, y, s, h, c, m: cement_loss(x, y, s, h, c, m, impl=impl, check_finite=False, **margins)


def _hard_negatives(num: int, args: argparse.Namespace, device, dtype, generator):
    """``[N, K, D]`` normalised features (requiring grad), ``[N, K]`` scores in [0, 1], ``[N, K]`` bool mask."""
    import torch

    if args.hn_num == 0:
        return None, None, None
    shape = (num, args.hn_num)
    hard = torch.nn.functional.normalize(torch.randn(*shape, args.dim, generator=generator), dim=-1)
    hard = hard.to(device=device, dtype=dtype).requires_grad_()
    scores = torch.rand(*shape, generator=generator).to(device)
    mask = (torch.rand(*shape, generator=generator) >= HN_MASKED_FRACTION).to(device)
    return hard, scores, mask


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
    hard, scores, mask = _hard_negatives(num, args, device, dtype, generator)
    loss_fn = _loss_function(job["impl"], args, job["margins"])

    def step() -> float:
        image.grad = text.grad = scale.grad = None
        if hard is not None:
            hard.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(image, text, scale, hard, scores, mask)
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


def _estimate_bytes(impl: str, num: int, dim: int, itemsize: int, num_hard: int = 0) -> float:
    """Rough peak above the inputs, used only to skip points that cannot fit."""
    hard = 2.0 * num * num_hard * dim * (4 + itemsize)  # gradient and fp32 copy of the hard negatives
    if impl in ("clip", "reference"):
        return 5.0 * num * num * 4 + hard  # logits, softmax, gradient and temporaries
    return 4.0 * num * dim * (4 + itemsize) + hard + 64 * 2**20  # fp32 gradients and copies, plus the tiles


def _variants(impl: str, mode: str) -> list[bool]:
    """Margins off/on runs of ``impl`` under ``--margins mode`` (only our paths take margins)."""
    if impl not in CEMENT_IMPLS:
        return [False]
    return {"off": [False], "on": [True], "both": [False, True]}[mode]


def _label(impl: str, margins_on: bool) -> str:
    return f"{impl}+margins" if margins_on else impl


def _flops(impl: str, num: int, dim: int, num_hard: int) -> float:
    """FLOPs counted for one forward+backward call: 8 N^2 D, plus 8 N K D for our paths' hard negatives."""
    columns = num + (num_hard if impl in CEMENT_IMPLS else 0)
    return 8.0 * num * columns * dim


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
    if args.hn_num < 0:
        raise SystemExit(f"--hn-num: expected an integer >= 0, got {args.hn_num}")
    for flag, value in (("--margin-hard", args.margin_hard), ("--margin-batch", args.margin_batch)):
        if not math.isfinite(value):
            raise SystemExit(f"{flag}: expected a finite number, got {value}")
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
    if args.hn_num and {"clip", "infcl"} & set(impls):
        print(f"note: clip and infcl take no hard negatives: they run without the K = {args.hn_num} columns")
    header = f"{'round':<6}{'impl':<{WIDTH}}{'N':>8}{'peak MiB':>12}{'median s':>11}{'GFLOP/s':>10}  note"
    print(header)
    print("-" * len(header))
    for round_index in range(args.rounds):
        for num in args.sizes:
            for impl in impls:
                # Margins off and on back to back: a load change on the shared machine hits both alike.
                for margins_on in _variants(impl, args.margins):
                    label = _label(impl, margins_on)
                    estimate = _estimate_bytes(impl, num, args.dim, itemsize, args.hn_num)
                    if estimate > budget:
                        gib = f"{estimate / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
                        result = {"error": f"skipped: estimated {gib}"}
                    else:
                        job = {"impl": impl, "n": num, "device": device, "margins": margins_on}
                        result = _run_child(args, job, raw_argv)
                    results.setdefault((label, num), []).append(result)
                    start = f"{round_index:<6}{label:<{WIDTH}}{num:>8}"
                    if "error" in result:
                        print(f"{start}{'-':>12}{'-':>11}{'-':>10}  {result['error']}")
                    else:
                        gflops = _flops(impl, num, args.dim, args.hn_num) / result["seconds"] / 1e9
                        peak = result["peak_bytes"] / 2**20
                        print(f"{start}{peak:>12.1f}{result['seconds']:>11.3f}{gflops:>10.1f}")
                    sys.stdout.flush()
        matmul = _run_child(args, {"impl": "matmul", "n": 0, "device": device}, raw_argv)
        rates += [matmul["gflops"]] if "gflops" in matmul else []
        print(f"{args.dtype} matmul rate after round {round_index}: {matmul.get('gflops', float('nan')):.1f} GFLOP/s")
    matmul_rate = statistics.median(rates) if rates else float("nan")
    rows: list[dict] = []
    failures = 0
    for num in args.sizes:
        for impl, margins_on in [(name, on) for name in impls for on in _variants(name, args.margins)]:
            label = _label(impl, margins_on)
            num_hard = args.hn_num if impl in CEMENT_IMPLS else 0
            row = {"impl": label, "n": num, "dim": args.dim, "dtype": args.dtype, "device": device}
            row.update(
                hn_num=num_hard,
                margin_hard=args.margin_hard if margins_on else 0.0,
                margin_batch=args.margin_batch if margins_on else 0.0,
            )
            good = [result for result in results[(label, num)] if "error" not in result]
            errors = [result["error"] for result in results[(label, num)] if "error" in result]
            failures += sum(not error.startswith("skipped") for error in errors)
            if args.hn_num and not num_hard:
                errors.insert(0, "without hard negatives")
            if good:
                calls = [value for result in good for value in result["all_seconds"]]
                seconds = statistics.median(calls)
                gflops = _flops(impl, num, args.dim, num_hard) / seconds / 1e9
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
    print(f"{'impl':<{WIDTH}}{'N':>8}{'peak MiB':>12}{'median s':>11}{'GFLOP/s':>10}  note")
    for row in rows:
        start = f"{row['impl']:<{WIDTH}}{row['n']:>8}"
        if row["seconds"] == "":
            print(f"{start}{'-':>12}{'-':>11}{'-':>10}  {row['note']}")
        else:
            print(f"{start}{row['peak_mib']:>12.1f}{row['seconds']:>11.3f}{row['gflops']:>10.1f}")
    _summarise(rows, matmul_rate)

    csv_path = args.out / "bench_loss.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"loss fwd+bwd, D={args.dim}, {args.dtype}, {device}"
    if args.margins != "off":
        title += f", margins {args.margins} (mu_h={args.margin_hard}, mu_b={args.margin_batch})"
    if args.hn_num:
        title += f", K={args.hn_num}"
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
        print(f"  {impl:<{WIDTH}}N={num:<7} {row['gflops'] / matmul_rate:6.1%} of matmul  {ratio}")
    pairs = [(label, label.removesuffix("+margins"), num) for label, num in by_key if label.endswith("+margins")]
    pairs = [(label, plain, num) for label, plain, num in pairs if (plain, num) in by_key]
    if pairs:
        print("margins on against off, same inputs, measured side by side (memory, time):")
    for label, plain, num in sorted(pairs, key=lambda key: (key[2], key[0])):
        on, off = by_key[(label, num)], by_key[(plain, num)]
        memory = on["peak_mib"] / off["peak_mib"] if off["peak_mib"] else float("inf")
        print(
            f"  {label:<{WIDTH}}N={num:<7} memory on/off = {memory:.2f}x, time on/off = "
            f"{on['seconds'] / off['seconds']:.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
