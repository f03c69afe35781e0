"""File formats that training and analysis share; the standard library only, the bottom layer of the project.

- :mod:`flatminima.formats.summary`: a run's ``summary.json`` (the :class:`~flatminima.formats.summary.Summary` dictionary, how
  non-finite numbers are written) and atomic JSON files. The :class:`~flatminima.callbacks.RunSummary` callback writes
  it and :mod:`studies` reads it, so ``study analyze`` of a pool needs neither torch nor Lightning.
"""
