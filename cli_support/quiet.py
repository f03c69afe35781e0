"""Silence, for one CLI call, the warnings and adverts a user of ``cli.py`` cannot act on.

Each entry says why it is noise here. Everything else (a data file that differs from the published
one, a deprecated argument of ours, Lightning's advice about a real setting) still shows. The
filters live inside :func:`quiet_noise` and are undone when the call returns, so nothing leaks into
the next run of the same process.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: (message regex, category): warnings that say nothing about the user's run.
NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # torch_geometric scripts a helper at import time; torch deprecates torch.jit.script
    (r"`torch\.jit\.\w+` is deprecated", FutureWarning),
    # Lightning's own use of a torch pytree API
    (r".*isinstance\(treespec, LeafSpec\)", Warning),
    # the task modules log epoch means themselves; per-step keys (log_train_steps) go to the logger directly
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning),
    # jsonargparse deprecations that Lightning's own LightningCLI code triggers
    (r"\s*(``[\w.]+``|skip_none parameter) was deprecated in v4", Warning),
    (r"\s*By default only one JsonargparseDeprecationWarning", Warning),
    # cli.main(args) called from Python while sys.argv holds other words (the study runner, tests)
    (r"LightningCLI's args parameter is intended", Warning),
)

#: Lightning's INFO records dropped: adverts for other products.
DROPPED = ("💡 Tip:",)
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)
SEED_LOGGER = "lightning.fabric.utilities.seed"


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(text in message for text in DROPPED)


class HeldRecords(logging.Filter):
    """Holds back a logger's records that contain ``text`` until :meth:`release` hands them on.

    ``Seed set to N`` is logged before the classes are built: held until they are, a config error
    that ends the call there stays one line, and a run that starts still shows its seed.
    """

    def __init__(self, logger: logging.Logger, text: str) -> None:
        super().__init__()
        self.logger, self.text, self.held, self.holding = logger, text, [], True

    def filter(self, record: logging.LogRecord) -> bool:
        if self.holding and self.text in str(record.msg):
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        """Stop holding and emit what was held, in order."""
        self.holding = False
        held, self.held = self.held, []
        for record in held:
            self.logger.handle(record)


@contextlib.contextmanager
def quiet_noise() -> Iterator[HeldRecords]:
    """Within the block: the :data:`NOISE` warnings and :data:`DROPPED` records are dropped, and the seed
    line is held (release it with the yielded :class:`HeldRecords`); everything is restored after."""
    dropper = _DropRecords()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    seed = HeldRecords(logging.getLogger(SEED_LOGGER), "Seed set to")
    with warnings.catch_warnings():
        for pattern, category in NOISE:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        for logger in loggers:
            logger.addFilter(dropper)
        seed.logger.addFilter(seed)
        try:
            yield seed
        finally:
            seed.logger.removeFilter(seed)
            for logger in loggers:
                logger.removeFilter(dropper)
