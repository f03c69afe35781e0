"""How ``--config`` files compose, which base a run sits on, and the run's name (no Lightning import).

The rule, as the code implements it (``docs/cli.md`` explains it to users):

1. A config that defines a whole run (it sets both ``model`` and ``data`` classes: every
   ``configs/experiments/*.yaml``, a run's saved ``config.yaml``) is the base, and the embedded default
   plays no part. Later files layer on it as in rule 3: an object a later file sets replaces the base's
   object whole (``experiments/sam_wrn_cifar10.yaml`` + ``optim/adam.yaml`` is Adam at its preset values,
   without the experiment's SGD weight decay); everything else composes as LightningCLI composes it.
2. Otherwise, when ``--ckpt_path`` points into a run folder (``<run>/checkpoints/<file>.ckpt``) that
   holds a ``config.yaml``, that config is the base (``test``/``validate``/``predict`` and a resumed
   ``fit`` need nothing else).
3. Otherwise the embedded default (``configs/experiments/moons_gsam.yaml``) is the base, and the
   preset files layer on it: an object a preset sets (``data``, the network, the optimizer, the rule,
   the lr scheduler, the logger: a mapping with ``class_path``) replaces the default's object at that
   key entirely, so no argument of the default's object leaks into it. A model preset changes the task
   class and replaces the network; the default's optimizer, rule and scheduler stay unless their own
   presets replace them. Every other key merges key by key, and ``callbacks+:`` appends to the list.

Command-line overrides (``--model.init_args.minimizer.init_args.rho=0.1``) apply last, as always.

The run is named after its base (the experiment's logger name, else the file's stem) followed by
``+<stem>`` for every later file that changed something: ``moons_gsam+adam+sam``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "experiments" / "moons_gsam.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
CONFIG_FLAGS = ("--config", "-c")
VERBOSE_FLAG = "--verbose_errors"
DEBUG_ENV = "FLATMINIMA_DEBUG"


class ConfigError(ValueError):
    """A config file that cannot be used (missing, invalid YAML, empty): the message is one line."""


@dataclass
class Plan:
    """What :func:`plan` decided for one call of the CLI (read by ``cli.FlatMinimaCLI``).

    Attributes:
        args: The arguments to parse (the base config inserted where rule 2 or 3 applies).
        subcommand: ``fit``/``validate``/``test``/``predict``, or None (``run=False``, ``--help``).
        base: ``"experiment"`` (rule 1), ``"run"`` (rule 2) or ``"default"`` (rule 3).
        name: The run's name: the base's name followed by ``+<stem>`` of each file that changed it.
        explicit: What the user set on the command line or in a non-base file, among ``name``,
            ``logger`` (the whole logger), ``logger.name``, ``logger.save_dir``, ``logger.version``,
            ``default_root_dir`` and ``enable_progress_bar``: those are honoured exactly.
        configs: ``(label, content)`` of every ``--config`` given (for error messages).
        verbose: Show the full parser output and tracebacks (``--verbose_errors`` or ``FLATMINIMA_DEBUG=1``).
    """

    args: list[str]
    subcommand: str | None = None
    base: str = "default"
    name: str | None = None
    explicit: frozenset[str] = frozenset()
    configs: list[tuple[str, Any]] = field(default_factory=list)
    verbose: bool = False


def verbose_requested(args: list[str]) -> bool:
    """``--verbose_errors`` among ``args`` or ``FLATMINIMA_DEBUG`` set to a true value."""
    truthy = ("1", "true", "yes")
    flag = any(
        a == VERBOSE_FLAG or (a.startswith(VERBOSE_FLAG + "=") and a.split("=", 1)[1].lower() in truthy) for a in args
    )
    return flag or os.environ.get(DEBUG_ENV, "").lower() in truthy


def strip_verbose(args: list[str]) -> list[str]:
    """``args`` without ``--verbose_errors[=...]``."""
    return [a for a in args if a != VERBOSE_FLAG and not a.startswith(VERBOSE_FLAG + "=")]


def plan(args: list[str], default: Path = DEFAULT_CONFIG) -> Plan:
    """Decide the base of the run and its name from the raw arguments (see the module docstring)."""
    verbose = verbose_requested(args)
    args = strip_verbose(list(args))
    if any(a in ("-h", "--help") for a in args) or not args:
        return Plan(args, verbose=verbose)
    start = 1 if args[0] in SUBCOMMANDS else 0
    subcommand = args[0] if start else None
    given = [(label, load_config(label)) for label in config_values(args[start:])]
    explicit = explicit_on_command_line(args[start:])
    whole = next((i for i, (_, content) in enumerate(given) if defines_run(content)), None)
    if whole is not None:
        label, content = given[whole]
        name = _name_of(label, content) + _variant_suffix(content, given[whole + 1 :], replace=True)
        for _, later in given[:whole] + given[whole + 1 :]:
            explicit |= explicit_in_file(later)
        pruned = content
        for _, later in given[whole + 1 :]:
            pruned = prune(pruned, later)
        if pruned != content:
            args = _replace_config(args, start, whole, yaml.safe_dump(pruned, sort_keys=False))
        return Plan(args, subcommand, "experiment", name, frozenset(explicit), given, verbose)
    run_config = _run_config(option_value(args[start:], "--ckpt_path"))
    base_label = str(run_config or default)
    base_content = load_config(base_label)
    for _, content in given:
        explicit |= explicit_in_file(content)
    pruned = base_content
    for _, content in given:
        pruned = prune(pruned, content)
    base_arg = base_label if pruned == base_content else yaml.safe_dump(pruned, sort_keys=False)
    name = _name_of(base_label, base_content) + _variant_suffix(base_content, given, replace=True)
    composed = args[:start] + ["--config", base_arg] + args[start:]
    return Plan(composed, subcommand, "run" if run_config else "default", name, frozenset(explicit), given, verbose)


def _replace_config(args: list[str], start: int, index: int, value: str) -> list[str]:
    """``args`` with the value of the ``index``-th ``--config`` (counted from ``args[start:]``) replaced."""
    out, seen = list(args), -1
    for i in range(start, len(out)):
        if out[i] in CONFIG_FLAGS and i + 1 < len(out):
            seen += 1
            if seen == index:
                out[i + 1] = value
                return out
        elif out[i].startswith(tuple(f + "=" for f in CONFIG_FLAGS)):
            seen += 1
            if seen == index:
                out[i] = out[i].split("=", 1)[0] + "=" + value
                return out
    return out


# ---------------------------------------------------------------------------------------- reading args
def config_values(args: list[str]) -> list[str]:
    """The values of ``--config``/``-c`` in ``args`` (``--config X``, ``--config=X``), in order."""
    values = []
    for i, arg in enumerate(args):
        if arg in CONFIG_FLAGS and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(tuple(f + "=" for f in CONFIG_FLAGS)):
            values.append(arg.split("=", 1)[1])
    return values


def option_value(args: list[str], flag: str) -> str | None:
    """The last value of ``flag`` in ``args`` (``flag X`` or ``flag=X``), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


_CLI_EXPLICIT = [
    (re.compile(r"^--trainer\.logger(=|$)"), "logger"),
    (re.compile(r"^--trainer\.logger\.(init_args\.)?name(=|$)"), "logger.name"),
    (re.compile(r"^--trainer\.logger\.(init_args\.)?save_dir(=|$)"), "logger.save_dir"),
    (re.compile(r"^--trainer\.logger\.(init_args\.)?version(=|$)"), "logger.version"),
    (re.compile(r"^--trainer\.default_root_dir(=|$)"), "default_root_dir"),
    (re.compile(r"^--trainer\.enable_progress_bar(=|$)"), "enable_progress_bar"),
    (re.compile(r"^--name(=|$)"), "name"),
]


def explicit_on_command_line(args: list[str]) -> set[str]:
    """Which of the logger/output settings the command line sets (see :class:`Plan`)."""
    return {what for arg in args for pattern, what in _CLI_EXPLICIT if pattern.match(arg)}


def explicit_in_file(content: Any) -> set[str]:
    """Which of the logger/output settings a (non-base) config file sets."""
    if not isinstance(content, dict):
        return set()
    named = {"name"} if content.get("name") else set()
    trainer = content.get("trainer")
    if not isinstance(trainer, dict):
        return named
    found = named | {key for key in ("default_root_dir", "enable_progress_bar") if key in trainer}
    logger = trainer.get("logger", ...)
    if logger is ...:
        return found
    if not isinstance(logger, dict) or "class_path" in logger:
        return found | {"logger"}
    args = logger.get("init_args", logger)
    return found | {f"logger.{key}" for key in ("name", "save_dir", "version") if key in args}


# ---------------------------------------------------------------------------------------- config files
def load_config(value: str) -> Any:
    """Read a ``--config`` value (a file, or a YAML string); :class:`ConfigError` in one line when unusable."""
    path = Path(value)
    looks_inline = value.lstrip().startswith("{") or ": " in value or "\n" in value
    if not looks_inline and not path.is_file():
        reason = "is a folder" if path.is_dir() else "not found"
        raise ConfigError(f"--config {value}: file {reason} (relative paths start from {Path.cwd()})")
    label = value if not looks_inline else "the inline config"
    try:
        content = yaml.safe_load(value if looks_inline else path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config {label}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {label}: cannot read the file ({err})") from None
    if content is None:
        raise ConfigError(
            f"--config {label}: the file is empty; expected a YAML mapping such as 'trainer: {{max_epochs: 5}}'"
        )
    if not isinstance(content, dict):
        raise ConfigError(
            f"--config {label}: expected a YAML mapping of keys (trainer, model, data, ...), "
            f"got a {type(content).__name__}: {str(content)[:60]!r}"
        )
    return content


def defines_run(content: Any) -> bool:
    """True for a config that sets both the model's and the data's class (an experiment, a run's config)."""
    if not isinstance(content, dict):
        return False
    return all(_is_object(content.get(key)) or isinstance(content.get(key), str) for key in ("model", "data"))


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


def prune(base: dict, preset: dict) -> dict:
    """``base`` without the objects ``preset`` replaces (rule 3 of the module docstring); a new dict."""
    out = copy.deepcopy(base)
    _prune(out, preset, ())
    return out


def _prune(base: dict, preset: dict, path: tuple[str, ...]) -> None:
    for key, value in preset.items():
        if not isinstance(key, str) or key.endswith("+") or key not in base:
            continue
        if _is_object(value) and path + (key,) != ("model",):
            del base[key]
        elif isinstance(value, dict) and isinstance(base[key], dict):
            _prune(base[key], value, path + (key,))


def merge(state: dict, preset: dict) -> dict:
    """``preset`` applied to ``state`` key by key (``key+`` appends to a list); a new dict."""
    out = copy.deepcopy(state)
    for key, value in preset.items():
        if isinstance(key, str) and key.endswith("+"):
            current = out.get(key[:-1]) or []
            current = current if isinstance(current, list) else [current]
            out[key[:-1]] = current + copy.deepcopy(value if isinstance(value, list) else [value])
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _variant_suffix(base: dict, later: list[tuple[str, Any]], *, replace: bool) -> str:
    """``+<stem>`` for each later file that changes the composed config."""
    suffix, state = "", base
    for label, content in later:
        new = merge(prune(state, content) if replace else state, content)
        if new != state:
            suffix += "+" + _stem(label)
        state = new
    return suffix


def _name_of(label: str, content: dict) -> str:
    """The base's name: its ``name`` (a run saved with ``--name``), its logger's ``name``, else the file's stem."""
    if isinstance(content.get("name"), str) and content["name"]:
        return content["name"]
    logger = (content.get("trainer") or {}).get("logger") if isinstance(content.get("trainer"), dict) else None
    if isinstance(logger, dict):
        name = (logger.get("init_args") or {}).get("name")
        if isinstance(name, str) and name:
            return name
    return _stem(label)


def _stem(label: str) -> str:
    return Path(label).stem if "\n" not in label and ": " not in label else "inline"


def run_folder(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run folder of a checkpoint saved as ``<run>/checkpoints/<file>.ckpt``, else None."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if not path.is_file() or path.parent.name != "checkpoints":
        return None
    return path.parent.parent


def _run_config(ckpt_path: str | None) -> Path | None:
    folder = run_folder(ckpt_path)
    config = folder / "config.yaml" if folder is not None else None
    return config if config is not None and config.is_file() else None


def next_version(folder: Path) -> str:
    """``version_<n>`` with n one past the largest existing ``version_*`` in ``folder`` (0 if none)."""
    numbers = [
        int(m.group(1))
        for p in (folder.iterdir() if folder.is_dir() else ())
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    return f"version_{max(numbers) + 1 if numbers else 0}"
