"""The two terms of the adaptive sharpness (A, L), the selection of a pass end, and falling ascent steps.

Oracles: a two-parameter concave quadratic whose projected-ascent iterates are worked out by hand below
(one coordinate oscillates between the box's faces, the other converges geometrically), and a plain-torch
rewrite of Hammoud et al.'s FCNN notebook loop (github.com/HadiHammoud44/CS439_Sharpness, FCNN_model.ipynb:
SGD on the negated training MSE, clamp back into the box after every step, keep the weights at the end of
the pass whose summed MSE is the largest, sharpness = MSE there minus the clean MSE).
"""

from __future__ import annotations

import copy
import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatminima.callbacks import AdaptiveSharpness, LossThresholdCheckpoint, RunSummary, measures
from flatminima.callbacks.adaptive import _PassEnds
from flatminima.callbacks.inputs import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


# ---------------------------------------------------------------------------------------- a hand-worked ascent
class Point(nn.Module):
    """Two weights w = (1, 1); the "output" is w itself, so the loss below is a function of w alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, dtype=DT))

    def forward(self, x):
        return self.w + 0 * x.sum()


CENTRE = torch.tensor([1.1, 1.15], dtype=DT)
CURVATURE = torch.tensor([1.0, 0.125], dtype=DT)


def concave(out, target):
    """L(w) = −Σ k_i (w_i − c_i)²: the ascent moves each coordinate towards c_i."""
    return -(CURVATURE * (out - target).square()).sum()


# With ρ = 0.2 (box |δ_i| ≤ 0.2) and step η = 2, δ ← clip(δ + 2·∇L):
#   coordinate 1, e = w − 1.1: e₀ = −0.1 → e = −0.1 + 2·0.2 = 0.3, clipped to δ = 0.2, e = 0.1 → then
#     e = 0.1 − 2·0.2 = −0.3 (δ = −0.2, on the box) → 0.1 → −0.3 → ...: −e² = −0.01, −0.09, −0.01, ...
#   coordinate 2, e = w − 1.15: e ← e − 2·0.25·e = e/2 (never clipped): −0.125·e² = −0.0028125·0.25^k.
B = [-0.0028125 * 0.25**k for k in range(7)]
LOSS = [-0.01 + B[0]] + [(-0.01 if k % 2 else -0.09) + B[k] for k in range(1, 7)]  # iterates 0 (clean) .. 6


def hand_measure(**kw):
    batch = (torch.zeros(1, dtype=DT), CENTRE)
    return measures.adaptive_sharpness_parts(
        Point(), [batch], 0.2, method="pga", step_size=2.0, n_iters=6, loss_fn=concave, **kw
    )


def test_the_hand_worked_ascent_best_iterate():
    parts = hand_measure()
    assert parts.clean_loss == pytest.approx(LOSS[0], abs=1e-15)
    assert parts.ascent_loss == pytest.approx(LOSS[5], abs=1e-15)  # −0.01 − 0.0028125/4⁵, the largest of 1..6
    assert parts.value == pytest.approx(LOSS[5] - LOSS[0], abs=1e-15)
    assert parts.falls == pytest.approx(3 / 6)  # iterates 2, 4 and 6 fall below their predecessors


@pytest.mark.parametrize(
    "passes, selected",
    [
        (3, 6),  # pass sums: L1+L2, L3+L4, L5+L6 — the last is the largest: its end, iterate 6 (a trough)
        (2, 3),  # L1+L2+L3 (one trough) > L4+L5+L6 (two troughs): iterate 3
        (6, 5),  # one step per pass: the pass end is the iterate itself, so the best iterate
        (1, 6),  # one pass: its end, the last iterate
    ],
)
def test_the_hand_worked_ascent_best_pass_end(passes, selected):
    sums = [sum(LOSS[1 + j * 6 // passes : 1 + (j + 1) * 6 // passes]) for j in range(passes)]
    assert (sums.index(max(sums)) + 1) * 6 // passes == selected  # the hand reading of the pass sums
    parts = hand_measure(select="best_pass_end", passes=passes)
    assert parts.ascent_loss == pytest.approx(LOSS[selected], abs=1e-15)
    assert parts.clean_loss == pytest.approx(LOSS[0], abs=1e-15)
    assert parts.value == pytest.approx(LOSS[selected] - LOSS[0], abs=1e-15)
    assert (
        measures.adaptive_sharpness(
            Point(),
            [(torch.zeros(1, dtype=DT), CENTRE)],
            0.2,
            method="pga",
            step_size=2.0,
            n_iters=6,
            loss_fn=concave,
            select="best_pass_end",
            passes=passes,
        )
        == parts.value
    )


@pytest.mark.parametrize(
    "losses, pass_steps, selected",
    [
        ([1.0, 3.0, 3.0, 1.0], 2, 3.0),  # equal sums 4 and 4: the earliest pass (the notebook's strict >)
        ([1.0, 3.0, 2.0, 2.5], 2, 2.5),  # sums 4 and 4.5
        ([5.0, 0.0, 1.0, 1.0, 1.0, 1.0], 3, 1.0),  # sums 6 and 3: the end of the first pass, not the best iterate 5
        ([1.0, float("nan"), 9.0, 9.0], 2, float("nan")),  # a NaN sum is selected and stays (as torch.maximum)
    ],
)
def test_pass_end_selection_rule(losses, pass_steps, selected):
    ends = _PassEnds(torch.zeros((), dtype=DT), pass_steps)
    for i, loss in enumerate(losses):
        ends.add(i, torch.tensor(loss, dtype=DT))
    assert float(ends.selected) == pytest.approx(selected, nan_ok=True)


# ---------------------------------------------------------------------------------------- the FCNN notebook
def elu_fcnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.ELU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 1), nn.ELU()]
    return nn.Sequential(*layers).double().eval()


def notebook_pass_ends(net: nn.Module, x, y, rho: float, lr: float, passes: int, steps: int) -> tuple[float, float]:
    """(Max, Min) of FCNN_model.ipynb: Max the train MSE of the weights saved at the end of the best pass."""
    network = copy.deepcopy(net)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    listt = [p.clone() for p in network.parameters()]
    saved, maximum_ = None, 0.0
    for _ in range(passes):
        maximum = 0.0
        for _ in range(steps):
            optimizer.zero_grad()
            (-nn.MSELoss()(network(x), y)).backward()
            optimizer.step()
            with torch.no_grad():
                for i, param in enumerate(network.parameters()):
                    param.data = torch.clamp(param.data, -listt[i] * rho + listt[i], listt[i] * rho + listt[i])
                maximum += float(nn.MSELoss()(network(x), y))
        if maximum > maximum_:
            saved, maximum_ = copy.deepcopy(network.state_dict()), maximum
    localmax = copy.deepcopy(net)
    localmax.load_state_dict(saved)
    with torch.no_grad():
        return float(nn.MSELoss()(localmax(x), y)), float(nn.MSELoss()(net(x), y))


def test_best_pass_end_reproduces_the_fcnn_notebook():
    net = elu_fcnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=g, dtype=DT)
    y = torch.randn(60, 1, generator=g, dtype=DT)
    rho, lr, passes, steps = 1.0, 30.0, 3, 4  # a box and a step large enough that the ascent is not monotone
    big_max, big_min = notebook_pass_ends(net, x, y, rho, lr, passes, steps)
    kw = dict(method="pga", step_size=lr, n_iters=passes * steps, loss_fn=mse_loss, box="signed")
    parts = measures.adaptive_sharpness_parts(net, [(x, y)], rho, select="best_pass_end", passes=passes, **kw)
    assert parts.ascent_loss == pytest.approx(big_max, rel=1e-10)
    assert parts.clean_loss == pytest.approx(big_min, rel=1e-12)
    assert parts.value == pytest.approx(big_max - big_min, rel=1e-9)
    best = measures.adaptive_sharpness_parts(net, [(x, y)], rho, **kw)
    assert best.falls > 0  # not monotone here ...
    assert best.ascent_loss > parts.ascent_loss + 1e-6  # ... so the best iterate is not a pass end
    assert best.clean_loss == parts.clean_loss


@pytest.mark.parametrize("method", ["apgd", "apgd_reset", "pga"])
def test_parts_add_up_to_the_value_and_l_is_the_clean_loss(method):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(16, 5, dtype=DT)
    y = torch.randint(3, (16,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    kw = dict(method=method, n_iters=4, step_size=0.05 if method == "pga" else None)
    parts = measures.adaptive_sharpness_parts(net, batches, 0.05, **kw)
    assert parts.value == measures.adaptive_sharpness(net, batches, 0.05, **kw)
    with torch.no_grad():
        clean = (F.cross_entropy(net(x[:8]), y[:8]) + F.cross_entropy(net(x[8:]), y[8:])) / 2
    assert parts.clean_loss == pytest.approx(float(clean), rel=1e-12)
    assert parts.ascent_loss - parts.clean_loss == pytest.approx(parts.value, rel=1e-9)
    assert 0.0 <= parts.falls <= 1.0
    zero = measures.adaptive_sharpness_parts(net, batches, 0.0, **kw)
    assert (zero.value, zero.falls) == (0.0, 0.0) and zero.ascent_loss == zero.clean_loss == parts.clean_loss


def test_a_small_step_ascends_monotonically():
    net = elu_fcnn(2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g, dtype=DT), torch.randn(40, 1, generator=g, dtype=DT)
    parts = measures.adaptive_sharpness_parts(
        net, [(x, y)], 0.01, method="pga", step_size=1e-3, n_iters=5, loss_fn=mse_loss
    )
    assert parts.falls == 0.0 and parts.value > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="apgd", select="best_pass_end"), "Invalid select: 'best_pass_end' with method='apgd'"),
        (dict(method="pga", select="last"), "Invalid select: 'last'"),
        (dict(method="pga", select="best_pass_end", n_iters=10, passes=3), "Invalid passes: 3; expected a divisor"),
        (dict(method="pga", passes=2, n_iters=10), "Invalid passes: 2 with select='best_iterate'"),
        (dict(method="pga", select="best_pass_end", passes=0), "Invalid passes: 0"),
    ],
)
def test_bad_selections_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveSharpness(rho=0.1, **kwargs)
    kwargs = {"n_iters": 20, **kwargs}
    with pytest.raises(ValueError, match=message):
        measures.adaptive_sharpness(
            elu_fcnn(),
            [(torch.zeros(2, 6, dtype=DT), torch.zeros(2, 1, dtype=DT))],
            0.1,
            step_size=0.1,
            loss_fn=mse_loss,
            **kwargs,
        )


# ---------------------------------------------------------------------------------------- the callback
class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ELU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.net(batch[0]), batch[1])
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_logs_a_and_l_into_the_run_summary(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g)
    data = TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])
    kw = dict(
        rho=0.05,
        method="pga",
        n_iters=6,
        score="train_set",
        box="signed",
        loss_fn=mse_loss,
        batch_size=24,
        num_samples=None,
    )  # one ascent batch: the whole training set
    notebook = AdaptiveSharpness(select="best_pass_end", passes=3, **kw)
    best = AdaptiveSharpness(**kw)
    module = Tiny()
    callbacks = [
        LossThresholdCheckpoint(threshold=-math.inf, dirpath=str(tmp_path)),
        notebook,
        best,
        RunSummary(str(tmp_path / "summary.json")),
    ]
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(data, batch_size=24))
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for measure, name in ((notebook, "adaptive_best_pass_end_passes3"), (best, "adaptive_best_iterate_passes1")):
        assert measure.metric_name == name
        select = dict(select=measure.select, passes=measure.passes)
        expected = measures.adaptive_sharpness_parts(
            module.net,
            [data.tensors],
            0.05,
            method="pga",
            n_iters=6,
            step_size=0.1,
            loss_fn=mse_loss,
            box="signed",
            score_batches=[data.tensors],
            **select,
        )
        key = f"sharpness/{name}"
        assert metrics[key] == pytest.approx(expected.value, rel=1e-6)
        assert metrics[f"{key}_ascent_loss"] == pytest.approx(expected.ascent_loss, rel=1e-6)
        assert metrics[f"{key}_clean_loss"] == pytest.approx(expected.clean_loss, rel=1e-6)
        assert metrics[f"{key}_ascent_falls"] == pytest.approx(expected.falls)
        with torch.no_grad():
            assert metrics[f"{key}_clean_loss"] == pytest.approx(
                float(F.mse_loss(module.net(x), data.tensors[1])), rel=1e-6
            )


def test_the_notebook_config_measures_both_selections():
    import yaml

    config = yaml.safe_load(open("configs/experiments/adaptive_sharpness_abalone_notebook.yaml"))
    callbacks = config["trainer"]["callbacks"]
    notebook, best = [c["init_args"] for c in callbacks if c["class_path"] == "flatminima.callbacks.AdaptiveSharpness"]
    assert (notebook.get("name", "adaptive"), notebook["select"], notebook["passes"], notebook["n_iters"]) == (
        "adaptive",
        "best_pass_end",
        6,
        318,
    )  # their 6 passes of 53 steps
    assert (best["name"], best.get("select", "best_iterate"), best["n_iters"], best["box"]) == (
        "adaptive_best_iterate",
        "best_iterate",
        318,
        "signed",
    )
    assert {k: v for k, v in notebook.items() if k not in ("select", "passes")} == {
        k: v for k, v in best.items() if k != "name"
    }
    AdaptiveSharpness(**{k: v for k, v in notebook.items() if k != "loss_fn"})  # the options are accepted together
