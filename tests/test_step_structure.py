"""The pieces of the two-pass step: the perturbed-weights context manager, the refused update, the epoch means.

The expected values are computed here independently (copies taken before, ``math.fsum`` over Python floats),
not with the code under test.
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import weakref
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from flatminima.lightning_modules import SAM, Classifier
from flatminima.lightning_modules._epoch_means import EpochMean, EpochMeans
from flatminima.lightning_modules._step import PerturbedWeights
from tests.helpers import bn_mlp, classification_batches, fixed_batches, quiet_trainer


def _bn_state(net: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = list(net.parameters())
    buffers = [
        b
        for m in net.modules()
        if isinstance(m, nn.BatchNorm1d)
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]
    return params, buffers


# ---------------------------------------------------------------------------------------- PerturbedWeights
def test_perturbed_weights_are_w_plus_eps_inside_and_exactly_w_after_an_error():
    net = bn_mlp(dtype=torch.float32)
    params, buffers = _bn_state(net)
    with torch.no_grad():
        params[0].fill_(0.1)  # (0.1 + 1e8) - 1e8 != 0.1 in float32: only a copy restores w exactly
    w = [p.detach().clone() for p in params]
    stats = [b.clone() for b in buffers]
    eps = [torch.full_like(p, 1e8) if i == 0 else torch.randn_like(p) for i, p in enumerate(params)]
    inside = []
    x = torch.randn(16, 3)
    with pytest.raises(RuntimeError, match="out of memory"):
        with PerturbedWeights(
            params,
            [e.clone() for e in eps],
            [torch.empty_like(p) for p in params],
            buffers,
            [torch.empty_like(b) for b in buffers],
        ):
            inside.extend(p.detach().clone() for p in params)
            net.train()(x)  # pass 2's forward moves the BatchNorm statistics
            assert not all(torch.equal(a, b) for a, b in zip(buffers, stats))
            raise RuntimeError("simulated out of memory in pass 2")
    assert all(torch.equal(a, b + e) for a, b, e in zip(inside, w, eps))
    assert float(((w[0] + eps[0]) - eps[0])[0, 0]) != 0.1  # the arithmetic undo would not be exact
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, w))
    assert all(torch.equal(a, b) for a, b in zip(buffers, stats))


def test_perturbed_weights_keep_no_reference_to_eps_in_pass_two():
    params = [nn.Parameter(torch.zeros(1000))]
    eps = [torch.ones(1000)]
    gone = weakref.ref(eps[0])
    perturbed = PerturbedWeights(params, eps, [torch.empty(1000)])
    del eps
    with perturbed:
        gc.collect()
        assert gone() is None  # ε freed before pass 2 runs
        assert torch.equal(params[0].detach(), torch.ones(1000))
    assert torch.equal(params[0].detach(), torch.zeros(1000))
    with pytest.raises(RuntimeError, match="entered once"):
        perturbed.__enter__()


def test_an_error_in_pass_two_leaves_pass_index_at_zero():
    class FailSecond(nn.Module):
        calls = 0

        def forward(self, z):
            FailSecond.calls += 1
            if FailSecond.calls == 2:
                raise RuntimeError("simulated error in pass 2")
            return z

    net = bn_mlp(dtype=torch.float32)
    net.insert(0, FailSecond())
    model = Classifier(net, num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1), minimizer=SAM(0.05))
    with pytest.raises(RuntimeError, match="simulated error in pass 2"):
        quiet_trainer(max_steps=1).fit(model, fixed_batches(classification_batches(1, dtype=torch.float32)))
    assert model.pass_index == 0


# ---------------------------------------------------------------------------------------- the refused update
class _Snapshots(pl.Callback):
    """The weights and the optimizer state after every batch."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []
        self.states: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append([p.detach().clone() for p in pl_module.net.parameters()])
        state = trainer.optimizers[0].state_dict()["state"]
        self.states.append(
            {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in state.items()}
        )


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys()
        and all(torch.equal(torch.as_tensor(a[k][n]), torch.as_tensor(b[k][n])) for n in a[k])
        for k in a
    )


def test_a_skipped_update_leaves_weights_and_optimizer_state_untouched_and_is_counted():
    batches = classification_batches(3, dtype=torch.float32)
    batches[1] = (batches[1][0].clone().fill_(float("nan")), batches[1][1])
    model = Classifier(
        bn_mlp(dtype=torch.float32),
        num_classes=3,
        optimizer=partial(torch.optim.Adam, lr=0.01),
        minimizer=SAM(0.05),
        on_nonfinite="skip",
    )
    snaps = _Snapshots()
    trainer = quiet_trainer(max_epochs=1, callbacks=[snaps])
    with pytest.warns(UserWarning, match=r"at epoch 0, step 1, batch loss nan: update skipped"):
        trainer.fit(model, fixed_batches(batches))
    first, skipped, last = snaps.weights
    assert all(torch.equal(a, b) for a, b in zip(first, skipped))
    assert _same_state(snaps.states[0], snaps.states[1])  # Adam's moments and step counts untouched
    assert not all(torch.equal(a, b) for a, b in zip(skipped, last))  # the next batch trains again
    assert not _same_state(snaps.states[1], snaps.states[2])
    assert model.skipped_steps == 1 and trainer.global_step == 3  # the skipped step still counts as a step
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert all(torch.isfinite(p).all() for p in model.net.parameters())


# ---------------------------------------------------------------------------------------- epoch means
def test_epoch_mean_is_the_batch_size_weighted_mean_in_float64():
    values = [0.1, 1e-8, 3.0, 7.25, 1e-3]
    sizes = [16, 16, 16, 5, 1]
    mean = EpochMean()
    for v, n in zip(values, sizes):
        mean.update(torch.tensor(v, dtype=torch.float32), n)
    expected = math.fsum(float(torch.tensor(v, dtype=torch.float32)) * n for v, n in zip(values, sizes)) / sum(sizes)
    result = mean.compute()
    assert result.dtype == torch.float64 and float(result) == pytest.approx(expected, rel=1e-15)
    mean.reset()
    mean.update(torch.tensor(2.0), 3)
    assert float(mean.compute()) == 2.0


def test_epoch_mean_stays_float64_when_the_module_is_cast_and_keeps_nan():
    holder = nn.Module()
    holder.mean = EpochMean()
    holder.to(torch.bfloat16)  # Lightning's "bf16-true" precision casts the LightningModule so
    holder.half()
    assert holder.mean.mean_value.dtype == torch.float64 and holder.mean.weight.dtype == torch.float64
    holder.mean.update(torch.tensor(1e300, dtype=torch.float64), 4)
    holder.mean.update(torch.tensor(3e300, dtype=torch.float64), 4)
    assert float(holder.mean.compute()) == pytest.approx(2e300, rel=1e-15)  # float32 sums would be inf
    holder.mean.update(torch.tensor(float("nan")), 1)
    assert math.isnan(float(holder.mean.compute()))  # a NaN loss is not silently dropped from the mean


def test_epoch_means_compute_only_the_values_updated_this_epoch():
    means = EpochMeans(("loss", "grad_norm", "loss_perturbed"))
    means.update({"loss": torch.tensor(1.0), "grad_norm": torch.tensor(4.0)}, 2)
    means.update({"loss": torch.tensor(4.0), "grad_norm": torch.tensor(1.0)}, 1)
    result = means.compute()
    assert list(result) == ["loss", "grad_norm"]
    assert float(result["loss"]) == 2.0 and float(result["grad_norm"]) == 3.0
    means.reset()
    assert means.compute() == {}


def test_the_module_logs_weighted_epoch_means_of_its_step_values():
    batches = classification_batches(3, dtype=torch.float32)
    batches[2] = (batches[2][0][:5], batches[2][1][:5])  # a short last batch weighs less
    seen: list[tuple[float, int]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((float(outputs["loss"]), batch[0].shape[0]))

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = Classifier(
        bn_mlp(dtype=torch.float32), num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1), minimizer=SAM(0.05)
    )
    trainer = quiet_trainer(max_epochs=1, callbacks=[Record()])
    trainer.fit(model, loader)
    assert [n for _, n in seen] == [16, 16, 5]
    expected = math.fsum(v * n for v, n in seen) / 37
    logged = trainer.callback_metrics["train/loss"]
    assert logged.dtype == torch.float32 and float(logged) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_ddp_epoch_means_weigh_every_batch_of_every_rank(tmp_path):
    script = Path(__file__).with_name("ddp_epoch_means_script.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=script.parents[1]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for stage in ("train", "val"):
        seen = ranks[0][stage] + ranks[1][stage]
        assert ranks[0][stage] != ranks[1][stage] and len({n for _, n in seen}) > 1  # the weights matter
        expected = math.fsum(v * n for v, n in seen) / sum(n for _, n in seen)
        for rank in ranks:
            logged = rank["logged"][f"{stage}/loss"]
            assert logged.dtype == torch.float64 and float(logged) == pytest.approx(expected, rel=1e-12)


def test_the_epoch_means_stay_out_of_the_module_tree():
    """The model summary, state_dict and checkpoints list the network and the task's metrics only."""
    model = Classifier(bn_mlp(dtype=torch.float32), num_classes=3, minimizer=SAM(0.05))
    assert [name for name, _ in model.named_children()] == ["net", "train_acc", "val_acc", "test_acc"]
    assert all(key.startswith("net.") for key in model.state_dict())


@pytest.mark.parametrize("bar", [True, False])
def test_the_progress_bar_loss_is_logged_only_when_a_bar_shows_it(bar):
    model = Classifier(bn_mlp(), num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1)).double()
    trainer = quiet_trainer(max_epochs=1, enable_progress_bar=bar, limit_val_batches=0)
    trainer.fit(model, fixed_batches(classification_batches(2)))
    assert ("loss" in trainer.progress_bar_metrics) is bar
    assert "train/loss" in trainer.callback_metrics  # the epoch mean either way
