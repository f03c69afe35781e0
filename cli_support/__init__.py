"""Helpers of ``cli.py``: how configs compose and runs are named, one-line errors, and the run's output.

- :mod:`cli_support.compose`: which base a run sits on (the embedded default, an experiment, or the run
  folder of ``--ckpt_path``), how preset files layer on it, and the run's name (no Lightning import);
- :mod:`cli_support.errors`: jsonargparse's and run-time errors as one line with a suggestion;
- :mod:`cli_support.output`: quiet warnings, the final table, TensorBoard's HParams, the ``--help`` text.
"""
