"""flatminima command line: ``python cli.py fit|validate|test|predict --config ...``.

With no ``--config``, ``fit`` trains the embedded default: seed 003's moons study with GSAM
(``configs/experiments/moons_gsam.yaml``). Configs compose: later files override earlier ones, e.g.
``--config configs/data/moons.yaml --config configs/model/mlp.yaml --config configs/optim/adam.yaml
--config configs/minimizer/sam.yaml``. ``--print_config`` shows the merged result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_modules import TwoPassModule

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "moons_gsam.yaml"
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "flatminima", "default_hp_metric": False},
    },
}


class FlatMinimaCLI(LightningCLI):
    """LightningCLI whose model is a :class:`~lightning_modules.TwoPassModule` task."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def with_default_config(args: list[str]) -> list[str]:
    """Prepend the embedded default config to ``fit`` when the user passed no ``--config``.

    Only then: a default underneath user configs would silently supply keys they did not set.
    """
    if not args or args[0] != "fit":
        return args
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in args[1:]):
        return args
    return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]


def main(args: list[str] | None = None) -> FlatMinimaCLI:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``)."""
    args = with_default_config(list(sys.argv[1:] if args is None else args))
    return FlatMinimaCLI(
        TwoPassModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
