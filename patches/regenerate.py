"""Regenerate the explicit OpenCLIP patches from pristine open_clip_torch 3.3.0 sources.

    python -m slipform_plugin.patches.regenerate [SITE_PACKAGES]

Each edit below is the explicit form of one extension point that the import hook installs at run time
(``slipform_plugin.integration``); both call the same functions. The script writes one unified diff per
file and ``manifest.json`` with the sha256 of every file before and after, which ``slipform patch`` checks.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent
OPENCLIP_VERSION = "3.3.0"
MARKER = "_SLIPFORM_PATCHED = True  # Slipform: explicit patches applied (see slipform_plugin/patches)\n"

# (file relative to site-packages, [(anchor text, replacement text)]), applied in order, each anchor exactly once.
EDITS: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "open_clip_train/params.py",
        [
            ("import argparse\n", "import argparse\n" + MARKER),
            (
                "    parser = argparse.ArgumentParser()\n",
                "    parser = argparse.ArgumentParser()\n"
                "    from slipform_plugin.integration import add_arguments as _slipform_add_arguments\n"
                "    _slipform_add_arguments(parser)  # Slipform: --loss, --hn, --hn-num, --cement-*, --loss-impl\n",
            ),
            (
                "    args = parser.parse_args(args)\n",
                "    args = parser.parse_args(args)\n"
                "    from slipform_plugin.integration import validate_args as _slipform_validate_args\n"
                "    _slipform_validate_args(parser, args)  # Slipform: check its flags\n",
            ),
        ],
    ),
    (
        "open_clip/factory.py",
        [
            (
                "_rescan_model_configs()  # initial populate of model config registry\n",
                "_rescan_model_configs()  # initial populate of model config registry\n"
                + MARKER
                + "try:  # Slipform: its model configs (slipform-tiny)\n"
                "    from slipform_plugin.integration import model_config_dir as _slipform_model_config_dir\n"
                "    _MODEL_CONFIG_PATHS.append(_slipform_model_config_dir())\n"
                "    _rescan_model_configs()\n"
                "except ImportError:\n"
                "    pass\n",
            ),
            (
                "def create_loss(args):\n",
                "def create_loss(args):\n"
                "    if getattr(args, 'loss', 'clip') != 'clip':  # Slipform: --loss picks a registered loss\n"
                "        from slipform_plugin.integration import create_loss as _slipform_create_loss\n"
                "        return _slipform_create_loss(args, None)\n",
            ),
        ],
    ),
    (
        "open_clip/model.py",
        [
            ("from .utils import", MARKER + "from .utils import"),
            (
                "            text: Optional[torch.Tensor] = None,\n    ):\n"
                "        image_features = self.encode_image(image, normalize=True) if image is not None else None\n",
                "            text: Optional[torch.Tensor] = None,\n    ):\n"
                "        if text is not None and text.ndim == 3:  # Slipform: captions packed with hard negatives\n"
                "            from slipform_plugin.integration import forward_with_negatives\n"
                "            return forward_with_negatives(type(self).forward, self, image, text)\n"
                "        image_features = self.encode_image(image, normalize=True) if image is not None else None\n",
            ),
        ],
    ),
    (
        "open_clip_train/data.py",
        [
            ("import ast\n", "import ast\n" + MARKER),
            (
                "def get_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):\n",
                "def get_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):\n"
                "    if is_train and getattr(args, 'hn', 'none') != 'none' and not getattr(tokenizer, '_slipform_wrapped', False):\n"
                "        # Slipform: add the --hn stage before tokenisation (training pipelines only)\n"
                "        from slipform_plugin.integration import get_wds_dataset as _slipform_get_wds_dataset\n"
                "        return _slipform_get_wds_dataset(get_wds_dataset, args, preprocess_img, is_train, epoch, floor, tokenizer)\n",
            ),
            (
                "    dataset = wds.DataPipeline(*pipeline)\n",
                "    dataset = wds.DataPipeline(*pipeline)\n"
                "    if is_train and getattr(args, 'seed_sample_shuffle', False):  # Slipform: --seed-sample-shuffle\n"
                "        from slipform_plugin.data_stage import seed_sample_shuffle as _slipform_seed_sample_shuffle\n"
                "        _slipform_seed_sample_shuffle(dataset.pipeline, args.seed, getattr(args, 'rank', 0), shared_epoch)\n",
            ),
        ],
    ),
    (
        "open_clip_train/train.py",
        [
            ("import json\n", "import json\n" + MARKER),
            (
                "def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):\n",
                "def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):\n"
                "    # Slipform: logs its losses' hard-negative accuracy, sets their schedules' step (no-op for OpenCLIP's)\n"
                "    from slipform_plugin.integration import wrap_train_one_epoch\n"
                "    return wrap_train_one_epoch(_openclip_train_one_epoch)(\n"
                "        model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer)\n\n\n"
                "def _openclip_train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):\n",
            ),
        ],
    ),
    (
        "open_clip_train/main.py",
        [
            ("import glob\n", "import glob\n" + MARKER),
            (
                "        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device], **ddp_args)\n",
                "        # Slipform: DDP rejects device_ids for CPU modules (torchrun on CPU crashed here)\n"
                "        device_ids = None if torch.device(device).type == 'cpu' else [device]\n"
                "        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_args)\n",
            ),
            (
                "            dist_model = torch.nn.parallel.DistributedDataParallel(dist_model, device_ids=[device], **ddp_args)\n",
                "            dist_model = torch.nn.parallel.DistributedDataParallel(dist_model, device_ids=device_ids, **ddp_args)\n",
            ),
        ],
    ),
]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def patched_text(original: str, edits: list[tuple[str, str]], path: str) -> str:
    text = original
    for anchor, replacement in edits:
        count = text.count(anchor)
        if count == 0:
            raise SystemExit(f"{path}: anchor not found: {anchor[:60]!r}")
        if anchor.startswith("            text: Optional") and count == 2:
            text = text.replace(anchor, replacement)  # CLIP.forward and CustomTextCLIP.forward
            continue
        if count != 1:
            raise SystemExit(f"{path}: anchor found {count} times: {anchor[:60]!r}")
        text = text.replace(anchor, replacement)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = Path(argv[0]) if argv else Path(sysconfig.get_paths()["purelib"])
    manifest = {"open_clip_torch": OPENCLIP_VERSION, "files": []}
    for relative, edits in EDITS:
        original = (site / relative).read_text()
        if "_SLIPFORM_PATCHED" in original:
            raise SystemExit(f"{site / relative} is already patched; regenerate from pristine sources")
        patched = patched_text(original, edits, relative)
        diff = "".join(
            difflib.unified_diff(
                original.splitlines(keepends=True),
                patched.splitlines(keepends=True),
                fromfile=f"a/{relative}",
                tofile=f"b/{relative}",
            )
        )
        name = relative.replace("/", "__").replace(".py", ".diff")
        (HERE / name).write_text(diff)
        manifest["files"].append(
            {"path": relative, "diff": name, "sha256_original": sha256(original), "sha256_patched": sha256(patched)}
        )
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(EDITS)} diffs and manifest.json to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
