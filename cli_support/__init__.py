"""Helpers of ``cli.py``: the CLI itself, how configs compose and runs are named, one-line errors, and the run's output.

- :mod:`cli_support.app`: the LightningCLI subclass and the run entry (:func:`cli_support.app.main`), which
  ``cli.py`` (the entry point) and a study worker (:mod:`studies.runner`) import;
- :mod:`cli_support.compose`: which base a run sits on (the embedded default, an experiment, or the run
  folder of ``--ckpt_path``), how preset files layer on it, and the run's name (no Lightning import);
- :mod:`cli_support.errors`: jsonargparse's and run-time errors as one line with a suggestion;
- :mod:`cli_support.quiet`, :mod:`cli_support.report`, :mod:`cli_support.hparams`, :mod:`cli_support.help`:
  quiet warnings, the final table, TensorBoard's HParams, the ``--help`` text.

Importing this package imports nothing else; :mod:`cli_support.app` imports Lightning.
"""
