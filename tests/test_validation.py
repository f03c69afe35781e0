"""The one set of argument checks (flatminima.lightning_modules.validation): same rules for every argument."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from flatminima.lightning_modules.validation import (
    ArgumentTypeError,
    check_betas,
    check_choice,
    check_float,
    check_fraction,
    check_int,
    check_ints,
    check_p,
    invalid,
)

ROOT = Path(__file__).resolve().parents[1]

NUMPY_FLOATS = [np.float16(0.5), np.float32(0.5), np.float64(0.5)]
NUMPY_INTS = [np.int8(3), np.int32(3), np.int64(3), np.uint16(3)]


# ---------------------------------------------------------------------------------------- numbers alike
@pytest.mark.parametrize("value", [0.5, Fraction(1, 2), *NUMPY_FLOATS], ids=repr)
def test_every_real_number_is_accepted_and_returned_as_a_float(value):
    for got in (
        check_float("rho", value),
        check_float("lr", value, strict=True),
        check_fraction("dropout", value),
        check_fraction("alpha", value, closed=True),
    ):
        assert type(got) is float and got == 0.5
    assert check_betas((value, value)) == (0.5, 0.5)


@pytest.mark.parametrize("value", [3, *NUMPY_INTS], ids=repr)
def test_every_integer_is_accepted_and_returned_as_an_int(value):
    got = check_int("k", value, 1)
    assert type(got) is int and got == 3
    assert check_ints("widths", [value, value]) == [3, 3]
    assert [type(v) for v in check_ints("widths", (value,))] == [int]


@pytest.mark.parametrize("value", [np.float32(2.0), np.int64(2), 2], ids=repr)
def test_norm_exponents_of_any_real_type(value):
    assert check_p(value) == 2.0 and type(check_p(value)) is float
    assert check_p(value, allowed=(2.0, math.inf)) == 2.0
    assert check_p(np.float32(np.inf)) == math.inf


def test_numpy_float32_is_accepted_as_rho_and_as_a_learning_rate():
    """The issue's case: numpy.float32 was accepted as rho (minimizers) but refused as an lr (optim)."""
    rho, lr = np.float32(0.05), np.float32(1e-3)
    assert check_float("rho", rho) == pytest.approx(0.05)
    assert check_float("lr", lr) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "call",
    [
        lambda v: check_float("rho", v),
        lambda v: check_fraction("dropout", v),
        lambda v: check_int("k", v),
        lambda v: check_p(v),
        lambda v: check_ints("widths", [v]),
        lambda v: check_betas((v, 0.9)),
    ],
)
@pytest.mark.parametrize("value", [True, False, np.bool_(True), "0.5", None, [0.5]], ids=repr)
def test_bools_strings_and_none_are_refused_as_numbers(call, value):
    with pytest.raises(ValueError, match=r"^Invalid \w+: .*; expected "):
        call(value)


def test_a_wrong_type_is_both_a_type_error_and_a_value_error():
    with pytest.raises(TypeError, match=r"^Invalid rho: '0.05'; expected a finite rho >= 0$") as err:
        check_float("rho", "0.05")
    assert isinstance(err.value, ArgumentTypeError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError) as err:
        check_float("rho", -1.0)
    assert not isinstance(err.value, TypeError)  # a number out of range is a ValueError only


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32(np.nan), np.float64(np.inf)], ids=repr)
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid rho: {value!r}; expected a finite rho >= 0")):
        check_float("rho", value)
    with pytest.raises(ValueError, match="Invalid dropout: "):
        check_fraction("dropout", value)
    with pytest.raises(ValueError, match="Invalid alpha: "):
        check_fraction("alpha", value, closed=True)


def test_nan_is_refused_as_a_norm_exponent_but_inf_is_the_max_norm():
    with pytest.raises(ValueError, match=re.escape("Invalid p: nan; expected p >= 1 (float('inf') for the max-norm)")):
        check_p(math.nan)
    assert check_p(math.inf) == math.inf


# ---------------------------------------------------------------------------------------- the messages
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_int("num_samples", 0), "Invalid num_samples: 0; expected an integer >= 1"),
        (lambda: check_int("n", -1, 0), "Invalid n: -1; expected an integer >= 0"),
        (lambda: check_int("n", 2.0, 0), "Invalid n: 2.0; expected an integer >= 0"),
        (lambda: check_int("hops", 0, optional=True), "Invalid hops: 0; expected None or an integer >= 1"),
        (lambda: check_ints("widths", [4, 0]), "Invalid widths: [4, 0]; expected a list of integers >= 1"),
        (
            lambda: check_ints("widths", [], allow_empty=False),
            "Invalid widths: []; expected a non-empty list of integers >= 1",
        ),
        (lambda: check_ints("widths", 4), "Invalid widths: 4; expected a list of integers >= 1"),
        (lambda: check_float("lr", -1), "Invalid lr: -1; expected a finite lr >= 0"),
        (lambda: check_float("tol", 0.0, strict=True), "Invalid tol: 0.0; expected a finite tol > 0"),
        (lambda: check_float("eps", 1e-13, minimum=1e-12), "Invalid eps: 1e-13; expected a finite eps >= 1e-12"),
        (
            lambda: check_float("clip", 0, strict=True, optional=True),
            "Invalid clip: 0; expected None or a finite clip > 0",
        ),
        (lambda: check_fraction("dropout", 1.0), "Invalid dropout: 1.0; expected 0 <= dropout < 1"),
        (lambda: check_fraction("alpha", 1.5, closed=True), "Invalid alpha: 1.5; expected 0 <= alpha <= 1"),
        (
            lambda: check_choice("scope", "bias", ("weight", "all")),
            "Invalid scope: 'bias'; expected one of 'weight', 'all'",
        ),
        (lambda: check_p(0.5), "Invalid p: 0.5; expected p >= 1 (float('inf') for the max-norm)"),
        (lambda: check_p(3, allowed=(2.0, math.inf)), "Invalid p: 3.0; expected p = 2 or p = inf"),
        (lambda: check_p("2"), "Invalid p: '2'; expected p >= 1 (float('inf') for the max-norm)"),
        (lambda: check_betas((0.9, 1.0)), "Invalid betas: (0.9, 1.0); expected two numbers in [0, 1)"),
        (lambda: check_betas((0.9,)), "Invalid betas: (0.9,); expected two numbers in [0, 1)"),
        (lambda: check_betas(0.9), "Invalid betas: 0.9; expected two numbers in [0, 1)"),
    ],
)
def test_messages_name_the_argument_the_accepted_range_and_the_value(call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_accepted_boundaries():
    assert check_int("n", 0, 0) == 0
    assert check_float("rho", 0) == 0.0
    assert check_fraction("dropout", 0) == 0.0 and check_fraction("alpha", 1, closed=True) == 1.0
    assert check_p(1) == 1.0
    assert check_int("hops", None, optional=True) is None
    assert check_float("clip", None, optional=True) is None
    assert check_choice("scope", "all", ("weight", "all")) == "all"
    assert check_ints("widths", []) == []


def test_invalid_builds_the_one_line_error():
    err = invalid("val_size", 5, "val_size < 5")
    assert type(err) is ValueError and str(err) == "Invalid val_size: 5; expected val_size < 5"
    assert isinstance(invalid("x", "a", "a number", error=ArgumentTypeError), TypeError)


# ---------------------------------------------------------------------------------------- no Lightning
def test_pure_modules_import_without_lightning():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import torch\n"
        "import flatminima.lightning_modules.validation as v, flatminima.lightning_modules.minimizers as m, flatminima.lightning_modules.compat as c\n"
        "from lightning_modules import SAM\n"
        "assert SAM is m.SAM and v.check_float('rho', 0.05) == 0.05\n"
        "p = [torch.ones(3)]\n"
        "print(round(float(m.SAM(rho=0.5).perturbation(p, p)[0].norm()), 6))\n"
        "print(len(c.running_stat_buffers(torch.nn.BatchNorm1d(2))))\n"
        "try:\n"
        "    from lightning_modules import TwoPassModule\n"
        "except ImportError as err:\n"
        "    print('needs Lightning' in str(err))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.5", "3", "True"]


# ---------------------------------------------------------------------------------------- every numeric argument
def _numeric_defaults(cls):
    """The constructor arguments of ``cls`` whose default is an int or a float (not a bool)."""
    import inspect

    return [(p.name, p.default) for p in inspect.signature(cls).parameters.values() if type(p.default) in (int, float)]


def _classes():
    import flatminima.lightning_modules.networks as networks
    from flatminima import datamodules
    from flatminima.lightning_modules import ASAM, GSAM, SAM, USAM, AdaptiveGSAM

    nets = [getattr(networks, n) for n in networks.__all__]
    data = [getattr(datamodules, n) for n in datamodules.__all__ if n.endswith("DataModule")]
    return [SAM, USAM, ASAM, GSAM, AdaptiveGSAM, *nets, *data]


CASES = [(cls, name, default) for cls in _classes() for name, default in _numeric_defaults(cls)]
IDS = [f"{cls.__name__}.{name}" for cls, name, _ in CASES]


def _numpy(value):
    return np.int64(value) if type(value) is int else np.float32(value)


@pytest.mark.parametrize("cls, name, default", CASES, ids=IDS)
def test_every_numeric_argument_takes_numpy_scalars(cls, name, default):
    obj = cls(**{name: _numpy(default)})
    hparams = getattr(obj, "hparams", None)
    if hparams is not None and name in hparams:  # saved as plain Python numbers (a clean hparams.yaml)
        assert type(hparams[name]) is type(default) and hparams[name] == pytest.approx(default)


@pytest.mark.parametrize("cls, name, default", CASES, ids=IDS)
def test_every_numeric_argument_refuses_a_bool(cls, name, default):
    with pytest.raises(ValueError, match=f"^Invalid {name}: True; expected "):
        cls(**{name: True})


@pytest.mark.parametrize(
    "cls, name, default",
    [c for c in CASES if type(c[2]) is float],
    ids=[i for c, i in zip(CASES, IDS) if type(c[2]) is float],
)
def test_every_float_argument_refuses_nan(cls, name, default):
    with pytest.raises(ValueError, match=f"^Invalid {name}: nan; expected "):
        cls(**{name: math.nan})


def test_numpy_float32_as_rho_and_as_a_learning_rate_in_the_classes():
    """The issue's case, end to end: SAM and the base optimizers take the same numpy.float32."""
    import torch

    from flatminima.lightning_modules import GSAM, SAM
    from flatminima.lightning_modules.optim import AdaBound, AdaShift

    value = np.float32(0.05)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert SAM(rho=value).rho == pytest.approx(0.05) and type(SAM(rho=value).rho) is float
    gsam = GSAM(rho=value, alpha=value, rho_min=np.float32(0.01), lr_max=value, lr_min=np.float32(0.0))
    assert (gsam.rho_min, gsam.lr_max) == (pytest.approx(0.01), pytest.approx(0.05))
    for opt in (
        AdaBound(
            params,
            lr=value,
            betas=(np.float32(0.9), np.float64(0.999)),
            final_lr=value,
            gamma=value,
            eps=np.float32(1e-8),
            weight_decay=value,
        ),
        AdaShift(
            params, lr=value, betas=(np.float32(0.9), np.float32(0.999)), keep_num=np.int64(3), eps=np.float32(1e-10)
        ),
    ):
        group = opt.param_groups[0]
        assert type(group["lr"]) is float and group["lr"] == pytest.approx(0.05)
        assert all(type(b) is float for b in group["betas"])
    with pytest.raises(ValueError, match=r"^Invalid lr: np\.float32\(-0\.05\); expected a finite lr >= 0$"):
        AdaBound(params, lr=-value)


def test_numpy_scalars_in_the_tasks():
    from flatminima.lightning_modules import Classifier, NodeClassifier, Regressor
    from flatminima.lightning_modules.networks import MLP

    clf = Classifier(MLP(in_features=2, out_features=3), num_classes=np.int64(3), label_smoothing=np.float32(0.1))
    assert type(clf.num_classes) is int and type(clf.label_smoothing) is float
    reg = Regressor(MLP(in_features=2, out_features=1), num_outputs=np.int64(1), loss_scale=np.float32(2.0))
    assert type(reg.num_outputs) is int and reg.loss_scale == 2.0
    node = NodeClassifier(MLP(in_features=2, out_features=3), train_subgraph_hops=np.int64(2))
    assert node.train_subgraph_hops == 2 and type(node.train_subgraph_hops) is int
    for make in (
        lambda: Classifier(MLP(in_features=2, out_features=2), label_smoothing=True),
        lambda: Regressor(MLP(in_features=2, out_features=1), loss_scale=math.nan),
        lambda: NodeClassifier(MLP(in_features=2, out_features=3), train_subgraph_hops=True),
    ):
        with pytest.raises(ValueError, match="^Invalid (label_smoothing|loss_scale|train_subgraph_hops): "):
            make()
