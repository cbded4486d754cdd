"""Compositional evaluation of OpenCLIP models (``slipform eval``).

- :func:`~slipform_plugin.evaluation.model.load_model` loads a model and checkpoint, refusing mismatches
  (:class:`~slipform_plugin.evaluation.model.CheckpointMismatchError`);
- :mod:`~slipform_plugin.evaluation.benchmarks` reads SugarCrepe, VALSE and ARO in their released formats;
- :mod:`~slipform_plugin.evaluation.synthetic` scores the synthetic benchmark's test shards;
- :mod:`~slipform_plugin.evaluation.cli` is the command line.

Importing this package loads neither torch nor OpenCLIP.
"""
