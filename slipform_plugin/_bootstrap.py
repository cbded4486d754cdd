"""Interpreter-start bootstrap, imported by ``slipform_plugin.pth`` in site-packages.

It costs one small import and one entry on ``sys.meta_path``: no torch, no OpenCLIP. When (and only when) a
process imports one of OpenCLIP's modules listed in ``integration.PATCHERS``, the module executes normally and
Slipform's patch is applied right after, before any ``from ... import`` in OpenCLIP's ``main`` can read the
patched names. torchrun workers and DataLoader workers are ordinary Python processes (or forks of them) and
get the same hook.

The bootstrap never breaks an unrelated process: every failure in it is swallowed with a one-line warning,
and ``SLIPFORM_DISABLE=1`` turns it off entirely.
"""

from __future__ import annotations

import contextlib
import os
import sys

_TARGETS = frozenset(
    {
        "open_clip",
        "open_clip.model",
        "open_clip_train.params",
        "open_clip_train.data",
        "open_clip_train.train",
        "open_clip_train.distributed",
    }
)


def _warn(message: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(f"slipform: {message}\n")


class _PatchingLoader:
    """Delegates to the real loader, then lets Slipform patch the freshly executed module."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            from slipform_plugin.integration import patch_module

            patch_module(module)
        except Exception as error:  # never break the host process because of the plugin
            _warn(f"could not patch {module.__name__} ({type(error).__name__}: {error}); Slipform is inactive there")

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


def _is_slipform_checkout(entry: str) -> bool:
    """Whether ``entry`` (a ``sys.path`` item; ``""`` is the working directory) is a Slipform source tree."""
    root = os.path.abspath(entry or os.curdir)
    return os.path.isfile(os.path.join(root, "kernels", "triton_cement.py")) and os.path.isdir(
        os.path.join(root, "slipform_plugin")
    )


def _installed_kernels_spec():
    """The spec of an installed top-level ``kernels`` outside every Slipform checkout on ``sys.path``, or None.

    A checkout's ``kernels/`` is installed as ``slipform_plugin.kernels``; the top-level name belongs to an
    unrelated PyPI package (Hugging Face's ``kernels``, which transformers imports). Python run from a
    checkout (``torchrun -m open_clip_train.main`` in the repository root) has the checkout first on
    ``sys.path``, where ``kernels/`` would shadow that package. None when no checkout is on ``sys.path`` or
    no other ``kernels`` is installed: the import then resolves as it always would.
    """
    try:
        from importlib.machinery import PathFinder

        entries = [entry for entry in sys.path if isinstance(entry, str)]
        others = [entry for entry in entries if not _is_slipform_checkout(entry)]
        if len(others) == len(entries):
            return None
        return PathFinder.find_spec("kernels", others)
    except Exception:
        return None


class SlipformFinder:
    """A ``sys.meta_path`` finder that only wraps the loaders of OpenCLIP's hooked modules (and keeps a source
    checkout's ``kernels/`` from shadowing an installed top-level ``kernels``)."""

    _busy = False

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None):
        if fullname == "kernels" and path is None:
            return _installed_kernels_spec()
        if fullname not in _TARGETS or cls._busy:
            return None
        cls._busy = True
        try:
            from importlib.machinery import PathFinder

            for finder in sys.meta_path:
                if finder is cls:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            else:
                spec = PathFinder.find_spec(fullname, path)
        except Exception:
            return None
        finally:
            cls._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if os.environ.get("SLIPFORM_DISABLE", "").strip() not in ("", "0"):
        return
    if not any(getattr(finder, "__name__", "") == "SlipformFinder" for finder in sys.meta_path):
        sys.meta_path.insert(0, SlipformFinder)
    # Modules imported before the hook existed (rare: only if the .pth ran late) are patched now.
    for name in _TARGETS & set(sys.modules):
        try:
            from slipform_plugin.integration import patch_module

            patch_module(sys.modules[name])
        except Exception as error:
            _warn(f"could not patch {name} ({type(error).__name__}: {error})")


try:
    install()
except Exception as _error:  # pragma: no cover - defensive: a .pth must never fail
    _warn(f"bootstrap failed ({type(_error).__name__}: {_error})")
