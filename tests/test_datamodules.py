"""Data modules on real files (Abalone, Cora from ../shared/datasets) and format-faithful tiny files."""

from __future__ import annotations

import csv
from urllib.error import URLError

import numpy as np
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
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from flatminima.datamodules import (
    AbaloneDataModule,
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MatrixSensingDataModule,
    MNISTDataModule,
    MoonsDataModule,
    PlanetoidDataModule,
)
from flatminima.datamodules._labels import corrupt_labels
from flatminima.datamodules._loaders import EpochShuffleSampler
from flatminima.datamodules._transforms import Cutout

needs_shared = pytest.mark.skipif(shared_datasets() is None, reason=SKIP_SHARED)


pytestmark = pytest.mark.usefixtures("one_thread")


def _offline(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution (offline test)")


# ---------------------------------------------------------------- Abalone (real file)
def _abalone_numpy(path):
    """Independent reading: one-hot (M, F, I) + 7 measurements, rings."""
    with open(path) as f:
        rows = [r for r in csv.reader(f) if r]
    x = np.array([[r[0] == s for s in "MFI"] + [float(v) for v in r[1:8]] for r in rows], dtype=np.float64)
    y = np.array([float(r[8]) for r in rows])
    return x, y


@needs_shared
def test_abalone_real_file_split_and_train_only_standardization(tmp_path):
    dm = AbaloneDataModule(str(copy_abalone(tmp_path)), data_seed=3)
    dm.prepare_data()
    dm.setup("fit")
    raw_x, raw_y = _abalone_numpy(tmp_path / "abalone" / "abalone.data")
    assert raw_x.shape == (4177, 10)
    n_train, n_test = len(dm.train_set), len(dm.test_set)
    assert (n_train, n_test) == (4177 - 835, 835)  # 80/20: round(0.2 * 4177) = 835
    assert dm.val_set is dm.test_set  # val_fraction=0: the study has no validation split
    idx = dm.split_indices
    assert sorted(torch.cat([idx["train"], idx["test"]]).tolist()) == list(range(4177))
    tr, te = idx["train"].numpy(), idx["test"].numpy()
    mean, std = raw_x[tr].mean(axis=0), raw_x[tr].std(axis=0)  # training rows only, population std
    x_train, y_train = dm.train_set.tensors
    x_test, y_test = dm.test_set.tensors
    assert x_train.shape == (n_train, 10) and x_train.dtype == torch.float32
    np.testing.assert_allclose(x_train.numpy(), (raw_x[tr] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_test.numpy(), (raw_x[te] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_train.numpy(), raw_y[tr])
    np.testing.assert_allclose(y_test.numpy(), raw_y[te])
    np.testing.assert_allclose(x_train.mean(0).numpy(), 0, atol=1e-5)
    assert np.abs(x_test.mean(0).numpy()).max() > 1e-3  # the test rows were not standardised with their own stats
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.shape == (64, 10) and batch_y.shape == (64,)
    assert isinstance(dm.train_dataloader().sampler, EpochShuffleSampler)


@needs_shared
def test_abalone_split_is_deterministic_per_seed(tmp_path):
    root = str(copy_abalone(tmp_path))

    def test_rows(seed, **kwargs):
        dm = AbaloneDataModule(root, data_seed=seed, **kwargs)
        dm.setup()
        return dm

    a, b, c = test_rows(0), test_rows(0), test_rows(1)
    assert torch.equal(a.split_indices["test"], b.split_indices["test"])
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.split_indices["test"], c.split_indices["test"])
    v = test_rows(0, val_fraction=0.1)
    assert (len(v.train_set), len(v.val_set), len(v.test_set)) == (4177 - 835 - 418, 418, 835)
    assert v.val_set is not v.test_set
    raw = test_rows(0, standardize=False)
    assert set(raw.train_set.tensors[0][:, :3].unique().tolist()) == {0.0, 1.0}


def test_abalone_missing_file_offline_names_the_path(tmp_path):
    dm = AbaloneDataModule(str(tmp_path))
    expected = str(tmp_path / "abalone" / "abalone.data")
    with pytest.raises(DataNotFoundError, match="Abalone not found") as err:
        dm.prepare_data()
    assert expected in str(err.value) and "download=True" in str(err.value) and AbaloneDataModule.url in str(err.value)
    with pytest.raises(DataNotFoundError):
        dm.setup()


def test_abalone_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", _offline)
    with pytest.raises(DataNotFoundError, match="download failed.*URLError") as err:
        AbaloneDataModule(str(tmp_path), download=True).prepare_data()
    assert str(tmp_path / "abalone" / "abalone.data") in str(err.value)


def test_abalone_malformed_row_names_the_line(tmp_path):
    (tmp_path / "abalone").mkdir()
    (tmp_path / "abalone" / "abalone.data").write_text("M,0.455,0.365,0.095,0.514,0.2245,0.101,0.15,15\nX,1,2\n")
    with pytest.raises(ValueError, match="line 2"):
        AbaloneDataModule(str(tmp_path)).setup()


# ---------------------------------------------------------------- Cora (real files)
@pytest.fixture(scope="module")
def cora_root(tmp_path_factory):
    if shared_datasets() is None:
        pytest.skip(SKIP_SHARED)
    return copy_cora_raw(tmp_path_factory.mktemp("planetoid"))


def test_cora_public_split_full_batch(cora_root):
    dm = PlanetoidDataModule(str(cora_root))
    assert (dm.num_features, dm.num_classes) == (1433, 7)  # known before setup: the CLI links num_classes into the task
    dm.prepare_data()
    dm.setup("fit")
    data = dm.data
    assert data.x.shape == (2708, 1433) and data.y.shape == (2708,) and int(data.y.max()) == 6
    assert data.edge_index.shape == (2, 10556)
    sizes = [int(data[m].sum()) for m in ("train_mask", "val_mask", "test_mask")]
    assert sizes == [140, 500, 1000]
    assert not (data.train_mask & data.val_mask).any() and not (data.val_mask & data.test_mask).any()
    # Planetoid's public split (Yang et al. 2016): the first 140 nodes train, the next 500 validate.
    assert torch.equal(data.train_mask.nonzero().flatten(), torch.arange(140))
    assert torch.equal(data.val_mask.nonzero().flatten(), torch.arange(140, 640))
    assert torch.bincount(data.y[data.train_mask]).tolist() == [20] * 7
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert len(batches) == 1 and batches[0] is data  # the graph itself, one batch per epoch
    assert (cora_root / "Cora" / "processed").is_dir()  # written beside raw/ in the copy, not in the shared folder
    again = PlanetoidDataModule(str(cora_root))
    again.setup()
    assert torch.equal(again.data.test_mask, data.test_mask) and torch.equal(again.data.x, data.x)


def test_cora_normalized_features(cora_root):
    dm = PlanetoidDataModule(str(cora_root), normalize_features=True)
    dm.setup()
    sums = dm.data.x.sum(dim=1)
    torch.testing.assert_close(sums[sums > 0], torch.ones(int((sums > 0).sum())))


def test_planetoid_missing_files_name_the_path(tmp_path, cora_root):
    with pytest.raises(DataNotFoundError, match="Cora not found") as err:
        PlanetoidDataModule(str(tmp_path)).prepare_data()
    assert str(tmp_path / "Cora" / "raw" / "ind.cora.x") in str(err.value)
    dm = PlanetoidDataModule(str(cora_root), name="CiteSeer")  # Cora files present, CiteSeer not
    assert (dm.num_features, dm.num_classes) == (3703, 6)
    with pytest.raises(DataNotFoundError, match="CiteSeer not found") as err:
        dm.setup()
    assert str(cora_root / "CiteSeer" / "raw" / "ind.citeseer.x") in str(err.value)


def test_planetoid_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    from torch_geometric.datasets import Planetoid

    monkeypatch.setattr(Planetoid, "download", _offline)
    with pytest.raises(DataNotFoundError, match="download failed.*URLError"):
        PlanetoidDataModule(str(tmp_path), download=True).prepare_data()


def test_cora_datamodule_is_the_deprecated_name_of_planetoid_datamodule():
    from flatminima import datamodules

    with pytest.warns(FutureWarning, match="CoraDataModule is now flatminima.datamodules.PlanetoidDataModule"):
        assert datamodules.CoraDataModule is PlanetoidDataModule
    with pytest.warns(FutureWarning):
        from flatminima.datamodules import CoraDataModule  # noqa: F401  (the old class_path of saved configs)
    assert "CoraDataModule" not in datamodules.__all__
    with pytest.raises(AttributeError):
        datamodules.NoSuchDataModule  # noqa: B018


# ---------------------------------------------------------------- CIFAR-10 (tiny files in torchvision's format)
def _normalized(images_hwc: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.as_tensor(images_hwc, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_cifar10_tiny_files_through_torchvision(tmp_path, monkeypatch):
    arrays = write_cifar10(tmp_path, per_batch=4, test=6)
    skip_md5(monkeypatch)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8, eval_batch_size=6, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.test_set)) == (20, 6) and dm.val_set is dm.test_set
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 32, 32)
    torch.testing.assert_close(x, _normalized(arrays["test_x"], dm.mean, dm.std))
    assert y.tolist() == arrays["test_y"].tolist()
    x0, y0 = dm.train_set[7]  # batch 2, image 3: the batches are read in order
    torch.testing.assert_close(x0, _normalized(arrays["train_x"][7:8], dm.mean, dm.std)[0])
    assert y0 == arrays["train_y"][7]
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)


def test_cifar10_md5_check_is_live(tmp_path):
    """Without the test's MD5 patch torchvision refuses the tiny files: a clear error, not a traceback."""
    write_cifar10(tmp_path)
    with pytest.raises(DataNotFoundError, match="corrupted") as err:
        CIFAR10DataModule(str(tmp_path)).setup()
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


def test_cifar10_augmentation_and_cutout(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    skip_md5(monkeypatch)
    dm = CIFAR10DataModule(str(tmp_path), cutout=16, cutout_prob=1.0, in_memory=False)  # torchvision's path
    dm.setup()
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize", "Cutout"]
    crop = dm.train_set.transform.transforms[0]
    assert crop.size == (32, 32) and crop.padding == 4
    assert [type(t).__name__ for t in dm.test_set.transform.transforms] == ["ToTensor", "Normalize"]
    torch.manual_seed(0)
    views = torch.stack([dm.train_set[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 32, 32)
    assert not all(torch.equal(views[0], v) for v in views[1:])  # random augmentation
    plain = CIFAR10DataModule(str(tmp_path), augment=False, in_memory=False)
    plain.setup()
    assert [type(t).__name__ for t in plain.train_set.transform.transforms] == ["ToTensor", "Normalize"]


@pytest.mark.parametrize("in_memory", [True, False])
def test_cifar10_validation_split_and_label_noise(tmp_path, monkeypatch, in_memory):
    arrays = write_cifar10(tmp_path, per_batch=8)  # 40 training images
    skip_md5(monkeypatch)

    def make(seed=0, **kwargs):
        dm = CIFAR10DataModule(str(tmp_path), val_size=10, augment=False, data_seed=seed, in_memory=in_memory, **kwargs)
        dm.setup()
        return dm

    def split(dm):
        train, val = dm.split_indices["train"].tolist(), dm.split_indices["val"].tolist()
        if not in_memory:  # torchvision's path: Subsets of those images
            assert (dm.train_set.indices, dm.val_set.indices) == (train, val)
        return train, val

    dm = make(label_noise=0.5)
    train_idx, val_idx = split(dm)
    assert (len(train_idx), len(val_idx)) == (30, 10) and not set(train_idx) & set(val_idx)
    assert val_idx == split(make())[1] and val_idx != split(make(seed=1))[1]
    clean = arrays["train_y"]
    # validation images: eval transform and clean labels
    for i, j in enumerate(val_idx):
        x, y = dm.val_set[i]
        torch.testing.assert_close(x, _normalized(arrays["train_x"][j : j + 1], dm.mean, dm.std)[0])
        assert y == clean[j]
    labels = np.array([dm.train_set[i][1] for i in range(30)])
    noisy = set(dm.noisy_indices.tolist())  # positions in train_set
    assert len(noisy) == 15 and noisy <= set(range(30))
    untouched = [k for k in range(30) if k not in noisy]
    assert (labels[untouched] == clean[np.array(train_idx)][untouched]).all()
    assert sorted(labels.tolist()) == sorted(clean[np.array(train_idx)].tolist())  # shuffle keeps the counts
    assert [dm.test_set[i][1] for i in range(6)] == arrays["test_y"].tolist()  # test labels stay clean
    again = make(label_noise=0.5)
    assert [again.train_set[i][1] for i in range(30)] == labels.tolist()  # seeded


def test_cifar10_missing_offline_names_the_path(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path))
    with pytest.raises(DataNotFoundError, match="CIFAR-10 not found") as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert CIFAR10.url in message and "download=True" in message


def test_cifar10_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(CIFAR10, "download", _offline)
    with pytest.raises(DataNotFoundError, match="download failed.*URLError") as err:
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(err.value)


# ---------------------------------------------------------------- FashionMNIST and MNIST (tiny idx files)
@pytest.mark.parametrize("module, name", [(FashionMNISTDataModule, "FashionMNIST"), (MNISTDataModule, "MNIST")])
def test_mnist_family_tiny_idx_files(tmp_path, monkeypatch, module, name):
    arrays = write_mnist(tmp_path, name, train=12, test=6)
    skip_md5(monkeypatch)
    dm = module(str(tmp_path), batch_size=4, eval_batch_size=6, in_memory=False)  # torchvision's path
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.test_set)) == (12, 6)
    x, y = next(iter(dm.test_dataloader()))
    expected = (torch.as_tensor(arrays["test_x"], dtype=torch.float32)[:, None] / 255.0 - dm.mean[0]) / dm.std[0]
    torch.testing.assert_close(x, expected)
    assert y.tolist() == arrays["test_y"].tolist()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.dtype == torch.long
    assert [type(t).__name__ for t in dm.train_set.transform.transforms] == ["ToTensor", "Normalize"]
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)


@pytest.mark.parametrize(
    "module, cls, folder", [(FashionMNISTDataModule, FashionMNIST, "FashionMNIST"), (MNISTDataModule, MNIST, "MNIST")]
)
def test_mnist_family_missing_and_failed_download(tmp_path, monkeypatch, module, cls, folder):
    monkeypatch.setattr(module, "system_dirs", ())  # as on a machine without the Debian package
    other = "MNIST" if folder == "FashionMNIST" else "FashionMNIST"
    write_mnist(tmp_path, other)  # the other data set's files do not count
    with pytest.raises(DataNotFoundError, match=f"{folder} not found") as err:
        module(str(tmp_path)).prepare_data()
    assert str(tmp_path / folder / "raw" / "train-images-idx3-ubyte") in str(err.value)
    assert cls.mirrors[0] in str(err.value)
    monkeypatch.setattr(cls, "download", _offline)
    with pytest.raises(DataNotFoundError, match="download failed"):
        module(str(tmp_path), download=True).prepare_data()


def test_mnist_label_noise_uniform(tmp_path, monkeypatch):
    arrays = write_mnist(tmp_path, "MNIST", train=40)
    skip_md5(monkeypatch)
    dm = MNISTDataModule(str(tmp_path), label_noise=0.25, label_noise_mode="uniform")
    dm.setup()
    labels = torch.as_tensor([dm.train_set[i][1] for i in range(40)])
    changed = (labels != torch.as_tensor(arrays["train_y"], dtype=torch.long)).nonzero().flatten()
    assert set(changed.tolist()) <= set(dm.noisy_indices.tolist()) and len(dm.noisy_indices) == 10
    assert labels.min() >= 0 and labels.max() < 10


# ---------------------------------------------------------------- moons, matrix sensing (generated)
def test_moons_label_noise_on_training_labels_only():
    clean = MoonsDataModule(num_samples=200)
    noisy = MoonsDataModule(num_samples=200, label_noise=0.2)
    clean.setup()
    noisy.setup()
    y_clean, y_noisy = clean.train_set.tensors[1], noisy.train_set.tensors[1]
    assert len(noisy.noisy_indices) == round(0.2 * 160)
    changed = (y_clean != y_noisy).nonzero().flatten()
    assert len(changed) > 0 and set(changed.tolist()) <= set(noisy.noisy_indices.tolist())
    assert torch.equal(clean.val_set.tensors[1], noisy.val_set.tensors[1])
    assert torch.equal(clean.test_set.tensors[1], noisy.test_set.tensors[1])
    assert torch.equal(clean.train_set.tensors[0], noisy.train_set.tensors[0])


def test_matrix_sensing_measurements():
    dm = MatrixSensingDataModule(dim=8, rank=2, num_val=7, num_test=9, data_seed=5)
    dm.setup()
    assert dm.hparams.num_measurements == 5 * 8 * 2 and dm.hparams.batch_size == 80  # m = 5dr, full batch
    a, b = dm.train_set.tensors
    assert a.shape == (80, 8, 8) and b.shape == (80,) and a.dtype == torch.float32
    u = dm.u_star.double().numpy()
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0, rtol=1e-6)  # unit-norm columns
    x_star = u @ u.T
    assert np.linalg.matrix_rank(x_star) == 2
    np.testing.assert_allclose(b.numpy(), (a.double().numpy() * x_star).sum(axis=(1, 2)), rtol=1e-4, atol=1e-4)
    assert (len(dm.val_set), len(dm.test_set)) == (7, 9)
    assert len(list(dm.train_dataloader())) == 1  # one full batch per epoch
    same = MatrixSensingDataModule(dim=8, rank=2, num_val=7, num_test=9, data_seed=5)
    same.setup()
    assert torch.equal(same.train_set.tensors[0], a)
    other = MatrixSensingDataModule(dim=8, rank=2, data_seed=6)
    other.setup()
    assert not torch.equal(other.u_star, dm.u_star)


def test_matrix_sensing_ground_truth_fits_the_factorization():
    from flatminima.lightning_modules.networks import MatrixFactorization

    dm = MatrixSensingDataModule(dim=6, rank=2, num_measurements=30, data_seed=0)
    dm.setup()
    net = MatrixFactorization(dim=dm.dim, width=2)
    with torch.no_grad():
        net.U.copy_(dm.u_star)
    a, b = dm.test_set.tensors
    torch.testing.assert_close(net(a), b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- shared helpers and argument checks
def test_corrupt_labels():
    y = torch.arange(10).repeat(10)
    shuffled, idx = corrupt_labels(y, 0.3, 10, seed=1, mode="shuffle")
    assert len(idx) == 30 and torch.equal(torch.bincount(shuffled), torch.bincount(y))
    assert torch.equal(shuffled[~torch.isin(torch.arange(100), idx)], y[~torch.isin(torch.arange(100), idx)])
    assert torch.equal(corrupt_labels(y, 0.3, 10, seed=1)[0], shuffled)
    assert not torch.equal(corrupt_labels(y, 0.3, 10, seed=2)[0], shuffled)
    uniform, _ = corrupt_labels(y, 1.0, 3, seed=0, mode="uniform")
    assert set(uniform.tolist()) <= {0, 1, 2}
    assert torch.equal(corrupt_labels(y, 0.0, 10, seed=0)[0], y)
    with pytest.raises(ValueError, match="Invalid label_noise: 1.5"):
        corrupt_labels(y, 1.5, 10, seed=0)


def test_cutout_zeroes_a_clipped_square():
    torch.manual_seed(0)
    for _ in range(20):
        out = Cutout(8)(torch.ones(3, 16, 16))
        zero = (out == 0).all(dim=0)
        rows, cols = zero.any(dim=1).sum(), zero.any(dim=0).sum()
        assert 1 <= rows <= 8 and 1 <= cols <= 8 and zero.sum() == rows * cols
    img = torch.ones(1, 4, 4)
    assert torch.equal(Cutout(2, p=1e-9)(img), img)
    with pytest.raises(ValueError, match="Invalid cutout"):
        Cutout(0)


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (CIFAR10DataModule, {"batch_size": 0}, "batch_size"),
        (CIFAR10DataModule, {"val_size": -1}, "val_size"),
        (CIFAR10DataModule, {"label_noise": 1.0}, "label_noise"),
        (CIFAR10DataModule, {"label_noise_mode": "flip"}, "label_noise_mode"),
        (CIFAR10DataModule, {"cutout_prob": 0.0}, "cutout_prob"),
        (MNISTDataModule, {"num_workers": -1}, "num_workers"),
        (AbaloneDataModule, {"test_fraction": 0.0}, "test_fraction"),
        (AbaloneDataModule, {"test_fraction": 0.6, "val_fraction": 0.5}, "test_fraction \\+ val_fraction"),
        (PlanetoidDataModule, {"name": "Citeseer"}, "name"),
        (PlanetoidDataModule, {"split": "random"}, "split"),
        (MatrixSensingDataModule, {"rank": 0}, "rank"),
        (MatrixSensingDataModule, {"dim": 3, "rank": 4}, "rank"),
        (MatrixSensingDataModule, {"batch_size": 0}, "batch_size"),
        (MoonsDataModule, {"label_noise": -0.1}, "label_noise"),
        (MoonsDataModule, {"split": "random"}, "split"),
        (MoonsDataModule, {"split": "sklearn", "test_fraction": 0.0}, "test_fraction"),
        (AbaloneDataModule, {"split": "kfold"}, "split"),
        (AbaloneDataModule, {"split_seed": -1}, "split_seed"),
        (DigitsDataModule, {"test_fraction": 0.0}, "test_fraction"),
        (DigitsDataModule, {"val_size": -1}, "val_size"),
        (DigitsDataModule, {"label_noise": 1.0}, "label_noise"),
        (DigitsDataModule, {"label_noise_mode": "flip"}, "label_noise_mode"),
        (PlanetoidDataModule, {"train_batch_nodes": 0}, "train_batch_nodes"),
        (MatrixSensingDataModule, {"dtype": "float16"}, "dtype"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        factory(**kwargs)


def test_validation_size_must_leave_training_images(tmp_path, monkeypatch):
    write_cifar10(tmp_path, per_batch=1)
    skip_md5(monkeypatch)
    with pytest.raises(ValueError, match="Invalid val_size: 5; expected val_size < 5"):
        CIFAR10DataModule(str(tmp_path), val_size=5).setup()


# ---------------------------------------------------------------- digits (scikit-learn's load_digits, no files)
def test_digits_split_and_normalization_against_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    dm = DigitsDataModule(data_seed=3)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)  # known before setup (CLI link, net check)
    dm.setup("fit")
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images / 16.0, digits.target, test_size=0.2, random_state=3, stratify=digits.target
    )
    mean, std = x_tr.mean(), x_tr.std()  # all training pixels, population std
    x_train, y_train = dm.train_set.tensors
    x_test, y_test = dm.test_set.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8) and x_train.dtype == torch.float32
    np.testing.assert_allclose(x_train[:, 0].numpy(), (x_tr - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_test[:, 0].numpy(), (x_te - mean) / std, rtol=1e-5, atol=1e-5)
    assert y_train.tolist() == y_tr.tolist() and y_test.tolist() == y_te.tolist() and y_train.dtype == torch.long
    assert (dm.pixel_mean, dm.pixel_std) == (pytest.approx(mean, rel=1e-5), pytest.approx(std, rel=1e-5))
    assert dm.val_set is dm.test_set  # val_size=0: validate on the test split
    # stratified: every class keeps its share (counts 174..183) in the test split
    counts = np.bincount(y_test.numpy(), minlength=10)
    np.testing.assert_allclose(counts / 360, np.bincount(digits.target) / 1797, atol=1.5 / 360)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (128, 1, 8, 8) and yb.shape == (128,)
    raw = DigitsDataModule(data_seed=3, normalize=False)
    raw.setup()
    np.testing.assert_allclose(raw.train_set.tensors[0][:, 0].numpy(), x_tr, rtol=1e-6)
    assert raw.train_set.tensors[0].min() == 0.0 and raw.train_set.tensors[0].max() == 1.0


def test_digits_plain_split_validation_and_label_noise():
    from sklearn.model_selection import train_test_split

    plain = DigitsDataModule(stratify=False, test_fraction=0.25, data_seed=1)
    plain.setup()
    train, test = train_test_split(np.arange(1797), test_size=0.25, random_state=1)
    assert plain.split_indices["test"].tolist() == test.tolist()
    assert plain.split_indices["train"].tolist() == train.tolist()
    dm = DigitsDataModule(val_size=100, label_noise=0.2, data_seed=0)
    dm.setup()
    idx = dm.split_indices
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1337, 100, 360)
    assert sorted(torch.cat([idx["train"], idx["val"], idx["test"]]).tolist()) == list(range(1797))
    clean = DigitsDataModule(val_size=100, data_seed=0)
    clean.setup()
    assert torch.equal(clean.val_set.tensors[1], dm.val_set.tensors[1])  # validation and test labels stay clean
    assert torch.equal(clean.test_set.tensors[1], dm.test_set.tensors[1])
    changed = (clean.train_set.tensors[1] != dm.train_set.tensors[1]).nonzero().flatten()
    assert len(dm.noisy_indices) == round(0.2 * 1337) and set(changed.tolist()) <= set(dm.noisy_indices.tolist())
    assert torch.equal(torch.bincount(dm.train_set.tensors[1]), torch.bincount(clean.train_set.tensors[1]))  # shuffle
    other = DigitsDataModule(val_size=100, data_seed=1)
    other.setup()
    assert not torch.equal(other.split_indices["test"], idx["test"])
    with pytest.raises(ValueError, match="Invalid val_size: 1437; expected val_size < 1437"):
        DigitsDataModule(val_size=1437).setup()


def test_digits_refuses_a_net_built_for_28x28_images():
    import lightning.pytorch as pl

    from flatminima.lightning_modules import Classifier
    from flatminima.lightning_modules.networks import SimpleBatch

    model = Classifier(SimpleBatch(in_channels=1, image_size=28))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(
        ValueError,
        match="image_size=28 but the data needs image_size=8; set model.init_args.net.init_args.image_size: 8",
    ):
        trainer.fit(model, datamodule=DigitsDataModule())


# ---------------------------------------------------------------- the authors' setups (moons, Abalone, Cora)
def test_moons_published_split_is_sklearn_train_test_split_with_standard_scaler():
    """The Adaptive-GSAM notebook: make_moons(10000, 0.3, random_state=10), train_test_split(0.3, 42), scaler."""
    from sklearn.datasets import make_moons
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    dm = MoonsDataModule(
        data_seed=10, split="sklearn", split_seed=42, test_fraction=0.3, val_fraction=0.0, standardize=True
    )
    dm.setup()
    x, y = make_moons(n_samples=10000, noise=0.3, random_state=10)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=42)
    scaler = StandardScaler()
    x_train, x_test = scaler.fit_transform(x_train), scaler.transform(x_test)
    np.testing.assert_allclose(dm.train_set.tensors[0].numpy(), x_train, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dm.test_set.tensors[0].numpy(), x_test, rtol=1e-5, atol=1e-6)
    assert dm.train_set.tensors[1].tolist() == y_train.tolist() and dm.test_set.tensors[1].tolist() == y_test.tolist()
    assert dm.val_set is dm.test_set  # Keras' validation_data=(x_test, y_test)
    np.testing.assert_allclose(dm.feature_std.numpy(), scaler.scale_, rtol=1e-5)
    default = MoonsDataModule(num_samples=200)  # the tuned default keeps its seeded 80/10/10 split, raw features
    default.setup()
    assert (len(default.train_set), len(default.val_set), len(default.test_set)) == (160, 20, 20)
    assert default.feature_mean is None


@needs_shared
def test_abalone_notebook_setup_against_an_independent_reading(tmp_path):
    """pandas' header eats the first row; train_test_split(test_size=0.2, random_state=42); rings standardised."""
    from sklearn.model_selection import train_test_split

    root = copy_abalone(tmp_path)
    dm = AbaloneDataModule(
        str(root), split="sklearn", split_seed=42, skip_first_row=True, standardize_targets=True, full_batch=True
    )
    dm.setup()
    x, y = _abalone_numpy(root / "abalone" / "abalone.data")
    x, y = x[1:], y[1:]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=42)
    assert (len(dm.train_set), len(dm.test_set)) == (3340, 836) and dm.val_set is dm.test_set
    fx = lambda a: (a - x_tr.mean(0)) / x_tr.std(0)  # noqa: E731
    fy = lambda a: (a - y_tr.mean()) / y_tr.std()  # noqa: E731
    np.testing.assert_allclose(dm.train_set.tensors[0].numpy(), fx(x_tr), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dm.test_set.tensors[0].numpy(), fx(x_te), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dm.train_set.tensors[1].numpy(), fy(y_tr), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dm.test_set.tensors[1].numpy(), fy(y_te), rtol=1e-5, atol=1e-5)
    assert (float(dm.target_mean), float(dm.target_std)) == (pytest.approx(y_tr.mean()), pytest.approx(y_tr.std()))
    # full_batch: 53 = ceil(3340 / 64) steps per epoch, each on all 3340 training rows
    batches = list(dm.train_dataloader())
    assert len(batches) == 53 and all(b[0] is dm.train_set.tensors[0] for b in batches)
    assert batches[0][0].shape == (3340, 10) and batches[0][1].shape == (3340,)
    default = AbaloneDataModule(str(root))  # the report's text: seeded permutation, raw rings, minibatches
    default.setup()
    assert len(default.train_set) == 4177 - 835 and default.target_mean is None
    assert next(iter(default.train_dataloader()))[0].shape == (64, 10)


def test_cora_minibatches_of_training_nodes(cora_root):
    """The GAT notebook: three SGD steps per epoch on masks of 64, 64 and 12 of the 140 training nodes."""
    dm = PlanetoidDataModule(str(cora_root), train_batch_nodes=64, data_seed=0)
    dm.setup()
    loader = dm.train_dataloader()

    def epoch(e):
        loader.sampler.set_epoch(e)
        return list(loader)

    first, again, second = epoch(0), epoch(0), epoch(1)
    sizes = [int(b.train_mask.sum()) for b in first]
    assert sizes == [64, 64, 12]
    union = torch.stack([b.train_mask for b in first]).sum(0)
    assert torch.equal(union, dm.data.train_mask.long())  # every training node exactly once per epoch
    assert all(b.x is dm.data.x and b.edge_index is dm.data.edge_index for b in first)  # shared, not copied
    assert torch.equal(dm.data.train_mask.nonzero().flatten(), torch.arange(140))  # the original mask untouched
    assert all(torch.equal(a.train_mask, b.train_mask) for a, b in zip(first, again))  # seeded
    assert not torch.equal(first[0].train_mask, second[0].train_mask)  # reshuffled per epoch
    assert all(b.val_mask is dm.data.val_mask for b in first)
    assert list(dm.val_dataloader())[0] is dm.data  # evaluation stays full batch


def test_matrix_sensing_float64():
    dm = MatrixSensingDataModule(dim=6, rank=2, num_val=3, num_test=3, dtype="float64", data_seed=2)
    dm.setup()
    a, b = dm.train_set.tensors
    assert a.dtype == b.dtype == dm.u_star.dtype == torch.float64
    np.testing.assert_allclose(np.linalg.norm(dm.u_star.numpy(), axis=0), 1.0, rtol=1e-14)
    expected = (a.numpy() * (dm.u_star.numpy() @ dm.u_star.numpy().T)).sum(axis=(1, 2))
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-12, atol=1e-12)  # exact to float64
