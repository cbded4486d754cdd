"""The ``slipform`` console script: one subcommand per module, each exposing ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module with ``main(argv)``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-shards": ("slipform_plugin.synthetic.shards", "write synthetic WebDataset shards of rendered scenes"),
    "patch": ("slipform_plugin.patching", "check/apply/revert the explicit OpenCLIP patches in patches/"),
    "bench-loss": ("slipform_plugin.kernels.bench", "benchmark loss memory and time against batch size"),
    "plant": ("slipform_plugin.concreteplant.offline", "plant hard negatives into WebDataset shards offline"),
    "eval-plant": ("slipform_plugin.concreteplant.evaluate", "ConcretePlant quality report on SugarCrepe"),
    "eval": ("slipform_plugin.evaluation.cli", "evaluate a model on compositional benchmarks"),
    "experiment": ("slipform_plugin.evaluation.experiment", "the synthetic ablation experiment"),
    "controls": ("slipform_plugin.evaluation.controls", "what the experiment's image tower can learn in its budget"),
    "compare": ("slipform_plugin.evaluation.compare", "pair configurations of separate experiment runs by seed"),
}


def _usage() -> str:
    lines = ["usage: slipform <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``slipform <command> ...`` to the command's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"slipform: unknown command {command!r}; expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
