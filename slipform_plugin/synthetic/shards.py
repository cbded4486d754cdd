"""``slipform make-shards``: write synthetic scenes as WebDataset shards for ``open_clip_train.main``.

Each sample has ``<key>.png`` (or ``.jpg``), ``<key>.txt`` (the true caption) and ``<key>.json`` (the hard
captions and the scene, see :func:`slipform_plugin.synthetic.make_item`). Shards are byte-for-byte
deterministic for a seed: entries carry mtime 0 and items depend only on ``(seed, split, index)``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from slipform_plugin._argtypes import non_negative_int, positive_int
from slipform_plugin.synthetic.dataset import check_args, check_single_group_fraction, heldout_for_seed, make_item
from slipform_plugin.synthetic.scene import SPLITS, WORLDS, get_world

IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg")
INFO_FILE = "slipform-synthetic.json"


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`write_shards` wrote: the shard paths, the brace pattern for OpenCLIP and the sample count."""

    shards: list[Path]
    pattern: str
    num_samples: int
    seconds: float


def encode_image(array, image_format: str) -> bytes:
    """PNG (fast, lossless) or JPEG (quality 95) bytes of a ``uint8 [S, S, 3]`` array."""
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(array, "RGB").save(buf, format="PNG", compress_level=1)
    elif image_format == "jpg":
        Image.fromarray(array, "RGB").save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buf.getvalue()


def shard_pattern(out_dir: Path, num_shards: int) -> str:
    """The brace pattern ``OUT/shard-{00000..0000K}.tar`` that OpenCLIP's ``--train-data`` expands."""
    return str(out_dir / f"shard-{{{0:05d}..{num_shards - 1:05d}}}.tar")


def _write_one_shard(
    path: Path,
    indices: range,
    seed: int,
    split: str,
    image_size: int,
    image_format: str,
    world: str,
    single_group_fraction: float = 0.0,
) -> Path:
    """Write items ``indices`` to ``path`` (through a temporary file, so a crash leaves no partial shard)."""
    import webdataset as wds  # imported here: the package import stays cheap

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=0.0)
        for index in indices:
            item = make_item(seed, split, index, image_size, world, single_group_fraction)
            writer.write(
                {
                    "__key__": item.key,
                    image_format: encode_image(item.image, image_format),
                    "txt": item.caption.encode("utf-8"),
                    "json": json.dumps(item.meta, sort_keys=True).encode("utf-8"),
                }
            )
        writer.close()
    os.replace(tmp, path)
    return path


def write_shards(
    out_dir: str | os.PathLike[str],
    num: int,
    seed: int = 0,
    shard_size: int = 256,
    image_size: int = 64,
    split: str = "train",
    image_format: str = "png",
    workers: int = 1,
    world: str = "default",
    single_group_fraction: float = 0.0,
) -> ShardSummary:
    """Write ``num`` items of ``split`` into ``out_dir/shard-00000.tar``, ... (``shard_size`` per shard).

    Also writes ``out_dir/slipform-synthetic.json`` with the settings and the held-out rule. ``workers > 1``
    writes shards in parallel processes; the bytes written do not depend on it. ``world`` names a preset of
    :data:`~slipform_plugin.synthetic.scene.WORLDS`. ``single_group_fraction`` (train only) is the share of items
    that show and caption only their subject group (see :func:`~slipform_plugin.synthetic.dataset.make_item`).
    Raises ``ValueError`` naming the argument when one is out of range.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    check_args(seed, split, image_size)
    get_world(world)  # raises ValueError naming the argument
    check_single_group_fraction(single_group_fraction, split)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    num_shards = (num + shard_size - 1) // shard_size
    start = time.perf_counter()
    jobs = [
        (out / f"shard-{shard:05d}.tar", range(shard * shard_size, min(num, (shard + 1) * shard_size)))
        for shard in range(num_shards)
    ]
    settings = (seed, split, image_size, image_format, world, single_group_fraction)
    if workers > 1 and num_shards > 1:
        import multiprocessing

        import webdataset  # noqa: F401  (load it once here; forked workers inherit it instead of re-importing torch)

        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with context.Pool(min(workers, num_shards)) as pool:
            shards = pool.starmap(_write_one_shard, [(path, indices, *settings) for path, indices in jobs])
    else:
        shards = [_write_one_shard(path, indices, *settings) for path, indices in jobs]
    seconds = time.perf_counter() - start
    info = {
        "num_samples": num,
        "seed": seed,
        "split": split,
        "world": world,
        "single_group_fraction": single_group_fraction,
        "shard_size": shard_size,
        "image_size": image_size,
        "image_format": image_format,
        "pattern": shard_pattern(out, num_shards),
        "heldout": heldout_for_seed(seed).to_json(),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return ShardSummary(shards, shard_pattern(out, num_shards), num, seconds)


def build_parser() -> argparse.ArgumentParser:
    """The ``slipform make-shards`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="slipform make-shards",
        description="Write WebDataset shards of rendered synthetic scenes with compositional captions.",
        allow_abbrev=False,
    )
    parser.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    parser.add_argument("--num", type=positive_int, required=True, help="number of samples")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed (also fixes the held-out rule)")
    parser.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard (default 256)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="train or test (default train)")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes writing shards (default 1)")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="png", help="image encoding (default png)")
    parser.add_argument(
        "--world",
        choices=tuple(WORLDS),
        default="default",
        help="scene world: default (the benchmark), simple (one material, one texture, larger objects), pair (two "
        "large objects, always 'to the left of'), pair-relations (pair with the four relations) or "
        "pair-relations-unseen (pair-relations whose captions also state an age per object that the image never "
        "shows)",
    )
    parser.add_argument(
        "--single-group-fraction",
        type=float,
        default=0.0,
        help="train only: share of items showing and captioning only their subject group (default 0)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slipform make-shards``; prints the ``--train-data`` pattern and sample count."""
    args = build_parser().parse_args(argv)
    try:
        summary = write_shards(
            args.out,
            args.num,
            args.seed,
            args.shard_size,
            args.image_size,
            args.split,
            args.format,
            args.workers,
            args.world,
            args.single_group_fraction,
        )
    except ValueError as err:
        print(f"slipform make-shards: error: {err}", file=sys.stderr)
        return 2
    rate = summary.num_samples / max(summary.seconds, 1e-9)
    print(
        f"wrote {summary.num_samples} {args.split} samples in {len(summary.shards)} shards to {args.out} "
        f"({summary.seconds:.1f} s, {rate:.0f} samples/s)"
    )
    flag = "train" if args.split == "train" else "val"
    print(f"--{flag}-data '{summary.pattern}' --{flag}-num-samples {summary.num_samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
