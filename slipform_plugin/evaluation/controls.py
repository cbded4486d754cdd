"""``slipform controls``: what the experiment's image tower can learn in the experiment's step budget.

The experiment's perception probe shows the image tower of every configuration encoding colour but hardly
shape (README, Evidence). These controls ask whether that is the tower's capacity, the step budget, or the
training signal, with the experiment's model, optimizer settings and number of steps, on the subject of the
experiment world's scenes rendered alone (the probe's images):

- ``supervised``: the image tower with one linear head per attribute (shape, colour, size, material, texture),
  trained with the sum of their cross-entropies. A high accuracy means the tower *can* learn the attribute
  in this many steps when told what it is.
- ``contrastive``: OpenCLIP's CLIP loss on the same images with their noun phrases ("two small red matte
  striped circles"), image and text towers from scratch, scored with the experiment's own perception probe
  and zero-shot shape classification. It is the experiment's configuration (a) with one group per image.

Both use AdamW as ``open_clip_train.main`` builds it (weight decay 0.2 except on gains, biases and the logit
scale; betas and eps of ``get_default_params`` for the model), a linear warm-up and a cosine decay to zero,
and batch 64, one fresh batch per step. Everything runs in this process,
in a few tens of seconds per control on two CPU cores.

Example::

    slipform controls --out runs/controls            # 128 steps of 64, the default experiment's budget
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from slipform_plugin._argtypes import positive_int
from slipform_plugin.synthetic.scene import WORLDS, get_world

logger = logging.getLogger("slipform")

#: the attributes the supervised control learns, each with its own linear head
SUPERVISED_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "material", "texture")
CONTROLS: tuple[str, ...] = ("supervised", "contrastive")


def subject_items(count: int, split: str, seed: int, world_name: str, image_size: int) -> list[dict[str, Any]]:
    """``count`` subjects of ``world_name`` scenes of ``split``, each ``{"image", "phrase", <attributes>}``.

    ``image`` is the ``uint8 [image_size, image_size, 3]`` rendering of the subject group's objects alone, at the
    positions the scene's layout gave them; ``phrase`` is the group's noun phrase as the caption states it.
    """
    from slipform_plugin.synthetic.render import render_objects
    from slipform_plugin.synthetic.scene import HeldOut, LayoutError, layout_scene, sample_scene

    world = get_world(world_name)
    heldout = HeldOut.from_seed(0)
    rng = random.Random(f"slipform-controls-{split}-{seed}")
    items: list[dict[str, Any]] = []
    while len(items) < count:
        scene = sample_scene(rng, split, heldout, world)
        try:
            scene = layout_scene(scene, rng, image_size, world)
        except LayoutError:
            continue
        subject = scene.subject
        objects = [o for o in scene.objects if o.role == "subject"]
        item = {"image": render_objects(objects, image_size), "phrase": subject.phrase()}
        item.update({attribute: str(getattr(subject, attribute)) for attribute in SUPERVISED_ATTRIBUTES})
        items.append(item)
    return items


def _to_tensor(items: list[dict[str, Any]]):
    """``[N, 3, H, W]`` float images normalised with OpenAI CLIP's mean and std (OpenCLIP's preprocessing)."""
    import numpy as np
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    images = torch.from_numpy(np.stack([item["image"] for item in items])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _optimizer(named_parameters, model_name: str, lr: float, steps: int, warmup: int):
    """AdamW and a warm-up + cosine schedule as ``open_clip_train.main`` builds them for ``model_name``.

    Weight decay 0.2 (``--wd``'s default) on every parameter but gains, biases, norms and the logit scale; betas
    and eps from ``open_clip_train.params.get_default_params`` for the model's name.
    """
    import torch
    from open_clip_train.params import get_default_params

    defaults = get_default_params(model_name)

    def exclude(name: str, parameter) -> bool:
        return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(defaults["beta1"], defaults["beta2"]), eps=defaults["eps"])

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(loss_of_rows, optimizer, schedule, steps: int, batch: int, after_step=None):
    """``steps`` optimizer steps on the loss of rows ``[step * batch, (step + 1) * batch)``; returns the last loss."""
    loss = None
    for step in range(steps):
        loss = loss_of_rows(slice(step * batch, (step + 1) * batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step()
    return loss


def supervised_control(
    model: Any,
    train: list[dict[str, Any]],
    test: list[dict[str, Any]],
    steps: int,
    batch: int,
    lr: float,
    warmup: int,
    model_name: str = "slipform-micro-cnn",
) -> dict[str, Any]:
    """Train ``model.visual`` with a linear head per attribute for ``steps`` batches; test accuracy per attribute.

    Args:
        model: an OpenCLIP model; only its image tower is used (and trained).
        train: at least ``steps * batch`` items of :func:`subject_items`; test: the scored items.
    Returns:
        ``{attribute: {"accuracy", "majority", "classes"}}`` on ``test`` (``majority``: the most common value's share).
    """
    import torch
    import torch.nn.functional as F

    visual = model.visual
    values = {a: sorted({item[a] for item in train + test}) for a in SUPERVISED_ATTRIBUTES}
    values = {a: v for a, v in values.items() if len(v) > 1}
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(visual.output_dim, len(v)) for a, v in values.items()})
    labels = {a: torch.tensor([v.index(item[a]) for item in train]) for a, v in values.items()}
    images = _to_tensor(train)
    named = [*visual.named_parameters(), *(("head." + n, p) for n, p in heads.named_parameters())]
    optimizer, schedule = _optimizer(named, model_name, lr, steps, warmup)

    def loss_of_rows(rows: slice):
        features = visual(images[rows])
        return sum(F.cross_entropy(heads[a](features), labels[a][rows]) for a in values)

    visual.train()
    _train(loss_of_rows, optimizer, schedule, steps, batch)
    visual.eval()
    with torch.no_grad():
        features = visual(_to_tensor(test))
    result: dict[str, Any] = {}
    for attribute, names in values.items():
        truth = torch.tensor([names.index(item[attribute]) for item in test])
        predicted = heads[attribute](features).argmax(1)
        result[attribute] = {
            "accuracy": float((predicted == truth).float().mean()),
            "majority": float(torch.bincount(truth).max()) / len(test),
            "classes": len(names),
        }
    return result


def contrastive_control(
    model: Any,
    tokenizer: Any,
    train: list[dict[str, Any]],
    test: list[dict[str, Any]],
    steps: int,
    batch: int,
    lr: float,
    warmup: int,
    world_name: str,
    model_name: str = "slipform-micro-cnn",
) -> dict[str, Any]:
    """CLIP loss on subject images and their noun phrases for ``steps`` batches, then the experiment's probes.

    Returns:
        ``{"perception": perception_probe(...), "zero_shot_shape": accuracy, "final_loss": loss}`` on ``test``.
    """
    import numpy as np
    import torch
    from open_clip import ClipLoss

    from slipform_plugin.evaluation.synthetic import _class_embeddings, perception_probe
    from slipform_plugin.synthetic.scene import SHAPES

    images = _to_tensor(train)
    texts = tokenizer([item["phrase"] for item in train])
    loss_fn = ClipLoss()
    optimizer, schedule = _optimizer(model.named_parameters(), model_name, lr, steps, warmup)

    def loss_of_rows(rows: slice):
        image_features = model.encode_image(images[rows], normalize=True)
        text_features = model.encode_text(texts[rows], normalize=True)
        return loss_fn(image_features, text_features, model.logit_scale.exp())

    def clamp_logit_scale() -> None:  # as open_clip_train's train_one_epoch does after every step
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    model.train()
    loss = _train(loss_of_rows, optimizer, schedule, steps, batch, clamp_logit_scale)
    model.eval()

    class _Texts:  # the Encoder.texts interface _class_embeddings needs
        def texts(self, phrases: list[str]):
            with torch.no_grad():
                return model.encode_text(tokenizer(phrases), normalize=True)

    with torch.no_grad():
        features = model.encode_image(_to_tensor(test), normalize=True)
    shapes, class_embeddings = _class_embeddings(_Texts(), "shape", get_world(world_name))
    predicted = (features @ class_embeddings.T).argmax(1).numpy()
    truth = np.array([shapes.index(item["shape"]) for item in test])
    assert shapes == list(SHAPES)
    return {
        "perception": perception_probe(features.numpy(), test),
        "zero_shot_shape": float((predicted == truth).mean()),
        "final_loss": float(loss.detach()),
    }


def run_controls(
    out: Path,
    steps: int = 128,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 20,
    test_items: int = 1000,
    seed: int = 0,
    world: str = "default",
    model_name: str = "slipform-micro-cnn",
    controls: tuple[str, ...] = CONTROLS,
    threads: int = 2,
) -> dict[str, Any]:
    """Run ``controls``; writes ``out/controls.json`` and ``out/controls.md`` and returns the JSON's content."""
    import open_clip
    import torch

    from slipform_plugin.integration import register_model_configs

    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    torch.set_num_threads(threads)
    register_model_configs()
    image_size = int(open_clip.get_model_config(model_name)["vision_cfg"]["image_size"])
    started = time.perf_counter()
    train = subject_items(steps * batch, "train", seed, world, image_size)
    test = subject_items(test_items, "test", seed, world, image_size)
    data_seconds = time.perf_counter() - started
    results: dict[str, Any] = {
        "settings": {
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "warmup": warmup,
            "test_items": test_items,
            "seed": seed,
            "world": world,
            "model": model_name,
            "threads": threads,
        },
        "data_seconds": round(data_seconds, 2),
    }
    for control in controls:
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name)
        started = time.perf_counter()
        if control == "supervised":
            result = supervised_control(model, train, test, steps, batch, lr, warmup, model_name)
        else:
            tokenizer = open_clip.get_tokenizer(model_name)
            result = contrastive_control(model, tokenizer, train, test, steps, batch, lr, warmup, world, model_name)
        result["seconds"] = round(time.perf_counter() - started, 2)
        results[control] = result
        logger.info("control %s: %s", control, _summary(control, result))
    out.mkdir(parents=True, exist_ok=True)
    (out / "controls.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "controls.md").write_text(markdown_table(results))
    return results


def _summary(control: str, result: dict[str, Any]) -> str:
    accuracies = result["perception"] if control == "contrastive" else result
    return ", ".join(f"{a} {accuracies[a]['accuracy']:.3f}" for a in SUPERVISED_ATTRIBUTES if a in accuracies)


def _percent(score: dict[str, Any]) -> str:
    return f"{100 * score['accuracy']:.1f} ({100 * score['majority']:.0f})"


def markdown_table(results: dict[str, Any]) -> str:
    """The controls as one Markdown table: accuracy per attribute (percent), majority share in brackets."""
    present = [results["supervised"]] if "supervised" in results else []
    present += [results["contrastive"]["perception"]] if "contrastive" in results else []
    attributes = [a for a in SUPERVISED_ATTRIBUTES if any(a in accuracies for accuracies in present)]
    rows = ["| control | " + " | ".join(attributes) + " | zero-shot shape | s |", "|---" * (len(attributes) + 3) + "|"]
    for control in CONTROLS:
        if control not in results:
            continue
        result = results[control]
        accuracies = result["perception"] if control == "contrastive" else result
        cells = [
            f"{100 * accuracies[a]['accuracy']:.1f} ({100 * accuracies[a]['majority']:.0f})"
            if a in accuracies
            else "n/a"
            for a in attributes
        ]
        zero_shot = f"{100 * result['zero_shot_shape']:.1f}" if "zero_shot_shape" in result else ""
        rows.append(f"| {control} | " + " | ".join(cells) + f" | {zero_shot} | {result['seconds']:.0f} |")
    settings = results["settings"]
    note = (
        f"\n{settings['steps']} steps of batch {settings['batch']}, lr {settings['lr']}, model {settings['model']}, "
        f"world {settings['world']}, {settings['test_items']} test subjects; accuracy (majority share) in percent.\n"
    )
    return "\n".join(rows) + "\n" + note


def build_parser() -> argparse.ArgumentParser:
    """The ``slipform controls`` argument parser."""
    p = argparse.ArgumentParser(
        prog="slipform controls",
        description="Supervised and contrastive perception controls for the experiment's image tower.",
        allow_abbrev=False,
    )
    p.add_argument("--out", default="runs/controls", help="output directory (default runs/controls)")
    p.add_argument(
        "--steps", type=positive_int, default=128, help="training steps (default 128: the experiment's 8,192 / 64)"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps (default 20)")
    p.add_argument("--test-items", type=positive_int, default=1000, help="test subjects (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation (default 0)")
    p.add_argument("--world", choices=tuple(WORLDS), default="default", help="synthetic world (default: default)")
    p.add_argument("--model", default="slipform-micro-cnn", help="OpenCLIP model config (default slipform-micro-cnn)")
    p.add_argument(
        "--controls",
        type=lambda text: tuple(_control_list(text)),
        default=CONTROLS,
        help="comma-separated subset of supervised,contrastive (default both)",
    )
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    return p


def _control_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in CONTROLS for name in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(CONTROLS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slipform controls``."""
    args = build_parser().parse_args(argv)
    if args.warmup < 0:
        build_parser().error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run_controls(
        Path(args.out), args.steps, args.batch_size, args.lr, args.warmup, args.test_items, args.seed, args.world,
        args.model, args.controls, args.threads,
    )  # fmt: skip
    print(markdown_table(results))
    print(f"wrote {Path(args.out) / 'controls.json'} and {Path(args.out) / 'controls.md'}")
    return 0
