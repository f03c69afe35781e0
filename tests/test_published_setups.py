"""The experiment configs that pin the authors' setups hold exactly the values their code uses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatminima import cli

CONFIGS = cli.ROOT / "configs"
AGSAM_PUBLISHED = (
    "--config",
    str(CONFIGS / "minimizer/agsam.yaml"),
    "--model.init_args.minimizer.init_args.rho",
    "0.5",
    "--model.init_args.minimizer.init_args.alpha",
    "0.04",
    "--model.init_args.minimizer.init_args.gamma",
    "0.1",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cli(config: str, *extra: str) -> cli.FlatMinimaCLI:
    return cli.main(["--config", str(CONFIGS / config), *extra], run=False)


def test_moons_published_arms_share_their_initial_weights():
    """Keras notebook: SGD lr 0.01 without momentum, GSAM(0.5, 0.04) vs Adaptive-GSAM(0.5, 0.04, 0.1), same start."""
    gsam = make_cli("experiments/moons_gsam_published.yaml")
    agsam = make_cli("experiments/moons_gsam_published.yaml", *AGSAM_PUBLISHED)
    rule = gsam.model.minimizer
    assert (type(rule).__name__, rule.rho, rule.alpha) == ("GSAM", 0.5, 0.04)
    rule = agsam.model.minimizer
    assert (type(rule).__name__, rule.rho, rule.alpha, rule.gamma) == ("AdaptiveGSAM", 0.5, 0.04, 0.1)
    for c in (gsam, agsam):
        opt = c.model.configure_optimizers()
        assert type(opt) is torch.optim.SGD and opt.defaults["lr"] == 0.01 and opt.defaults["momentum"] == 0.0
        assert type(c.model).__name__ == "BinaryClassifier" and c.trainer.max_epochs == 50
        linears = [m for m in c.model.net if isinstance(m, nn.Linear)]
        assert [m.out_features for m in linears] == [32, 32, 32, 1]
        assert all(torch.count_nonzero(m.bias) == 0 for m in linears)  # Keras' zero biases (Glorot weights)
        h = c.datamodule.hparams
        assert (h.data_seed, h.split, h.split_seed, h.test_fraction, h.val_fraction, h.standardize, h.batch_size) == (
            10,
            "sklearn",
            42,
            0.3,
            0.0,
            True,
            64,
        )
    for a, b in zip(gsam.model.net.state_dict().values(), agsam.model.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_tuned_moons_default_is_unchanged():
    c = make_cli("experiments/moons_gsam.yaml")
    assert type(c.model).__name__ == "Classifier" and c.model.net.out_features == 2
    opt = c.model.configure_optimizers()
    assert (opt.defaults["lr"], opt.defaults["momentum"]) == (0.1, 0.9)
    assert (c.model.minimizer.rho, c.model.minimizer.alpha) == (0.05, 0.1)
    h = c.datamodule.hparams
    assert (h.data_seed, h.split, h.val_fraction, h.test_fraction, h.standardize) == (0, "permutation", 0.1, 0.1, False)


def test_matrix_sensing_published_values():
    c = make_cli("experiments/matrix_sensing_published.yaml")
    assert c.trainer.precision == "64-true" and c.trainer.max_epochs == 10
    assert c.model.loss_scale == 0.5 and c.model.on_nonfinite == "stop"
    assert (c.model.net.dim, c.model.net.width) == (100, 100)
    opt = c.model.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.defaults["lr"] == 0.5 and opt.defaults["momentum"] == 0
    assert type(c.model.minimizer).__name__ == "SAM" and c.model.minimizer.rho == 0.1
    h = c.datamodule.hparams
    assert (h.dim, h.rank, h.num_measurements, h.batch_size, h.dtype) == (100, 5, 2500, 2500, "float64")
    # U_0 = 0.05 N(0, 1): the sample standard deviation of its 10^4 entries is 0.05 within 3 %
    assert c.model.net.U.std().item() == pytest.approx(0.05, rel=0.03)
    usam = make_cli(
        "experiments/matrix_sensing_published.yaml",
        "--config",
        str(CONFIGS / "minimizer/usam.yaml"),
        "--model.init_args.minimizer.init_args.rho",
        "0.1",
    )
    assert type(usam.model.minimizer).__name__ == "USAM" and usam.model.minimizer.rho == 0.1
    assert usam.model.loss_scale == 0.5


def test_notebook_configs_hold_the_notebooks_values():
    ab = make_cli("experiments/adaptive_sharpness_abalone_notebook.yaml")
    acts = [type(m).__name__ for m in ab.model.net]
    assert acts == ["Linear", "ELU", "Linear", "ELU", "Linear", "ELU"]
    assert ab.model.configure_optimizers().defaults["lr"] == 0.102
    h = ab.datamodule.hparams
    assert (h.split, h.split_seed, h.skip_first_row, h.standardize_targets, h.full_batch) == (
        "sklearn",
        42,
        True,
        True,
        True,
    )
    stop = [cb for cb in ab.trainer.callbacks if type(cb).__name__ == "RelativeLossStopping"][0]
    assert (stop.threshold, stop.change_mode, ab.trainer.max_epochs) == (0.05, "decrease", 12)
    sharp = [cb for cb in ab.trainer.callbacks if type(cb).__name__ == "AdaptiveSharpness"][0]
    assert (sharp.rho, sharp.p, sharp.method, sharp.n_iters, sharp.num_samples) == (0.025, math.inf, "pga", 318, 1)

    cora = make_cli("experiments/adaptive_sharpness_cora_notebook.yaml")
    net = cora.model.net
    assert (net.conv1.heads, net.input_dropout, net.dropout, net.conv1.dropout) == (1, 0.0, 0.6, 0.6)
    assert cora.datamodule.hparams.train_batch_nodes == 64 and not cora.datamodule.hparams.normalize_features
    stop = [cb for cb in cora.trainer.callbacks if type(cb).__name__ == "RelativeLossStopping"][0]
    assert (stop.min_epochs, stop.change_mode, cora.trainer.max_epochs) == (11, "abs", 20)

    fm = make_cli("experiments/adaptive_sharpness_fashion_mnist_notebook.yaml")
    opt = fm.model.configure_optimizers()
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (0.05, 0.005)
    assert sum(p.numel() for p in fm.model.net.parameters()) == 175_546
