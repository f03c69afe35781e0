"""The LightningCLI application behind ``python cli.py``: :class:`FlatMinimaCLI`, :func:`main` and :func:`entry`.

``cli.py`` is the thin entry point (its docstring describes the behaviour: composition, run folders,
errors, output); this module holds the CLI class and the run entry so that every caller imports it from
here: ``cli.py``, and a study worker running one run (:mod:`flatminima.studies.runner`), which thereby never imports
``cli.py`` (no import cycle: ``cli.py`` hands ``python cli.py study ...`` to :mod:`flatminima.studies.cli`).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from flatminima.callbacks.progress import EpochLines
from flatminima.cli_support import claims, compose, errors
from flatminima.cli_support.help import DESCRIPTION, HelpFormatter, presets_epilog
from flatminima.cli_support.hparams import HParamsWriter, readable_hparams
from flatminima.cli_support.quiet import HeldRecords, quiet_noise
from flatminima.cli_support.report import StepCounter, final_metrics, run_folder, table
from flatminima.lightning_modules import TwoPassModule, compat

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (its ``configs/`` are listed by ``--help``)."""
DEFAULT_CONFIG = compose.DEFAULT_CONFIG
LOG_ROOT = "logs"
EVALUATIONS = ("validate", "test", "predict")
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": LOG_ROOT, "name": "flatminima", "default_hp_metric": False},
    },
}


class FlatMinimaParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line (:func:`flatminima.cli_support.errors.summarize`), exit code 2."""

    plan: compose.Plan | None = None

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or self.plan is None or self.plan.verbose:
            return super().error(message, ex)
        actions = [a for p in _parsers(self) for a in compat.parser_actions(p)]
        line = errors.summarize(
            message,
            options=[s for a in actions for s in a.option_strings if s.startswith("--")],
            keys=[a.dest for a in actions if a.dest and a.dest != "help"],
            configs=self.plan.configs,
            subcommands=[*(compose.SUBCOMMANDS if self.plan.subcommand or _has_subcommands(self) else ()), "study"],
        )
        sys.stderr.write(f"error: {line}\n")
        self.exit(2)


def _parsers(parser):
    yield parser
    for sub in compat.subcommand_parsers(parser).values():
        yield from _parsers(sub)


def _has_subcommands(parser) -> bool:
    return bool(compat.subcommand_parsers(parser))


class FlatMinimaCLI(LightningCLI):
    """LightningCLI whose model is a :class:`~flatminima.lightning_modules.TwoPassModule` task (behaviour: ``cli.py``'s docstring).

    A value that a class refuses (``ValueError``/``TypeError`` from its ``__init__``) ends the run
    before training with one line naming the config key, e.g.
    ``error: model.init_args.minimizer (flatminima.lightning_modules.minimizers.SAM): Invalid rho: -0.1; ...``.
    """

    def __init__(self, *args, plan: compose.Plan | None = None, seed_line: HeldRecords | None = None, **kwargs) -> None:
        self.plan = plan or compose.Plan([])
        self._seed_line = seed_line
        self._steps = StepCounter()
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.plan = self.plan
        return parser

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
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, run the test loop on the final weights (when the data module has a test set).",
        )
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="Run name: logs go to logs/<name>/version_<n>/ (default: the experiment + the presets that "
            "changed it, e.g. moons_gsam+adam+sam).",
        )

    def _section(self):
        return self.config.get(self.subcommand) if self.subcommand else self.config

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in EVALUATIONS and not self.config[subcommand].get("ckpt_path"):
            parser.exit(
                2,
                f"error: ckpt_path: `{subcommand}` evaluates the weights of a checkpoint and none was "
                "given (the config alone holds untrained weights); pass --ckpt_path "
                "<run>/checkpoints/<file>.ckpt (fit --trainer.max_epochs 0 reports untrained weights)\n",
            )

    def before_instantiate_classes(self) -> None:
        config = self._section()
        self._place_run(config)
        trainer = config.trainer
        if "enable_progress_bar" not in self.plan.explicit:
            trainer.enable_progress_bar = sys.stdout.isatty()

    def _place_run(self, config) -> None:
        """Name the run's folder, or put test/validate/resume output into the checkpoint's run folder."""
        trainer, explicit = config.trainer, self.plan.explicit
        named = "name" in explicit  # --name on the command line or in a preset (a base's name is its name)
        name = config.get("name") if named else self.plan.name
        folder = compose.run_folder(config.get("ckpt_path"))
        logger = trainer.get("logger")
        if hasattr(logger, "get") and logger.get("class_path") and "logger" not in explicit:
            init = logger.get("init_args")
            if init is None or "name" not in init:
                return
            set_by_user = explicit & {"logger.name", "logger.save_dir", "logger.version"}
            if folder is not None and not named and not set_by_user:
                same = Path(init.get("save_dir") or ".").resolve() == folder.parent.parent.resolve()
                init.save_dir = init.save_dir if same else str(folder.parent.parent)  # as the run wrote it
                init.name, init.version = folder.parent.name, folder.name
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            elif name and (named or "logger.name" not in explicit):
                init.name = name
        elif logger in (False, None) and "default_root_dir" not in explicit and (name or folder):
            parent = Path(LOG_ROOT) / name if name else None
            trainer.default_root_dir = str(folder or parent / compose.next_version(parent))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            cause = errors.innermost(err)
            key, class_path = errors.locate(cause, self._section())
            where = f"{key} ({class_path})" if key else "configuration"
            self.parser.exit(2, f"error: {where}: {cause}\n")

    def after_instantiate_classes(self) -> None:
        if self._seed_line is not None:  # the classes are built: no config error can follow
            self._seed_line.release()

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.logger is None:  # nothing to monitor the lr into (LearningRateMonitor would refuse)
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        extra: list[pl.Callback] = [self._steps]
        if self.subcommand == "fit":
            extra.append(HParamsWriter(readable_hparams(self._section().as_dict())))
            if not trainer.progress_bar_callback:
                extra.append(EpochLines())
        first_checkpoint = next(
            (i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)), len(trainer.callbacks)
        )
        trainer.callbacks[first_checkpoint:first_checkpoint] = extra
        return trainer

    def before_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        limits = {
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "limit_train_batches": trainer.limit_train_batches,
        }
        zero = [f"trainer.{k}={v}" for k, v in limits.items() if v == 0]
        if zero:
            _warn(f"{zero[0]}: nothing will be trained; the metrics reported are those of the untrained weights")
        elif self._section().trainer.get("max_epochs") is None and trainer.max_steps == -1:
            _warn("neither trainer.max_epochs nor trainer.max_steps is set: Lightning trains 1000 epochs")

    def after_fit(self) -> None:
        """Test the final weights (``--test_after_fit false`` to skip), then print the final table."""
        config = self._section()
        metrics = final_metrics(self.trainer)  # the test loop resets the trainer's metrics
        datamodule = self.datamodule
        testable = (
            datamodule is not None and type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader
        )
        if (
            config.get("test_after_fit", False)
            and testable
            and not self.trainer.fast_dev_run
            and not self.trainer.interrupted
        ):
            self.trainer.test(self.model, datamodule=datamodule, verbose=False)
            metrics.update(final_metrics(self.trainer))
        if self.trainer.is_global_zero:
            print(self._final_table(config, metrics), flush=True)

    def _final_table(self, config, metrics: dict[str, float]) -> str:
        trainer = self.trainer
        if self._steps.batches:
            title = (
                f"Final metrics (seed {config.get('seed_everything')}, epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}):"
            )
        else:
            source = f"loaded from {config.get('ckpt_path')}" if config.get("ckpt_path") else "untrained (initial)"
            title = f"Final metrics of weights {source}: no training step ran in this fit"
        notes = []
        if (folder := run_folder(trainer)) is not None:
            notes.append(f"run folder: {folder}")
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or getattr(
            trainer.checkpoint_callback, "last_model_path", ""
        )
        if ckpt:
            notes.append(f"evaluate again: python cli.py test --ckpt_path {ckpt}")
        return table(metrics, title=title, notes=tuple(notes))


def _warn(text: str) -> None:
    sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()


def main(args: list[str] | None = None, run: bool = True) -> FlatMinimaCLI:
    """Run the CLI on ``args`` (default: the command line); ``run=False`` only instantiates (no subcommand).

    Re-entrant: every setting it changes (warning filters, Lightning's log filters) is restored when
    it returns. Config errors raise ``SystemExit(2)`` after one ``error:`` line on stderr; errors of
    the run itself are raised as they are (:func:`entry` prints them as one line).
    """
    from_command_line = args is None
    raw = list(sys.argv[1:] if from_command_line else args)
    try:
        plan = compose.plan(raw)
    except compose.ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    if from_command_line:  # rewrite sys.argv itself: DDP re-executes it for the other ranks
        sys.argv[1:] = plan.args
    wants_help = any(a in ("-h", "--help") for a in raw)
    with quiet_noise() as seed_line:
        return FlatMinimaCLI(
            TwoPassModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=SaveConfigCallback if plan.subcommand in (None, "fit") else None,
            save_config_kwargs={"overwrite": True},
            parser_class=FlatMinimaParser,
            parser_kwargs={
                "description": DESCRIPTION,
                "formatter_class": HelpFormatter,
                "epilog": presets_epilog(ROOT / "configs") if wants_help else None,
            },
            args=None if from_command_line else plan.args,
            run=run,
            plan=plan,
            seed_line=seed_line,
        )


def entry(args: list[str] | None = None) -> int:
    """The command line: :func:`main`, with an error raised during the run printed as one line (exit code 1).

    With ``FLATMINIMA_CLAIM=<path>`` set (the commands ``study run --dry-run`` prints), a ``fit`` claims
    ``<path>`` while it trains (:mod:`flatminima.cli_support.claims`; the first process of a multi-process launch
    only): a run that a live process already claimed (``study run``, or the same command started twice)
    is left to it, with one line and exit code 0; a dead owner's claim is taken over.
    """
    raw = list(sys.argv[1:] if args is None else args)
    path = os.environ.get(claims.CLAIM_ENV)
    if path and raw[:1] == ["fit"] and claims.rank_zero():
        with claims.held(path, "cli.py fit") as outcome:
            if not outcome.acquired:
                holder = outcome.holder.describe() if outcome.holder else "another process"
                sys.stderr.write(f"{path}: claimed by {holder}, which trains this run: nothing to do here\n")
                return 0
            return _entry(args, raw)
    return _entry(args, raw)


def _entry(args: list[str] | None, raw: list[str]) -> int:
    try:
        main(args)
    except Exception as err:  # noqa: BLE001 - the command line reports every failure in one line
        if compose.verbose_requested(raw):
            raise
        start = "\n" if sys.stdout.isatty() else ""  # after a progress bar's unfinished line
        sys.stderr.write(f"{start}error: {errors.runtime_line(err)} (--verbose_errors shows the traceback)\n")
        return 1
    return 0
