"""Helpers of ``cli.py``: the CLI itself, how configs compose and runs are named, one-line errors, and the run's output.

- :mod:`flatminima.cli_support.app`: the LightningCLI subclass and the run entry (:func:`flatminima.cli_support.app.main`), which
  ``cli.py`` (the entry point) and a study worker (:mod:`flatminima.studies.runner`) import;
- :mod:`flatminima.cli_support.compose`: which base a run sits on (the embedded default, an experiment, or the run
  folder of ``--ckpt_path``), how preset files layer on it, and the run's name (no Lightning import);
- :mod:`flatminima.cli_support.errors`: jsonargparse's and run-time errors as one line with a suggestion;
- :mod:`flatminima.cli_support.quiet`, :mod:`flatminima.cli_support.report`, :mod:`flatminima.cli_support.hparams`, :mod:`flatminima.cli_support.help`:
  quiet warnings, the final table, TensorBoard's HParams, the ``--help`` text.

Importing this package imports nothing else; :mod:`flatminima.cli_support.app` imports Lightning.
"""
