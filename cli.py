"""flatminima command line: ``python cli.py fit|validate|test|predict --config ...`` (and ``study run|analyze``).

With no ``--config``, ``fit`` trains the embedded default: seed 003's moons study with GSAM
(``configs/experiments/moons_gsam.yaml``). Configs compose: later files override earlier ones, e.g.
``--config configs/data/moons.yaml --config configs/model/mlp.yaml --config configs/optim/adam.yaml
--config configs/minimizer/sam.yaml``. ``--print_config`` shows the merged result.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

if __name__ == "__main__" and sys.argv[1:2] == ["study"]:  # studies/cli.py: this process needs no Lightning
    from studies.cli import main as study_main

    sys.exit(study_main(sys.argv[2:]))

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
    """LightningCLI whose model is a :class:`~lightning_modules.TwoPassModule` task.

    A value that a class refuses (``ValueError``/``TypeError`` from its ``__init__``) ends the run
    before training with one line naming the config key, e.g.
    ``error: model.init_args.minimizer (lightning_modules.minimizers.SAM): Invalid rho: -0.1; ...``.
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            cause = _innermost(err)
            key, class_path = _locate(cause, self.config.get(self.subcommand) if self.subcommand else self.config)
            where = f"{key} ({class_path})" if key else "configuration"
            self.parser.exit(2, f"error: {where}: {cause}\n")

    def add_arguments_to_parser(self, parser) -> None:
        # The data's class count goes into the task (Classifier/NodeClassifier; Regressor lacks it and
        # data without num_classes skip the link). The net's input shape is set in the configs, not
        # linked: with Lightning 2.6 / jsonargparse 4.53, links into model.init_args.net.init_args.*
        # break load_from_checkpoint (a link to an argument the chosen net lacks is still written into
        # the saved hyperparameters; a net whose arguments are all linked fails to instantiate; links
        # applied on parse are left out of them). The data modules refuse a net whose in_channels,
        # image_size, in_features or dim disagrees with the data, naming the key to set.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="After fit, run the test loop on the final weights (when the data module has a test set).",
        )

    def after_fit(self) -> None:
        """Report the test metrics of the final weights (``--test_after_fit false`` to skip)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        datamodule = self.datamodule
        if not config.get("test_after_fit", False) or self.trainer.fast_dev_run:
            return
        if datamodule is None or type(datamodule).test_dataloader is pl.LightningDataModule.test_dataloader:
            return
        if self.trainer.interrupted:
            return
        self.trainer.test(self.model, datamodule=datamodule)


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _locate(err: BaseException, config) -> tuple[str, str]:
    """The config key and class path of the object whose ``__init__`` raised ``err``."""
    tb, cls = err.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
        tb = tb.tb_next
    if cls is None or config is None:
        return "", ""

    def search(node, prefix: str) -> tuple[str, str] | None:
        if isinstance(node, dict):
            class_path = node.get("class_path")
            if isinstance(class_path, str) and _resolves_to(class_path, cls):
                return prefix, class_path
            for k, v in node.items():
                found = search(v, f"{prefix}.{k}" if prefix else k)
                if found:
                    return found
        elif isinstance(node, list):
            for i, v in enumerate(node):
                found = search(v, f"{prefix}[{i}]")
                if found:
                    return found
        return None

    return search(config.as_dict(), "") or ("", f"{cls.__module__}.{cls.__qualname__}")


def _resolves_to(class_path: str, cls: type) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) is cls
    except (ImportError, AttributeError, ValueError):
        return False


def with_default_config(args: list[str]) -> list[str]:
    """Prepend the embedded default config to ``fit`` when the user passed no ``--config``.

    Only then: a default underneath user configs would silently supply keys they did not set.
    """
    if not args or args[0] != "fit":
        return args
    if any(a in ("-c", "--config") or a.startswith(("--config=", "-c=")) for a in args[1:]):
        return args
    return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]


def main(args: list[str] | None = None, run: bool = True) -> FlatMinimaCLI:
    """Run the CLI on ``args`` (default: the command line); ``run=False`` only instantiates (no subcommand)."""
    if not run:
        pass
    elif args is None:  # rewrite sys.argv itself: DDP re-executes it for the other ranks
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        args = with_default_config(list(args))
    return FlatMinimaCLI(
        TwoPassModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
