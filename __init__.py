"""flatminima: sharpness-aware training and sharpness measures for PyTorch Lightning.

One import name for everything the repository holds: ``flatminima.lightning_modules`` (the two-pass
step, the SAM family and its cheaper variants, the networks), ``flatminima.datamodules``,
``flatminima.callbacks`` (the sharpness, flatness and norm measures as Lightning callbacks),
``flatminima.studies`` (pools of runs and their statistics) and ``flatminima.cli`` (the command line,
also installed as the console script ``flatminima``). A project with packages of its own named
``callbacks`` or ``datamodules`` keeps them::

    from flatminima.callbacks import MinimumSharpness, GradientNormSharpness
    from flatminima.lightning_modules import Classifier, SAM

Importing this package imports nothing heavy (no torch, no Lightning). It installs one import hook,
for files written before the package had one name: a saved ``config.yaml`` or checkpoint that names
``lightning_modules.Classifier`` or ``callbacks.RunSummary`` loads, the old name resolving to the very
same module as ``flatminima.lightning_modules`` (with a ``FutureWarning``), unless a package of that
name exists outside flatminima: a project's own ``callbacks`` always wins.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"
__all__ = ["__version__"]

LEGACY_NAMES = ("lightning_modules", "datamodules", "callbacks", "studies", "cli_support", "formats")
"""The subpackages' former top-level import names (before ``flatminima.`` prefixed them)."""

_HERE = Path(__file__).resolve().parent


class _LegacyNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve ``callbacks.X`` to the module ``flatminima.callbacks.X`` itself (not a second copy).

    Only where the old name is not another package: a top-level ``callbacks`` found outside this package's
    folder (a project's own) is left to Python's import system, as are its submodules.
    """

    installed_by_flatminima = True  # recognised on sys.meta_path even from another copy of this file

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        top = name.partition(".")[0]
        if top not in LEGACY_NAMES:
            return None
        if name == top:
            if not _ours_or_absent(top):
                return None
        elif getattr(sys.modules.get(top), "__name__", None) != f"{__name__}.{top}":
            return None  # a submodule of a project's own package of that name
        return importlib.machinery.ModuleSpec(name, self, is_package=False)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if "." not in spec.name:
            warnings.warn(
                f"{spec.name!r} is flatminima's former import name: write 'flatminima.{spec.name}' "
                "(in configs: class_path: flatminima.<...>)",
                FutureWarning,
                stacklevel=2,
            )
        return importlib.import_module(f"{__name__}.{spec.name}")

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is ``flatminima``'s, already executed."""


def _ours_or_absent(top: str) -> bool:
    """Whether the top-level name ``top`` is nowhere on ``sys.path`` but here (or nowhere at all)."""
    spec = importlib.machinery.PathFinder.find_spec(top)
    if spec is None:
        return True
    places = [spec.origin, *(spec.submodule_search_locations or [])]
    return any(p and Path(p).resolve().is_relative_to(_HERE) for p in places)


# Installed once, by the module named flatminima (pytest also imports this file as its rootdir's package).
if __name__ == "flatminima" and not any(getattr(f, "installed_by_flatminima", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _LegacyNames())
