"""Studies: pools of runs over a grid of configs, one summary per run, and their statistics.

``python cli.py study run STUDY.yaml`` expands a study file (:mod:`flatminima.studies.spec`) into runs, runs each through
the same LightningCLI path as ``cli.py fit`` on reused worker processes (:mod:`flatminima.studies.engines.local`) or
Ray Tune (:mod:`flatminima.studies.engines.ray`), and analyses the pool (:mod:`flatminima.studies.analysis`: Kendall τ with
bootstrap intervals, the granulated coefficient Ψ of Jiang et al. 2020, KS tests); ``python cli.py study
analyze DIR`` analyses any folder of ``runs/*/summary.json`` (format: :mod:`flatminima.formats.summary`). Several
processes, on one machine or several, may run one study folder at once (:mod:`flatminima.studies.shared`: each run is
claimed before it is trained). Importing this package imports neither torch nor Lightning (a worker
imports them when it trains).
"""
