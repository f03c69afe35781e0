"""The study file: base configs, grid axes, seeds, resources and analysis; parsed, validated and expanded into runs.

A study file (YAML)::

    name: moons_quick                        # default: the file's stem
    base: [configs/data/moons.yaml, configs/model/mlp.yaml]  # --config files of every run, in order
    overrides: {trainer.max_epochs: 5}       # dotted overrides of every run
    axes:                                    # the grid; an axis maps value names to what they set
      optim:
        sgd: configs/optim/sgd.yaml          # a preset file (or a list of them)
        adam: {configs: [configs/optim/adam.yaml], overrides: {model.init_args.optimizer.init_args.lr: 0.01}}
      rho:                                   # a one-key sweep: value names are the values
        key: model.init_args.minimizer.init_args.rho
        values: [0.01, 0.05]
    seeds: [0, 1]                            # or a count: 3 means 0, 1, 2 (--seed_everything)
    resources: {cpu: 1, gpu: 0}              # per run: threads (local), Ray CPUs/GPUs (fractional GPUs)
    analysis:
      x: [sharpness/adaptive]                # sharpness keys
      y: [gap/acc, test/loss]                # generalization keys
      groups: [optim]                        # per-group τ, colours and distributions (default: every axis)
      ks: [{axis: optim, groups: {adaptive: [adam], plain: [sgd]}, keys: [test/acc]}]
      bootstrap: 1000                        # resamples of the τ interval (0: none)
      seed: 0                                # of the bootstrap
      require: {train/loss: {max: 0.01}}     # runs outside these bounds are left out (and counted)

A run's arguments are, in order: the base configs, each axis value's configs (axes in file order), the
study overrides, each axis value's overrides, then the seed (so an axis value overrides the study, and the
study overrides its presets). Relative config paths resolve against the current directory, as ``--config``
does for ``cli.py fit``. Every error names the key: ``study.yaml: axes.optim.adam.configs[0]: file not
found: configs/optim/adamm.yaml``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_KEYS = ("name", "description", "base", "overrides", "axes", "seeds", "resources", "analysis")
VALUE_KEYS = ("configs", "overrides")
ANALYSIS_KEYS = ("x", "y", "groups", "ks", "bootstrap", "seed", "require")
BOUNDS = ("min", "max")
KS_KEYS = ("axis", "groups", "keys")
NAME = re.compile(r"^[A-Za-z0-9_.+]+[A-Za-z0-9_.+-]*$")
AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\+?$")


class StudyError(ValueError):
    """A study file refused: the message is one line naming the file and the key."""


@dataclass(frozen=True)
class AxisValue:
    """One named value of an axis: config files and dotted overrides."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Axis:
    """A grid axis: its name and its values, in file order."""

    name: str
    values: tuple[AxisValue, ...]


@dataclass(frozen=True)
class KSTest:
    """Two-sample KS tests between named groups of an axis's values, on each key."""

    axis: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Analysis:
    """What ``study analyze`` computes: τ and Ψ for every x × y, per-group τ, KS tests."""

    x: tuple[str, ...] = ()
    y: tuple[str, ...] = ()
    groups: tuple[str, ...] | None = None
    ks: tuple[KSTest, ...] = ()
    bootstrap: int = 1000
    seed: int = 0
    require: tuple[tuple[str, str, float], ...] = ()
    """``(key, "min" | "max", bound)``: a finished run whose final ``key`` is outside the bound is left out."""


@dataclass(frozen=True)
class Resources:
    """Per-run resources: CPU threads (local engine, Ray CPUs) and GPUs (Ray, fractional allowed)."""

    cpu: float = 1.0
    gpu: float = 0.0

    @property
    def threads(self) -> int:
        """Intra-op threads of a run (``OMP_NUM_THREADS``): the CPUs rounded down, at least 1."""
        return max(1, int(self.cpu))


@dataclass(frozen=True)
class Run:
    """One run of the grid: its id, axis values, seed, config files and overrides (in order)."""

    id: str
    axes: dict[str, str]
    seed: int
    configs: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Study:
    """A parsed, validated study file."""

    name: str
    path: Path
    base: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()
    axes: tuple[Axis, ...] = ()
    seeds: tuple[int, ...] = (0,)
    resources: Resources = field(default_factory=Resources)
    analysis: Analysis = field(default_factory=Analysis)
    description: str = ""

    def runs(self) -> list[Run]:
        """The grid in a stable order (axes in file order, then seeds), with readable unique ids."""
        return list(self._expand())

    def _expand(self) -> Iterator[Run]:
        for combo in itertools.product(*(axis.values for axis in self.axes)):
            axes = {axis.name: value.name for axis, value in zip(self.axes, combo)}
            configs = self.base + tuple(c for value in combo for c in value.configs)
            overrides = self.overrides + tuple(o for value in combo for o in value.overrides)
            for seed in self.seeds:
                yield Run(run_id(axes, seed), axes, seed, configs, overrides)


def run_id(axes: Mapping[str, str], seed: int) -> str:
    """``optim=adam-rule=sam-seed=0``: the axis values in order, then the seed."""
    return "-".join([*(f"{k}={v}" for k, v in axes.items()), f"seed={seed}"])


def load(path: str | Path, *, check_files: bool = True) -> Study:
    """Read and validate a study file; ``check_files=False`` skips the existence check of config files."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"{path}: study file not found") from None
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return parse(data, path, check_files=check_files)


def parse(data: Any, path: str | Path = "study.yaml", *, check_files: bool = True) -> Study:
    """Validate a study's parsed YAML; every error is one ``StudyError`` line naming the key."""
    path = Path(path)
    ctx = _Context(path, check_files)
    data = ctx.mapping("", data, TOP_KEYS)
    axes = ctx.axes(data.get("axes", {}))
    study = Study(
        name=ctx.name("name", data.get("name", path.stem)),
        path=path,
        description=ctx.string("description", data.get("description", "")),
        base=ctx.files("base", data.get("base", [])),
        overrides=ctx.overrides("overrides", data.get("overrides", {})),
        axes=axes,
        seeds=ctx.seeds(data.get("seeds", [0])),
        resources=ctx.resources(data.get("resources", {})),
        analysis=ctx.analysis(data.get("analysis", {}), axes),
    )
    if not study.base and not any(v.configs for a in axes for v in a.values):
        raise StudyError(f"{path}: base: no config file in base or in any axis value; a run needs --config files")
    return study


class _Context:
    """Validation helpers that know the file (for messages) and whether config files must exist."""

    def __init__(self, path: Path, check_files: bool) -> None:
        self.path = path
        self.check_files = check_files

    def fail(self, key: str, problem: str) -> StudyError:
        return StudyError(f"{self.path}: {key or '(top level)'}: {problem}")

    def mapping(self, key: str, value: Any, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {_show(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(key, f"keys must be strings, got {_show(k)}")
            if allowed is not None and k not in allowed:
                raise self.fail(_join(key, k), f"unknown key; expected one of {', '.join(allowed)}")
        return value

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_show(value)}")
        return value

    def name(self, key: str, value: Any) -> str:
        value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str) or not NAME.match(value):
            raise self.fail(
                key, f"invalid name {_show(value)}; expected letters, digits, '_', '.', '+' or '-' (not first)"
            )
        return value

    def files(self, key: str, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.fail(key, f"expected a config file or a list of them, got {_show(value)}")
        for i, item in enumerate(items):
            where = f"{key}[{i}]" if not isinstance(value, str) else key
            if not isinstance(item, str) or not item:
                raise self.fail(where, f"expected a config file path, got {_show(item)}")
            if self.check_files and not Path(item).is_file():
                raise self.fail(
                    where,
                    f"file not found: {item} (relative paths resolve against the current directory, {Path.cwd()})",
                )
        return tuple(items)

    def overrides(self, key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        value = self.mapping(key, value)
        for dotted in value:
            if not DOTTED.match(dotted):
                raise self.fail(_join(key, dotted), "expected a dotted config key such as trainer.max_epochs")
        return tuple(value.items())

    def axes(self, value: Any) -> tuple[Axis, ...]:
        axes = []
        for name, values in self.mapping("axes", value).items():
            if not AXIS.match(name) or name == "seed":
                raise self.fail(f"axes.{name}", "invalid axis name; expected an identifier other than 'seed'")
            axes.append(Axis(name, self.axis_values(f"axes.{name}", values)))
        return tuple(axes)

    def axis_values(self, key: str, value: Any) -> tuple[AxisValue, ...]:
        value = self.mapping(key, value)
        if set(value) == {"key", "values"} and isinstance(value.get("values"), list):
            return self.sweep(key, value)
        if not value:
            raise self.fail(key, "an axis needs at least one value")
        return tuple(
            self.axis_value(f"{key}.{name}", self.name(f"{key}.{name}", name), spec) for name, spec in value.items()
        )

    def sweep(self, key: str, value: dict[str, Any]) -> tuple[AxisValue, ...]:
        dotted = value["key"]
        if not isinstance(dotted, str) or not DOTTED.match(dotted):
            raise self.fail(f"{key}.key", f"expected a dotted config key, got {_show(dotted)}")
        if not value["values"]:
            raise self.fail(f"{key}.values", "an axis needs at least one value")
        out = []
        for i, v in enumerate(value["values"]):
            if isinstance(v, (dict, list)) or v is None:
                raise self.fail(f"{key}.values[{i}]", f"expected a scalar, got {_show(v)}")
            out.append(AxisValue(self.name(f"{key}.values[{i}]", _scalar_name(v)), (), ((dotted, v),)))
        if len({v.name for v in out}) != len(out):
            raise self.fail(f"{key}.values", "values must be distinct")
        return tuple(out)

    def axis_value(self, key: str, name: str, spec: Any) -> AxisValue:
        if isinstance(spec, (str, list)):
            return AxisValue(name, self.files(key, spec))
        spec = self.mapping(key, spec, VALUE_KEYS)
        if not spec:
            raise self.fail(key, "expected configs and/or overrides")
        configs = self.files(f"{key}.configs", spec.get("configs", []))
        return AxisValue(name, configs, self.overrides(f"{key}.overrides", spec.get("overrides", {})))

    def seeds(self, value: Any) -> tuple[int, ...]:
        if _is_int(value):
            if value < 1:
                raise self.fail("seeds", f"expected a count >= 1 or a list of seeds, got {value}")
            return tuple(range(value))
        if not isinstance(value, list) or not value or not all(_is_int(s) and s >= 0 for s in value):
            raise self.fail("seeds", f"expected a count >= 1 or a list of integers >= 0, got {_show(value)}")
        if len(set(value)) != len(value):
            raise self.fail("seeds", f"seeds must be distinct, got {value}")
        return tuple(value)

    def resources(self, value: Any) -> Resources:
        value = self.mapping("resources", value, ("cpu", "gpu"))
        out = {}
        for k in ("cpu", "gpu"):
            v = value.get(k, Resources.cpu if k == "cpu" else Resources.gpu)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise self.fail(f"resources.{k}", f"expected a number >= 0, got {_show(v)}")
            out[k] = float(v)
        if out["cpu"] <= 0:
            raise self.fail("resources.cpu", f"expected a number > 0, got {out['cpu']:g}")
        return Resources(**out)

    def analysis(self, value: Any, axes: tuple[Axis, ...]) -> Analysis:
        value = self.mapping("analysis", value, ANALYSIS_KEYS)
        names = {a.name: a for a in axes}
        groups = value.get("groups")
        if groups is not None:
            groups = self.keys("analysis.groups", groups)
            for i, g in enumerate(groups):
                if g not in names:
                    raise self.fail(f"analysis.groups[{i}]", f"unknown axis {g!r}; axes: {', '.join(names) or 'none'}")
        bootstrap, seed = value.get("bootstrap", 1000), value.get("seed", 0)
        if not _is_int(bootstrap) or bootstrap < 0:
            raise self.fail("analysis.bootstrap", f"expected an integer >= 0, got {_show(bootstrap)}")
        if not _is_int(seed) or seed < 0:
            raise self.fail("analysis.seed", f"expected an integer >= 0, got {_show(seed)}")
        ks = value.get("ks", [])
        if not isinstance(ks, list):
            raise self.fail("analysis.ks", f"expected a list of tests, got {_show(ks)}")
        return Analysis(
            x=self.keys("analysis.x", value.get("x", [])),
            y=self.keys("analysis.y", value.get("y", [])),
            groups=groups,
            ks=tuple(self.ks(f"analysis.ks[{i}]", t, names) for i, t in enumerate(ks)),
            bootstrap=bootstrap,
            seed=seed,
            require=self.require(value.get("require", {})),
        )

    def require(self, value: Any) -> tuple[tuple[str, str, float], ...]:
        """``analysis.require``: ``{key: {min: v, max: v}}`` (either bound or both) as ``(key, bound, v)``."""
        value = self.mapping("analysis.require", value, None)
        out = []
        for key, bounds in value.items():
            bounds = self.mapping(f"analysis.require.{key}", bounds, BOUNDS)
            if not bounds:
                raise self.fail(f"analysis.require.{key}", "expected min and/or max")
            for bound, v in bounds.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                    raise self.fail(f"analysis.require.{key}.{bound}", f"expected a number, got {_show(v)}")
                out.append((str(key), bound, float(v)))
        return tuple(out)

    def keys(self, key: str, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(k, str) and k for k in items):
            raise self.fail(key, f"expected a key or a list of keys, got {_show(value)}")
        return tuple(items)

    def ks(self, key: str, value: Any, axes: dict[str, Axis]) -> KSTest:
        value = self.mapping(key, value, KS_KEYS)
        for required in ("axis", "keys"):
            if required not in value:
                raise self.fail(f"{key}.{required}", "missing")
        axis = value["axis"]
        if axis not in axes:
            raise self.fail(f"{key}.axis", f"unknown axis {_show(axis)}; axes: {', '.join(axes) or 'none'}")
        known = [v.name for v in axes[axis].values]
        groups = value.get("groups", {v: [v] for v in known})
        groups = self.mapping(f"{key}.groups", groups)
        if len(groups) < 2:
            raise self.fail(f"{key}.groups", "expected at least two groups")
        out = []
        for name, members in groups.items():
            members = [members] if isinstance(members, str) else members
            if not isinstance(members, list) or not members:
                raise self.fail(f"{key}.groups.{name}", f"expected a list of {axis} values, got {_show(members)}")
            for m in members:
                if str(m) not in known:
                    raise self.fail(
                        f"{key}.groups.{name}", f"unknown {axis} value {_show(m)}; values: {', '.join(known)}"
                    )
            out.append((name, tuple(str(m) for m in members)))
        return KSTest(axis, tuple(out), self.keys(f"{key}.keys", value["keys"]))


def _scalar_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _join(key: str, sub: str) -> str:
    return f"{key}.{sub}" if key else sub


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
