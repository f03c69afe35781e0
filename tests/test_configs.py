"""Every YAML under configs/ is instantiated through the CLI; one fast_dev_run fit per experiment and data set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_data import (
    SKIP_SHARED,
    copy_abalone,
    copy_cora_raw,
    shared_datasets,
    skip_md5,
    write_cifar10,
    write_mnist,
)

from flatminima import cli

CONFIGS = cli.ROOT / "configs"
# configs/studies/ holds study files (python cli.py study run), not LightningCLI configs: tests/test_study_spec.py
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if p.parent.name != "studies")
BASE = ["data/moons.yaml", "model/mlp.yaml"]  # a cheap data + model under the other groups' presets


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cli(*configs: str, extra: tuple[str, ...] = ()) -> cli.FlatMinimaCLI:
    """Instantiate (no run) the CLI of :func:`cli.main` on config files relative to configs/."""
    return cli.main([a for c in configs for a in ("--config", str(CONFIGS / c))] + list(extra), run=False)


def in_group(group: str) -> list[str]:
    return [c for c in ALL if c.startswith(f"{group}/")]


# ---------------------------------------------------------------- data x model presets
# Every data preset and every model preset appears at least once (checked below). The nets' input
# shapes are set in the model presets (not linked: see cli.py); the data module checks them.
PAIRS = [
    ("data/moons.yaml", "model/mlp.yaml"),
    ("data/abalone.yaml", "model/fcnn.yaml"),
    ("data/cora.yaml", "model/gat.yaml"),
    ("data/fashion_mnist.yaml", "model/simplebatch.yaml"),
    ("data/fashion_mnist.yaml", "model/middlebatch.yaml"),
    ("data/fashion_mnist.yaml", "model/complexbatch.yaml"),
    ("data/fashion_mnist.yaml", "model/lenet5.yaml"),
    ("data/mnist.yaml", "model/small_cnn.yaml"),
    ("data/cifar10.yaml", "model/simplebatch_cifar10.yaml"),
    ("data/cifar10.yaml", "model/middlebatch_cifar10.yaml"),
    ("data/cifar10.yaml", "model/complexbatch_cifar10.yaml"),
    ("data/cifar10.yaml", "model/resnet18.yaml"),
    ("data/cifar10.yaml", "model/vgg16.yaml"),
    ("data/cifar10.yaml", "model/wideresnet.yaml"),
    ("data/cifar10.yaml", "model/pyramidnet.yaml"),
    ("data/matrix_sensing.yaml", "model/matrix_factorization.yaml"),
    ("data/digits.yaml", "model/simplebatch_digits.yaml"),
    ("data/digits.yaml", "model/middlebatch_digits.yaml"),
    ("data/digits.yaml", "model/complexbatch_digits.yaml"),
    ("data/digits.yaml", "model/resnet_digits.yaml"),
    ("data/moons_published.yaml", "model/mlp_binary.yaml"),
]
# data attribute -> net attribute that must agree
SHAPE = {"in_channels": "in_channels", "image_size": "image_size", "num_features": "in_features", "dim": "dim"}


def test_every_config_is_covered():
    """Each YAML file is instantiated by one of the tests of this file (the rules below)."""
    covered = set(in_group("experiments")) | {c for pair in PAIRS for c in pair}
    covered |= set(in_group("optim")) | set(in_group("minimizer")) | set(in_group("trainer"))
    covered |= set(OTHER)
    assert set(ALL) == covered, f"not instantiated by any test: {sorted(set(ALL) - covered)}"
    assert {"data/abalone.yaml", "data/cora.yaml", "data/cifar10.yaml", "model/resnet18.yaml"} <= set(ALL)


@pytest.mark.parametrize("data, model", PAIRS, ids=[f"{Path(d).stem}+{Path(m).stem}" for d, m in PAIRS])
def test_data_and_model_presets_fit_together(data, model):
    c = make_cli(data, model)
    net, dm = c.model.net, c.datamodule
    checked = 0
    for data_attr, net_attr in SHAPE.items():
        if hasattr(dm, data_attr) and isinstance(getattr(net, net_attr, None), int):
            assert getattr(net, net_attr) == getattr(dm, data_attr), (net_attr, getattr(net, net_attr))
            checked += 1
    assert checked >= 1, f"{model} shares no input attribute with {data}"
    if hasattr(dm, "num_classes"):  # linked into the task; the task checks the net's outputs
        outputs = 1 if type(c.model).__name__ == "BinaryClassifier" else dm.num_classes  # one logit
        assert c.model.num_classes == dm.num_classes and net.out_features == outputs
    else:
        assert net.out_features == 1 == c.model.num_outputs


def test_class_count_link_gives_a_clear_error_on_mismatch(capsys):
    """data.num_classes goes into the task, which refuses a net with another number of outputs."""
    c = make_cli(
        "data/cora.yaml",
        "model/gat.yaml",
        extra=(
            "--data.init_args.name",
            "PubMed",
            "--model.init_args.net.init_args.in_features",
            "500",
            "--model.init_args.net.init_args.num_classes",
            "3",
        ),
    )
    assert (c.model.num_classes, c.model.net.out_features) == (3, 3)
    with pytest.raises(SystemExit):
        make_cli("data/cora.yaml", "model/gat.yaml", extra=("--data.init_args.name", "PubMed"))
    assert "out_features=7 but num_classes=3" in capsys.readouterr().err


def test_composition_swaps_the_net_of_an_experiment():
    c = make_cli("experiments/sam_wrn_cifar10.yaml", "model/resnet18.yaml", "optim/adam.yaml", "minimizer/asam.yaml")
    assert type(c.model.net).__name__ == "ResNet18" and type(c.model.minimizer).__name__ == "ASAM"
    assert c.model.label_smoothing == 0.1  # the rest of the experiment stays
    assert isinstance(c.model.configure_optimizers()["optimizer"], torch.optim.Adam)


# ---------------------------------------------------------------- experiments
EXPERIMENT_NETS = {
    "experiments/moons_gsam.yaml": ("MLP", "MoonsDataModule", "GSAM"),
    "experiments/minsharp_fashion_mnist.yaml": ("SimpleBatch", "FashionMNISTDataModule", "SAM"),
    "experiments/minsharp_cifar10.yaml": ("SimpleBatch", "CIFAR10DataModule", "SAM"),
    "experiments/adam_sam_cifar10.yaml": ("ResNet18", "CIFAR10DataModule", "SAM"),
    "experiments/adaptive_sharpness_abalone.yaml": ("FCNN", "AbaloneDataModule", None),
    "experiments/adaptive_sharpness_fashion_mnist.yaml": ("LeNet5", "FashionMNISTDataModule", None),
    "experiments/adaptive_sharpness_cora.yaml": ("GAT", "PlanetoidDataModule", None),
    "experiments/gat_paper_cora.yaml": ("GAT", "PlanetoidDataModule", None),
    "experiments/mnist_gsam.yaml": ("SmallCNN", "MNISTDataModule", "GSAM"),
    "experiments/sam_wrn_cifar10.yaml": ("WideResNet", "CIFAR10DataModule", "SAM"),
    "experiments/matrix_sensing_sam.yaml": ("MatrixFactorization", "MatrixSensingDataModule", "SAM"),
    "experiments/matrix_sensing_published.yaml": ("MatrixFactorization", "MatrixSensingDataModule", "SAM"),
    "experiments/moons_gsam_published.yaml": ("MLP", "MoonsDataModule", "GSAM"),
    "experiments/adaptive_sharpness_abalone_notebook.yaml": ("FCNN", "AbaloneDataModule", None),
    "experiments/adaptive_sharpness_cora_notebook.yaml": ("GAT", "PlanetoidDataModule", None),
    "experiments/adaptive_sharpness_fashion_mnist_notebook.yaml": ("LeNet5", "FashionMNISTDataModule", None),
    "experiments/minsharp_digits.yaml": ("SimpleBatch", "DigitsDataModule", "SAM"),
    "experiments/measures_ranking_digits.yaml": ("ConvNet", "DigitsDataModule", None),
    "experiments/gradient_norm_digits.yaml": ("ResNet", "DigitsDataModule", "SAM"),
}


@pytest.mark.parametrize("config", in_group("experiments"))
def test_experiment_instantiates(config):
    c = make_cli(config)
    assert config in EXPERIMENT_NETS, f"{config}: add it to EXPERIMENT_NETS and to the fits below"
    net, data, rule = EXPERIMENT_NETS[config]
    assert type(c.model.net).__name__ == net and type(c.datamodule).__name__ == data
    assert (type(c.model.minimizer).__name__ if c.model.minimizer is not None else None) == rule
    assert c.trainer.max_epochs >= 1
    assert isinstance(c.model.configure_optimizers(), (torch.optim.Optimizer, dict))


# ---------------------------------------------------------------- optimizer and rule presets
# The variants that change the step (LookSAM, the schedules, MSAM, ESAM, SAF, MESA) are parsed with heavy-ball SGD
# only, which each of them accepts: the cross with every optimizer would add ~20 s and test the parser alone.
VARIANT_PRESETS = {
    f"minimizer/{n}.yaml" for n in ("looksam", "sam_every_k", "sam_random", "aesam", "msam", "esam", "saf", "mesa")
}
RULE_OPTIM = [
    (r, o)
    for r in in_group("minimizer")
    for o in in_group("optim")
    if r not in VARIANT_PRESETS or o == "optim/phb.yaml"
]


@pytest.mark.parametrize(("rule", "optim"), RULE_OPTIM, ids=[f"{Path(r).stem}-{Path(o).stem}" for r, o in RULE_OPTIM])
def test_every_base_optimizer_with_every_rule(optim, rule):
    c = make_cli(*BASE, optim, rule)
    opt = c.model.configure_optimizers()
    assert isinstance(opt, torch.optim.Optimizer)
    assert type(opt).__name__.lower() in Path(optim).stem.replace("phb", "sgd")
    expected = None if rule == "minimizer/none.yaml" else c.config["model"]["init_args"]["minimizer"]["class_path"]
    got = c.model.minimizer
    assert (got is None) if expected is None else (f"{type(got).__module__}.{type(got).__name__}" == expected)


@pytest.mark.parametrize("config", in_group("trainer"))
def test_trainer_presets(config, capsys):
    if "gpu" in config and not torch.cuda.is_available():
        with pytest.raises((Exception, SystemExit)) as err:  # refused by Lightning, with a message about the GPU
            make_cli(*BASE, config)
        message = f"{err.value} {capsys.readouterr().err}"
        assert "GPU" in message or "gpu" in message or "CUDA" in message
        return
    assert make_cli(*BASE, config).trainer is not None


# Any other folder (e.g. callbacks/): each file composes with the base data + model.
OTHER = [c for c in ALL if c.split("/")[0] not in {"data", "model", "optim", "minimizer", "trainer", "experiments"}]


@pytest.mark.parametrize("config", OTHER or [pytest.param(None, marks=pytest.mark.skip(reason="no other configs yet"))])
def test_other_configs_instantiate(config):
    assert make_cli(*BASE, config) is not None


# ---------------------------------------------------------------- one fast_dev_run fit per data set
@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """Tiny image files in torchvision's formats (+ the real Abalone/Cora when available); cwd is a tmp dir."""
    root = tmp_path / "data"
    write_cifar10(root, per_batch=2, test=4)
    write_mnist(root, "MNIST", train=8, test=4)
    write_mnist(root, "FashionMNIST", train=8, test=4)
    skip_md5(monkeypatch)
    monkeypatch.chdir(tmp_path)  # logs and checkpoints stay out of the repository
    return root


SMALL_IMAGES = ("--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2")
THIN = ("--model.init_args.net.init_args.width", "4")  # ResNet18 / WideResNet: the full nets step in test_networks
FITS = {  # experiment -> extra CLI arguments that keep the run tiny
    "experiments/moons_gsam.yaml": ("--data.init_args.num_samples", "200"),
    "experiments/minsharp_fashion_mnist.yaml": (),
    "experiments/minsharp_cifar10.yaml": (),
    "experiments/adam_sam_cifar10.yaml": SMALL_IMAGES + THIN,
    "experiments/adaptive_sharpness_fashion_mnist.yaml": (),
    "experiments/mnist_gsam.yaml": (),
    "experiments/sam_wrn_cifar10.yaml": SMALL_IMAGES + ("--model.init_args.net.init_args.width", "1"),
    "experiments/matrix_sensing_sam.yaml": (
        "--data.init_args.dim",
        "12",
        "--data.init_args.num_measurements",
        "60",
        "--data.init_args.num_val",
        "8",
        "--data.init_args.num_test",
        "8",
        "--model.init_args.net.init_args.dim",
        "12",
        "--model.init_args.net.init_args.width",
        "12",
    ),
    "experiments/adaptive_sharpness_abalone.yaml": (),  # real data
    "experiments/adaptive_sharpness_cora.yaml": (),  # real data
    "experiments/gat_paper_cora.yaml": (),  # real data
    "experiments/matrix_sensing_published.yaml": (
        "--data.init_args.dim",
        "12",
        "--data.init_args.num_measurements",
        "60",
        "--data.init_args.num_val",
        "8",
        "--data.init_args.num_test",
        "8",
        "--model.init_args.net.init_args.dim",
        "12",
        "--model.init_args.net.init_args.width",
        "12",
    ),
    "experiments/moons_gsam_published.yaml": ("--data.init_args.num_samples", "200"),
    "experiments/adaptive_sharpness_abalone_notebook.yaml": (),  # real data
    "experiments/adaptive_sharpness_cora_notebook.yaml": (),  # real data
    "experiments/adaptive_sharpness_fashion_mnist_notebook.yaml": (),
    "experiments/minsharp_digits.yaml": (),
    "experiments/measures_ranking_digits.yaml": (),
    "experiments/gradient_norm_digits.yaml": (),
}
REAL = {
    "experiments/adaptive_sharpness_abalone.yaml": copy_abalone,
    "experiments/adaptive_sharpness_cora.yaml": copy_cora_raw,
    "experiments/gat_paper_cora.yaml": copy_cora_raw,
    "experiments/adaptive_sharpness_abalone_notebook.yaml": copy_abalone,
    "experiments/adaptive_sharpness_cora_notebook.yaml": copy_cora_raw,
}
GENERATED = ("matrix_sensing", "moons", "digits")  # no data_dir argument


def fit(args: list[str]) -> cli.FlatMinimaCLI:
    """``python cli.py fit ... --trainer.fast_dev_run true``, in process, through :func:`cli.main`."""
    result = cli.main(["fit", *args, "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"])
    assert result.trainer.state.finished and result.trainer.global_step == 1
    return result


def test_every_experiment_has_a_fit():
    assert set(FITS) == set(in_group("experiments"))


@pytest.mark.parametrize("config", list(FITS))
def test_experiment_fast_dev_run(config, data_root):
    if config in REAL:
        if shared_datasets() is None:
            pytest.skip(SKIP_SHARED)
        REAL[config](data_root)
    extra = () if any(g in config for g in GENERATED) else ("--data.init_args.data_dir", str(data_root))
    result = fit(["--config", str(CONFIGS / config), *extra, *FITS[config]])
    assert torch.isfinite(result.trainer.callback_metrics["train/loss"])


def test_composed_presets_fast_dev_run(data_root):
    """The composition of docs/cli.md: data + model + base optimizer + rule presets."""
    args = [
        a
        for c in ("data/cifar10.yaml", "model/resnet18.yaml", "optim/sgd.yaml", "minimizer/sam.yaml")
        for a in ("--config", str(CONFIGS / c))
    ]
    result = fit([*args, "--data.init_args.data_dir", str(data_root), *SMALL_IMAGES, *THIN])
    assert type(result.model.net).__name__ == "ResNet18" and "train/loss_perturbed" in result.trainer.callback_metrics


def test_missing_data_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from flatminima.datamodules import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="CIFAR-10 not found") as err:
        fit(["--config", str(CONFIGS / "experiments/adam_sam_cifar10.yaml"), "--data.init_args.data_dir", "nowhere"])
    assert str(Path("nowhere") / "cifar-10-batches-py" / "data_batch_1") in str(err.value)


def test_net_built_for_another_input_is_refused_by_the_data(data_root):
    args = [a for c in ("data/cifar10.yaml", "model/simplebatch.yaml") for a in ("--config", str(CONFIGS / c))]
    with pytest.raises(
        ValueError,
        match="in_channels=1 but the data needs in_channels=3; set model.init_args.net.init_args.in_channels: 3",
    ):
        fit([*args, "--data.init_args.data_dir", str(data_root)])


@pytest.mark.parametrize(
    "configs, extra",
    [
        (("data/moons.yaml", "model/mlp.yaml"), ("--data.init_args.num_samples", "100")),
        (("data/cifar10.yaml", "model/resnet18.yaml"), SMALL_IMAGES + THIN),
        (
            ("data/matrix_sensing.yaml", "model/matrix_factorization.yaml"),
            (
                "--data.init_args.dim",
                "6",
                "--data.init_args.num_measurements",
                "20",
                "--data.init_args.num_val",
                "4",
                "--data.init_args.num_test",
                "4",
                "--model.init_args.net.init_args.dim",
                "6",
                "--model.init_args.net.init_args.width",
                "6",
            ),
        ),
    ],
    ids=["moons+mlp", "cifar10+resnet18", "matrix_sensing"],
)
def test_checkpoint_rebuilds_net_and_task(configs, extra, data_root, tmp_path):
    """load_from_checkpoint rebuilds the net from the saved hyperparameters (docs/design.md, "Decisions")."""
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    data_dir = () if "cifar10" not in configs[0] else ("--data.init_args.data_dir", str(data_root))
    result = cli.main(
        [
            "fit",
            *args,
            *data_dir,
            *extra,
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    (ckpt,) = tmp_path.rglob("*.ckpt")
    loaded = type(result.model).load_from_checkpoint(ckpt)
    assert type(loaded) is type(result.model) and type(loaded.net) is type(result.model.net)
    for (name, a), b in zip(result.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
