"""Load an OpenCLIP model for evaluation, refusing checkpoints that do not match the requested architecture.

Accepted ``pretrained`` values: ``None`` (random weights, for smoke tests), a local file (an OpenCLIP training
checkpoint with a ``state_dict`` key and ``module.`` prefixes, a bare state dict, an OpenAI-format state dict,
or ``.safetensors``), or a pretrained tag OpenCLIP knows (downloaded by OpenCLIP, so it needs network access).

Detected mismatches raise :class:`CheckpointMismatchError` instead of scoring a broken model:

- missing or unexpected keys, or tensors of another shape (a strict load, after OpenCLIP's own conversions);
- QuickGELU: the checkpoint was trained with QuickGELU and the model config uses GELU, or the reverse. The
  training activation is known for OpenAI-format state dicts (always QuickGELU), for OpenCLIP pretrained tags
  (their ``quick_gelu`` entry) and for ``open_clip_train`` runs, whose ``params.txt`` (two directories above
  ``checkpoints/epoch_N.pt``) names the model and ``force_quick_gelu``. QuickGELU and GELU models have the
  same parameters, so no strict load can catch this one.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the requested model (keys, shapes or activation)."""


@dataclass
class LoadedModel:
    """A model in eval mode with its validation transform and tokenizer, plus how it was loaded."""

    model: Any
    preprocess: Any
    tokenizer: Any
    name: str
    pretrained: str | None
    quick_gelu: bool
    notes: list[str] = field(default_factory=list)


def _config_quick_gelu(model_name: str) -> bool | None:
    import open_clip

    config = open_clip.get_model_config(model_name)
    return None if config is None else bool(config.get("quick_gelu", False))


def read_train_params(checkpoint: Path) -> dict[str, str] | None:
    """``params.txt`` of the ``open_clip_train`` run that wrote ``checkpoint`` (``LOGS/NAME/checkpoints/x.pt``)."""
    params = checkpoint.absolute().parent.parent / "params.txt"
    if checkpoint.absolute().parent.name != "checkpoints" or not params.is_file():
        return None
    out: dict[str, str] = {}
    for line in params.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _trained_quick_gelu(checkpoint: Path, raw_keys: set[str], notes: list[str]) -> bool | None:
    """The activation the checkpoint was trained with, when it can be known; ``None`` otherwise."""
    if any(k in raw_keys for k in _OPENAI_KEYS):
        notes.append("OpenAI-format state dict: trained with QuickGELU")
        return True
    params = read_train_params(checkpoint)
    if params is None or "model" not in params:
        return None
    trained_model = params["model"]
    forced = params.get("force_quick_gelu", "False") == "True"
    config_quick = _config_quick_gelu(trained_model)
    notes.append(f"training run params.txt: model={trained_model}, force_quick_gelu={forced}")
    if config_quick is None:
        return True if forced else None
    return forced or config_quick


def _raw_checkpoint(path: Path) -> tuple[dict[str, Any], set[str], bool]:
    """The checkpoint's state dict, its raw keys (before OpenCLIP strips ``module.``) and whether the file
    is a TorchScript archive."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
        return state, set(state), False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unreadable file or a pickle that is not plain tensors
        try:
            obj = torch.jit.load(str(path), map_location="cpu")
        except Exception:
            raise CheckpointMismatchError(
                f"--pretrained {path}: cannot read it as a weights-only torch checkpoint ({err})"
            ) from err
    is_jit = isinstance(obj, torch.jit.ScriptModule)
    if is_jit:
        obj = dict(obj.state_dict())
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointMismatchError(f"--pretrained {path}: expected a state dict, got {type(obj).__name__}")
    return obj, set(obj), is_jit


def _load_weights(model: Any, path: Path, state: dict[str, Any], raw_keys: set[str], is_jit: bool) -> Any:
    """OpenCLIP's ``load_checkpoint`` (conversions included) with ``strict=False``; returns incompatible keys.

    OpenAI-format files (a TorchScript archive, or a state dict with ``input_resolution`` & co.) are first
    rewritten without those metadata entries into a temporary file, since OpenCLIP only drops them for
    TorchScript archives it can read with ``weights_only``.
    """
    import tempfile

    import open_clip
    import torch

    if not is_jit and not any(k in raw_keys for k in _OPENAI_KEYS):
        return open_clip.load_checkpoint(model, str(path), strict=False)
    clean = {k: v for k, v in state.items() if k not in _OPENAI_KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "state_dict.pt"
        torch.save(clean, tmp_path)
        return open_clip.load_checkpoint(model, str(tmp_path), strict=False)


def _summarise(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def load_model(
    model_name: str,
    pretrained: str | None,
    device: str = "cpu",
    force_quick_gelu: bool = False,
) -> LoadedModel:
    """Create ``model_name`` and load ``pretrained`` (file, tag or ``None``), refusing detectable mismatches.

    Raises :class:`CheckpointMismatchError` on a mismatch and ``ValueError`` for an unknown model name or a
    ``pretrained`` value that is neither a file nor a tag.
    """
    import open_clip
    import torch
    from open_clip.factory import parse_model_name

    notes: list[str] = []
    schema, _ = parse_model_name(model_name)
    if schema is None and model_name not in open_clip.list_models():
        raise ValueError(
            f"--model: unknown OpenCLIP model {model_name!r}; expected one of open_clip.list_models() "
            f"(e.g. {', '.join(open_clip.list_models()[:5])}, ...)"
        )
    config_quick = _config_quick_gelu(model_name) if schema is None else None
    model_quick = bool(force_quick_gelu or config_quick)
    path = Path(pretrained) if pretrained else None

    if pretrained and path is not None and path.is_file():
        state, raw_keys, is_jit = _raw_checkpoint(path)
        trained_quick = _trained_quick_gelu(path, raw_keys, notes)
        if trained_quick is not None and trained_quick != model_quick:
            raise CheckpointMismatchError(
                f"--pretrained {path} was trained with {'QuickGELU' if trained_quick else 'GELU'} but --model "
                f"{model_name} uses {'QuickGELU' if model_quick else 'GELU'}: the weights would load and score "
                f"wrongly. Use the matching config (e.g. a '-quickgelu' model name) or "
                f"{'--force-quick-gelu' if trained_quick else 'a config without quick_gelu'}."
            )
        params = read_train_params(path)
        if params and params.get("model") not in (None, model_name):
            notes.append(f"checkpoint was trained as --model {params['model']}, evaluated as {model_name}")
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None, device="cpu", force_quick_gelu=force_quick_gelu
        )
        try:
            incompatible = _load_weights(model, path, state, raw_keys, is_jit)
        except RuntimeError as err:  # size mismatches raise even with strict=False
            raise CheckpointMismatchError(
                f"--pretrained {path} does not fit --model {model_name}: {str(err).splitlines()[0]} "
                f"{' '.join(line.strip() for line in str(err).splitlines()[1:4])}"
            ) from err
        missing, unexpected = list(incompatible.missing_keys), list(incompatible.unexpected_keys)
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"--pretrained {path} does not fit --model {model_name}: missing keys {_summarise(missing)}, "
                f"unexpected keys {_summarise(unexpected)}"
            )
        del state
    elif pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise ValueError(
            f"--pretrained: expected a checkpoint file or a pretrained tag, got {pretrained!r} (not a file)"
        )
    elif pretrained:
        if schema is not None:
            raise ValueError(f"--pretrained: a tag cannot be combined with --model {model_name} (its weights are set)")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(
                f"--pretrained: {pretrained!r} is neither a file nor a pretrained tag of {model_name}; "
                f"expected a checkpoint path or one of {tags or 'no tags'}"
            )
        tag_quick = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
        if tag_quick != model_quick:
            raise CheckpointMismatchError(
                f"--pretrained tag {pretrained!r} was trained with {'QuickGELU' if tag_quick else 'GELU'} but "
                f"--model {model_name} uses {'QuickGELU' if model_quick else 'GELU'}; use the matching config"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device="cpu", force_quick_gelu=force_quick_gelu
            )
    else:
        notes.append("no --pretrained: randomly initialised weights")
        logging.warning("slipform eval: no --pretrained given, evaluating randomly initialised weights")
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None, device="cpu", force_quick_gelu=force_quick_gelu
        )
    model = model.to(torch.device(device)).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return LoadedModel(model, preprocess, tokenizer, model_name, pretrained, model_quick, notes)
