"""``slipform eval``: score an OpenCLIP model on SugarCrepe, VALSE, ARO and the synthetic benchmark.

Example::

    slipform eval --model ViT-B-32 --pretrained logs/run/checkpoints/epoch_5.pt \\
        --sugarcrepe data/sugarcrepe --coco-images data/coco/val2017 \\
        --synthetic data/synthetic-test --out results/run

writes ``OUT/eval.json`` (every number, with per-category breakdowns) and ``OUT/eval.md`` (the tables, also
printed). Exit status 2 for bad arguments or missing files, 3 for a model/checkpoint mismatch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from slipform_plugin.evaluation.model import CheckpointMismatchError


def build_parser() -> argparse.ArgumentParser:
    """The ``slipform eval`` argument parser."""
    p = argparse.ArgumentParser(
        prog="slipform eval",
        description="Evaluate an OpenCLIP model on compositional benchmarks; writes eval.json and eval.md.",
        allow_abbrev=False,
    )
    p.add_argument("--model", required=True, help="OpenCLIP model name (as for open_clip_train --model)")
    p.add_argument("--pretrained", default=None, help="checkpoint file or OpenCLIP pretrained tag (none: random)")
    p.add_argument("--force-quick-gelu", action="store_true", help="as open_clip_train's flag")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images or texts per forward pass (default 64)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per file/benchmark (quick)")
    p.add_argument("--out", required=True, help="output directory for eval.json and eval.md")
    g = p.add_argument_group("benchmarks (at least one)")
    g.add_argument("--sugarcrepe", metavar="DIR", help="folder with SugarCrepe's JSON files")
    g.add_argument("--coco-images", metavar="DIR", help="COCO val2017 images (for --sugarcrepe)")
    g.add_argument("--valse", metavar="DIR", help="folder with VALSE's JSON files")
    g.add_argument("--valse-images", metavar="DIR", help="VALSE images: DIR/<dataset>/<file> or DIR/<file>")
    g.add_argument("--valse-all", action="store_true", help="keep VALSE samples not validated by annotators")
    g.add_argument("--aro", metavar="DIR", help="folder with visual_genome_{relation,attribution}.json + images/")
    g.add_argument("--aro-min-count", type=int, default=25, help="VG-Attribution macro: min items per pair (25)")
    g.add_argument("--aro-coco-order", metavar="JSON", help="COCO Karpathy test JSON for COCO-Order")
    g.add_argument("--aro-coco-order-root", metavar="DIR", help="image root its 'image' paths are relative to")
    g.add_argument("--aro-flickr-order", metavar="JSON", help="Flickr30k Karpathy test JSON for Flickr-Order")
    g.add_argument("--aro-flickr-order-root", metavar="DIR", help="image root its 'image' paths are relative to")
    g.add_argument("--seed", type=int, default=0, help="seed of the ARO order perturbations (default 0)")
    g.add_argument("--synthetic", metavar="SHARDS", help="synthetic test shards: directory, tar or brace pattern")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.aro_min_count < 1:
        raise ValueError(f"--aro-min-count must be >= 1, got {args.aro_min_count}")
    pairs = [
        ("--sugarcrepe", "--coco-images"),
        ("--valse", "--valse-images"),
        ("--aro-coco-order", "--aro-coco-order-root"),
        ("--aro-flickr-order", "--aro-flickr-order-root"),
    ]
    for main_flag, other in pairs:
        a, b = (getattr(args, f.lstrip("-").replace("-", "_")) for f in (main_flag, other))
        if bool(a) != bool(b):
            raise ValueError(f"{main_flag} and {other} go together; got only {main_flag if a else other}")
    chosen = [args.sugarcrepe, args.valse, args.aro, args.aro_coco_order, args.aro_flickr_order, args.synthetic]
    if not any(chosen):
        raise ValueError(
            "no benchmark given; expected at least one of --sugarcrepe, --valse, --aro, --aro-coco-order, "
            "--aro-flickr-order, --synthetic"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load every requested benchmark (all inputs are checked before the model is built), then score them."""
    from slipform_plugin.evaluation import benchmarks as bm
    from slipform_plugin.evaluation.core import Encoder
    from slipform_plugin.evaluation.model import load_model
    from slipform_plugin.evaluation.synthetic import evaluate_synthetic, read_samples

    _check_args(args)
    data: dict[str, Any] = {}
    if args.sugarcrepe:
        data["sugarcrepe"] = bm.load_sugarcrepe(args.sugarcrepe, args.coco_images, args.limit)
    if args.valse:
        data["valse"] = bm.load_valse(args.valse, args.valse_images, not args.valse_all, args.limit)
    if args.aro:
        data.update(bm.load_aro_vg(args.aro, args.limit))
    if args.aro_coco_order:
        data["coco_order"] = bm.load_aro_order(
            args.aro_coco_order, args.aro_coco_order_root, "--aro-coco-order", args.seed, args.limit
        )
    if args.aro_flickr_order:
        data["flickr_order"] = bm.load_aro_order(
            args.aro_flickr_order, args.aro_flickr_order_root, "--aro-flickr-order", args.seed, args.limit
        )
    if args.synthetic:
        data["synthetic"] = read_samples(args.synthetic, args.limit)

    loaded = load_model(args.model, args.pretrained, args.device, args.force_quick_gelu)
    encoder = Encoder(loaded.model, loaded.preprocess, loaded.tokenizer, args.device, args.batch_size)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name, items in data.items():
        start = time.perf_counter()
        if name == "sugarcrepe":
            results[name] = bm.evaluate_sugarcrepe(encoder, items)
        elif name == "valse":
            results[name] = bm.evaluate_valse(encoder, items)
        elif name in ("vg_relation", "vg_attribution"):
            results[name] = bm.evaluate_aro_vg(encoder, name, items, args.aro_min_count)
        elif name in ("coco_order", "flickr_order"):
            results[name] = bm.evaluate_order(encoder, items)
        else:
            results[name] = evaluate_synthetic(encoder, items)
        timings[name] = round(time.perf_counter() - start, 3)
    return {
        "model": args.model,
        "pretrained": args.pretrained,
        "quick_gelu": loaded.quick_gelu,
        "notes": loaded.notes,
        "results": results,
        "seconds": timings,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def to_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run` report (percentages, one decimal)."""
    lines = [f"# slipform eval: `{report['model']}` / `{report['pretrained']}`", ""]
    lines += [f"- {note}" for note in report["notes"]]
    res = report["results"]

    def table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
        lines.extend(["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)

    if "sugarcrepe" in res:
        r = res["sugarcrepe"]
        rows = [(k, _pct(v["accuracy"]), v["n"]) for k, v in r["categories"].items()]
        rows += [(f"*{k} (mean)*", _pct(v), "") for k, v in r["families"].items()]
        rows.append(("**average**", _pct(r["average"]), r["n"]))
        table("SugarCrepe (image-to-text accuracy, %)", ("category", "accuracy", "n"), rows)
    if "valse" in res:
        r = res["valse"]
        rows = [(k, _pct(v["accuracy"]), v["n"]) for k, v in r["pieces"].items()]
        rows.append(("**average**", _pct(r["average"]), r["n"]))
        table("VALSE (pairwise accuracy, %)", ("piece", "accuracy", "n"), rows)
    aro_rows = []
    for name in ("vg_relation", "vg_attribution"):
        if name in res:
            r = res[name]
            aro_rows.append((name, _pct(r["macro_accuracy"]), _pct(r["accuracy"]), r["n"]))
    for name in ("coco_order", "flickr_order"):
        if name in res:
            aro_rows.append((name, _pct(res[name]["precision_at_1"]), "", res[name]["n"]))
    if aro_rows:
        table("ARO (%; order sets: precision@1)", ("set", "macro accuracy", "micro accuracy", "n"), aro_rows)
    if "synthetic" in res:
        r = res["synthetic"]
        rows = [
            (k, _pct(v["accuracy"]), _pct(v.get("accuracy_seen")), _pct(v.get("accuracy_heldout")), v["n"])
            for k, v in r["hard"].items()
        ]
        table(
            "Synthetic: image-to-text accuracy per hard-caption kind (%)",
            ("kind", "all", "seen", "held-out", "n"),
            rows,
        )
        ret = r["retrieval"]
        rows = [
            ("image to text", _pct(ret["image_to_text"]["R@1"]), _pct(ret["image_to_text"]["R@5"])),
            ("text to image", _pct(ret["text_to_image"]["R@1"]), _pct(ret["text_to_image"]["R@5"])),
        ]
        table(f"Synthetic: retrieval over {ret['n']} test items (%)", ("direction", "R@1", "R@5"), rows)
        zs = r["zero_shot"]
        rows = [(k, _pct(zs[k]["accuracy"]), zs[k]["classes"]) for k in ("shape", "colour")]
        table("Synthetic: zero-shot classification of the subject (%)", ("attribute", "accuracy", "classes"), rows)
        rows = [
            (f"{k} (subject)", _pct(v["accuracy"]), _pct(v["majority"]), v["classes"])
            for k, v in r.get("perception", {}).items()
            if k != "n"
        ]
        rows += [
            (f"{k} (scene)", _pct(v["accuracy"]), _pct(v["majority"]), v["classes"])
            for k, v in r.get("layout", {}).items()
            if k != "n"
        ]
        if rows:
            table(
                "Synthetic: linear probe of the image features (%; chance: the majority value)",
                ("label", "accuracy", "majority", "classes"),
                rows,
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slipform eval``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = run(args)
    except CheckpointMismatchError as err:
        print(f"slipform eval: refusing the checkpoint: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"slipform eval: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (out / "eval.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
