"""flatminima command line: ``python cli.py fit|validate|test|predict`` (LightningCLI) and ``study run|analyze``.

**Composition.** ``python cli.py fit`` alone trains the embedded default, GSAM on moons
(``configs/experiments/moons_gsam.yaml``); ``--config`` preset files layer on it, a whole-run config replaces
it, ``--key value`` overrides apply last, ``--print_config`` shows the result. The rule: ``docs/cli.md``
(in code: :mod:`flatminima.cli_support.compose`).

**Runs and folders.** A run logs to ``logs/<name>/version_<n>/`` (TensorBoard events, ``config.yaml``,
``checkpoints/``), ``<name>`` being the base's name followed by ``+<stem>`` of each file that changed it
(``moons_gsam+adam+sam``), or ``--name``. ``validate``/``test``/``predict`` need ``--ckpt_path`` and
log into the folder of the run that saved it; ``fit --ckpt_path`` resumes into that folder, continuing
its curves. A logger, ``save_dir``, ``name``, ``version`` or ``default_root_dir`` given on the command
line or in a preset is honoured exactly. ``--trainer.logger false`` writes checkpoints under
``logs/<name>/version_<n>/``, never into the working directory.

**Errors.** A config error is one line, ``error: <key>: ...`` with what was given, what is accepted and
a close match, exit code 2. From the command line, an error raised once the run started is one
``error:`` line (exit code 1); ``--verbose_errors`` or ``FLATMINIMA_DEBUG=1`` shows the parser's full
output and tracebacks. In Python, :func:`main` raises those exceptions as they are.

**Output.** A progress bar on a terminal, one line per epoch otherwise (:class:`flatminima.callbacks.EpochLines`);
warnings nobody can act on are silenced for the call; a final table lists train/val/test and
``sharpness/*`` values; TensorBoard's HParams tab gets each run's readable hyperparameters.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CONFIG",
    "EVALUATIONS",
    "LOG_ROOT",
    "ROOT",
    "TRAINER_DEFAULTS",
    "FlatMinimaCLI",
    "FlatMinimaParser",
    "entry",
    "main",
    "run",
]


def use_this_checkout() -> None:
    """Make the folder of this file the package ``flatminima`` (``python cli.py`` from a clone).

    A clone is the package itself (its root holds ``__init__.py``); ``pip install -e .`` maps the name to
    it, and without an install, or with another copy installed, running this file still uses this clone.
    """
    root = Path(__file__).resolve().parent
    current = sys.modules.get("flatminima")
    if current is not None and Path(current.__file__).resolve().parent == root:
        return
    spec = importlib.util.spec_from_file_location(
        "flatminima", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["flatminima"] = module
    spec.loader.exec_module(module)


def run(argv: list[str] | None = None) -> int:
    """The command line (``python cli.py ...``, the console script ``flatminima ...``): exit code.

    ``study ...`` goes to :mod:`flatminima.studies.cli` without importing torch or Lightning; everything
    else to LightningCLI through :func:`flatminima.cli_support.app.entry`.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["study"]:
        from flatminima.studies.cli import main as study_main

        return study_main(words[1:])
    from flatminima.cli_support.app import entry as run_cli

    return run_cli(argv)  # None: LightningCLI reads sys.argv itself, as from the command line


def __getattr__(name: str) -> Any:
    """The CLI's names (``main``, ``FlatMinimaCLI``, ...) from :mod:`flatminima.cli_support.app`, imported on use."""
    if name in __all__:
        from flatminima.cli_support import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ in ("__main__", "__mp_main__", "cli"):  # a script, a forkserver's copy of one, `import cli`
    use_this_checkout()
if __name__ == "__main__":
    sys.exit(run())
