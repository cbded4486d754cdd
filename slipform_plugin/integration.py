"""The extension points Slipform adds to OpenCLIP 3.x, as plain functions.

Two mechanisms call them, never both in one process:

- the import hook of :mod:`slipform_plugin._bootstrap` (the default): it wraps OpenCLIP's functions right
  after their modules load, through :func:`patch_module`;
- the explicit diffs in ``patches/`` (``slipform patch apply``): OpenCLIP's source then calls these functions
  itself and marks the module with ``_SLIPFORM_PATCHED = True``, which the import hook respects.

Every wrapper is inert without Slipform's flags: ``--loss clip`` (the default) and ``--hn none`` run
OpenCLIP's own code paths, bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from pathlib import Path
from typing import Any

from slipform_plugin._argtypes import float_in_range, int_in_range, positive_int

logger = logging.getLogger("slipform")

SUPPORTED_OPENCLIP = (3, 0), (4, 0)  # [min, max)
MAX_HARD_NEGATIVES = 64
MODEL_CONFIG_DIR = "model_configs"

#: Flags Slipform adds: destination -> default. A value different from the default means "Slipform is used".
SLIPFORM_DEFAULTS: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------------------------
# Version guard


def openclip_version() -> str:
    try:
        from importlib.metadata import version

        return version("open_clip_torch")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        import open_clip

        return getattr(open_clip, "__version__", "0")


def _version_tuple(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return ([*parts, 0, 0])[0], ([*parts, 0, 0])[1]


def openclip_supported(version: str | None = None) -> bool:
    low, high = SUPPORTED_OPENCLIP
    return low <= _version_tuple(version or openclip_version()) < high


def unsupported_message(version: str) -> str:
    return (
        f"Slipform supports open_clip_torch >=3.0,<4, found {version}; "
        "install a supported version (pip install 'open_clip_torch[training]>=3.0,<4')"
    )


# --------------------------------------------------------------------------------------------------------------
# Arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add Slipform's flags to OpenCLIP's parser (a group of their own, listed in ``--help``)."""
    from slipform_plugin.hard_negatives import DEFAULT_SCORE_SCALE, SCORE_SCALES
    from slipform_plugin.losses import CEMENT_DEFAULTS, HARD_COLUMNS, LOSS_IMPLS, MARGIN_GATES
    from slipform_plugin.registry import hard_negative_names, loss_names

    group = parser.add_argument_group("Slipform (hard negatives and the Cement loss)")
    group.add_argument(
        "--loss",
        default="clip",
        help=f"Contrastive loss: one of {', '.join(loss_names())} (default: clip, OpenCLIP's own ClipLoss).",
    )
    group.add_argument(
        "--loss-impl",
        default="auto",
        choices=LOSS_IMPLS,
        help="Implementation of the Slipform losses: auto (Triton on CUDA, else chunked), triton, chunked "
        "(tiled PyTorch, O(N*D) memory) or reference (full similarity matrix). Default: auto.",
    )
    group.add_argument(
        "--hn",
        default="none",
        help=f"Hard-negative generator: one of {', '.join(hard_negative_names())} (default: none).",
    )
    group.add_argument(
        "--hn-num",
        type=int_in_range(0, MAX_HARD_NEGATIVES),
        default=3,
        help="Hard negatives per caption, K (default: 3).",
    )
    group.add_argument("--hn-seed", type=int, default=None, help="Seed of the generator (default: --seed).")
    group.add_argument(
        "--hn-kinds",
        default=None,
        help="Comma-separated kinds of negatives to make (default: all), e.g. replace_object,swap_attributes.",
    )
    group.add_argument("--hn-spacy-model", default=None, help="spaCy model of the generator (default: en_core_web_sm).")
    group.add_argument(
        "--hn-vocab",
        default=None,
        metavar="FILE",
        help="Draw replacement words only from this vocabulary (a text file, one word per line, e.g. every word of "
        "the training captions); default: no restriction.",
    )
    group.add_argument(
        "--hn-score-scale",
        default=DEFAULT_SCORE_SCALE,
        choices=SCORE_SCALES,
        help="Concreteness scale of the score each ConcretePlant negative carries to Cement's concreteness margin: "
        "pos, its within-part-of-speech percentile (default); all, its percentile among all caption words, "
        "comparable across kinds (a changed preposition scores below a colour). Sampling ranks within POS either way.",
    )
    group.add_argument(
        "--hn-first-tier-rating",
        type=float_in_range(1.0, 5.0),
        default=None,
        metavar="RATING",
        help="ConcretePlant: a change whose every side has a Brysbaert concreteness rating of at least RATING (1 to 5) "
        "is drawn in the first tier even when it ranks low within its part of speech (shape nouns such as "
        "'square', 4.33, sit at the 21st percentile of caption nouns). Default: the percentile cut alone.",
    )
    group.add_argument(
        "--hn-batch-size", type=positive_int, default=64, help="Captions per generator call in a worker (64)."
    )
    group.add_argument(
        "--cement-margin-hard",
        type=float,
        default=CEMENT_DEFAULTS["margin_hard"],
        help="mu_h: a hard negative's logit is raised by s*mu_h*score (default: %(default)s).",
    )
    group.add_argument(
        "--cement-margin-batch",
        type=float,
        default=CEMENT_DEFAULTS["margin_batch"],
        help="mu_b: largest difficulty margin of in-batch negatives, in cosine units (default: %(default)s).",
    )
    group.add_argument(
        "--cement-difficulty-offset",
        type=float,
        default=CEMENT_DEFAULTS["difficulty_offset"],
        help="delta of the difficulty sigmoid((sim_neg - sim_pos + delta) / gamma) (default: %(default)s).",
    )
    group.add_argument(
        "--cement-difficulty-temperature",
        type=float,
        default=CEMENT_DEFAULTS["difficulty_temperature"],
        help="gamma (> 0) of the difficulty sigmoid (default: %(default)s).",
    )
    group.add_argument(
        "--cement-hard-weight",
        type=float,
        default=CEMENT_DEFAULTS["hard_weight"],
        help="lambda (>= 0): weight of the hard-negative term, each caption against its own hard negatives in a "
        "softmax of their own (default: %(default)s).",
    )
    group.add_argument(
        "--cement-margin-gate",
        choices=MARGIN_GATES,
        default="none",
        help="none: margins at full strength; hn-accuracy: both margins scaled by a gate in [0, 1] that opens "
        "with the training hard-negative accuracy above chance (default: %(default)s).",
    )
    group.add_argument(
        "--cement-hard-margin-difficulty",
        action="store_true",
        default=False,
        help="Scale each hard negative's concreteness margin by its pair's difficulty, "
        "sigmoid((sim_hard - sim_pos + delta) / gamma): the margin stays on negatives the model cannot yet tell "
        "from the caption and fades from those it has separated.",
    )
    group.add_argument(
        "--cement-hard-difficulty-offset",
        type=float,
        default=None,
        help="delta_h of the pair sigmoid of --cement-hard-margin-difficulty, if not --cement-difficulty-offset "
        "(default: the same): with delta_h > 0 a margin fades only once the caption leads by about delta_h.",
    )
    group.add_argument(
        "--cement-hard-difficulty-warmup",
        type=int,
        default=0,
        metavar="STEPS",
        help="Phase in --cement-hard-margin-difficulty over this many training steps: the concreteness margins "
        "start constant and end scaled by their pairs' difficulty (default: %(default)s, scaled from the start).",
    )
    group.add_argument(
        "--cement-hard-columns",
        choices=HARD_COLUMNS,
        default="joint",
        help="joint: hard negatives are extra columns of their image's row beside the in-batch captions (and enter "
        "the hard-negative term when --cement-hard-weight > 0); separate: they enter the hard-negative term only, so "
        "the in-batch rows are CLIP's (needs --cement-hard-weight > 0) (default: %(default)s).",
    )
    group.add_argument(
        "--cement-text-weight",
        type=float,
        default=CEMENT_DEFAULTS["text_weight"],
        help="lambda_t (>= 0): weight of the caption-separation term, which asks a caption and its own hard "
        "negative to be at most 1 - mu_t * score alike in the text tower's space (default: %(default)s, off).",
    )
    group.add_argument(
        "--cement-text-margin",
        type=float,
        default=CEMENT_DEFAULTS["text_margin"],
        help="mu_t in [0, 2]: the text-side separation of --cement-text-weight asked of a negative with "
        "concreteness score 1 (default: %(default)s).",
    )
    group.add_argument(
        "--cement-hard-unit-difference",
        type=float,
        default=None,
        metavar="EPS",
        help="In the hard-negative term of --cement-hard-columns separate, divide each hard pair's cosine gap by "
        "the two captions' distance in text space (at least EPS): the image prefers its caption along the unit "
        "direction between them (default: off).",
    )
    group.add_argument(
        "--seed-sample-shuffle",
        action="store_true",
        default=False,
        help="Seed the WebDataset sample shuffle of training data from --seed, the epoch, the rank and the worker "
        "(OpenCLIP's own is seeded from the clock), so that a run can be repeated exactly.",
    )
    group.add_argument(
        "--cement-skip-finite-check",
        action="store_true",
        default=False,
        help="Skip the NaN/Inf check of the loss inputs (a little faster).",
    )
    for action in group._group_actions:
        SLIPFORM_DEFAULTS[action.dest] = action.default


def slipform_flags_used(args: argparse.Namespace) -> list[str]:
    """Destinations of Slipform's flags that differ from their defaults."""
    return [dest for dest, default in SLIPFORM_DEFAULTS.items() if getattr(args, dest, default) != default]


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check Slipform's flags against each other and against OpenCLIP's; ``parser.error`` on a bad one."""
    from slipform_plugin.registry import (
        LOSSES_WITHOUT_HARD_NEGATIVES,
        hard_negative_names,
        loss_names,
    )

    used = slipform_flags_used(args)
    version = openclip_version()
    if used and not openclip_supported(version):
        parser.error(f"{unsupported_message(version)} (Slipform flags given: {', '.join(used)})")
    losses = loss_names()
    if args.loss not in losses:
        parser.error(f"--loss: unknown loss {args.loss!r}; registered losses are {', '.join(losses)}")
    generators = hard_negative_names()
    if args.hn not in generators:
        parser.error(
            f"--hn: unknown hard-negative generator {args.hn!r}; registered generators are {', '.join(generators)}"
        )
    if args.hn != "none":
        if args.loss in LOSSES_WITHOUT_HARD_NEGATIVES:
            parser.error(
                f"--hn {args.hn} needs a loss that uses hard negatives, but --loss is {args.loss!r}; "
                "use --loss cement or --loss infonce"
            )
        if getattr(args, "distill", False) or "coca" in str(getattr(args, "model", "")).lower():
            parser.error(f"--hn {args.hn} supports CLIP-style models without distillation (got --model {args.model})")
        dataset_type = getattr(args, "dataset_type", "auto")
        train_data = str(getattr(args, "train_data", None) or "")
        if dataset_type == "auto" and train_data.split("::")[0].endswith((".csv", ".tsv")):
            dataset_type = "csv"
        if dataset_type not in ("webdataset", "auto"):
            parser.error(
                f"--hn {args.hn} needs WebDataset training data (--dataset-type webdataset), got {dataset_type!r}"
            )
    if args.loss != "clip":
        if getattr(args, "siglip", False):
            parser.error(f"--loss {args.loss} cannot be combined with --siglip")
        if getattr(args, "distill", False):
            parser.error(f"--loss {args.loss} cannot be combined with --distill")
        if getattr(args, "horovod", False):
            parser.error(f"--loss {args.loss} does not support --horovod; use torchrun or srun")
    if not (math.isfinite(args.cement_hard_weight) and args.cement_hard_weight >= 0):
        parser.error(f"--cement-hard-weight must be a finite number >= 0, got {args.cement_hard_weight}")
    if not (math.isfinite(args.cement_text_weight) and args.cement_text_weight >= 0):
        parser.error(f"--cement-text-weight must be a finite number >= 0, got {args.cement_text_weight}")
    if not (math.isfinite(args.cement_text_margin) and 0 <= args.cement_text_margin <= 2):
        parser.error(f"--cement-text-margin must be in [0, 2] (a cosine separation), got {args.cement_text_margin}")
    unit = args.cement_hard_unit_difference
    if unit is not None and not (math.isfinite(unit) and 0 < unit <= 2):
        parser.error(f"--cement-hard-unit-difference must be a floor in (0, 2], got {unit}")
    if unit is not None and args.cement_hard_columns != "separate":
        parser.error(
            "--cement-hard-unit-difference reshapes the separate hard-negative term; "
            f"expected --cement-hard-columns separate, got {args.cement_hard_columns}"
        )
    if not args.cement_difficulty_temperature > 0:
        parser.error(f"--cement-difficulty-temperature must be > 0, got {args.cement_difficulty_temperature}")
    if args.cement_hard_difficulty_warmup < 0:
        parser.error(f"--cement-hard-difficulty-warmup must be >= 0 steps, got {args.cement_hard_difficulty_warmup}")
    if args.cement_hard_difficulty_warmup and not args.cement_hard_margin_difficulty:
        parser.error("--cement-hard-difficulty-warmup phases in --cement-hard-margin-difficulty; give that flag too")
    if args.cement_hard_columns == "separate" and not args.cement_hard_weight > 0:
        parser.error(
            "--cement-hard-columns separate puts the hard negatives in the hard-negative term only; "
            f"expected --cement-hard-weight > 0, got {args.cement_hard_weight}"
        )
    if args.hn_kinds:
        from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS

        unknown = [k for k in args.hn_kinds.split(",") if k.strip() and k.strip() not in HARD_NEGATIVE_KINDS]
        if unknown:
            parser.error(
                f"--hn-kinds: unknown kinds {unknown}; expected a comma-separated subset of {HARD_NEGATIVE_KINDS}"
            )
    if args.hn_vocab:
        from slipform_plugin.concreteplant.corpus import read_vocabulary_file

        try:
            read_vocabulary_file(args.hn_vocab, "--hn-vocab")
        except (OSError, ValueError) as error:
            parser.error(str(error))
    if args.hn_seed is None:
        args.hn_seed = getattr(args, "seed", 0)


class _SlipformArgumentParser(argparse.ArgumentParser):
    """OpenCLIP's parser with Slipform's flags added and checked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        add_arguments(self)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        validate_args(self, parsed)
        return parsed


def wrap_parse_args(original):
    """Wrap ``open_clip_train.params.parse_args`` so the parser it builds carries Slipform's flags."""
    import open_clip_train.params as params

    @functools.wraps(original)
    def parse_args(args):
        saved = params.argparse
        shim = _ArgparseShim()
        params.argparse = shim
        try:
            return original(args)
        finally:
            params.argparse = saved

    return parse_args


class _ArgparseShim:
    """Stands in for the ``argparse`` module inside ``open_clip_train.params`` while it builds its parser."""

    ArgumentParser = _SlipformArgumentParser

    def __getattr__(self, name: str) -> Any:
        return getattr(argparse, name)


# --------------------------------------------------------------------------------------------------------------
# Loss


def create_loss(args: Any, original) -> Any:
    """``open_clip.create_loss`` with ``--loss``: OpenCLIP's own for ``clip``, else the registered factory."""
    name = getattr(args, "loss", "clip")
    if name == "clip":
        return original(args)
    from slipform_plugin.registry import get_loss_factory

    loss = get_loss_factory(name)(args)
    if getattr(args, "hn", "none") != "none" and not getattr(loss, "accepts_hard_negatives", False):
        raise ValueError(
            f"--hn {args.hn}: the loss registered as {name!r} ({type(loss).__name__}) does not declare "
            "accepts_hard_negatives = True"
        )
    logger.info("Slipform: loss=%s (%s)", name, loss)
    return loss


def wrap_create_loss(original):
    @functools.wraps(original)
    def create_loss_with_slipform(args):
        return create_loss(args, original)

    create_loss_with_slipform._slipform_wrapped = True
    return create_loss_with_slipform


# --------------------------------------------------------------------------------------------------------------
# Data


def add_hard_negative_stage(data_info: Any, args: Any) -> Any:
    """Insert the ``--hn`` stage into a training WebDataset pipeline built by OpenCLIP."""
    from slipform_plugin.data_stage import HardNegativeStage, insert_before_tokenization
    from slipform_plugin.registry import get_hard_negative_factory

    generator = get_hard_negative_factory(args.hn)(args)
    if generator is None:
        return data_info
    stage = HardNegativeStage(generator, args.hn_num, batch_size=getattr(args, "hn_batch_size", 64))
    insert_before_tokenization(_sample_pipeline(data_info.dataloader), stage)
    logger.info("Slipform: hard negatives from %r, K=%d, in the training pipeline", args.hn, args.hn_num)
    return data_info


def _sample_pipeline(loader: Any) -> list:
    """The stage list of the WebDataset pipeline behind OpenCLIP's ``WebLoader`` (a DataLoader in a pipeline)."""
    for candidate in (loader, *getattr(loader, "pipeline", [])):
        dataset = getattr(candidate, "dataset", None)
        if dataset is not None and isinstance(getattr(dataset, "pipeline", None), list):
            return dataset.pipeline
    raise RuntimeError("Slipform: could not find the WebDataset pipeline behind OpenCLIP's training dataloader")


def get_wds_dataset(original, args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
    """``open_clip_train.data.get_wds_dataset`` with the ``--hn`` stage in training pipelines only."""
    use_hn = is_train and getattr(args, "hn", "none") != "none"
    if not use_hn:
        info = original(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
    else:
        from slipform_plugin.data_stage import TokenizerWithNegatives

        wrapped = TokenizerWithNegatives(tokenizer, args.hn_num)
        info = add_hard_negative_stage(
            original(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=wrapped), args
        )
    if is_train and getattr(args, "seed_sample_shuffle", False):
        from slipform_plugin.data_stage import seed_sample_shuffle

        seed_sample_shuffle(_sample_pipeline(info.dataloader), args.seed, getattr(args, "rank", 0), info.shared_epoch)
        logger.info("Slipform: sample shuffle seeded from --seed %d, the epoch, the rank and the worker", args.seed)
    return info


def wrap_get_wds_dataset(original):
    @functools.wraps(original)
    def get_wds_dataset_with_slipform(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
        return get_wds_dataset(original, args, preprocess_img, is_train, epoch, floor, tokenizer)

    return get_wds_dataset_with_slipform


# --------------------------------------------------------------------------------------------------------------
# Model


def forward_with_negatives(original_forward, model, image=None, text=None):
    """CLIP forward for a packed ``[B, 1 + K, L + 3]`` caption batch.

    Encodes the captions and their real negatives in one text-tower call (padding rows are skipped) and returns
    OpenCLIP's output dict plus ``hn_text_features [B, K, D]``, ``hn_scores [B, K]`` and ``hn_mask [B, K]``, and
    ``hn_kinds [B, K]`` when the training loss declares ``accepts_hard_negative_kinds`` (the wrapped
    ``train_one_epoch`` marks the model so).
    """
    import torch

    from slipform_plugin.packing import unpack_batch

    tokens, mask, kinds, scores = unpack_batch(text)
    batch, rows, length = tokens.shape
    real = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1).reshape(-1)  # [B * (1 + K)]
    out = original_forward(model, image, tokens.reshape(batch * rows, length)[real])
    if not isinstance(out, dict):
        raise RuntimeError(
            "Slipform hard negatives need the model built with output_dict=True (as OpenCLIP's trainer does)"
        )
    encoded = out["text_features"]
    features = encoded.new_zeros(batch * rows, encoded.shape[-1])
    features = features.index_put((real.nonzero().squeeze(1),), encoded)
    features = features.view(batch, rows, -1)
    out["text_features"] = features[:, 0]
    out["hn_text_features"] = features[:, 1:]
    out["hn_scores"] = scores
    out["hn_mask"] = mask
    if getattr(model, "_slipform_hn_kinds", False):
        out["hn_kinds"] = kinds
    return out


def wrap_model_forward(original_forward):
    """Wrap ``CLIP.forward``/``CustomTextCLIP.forward``: 3-D caption batches carry negatives, 2-D are untouched."""

    @functools.wraps(original_forward)
    def forward(self, image=None, text=None):
        if text is not None and getattr(text, "ndim", 2) == 3:
            return forward_with_negatives(original_forward, self, image, text)
        return original_forward(self, image, text)

    forward._slipform_wrapped = True
    return forward


# --------------------------------------------------------------------------------------------------------------
# Training loop: logging of the hard-negative accuracy


class _TrainLogWriter:
    """Stands in for the TensorBoard writer inside ``train_one_epoch``.

    OpenCLIP writes its scalars when (and only when) it logs a step; on its first scalar of a step this writer
    also logs ``train/hn_acc`` (hard-negative accuracy since the last log: rows whose caption beats all of its
    negatives) and, when the loss saw the kinds, ``train/hn_acc/<kind>`` (the share of that kind's negatives
    their caption beat) to the log and to TensorBoard.
    """

    def __init__(self, writer: Any, loss: Any, epoch: int) -> None:
        self.writer = writer
        self.loss = loss
        self.epoch = epoch

    def add_scalar(self, name: str, value: Any, step: int, *args: Any, **kwargs: Any) -> None:
        if name == "train/data_time":
            accuracy = self.loss.hard_negative_meter.pop()
            if accuracy is not None:
                logger.info(
                    "Slipform: Train Epoch: %d step %d Hard-negative accuracy: %.4f", self.epoch, step, accuracy
                )
                if self.writer is not None:
                    self.writer.add_scalar("train/hn_acc", accuracy, step)
            by_kind = self.loss.hard_negative_meter.pop_kinds()
            if by_kind:
                logger.info(
                    "Slipform: Train Epoch: %d step %d Hard-negative accuracy by kind: %s",
                    self.epoch,
                    step,
                    ", ".join(f"{kind} {value:.4f}" for kind, value in by_kind.items()),
                )
                if self.writer is not None:
                    for kind, value in by_kind.items():
                        self.writer.add_scalar(f"train/hn_acc/{kind}", value, step)
        if self.writer is not None:
            self.writer.add_scalar(name, value, step, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        writer = self.__dict__["writer"]
        if writer is None:
            raise AttributeError(name)
        return getattr(writer, name)


def _log_first_batch(module: Any, args: tuple, kwargs: dict) -> None:
    hard = kwargs.get("hn_text_features")
    image = kwargs.get("image_features", args[0] if args else None)
    if hard is not None:
        mask = kwargs.get("hn_mask")
        real = int(mask.sum()) if mask is not None else hard.shape[0] * hard.shape[1]
        logger.info(
            "Slipform: first loss call: image_features %s, hn_text_features %s, real negatives %d/%d",
            list(image.shape) if image is not None else None,
            list(hard.shape),
            real,
            hard.shape[0] * hard.shape[1],
        )
    else:
        logger.info(
            "Slipform: first loss call: image_features %s, no hard negatives",
            list(image.shape) if image is not None else None,
        )


def _unwrapped_model(model: Any) -> Any:
    """The CLIP module inside DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def wrap_train_one_epoch(original):
    """Wrap ``train_one_epoch`` to log Slipform's metrics; a no-op for OpenCLIP's own losses."""

    @functools.wraps(original)
    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        meter = getattr(loss, "hard_negative_meter", None)
        if meter is None:
            return original(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer)
        if hasattr(loss, "set_training_step"):
            # OpenCLIP's own step count (train_one_epoch: step = num_batches_per_epoch * epoch + i), so that the
            # loss's schedules continue where a resumed run left off.
            accum_freq = max(1, int(getattr(args, "accum_freq", 1)))
            loss.set_training_step(epoch * (data["train"].dataloader.num_batches // accum_freq), accum_freq)
        from open_clip_train.distributed import is_master

        # Let the model hand the loss each negative's kind (for per-kind logging) only if the loss takes it.
        inner = _unwrapped_model(model)
        previous_kinds = getattr(inner, "_slipform_hn_kinds", False)
        if inner is not None:
            inner._slipform_hn_kinds = bool(getattr(loss, "accepts_hard_negative_kinds", False))
        handle = None
        if is_master(args):
            state = {"done": False}

            def log_once(module, hook_args, hook_kwargs):
                if not state["done"]:
                    state["done"] = True
                    _log_first_batch(module, hook_args, hook_kwargs)

            handle = loss.register_forward_pre_hook(log_once, with_kwargs=True)
            tb_writer = _TrainLogWriter(tb_writer, loss, epoch)
        try:
            return original(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer)
        finally:
            if inner is not None:
                inner._slipform_hn_kinds = previous_kinds
            if handle is not None:
                handle.remove()

    train_one_epoch._slipform_wrapped = True
    return train_one_epoch


# --------------------------------------------------------------------------------------------------------------
# DDP on CPU


def install_cpu_ddp_fix() -> None:
    """Let OpenCLIP's ``DistributedDataParallel(model, device_ids=[device])`` work for CPU models.

    Stock OpenCLIP 3.3.0 always passes ``device_ids=[device]``; for a CPU module torch rejects that with a
    ValueError, so ``torchrun --nproc_per_node 2`` on CPU crashes. The replacement class drops ``device_ids``
    and ``output_device`` exactly in that case and is otherwise the same class (a subclass, so ``isinstance``
    checks keep working).
    """
    import torch

    parallel = torch.nn.parallel
    if getattr(parallel.DistributedDataParallel, "_slipform_cpu_fix", False):
        return
    base = parallel.DistributedDataParallel

    class DistributedDataParallel(base):  # type: ignore[misc, valid-type]
        _slipform_cpu_fix = True

        def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
            on_cpu = device_ids and all(torch.device(d).type == "cpu" for d in device_ids)
            if on_cpu and all(p.device.type == "cpu" for p in module.parameters()):
                device_ids, output_device = None, None
            super().__init__(module, device_ids, output_device, *args, **kwargs)

    DistributedDataParallel.__qualname__ = base.__qualname__
    DistributedDataParallel.__module__ = base.__module__
    parallel.DistributedDataParallel = DistributedDataParallel
    torch.nn.parallel.distributed.DistributedDataParallel = DistributedDataParallel


# --------------------------------------------------------------------------------------------------------------
# Module patchers, keyed by module name (called by the import hook right after a module has executed)


def model_config_dir() -> Path:
    """Directory of the model configs Slipform ships (``slipform-tiny``)."""
    return Path(__file__).resolve().parent / MODEL_CONFIG_DIR


def register_model_configs() -> None:
    """Make ``--model slipform-tiny`` (and any config shipped in ``slipform_plugin/model_configs``) known."""
    import open_clip.factory as factory

    path = model_config_dir()
    if str(path) not in {str(p) for p in factory._MODEL_CONFIG_PATHS}:
        factory.add_model_config(path)


def _patch_open_clip(module) -> None:
    version = openclip_version()
    if not openclip_supported(version):
        sys.stderr.write(f"slipform: warning: {unsupported_message(version)}; the plugin stays inactive\n")
        return
    if not getattr(module.create_loss, "_slipform_wrapped", False):
        module.create_loss = wrap_create_loss(module.create_loss)
    factory = module.factory
    if not getattr(factory.create_loss, "_slipform_wrapped", False):
        factory.create_loss = module.create_loss
    register_model_configs()


def _patch_open_clip_model(module) -> None:
    if not openclip_supported():
        return
    for name in ("CLIP", "CustomTextCLIP"):
        cls = getattr(module, name, None)
        if cls is not None and not getattr(cls.forward, "_slipform_wrapped", False):
            cls.forward = wrap_model_forward(cls.forward)


def _patch_params(module) -> None:
    # Always add the flags (so a Slipform flag on an unsupported OpenCLIP gives a clear error, not an abbreviation).
    if not getattr(module.parse_args, "_slipform_wrapped", False):
        module.parse_args = wrap_parse_args(module.parse_args)
        module.parse_args._slipform_wrapped = True


def _patch_data(module) -> None:
    if not openclip_supported():
        return
    if not getattr(module.get_wds_dataset, "_slipform_wrapped", False):
        module.get_wds_dataset = wrap_get_wds_dataset(module.get_wds_dataset)
        module.get_wds_dataset._slipform_wrapped = True


def _patch_train(module) -> None:
    if not openclip_supported():
        return
    if not getattr(module.train_one_epoch, "_slipform_wrapped", False):
        module.train_one_epoch = wrap_train_one_epoch(module.train_one_epoch)


def _patch_distributed(module) -> None:
    if not openclip_supported():
        return
    install_cpu_ddp_fix()


PATCHERS = {
    "open_clip": _patch_open_clip,
    "open_clip.model": _patch_open_clip_model,
    "open_clip_train.params": _patch_params,
    "open_clip_train.data": _patch_data,
    "open_clip_train.train": _patch_train,
    "open_clip_train.distributed": _patch_distributed,
}


def explicit_patches_applied() -> bool:
    """True when ``slipform patch apply`` has put the hooks into OpenCLIP's source (checked once per process)."""
    global _EXPLICIT
    if _EXPLICIT is None:
        try:
            from importlib.util import find_spec

            spec = find_spec("open_clip_train")
            locations = list(spec.submodule_search_locations or []) if spec else []
            params = Path(locations[0]) / "params.py" if locations else None
            _EXPLICIT = bool(params and params.exists() and "_SLIPFORM_PATCHED" in params.read_text())
        except Exception:
            _EXPLICIT = False
    return _EXPLICIT


_EXPLICIT: bool | None = None


def patch_module(module) -> None:
    """Apply Slipform's patch for ``module`` unless the explicit diffs already put the hooks in OpenCLIP's source."""
    if getattr(module, "_SLIPFORM_PATCHED", False) or explicit_patches_applied():
        return
    patcher = PATCHERS.get(module.__name__)
    if patcher is not None:
        patcher(module)
