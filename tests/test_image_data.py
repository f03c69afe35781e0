"""Image data from the files as distributed and held in memory: idx files, MD5, search order, the in-memory
batches against a per-sample reference (torchvision's functional ops), resume mid-epoch, DDP shards."""

from __future__ import annotations

import gzip
import hashlib
import struct
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from fixtures_data import idx_bytes, skip_md5, write_cifar10, write_mnist
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from flatminima.datamodules import (
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from flatminima.datamodules._idx import IdxFormatError, parse_idx
from flatminima.datamodules._loaders import make_loader
from flatminima.datamodules._memory import InMemoryImages, InMemoryLoader

pytestmark = pytest.mark.usefixtures("one_thread")

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
HAVE_DEBIAN = all((DEBIAN / f"{name}.gz").is_file() for name in IDX_NAMES)
SKIP_DEBIAN = (
    "the real FashionMNIST files are not here: install the Debian package dataset-fashion-mnist "
    f"(apt-get install dataset-fashion-mnist puts them in {DEBIAN}); .ci/run does where apt-get works"
)


# ---------------------------------------------------------------- the reference: one sample at a time
def epoch_seed(seed: int, epoch: int) -> int:
    """The documented seed of an epoch's augmentation draws (BLAKE2b of "augment:<seed>:<epoch>", 63 bits)."""
    digest = hashlib.blake2b(f"augment:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def reference_draws(n, size, padding, flip, cutout, cutout_prob, generator=None):
    """The documented draws: top, left (crop), flip (rand < 0.5), cut (rand < p), cy, cx; each (n,)."""
    g = {"generator": generator}
    d = {}
    if padding:
        d["top"] = torch.randint(0, 2 * padding + 1, (n,), **g)
        d["left"] = torch.randint(0, 2 * padding + 1, (n,), **g)
    if flip:
        d["flip"] = torch.rand(n, **g) < 0.5
    if cutout:
        d["cut"] = torch.rand(n, **g) < cutout_prob
        d["cy"] = torch.randint(0, size, (n,), **g)
        d["cx"] = torch.randint(0, size, (n,), **g)
    return d


def reference_image(raw, k, d, mean, std, padding, cutout):
    """torchvision's per-image pipeline on raw uint8 image ``raw`` with the k-th draws of ``d``:
    pad(0) + crop, hflip, to_tensor, normalize, then Cutout's slice assignment."""
    img = Image.fromarray(raw)
    size = raw.shape[0]
    if padding:
        img = TF.crop(TF.pad(img, padding, fill=0), int(d["top"][k]), int(d["left"][k]), size, size)
    if "flip" in d and d["flip"][k]:
        img = TF.hflip(img)
    x = TF.normalize(TF.to_tensor(img), list(mean), list(std))
    if cutout and d["cut"][k]:
        top, left = int(d["cy"][k]) - cutout // 2, int(d["cx"][k]) - cutout // 2
        x[..., max(top, 0) : max(top + cutout, 0), max(left, 0) : max(left + cutout, 0)] = 0
    return x


def reference_epoch(
    raw, labels, *, seed, epoch, batch_size, mean, std, padding=0, flip=False, cutout=0, cutout_prob=1.0
):
    """The training batches of an epoch, built image by image: order randperm(n) seeded by seed + epoch."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    d = reference_draws(
        n, raw.shape[1], padding, flip, cutout, cutout_prob, torch.Generator().manual_seed(epoch_seed(seed, epoch))
    )
    images = [reference_image(raw[i], i, d, mean, std, padding, cutout) for i in order]
    return [
        (torch.stack(images[s : s + batch_size]), torch.as_tensor(labels[order[s : s + batch_size]]).long())
        for s in range(0, n, batch_size)
    ]


def epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


# ---------------------------------------------------------------- idx files
@pytest.mark.parametrize(
    "code, dtype", [(0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")]
)
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)])
def test_parse_idx_agrees_with_torchvisions_reader(tmp_path, code, dtype, shape):
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    values = np.random.default_rng(code).integers(-100, 200, size=shape).astype(dtype)
    data = struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + values.tobytes()
    (tmp_path / "f").write_bytes(data)
    theirs = read_sn3_pascalvincent_tensor(str(tmp_path / "f")).numpy()
    ours = parse_idx(data)
    assert ours.shape == shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_parse_idx_refuses_malformed_bytes():
    good = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    parse_idx(good)
    for bad, why in [
        (b"\x01" + good[1:], "magic"),
        (good[:2] + b"\x07" + good[3:], "magic"),
        (good[:-1], "need 18"),
        (good + b"\x00", "need 18"),
        (good[:6], "header"),
    ]:
        with pytest.raises(IdxFormatError, match=why):
            parse_idx(bad)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("module, name", [(FashionMNISTDataModule, "FashionMNIST"), (MNISTDataModule, "MNIST")])
def test_mnist_family_in_memory_equals_torchvisions_path(tmp_path, monkeypatch, module, name, compressed):
    """gzip or plain: the in-memory batches are torchvision's (PIL, ToTensor, Normalize) bit for bit, same order."""
    monkeypatch.setattr(module, "system_dirs", ())
    arrays = write_mnist(tmp_path, name, train=10, test=6, gzip=compressed)
    skip_md5(monkeypatch)
    memory = module(str(tmp_path), batch_size=4, eval_batch_size=4, data_seed=5)
    pil = module(str(tmp_path), batch_size=4, eval_batch_size=4, data_seed=5, in_memory=False)
    memory.setup()
    pil.setup()
    assert isinstance(memory.train_set, InMemoryImages) and isinstance(memory.train_dataloader(), InMemoryLoader)
    x, y = memory.train_set.tensors
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert y.tolist() == arrays["train_y"].tolist()
    for epoch in (0, 1):
        a, b = epoch_batches(memory.train_dataloader(), epoch), epoch_batches(pil.train_dataloader(), epoch)
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(memory.test_dataloader(), pil.test_dataloader()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _decompressed(folder: Path) -> dict[str, bytes]:
    """Each file's bytes (gunzipped when only the .gz is there)."""
    out = {}
    for name in IDX_NAMES:
        path = folder / name if (folder / name).is_file() else folder / f"{name}.gz"
        out[name] = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return out


def _md5_table(folder: Path) -> dict[str, str]:
    """MD5 of each file's decompressed bytes, computed here with hashlib and gzip."""
    return {name: hashlib.md5(data).hexdigest() for name, data in _decompressed(folder).items()}


def test_md5_of_the_decompressed_bytes_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", ())
    raw = tmp_path / "FashionMNIST" / "raw"
    write_mnist(tmp_path, "FashionMNIST", train=6, test=4, gzip=True)
    table = _md5_table(raw)  # of the plain files; the .gz archives themselves have other sums
    archive = hashlib.md5((raw / "train-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    assert table["train-labels-idx1-ubyte"] != archive
    monkeypatch.setattr(FashionMNISTDataModule, "md5", table)
    dm = FashionMNISTDataModule(str(tmp_path))
    dm.setup()
    assert len(dm.train_set) == 6
    # the same content compressed anew (another archive) is accepted; one changed pixel is not
    data = gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes())
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data, compresslevel=1, mtime=12345))
    FashionMNISTDataModule(str(tmp_path)).setup()
    changed = bytearray(data)
    changed[-1] ^= 1
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(changed)))
    with pytest.raises(DataNotFoundError, match="MD5 of its decompressed bytes is [0-9a-f]{32}, expected") as err:
        FashionMNISTDataModule(str(tmp_path)).setup()
    assert str(raw / "t10k-images-idx3-ubyte.gz") in str(err.value)


def test_a_malformed_file_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(MNISTDataModule, "system_dirs", ())
    write_mnist(tmp_path, "MNIST", train=6, test=4)
    skip_md5(monkeypatch)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataNotFoundError, match="is not an idx file: dimensions") as err:
        MNISTDataModule(str(tmp_path)).setup()
    assert str(path) in str(err.value)
    write_mnist(tmp_path, "MNIST", train=6, test=5)  # 5 test images but the labels of another file: 4
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(DataNotFoundError, match=r"images torch.uint8 \(5, 28, 28\), labels torch.uint8 \(4,\)"):
        MNISTDataModule(str(tmp_path)).setup()


def test_system_folder_is_read_never_written_and_data_dir_comes_first(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = write_mnist(tmp_path, folder=system, train=8, test=4, gzip=True, seed=1)
    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", (str(system),))
    skip_md5(monkeypatch)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in system.iterdir()}
    data_dir = tmp_path / "data"
    dm = FashionMNISTDataModule(str(data_dir))
    dm.prepare_data()
    dm.setup()
    assert dm.train_set.labels.tolist() == arrays["train_y"].tolist()
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in system.iterdir()} == before
    assert not data_dir.exists()  # nothing written anywhere
    for in_memory in (True, False):
        tv = FashionMNISTDataModule(str(data_dir), in_memory=in_memory)
        tv.setup()
        assert [tv.train_set[i][1] for i in range(8)] == arrays["train_y"].tolist()
    mine = write_mnist(data_dir, "FashionMNIST", train=5, test=3, seed=2)  # data_dir's files come first
    first = FashionMNISTDataModule(str(data_dir))
    first.setup()
    assert first.train_set.labels.tolist() == mine["train_y"].tolist()
    (data_dir / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()  # an incomplete folder is passed over
    fallback = FashionMNISTDataModule(str(data_dir))
    fallback.setup()
    assert len(fallback.train_set) == 8


def test_missing_fashion_mnist_names_the_package_and_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataNotFoundError) as err:
        FashionMNISTDataModule(str(tmp_path / "data")).prepare_data()
    message = str(err.value)
    assert "\n" not in message and "FashionMNIST not found: missing" in message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message
    assert "http" in message and str(tmp_path / "nowhere") in message


# ---------------------------------------------------------------- the real FashionMNIST (Debian's package)
@pytest.fixture(scope="module")
def real_fashion_mnist(tmp_path_factory):
    if not HAVE_DEBIAN:
        pytest.skip(SKIP_DEBIAN)
    dm = FashionMNISTDataModule(str(tmp_path_factory.mktemp("empty")), batch_size=64)  # found in the system folder
    dm.prepare_data()
    dm.setup()
    return dm


def test_real_fashion_mnist_files_md5_shapes_classes_and_statistics(real_fashion_mnist):
    dm = real_fashion_mnist
    files = _decompressed(DEBIAN)
    assert {name: hashlib.md5(data).hexdigest() for name, data in files.items()} == {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    }
    x, y = dm.train_set.tensors
    xt, yt = dm.test_set.tensors
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    pixels = np.frombuffer(files["train-images-idx3-ubyte"], dtype=np.uint8, offset=16)  # header: 4 + 3·4 bytes
    counts = torch.from_numpy(pixels.copy()).bincount(minlength=256).double().numpy()  # exact moments from it
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert (round(mean, 4), round(std, 4)) == (0.2860, 0.3530)
    image = torch.from_numpy(pixels[123 * 784 : 124 * 784].astype(np.float64).reshape(28, 28)) / 255
    torch.testing.assert_close(x[123, 0].double(), (image - 0.2860) / 0.3530, rtol=0, atol=1e-6)
    labels = np.frombuffer(files["train-labels-idx1-ubyte"], dtype=np.uint8, offset=8)
    assert y.tolist() == labels.tolist()


def test_real_fashion_mnist_fits_a_lenet5_step(real_fashion_mnist):
    from flatminima.lightning_modules import Classifier
    from flatminima.lightning_modules.networks import LeNet5

    torch.manual_seed(0)
    model = Classifier(LeNet5(dropout=0.5, weight_init="xavier"), optimizer=partial(torch.optim.SGD, lr=0.05))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=real_fashion_mnist)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])


# ---------------------------------------------------------------- in-memory batches against the reference
CIFAR_AUG = dict(cutout=8, cutout_prob=0.5)


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    arrays = write_cifar10(tmp_path, per_batch=4, test=6)  # 20 training images
    skip_md5(monkeypatch)
    return tmp_path, arrays


def test_cifar10_in_memory_batches_equal_the_per_sample_reference(cifar):
    root, arrays = cifar
    dm = CIFAR10DataModule(str(root), batch_size=6, eval_batch_size=4, data_seed=3, **CIFAR_AUG)
    dm.setup()
    for epoch in (0, 1, 2):
        got = epoch_batches(dm.train_dataloader(), epoch)
        want = reference_epoch(
            arrays["train_x"],
            arrays["train_y"],
            seed=3,
            epoch=epoch,
            batch_size=6,
            mean=dm.mean,
            std=dm.std,
            padding=4,
            flip=True,
            **CIFAR_AUG,
        )
        assert [len(b[1]) for b in got] == [6, 6, 6, 2]
        for (x, y), (xr, yr) in zip(got, want, strict=True):
            assert torch.equal(y, yr)
            assert torch.equal(x, xr)  # bit for bit: padding value, crop, flip, cutout square
    for (x, y), s in zip(dm.test_dataloader(), range(0, 6, 4)):  # evaluation: no augmentation
        xr = torch.stack(
            [reference_image(arrays["test_x"][i], i, {}, dm.mean, dm.std, 0, 0) for i in range(s, s + len(y))]
        )
        assert torch.equal(x, xr) and y.tolist() == arrays["test_y"][s : s + len(y)].tolist()


def test_mnist_cutout_batches_equal_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(MNISTDataModule, "system_dirs", ())
    arrays = write_mnist(tmp_path, "MNIST", train=9, test=3)
    skip_md5(monkeypatch)
    dm = MNISTDataModule(str(tmp_path), batch_size=4, cutout=10, cutout_prob=1.0, data_seed=1)
    dm.setup()
    got = epoch_batches(dm.train_dataloader(), 4)
    want = reference_epoch(
        arrays["train_x"], arrays["train_y"], seed=1, epoch=4, batch_size=4, mean=dm.mean, std=dm.std, cutout=10
    )
    for (x, y), (xr, yr) in zip(got, want, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert all(((x == 0).flatten(1).sum(1) > 0).all() for x, _ in got)  # every image has its square


def test_augmentation_draws_do_not_depend_on_the_batch_size(cifar):
    root, _ = cifar

    def per_sample(batch_size):
        dm = CIFAR10DataModule(str(root), batch_size=batch_size, data_seed=7, with_indices=True, **CIFAR_AUG)
        dm.setup()
        out = {}
        for x, _, idx in epoch_batches(dm.train_dataloader(), 2):
            out.update(zip(idx.tolist(), x))
        return out

    a, b = per_sample(3), per_sample(8)
    assert sorted(a) == list(range(20)) and all(torch.equal(a[i], b[i]) for i in a)


def test_validation_split_and_label_noise_as_torchvisions_path(cifar):
    root, arrays = cifar
    kwargs = dict(val_size=5, label_noise=0.4, augment=False, batch_size=5, data_seed=2)
    memory, pil = CIFAR10DataModule(str(root), **kwargs), CIFAR10DataModule(str(root), in_memory=False, **kwargs)
    memory.setup()
    pil.setup()
    assert torch.equal(memory.noisy_indices, pil.noisy_indices) and len(memory.noisy_indices) == 6
    assert torch.equal(memory.split_indices["val"], pil.split_indices["val"])
    for make in ("train_dataloader", "val_dataloader", "test_dataloader"):
        a, b = list(getattr(memory, make)()), list(getattr(pil, make)())
        assert len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_digits_batches_unchanged(tmp_path):
    """The digits' batches are those of the former TensorDataset + DataLoader, epoch after epoch."""
    dm = DigitsDataModule(batch_size=100, eval_batch_size=200, data_seed=3, label_noise=0.1)
    dm.setup()
    former = make_loader(TensorDataset(*dm.train_set.tensors), 100, shuffle=True, seed=3)
    for epoch in (0, 1):
        former.sampler.set_epoch(epoch)
        new = epoch_batches(dm.train_dataloader(), epoch)
        assert len(new) == len(former) == 15
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(new, former))
    old_test = make_loader(TensorDataset(*dm.test_set.tensors), 200, shuffle=False)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(dm.test_dataloader(), old_test))


# ---------------------------------------------------------------- outside the training loader
def test_fixed_subsets_outside_the_loader_are_deterministic(cifar):
    """callbacks' subsets (Subset of loader.dataset, the loader's collate_fn): augmented with draws from torch's
    global generator, seeded by the callback, as torchvision's transforms draw theirs."""
    from flatminima.callbacks._subset import collate_subset

    root, arrays = cifar
    dm = CIFAR10DataModule(str(root), batch_size=4, **CIFAR_AUG)
    dm.setup()
    loader = dm.train_dataloader()
    indices = [5, 0, 17, 3, 9]
    first, again = collate_subset(loader, indices, 2, seed=11), collate_subset(loader, indices, 2, seed=11)
    assert [len(b[1]) for b in first] == [2, 2, 1]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed, drawn first
        for s, (x, y) in zip(range(0, 5, 2), first):
            part = indices[s : s + 2]
            d = reference_draws(len(part), 32, 4, True, 8, 0.5)
            want = torch.stack(
                [reference_image(arrays["train_x"][i], k, d, dm.mean, dm.std, 4, 8) for k, i in enumerate(part)]
            )
            assert torch.equal(x, want) and y.tolist() == arrays["train_y"][part].tolist()
    samples = loader.collate_fn([loader.dataset[i] for i in range(3)])  # AdaptiveSharpness(score="train_set")
    assert samples[0].shape == (3, 3, 32, 32) and samples[1].tolist() == arrays["train_y"][:3].tolist()


# ---------------------------------------------------------------- resume mid-epoch, DDP shards
def _resume_model():
    from flatminima.lightning_modules import Classifier

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 10))
    return Classifier(net, num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def test_resume_mid_epoch_is_bit_for_bit(cifar):
    """Checkpointed at step 7 (epoch 1, batch 2 of 5) and resumed: the weights of the uninterrupted run."""
    root, _ = cifar
    data = partial(CIFAR10DataModule, str(root), batch_size=4, data_seed=3, **CIFAR_AUG)
    run = partial(quiet_trainer, deterministic=True, limit_val_batches=0)

    full = _resume_model()
    run(max_epochs=3).fit(full, data())
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=7, save_top_k=-1)
    run(max_steps=7, enable_checkpointing=True, callbacks=[ckpt]).fit(_resume_model(), data())
    path = root / "ckpt" / "epoch=1-step=7.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2, "batch_size": 4, "num_batches": 5}
    ]

    resumed = _resume_model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    trainer = run(max_epochs=3)
    trainer.fit(resumed, data(), ckpt_path=str(path))
    assert trainer.global_step == 15
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

    del saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # without the loader's state the epoch
    torch.save(saved, root / "stateless.ckpt")  # restarts at its first batch (a plain DataLoader's resume)...
    other = _resume_model()
    run(max_epochs=3).fit(other, data(), ckpt_path=str(root / "stateless.ckpt"))
    assert not all(torch.equal(a, b) for a, b in zip(full.parameters(), other.parameters()))  # ...and ends elsewhere


def test_loader_state_refuses_another_batch_size(cifar):
    root, _ = cifar
    dm = CIFAR10DataModule(str(root), batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 2, "batch_size": 4, "num_batches": 5}
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert fresh.state_dict()["batches"] == 2 and len(list(fresh)) == 3 and len(list(fresh)) == 5
    other = CIFAR10DataModule(str(root), batch_size=5)
    other.setup()
    with pytest.raises(ValueError, match="batch_size 4 and 5 batches per epoch, this one 5 and 4"):
        other.train_dataloader().load_state_dict(state)


def test_ddp_shards_as_before_with_the_same_draws(cifar):
    """Lightning's DDP setup re-creates the training loader around a DistributedSampler (_update_dataloader):
    the in-memory loader stays one, each rank gets the shard torchvision's path gets, and every sample keeps
    the augmentation of the single-process run."""
    from lightning.fabric.utilities.data import _replace_dunder_methods, _update_dataloader
    from torch.utils.data import DataLoader

    root, _ = cifar
    make = partial(CIFAR10DataModule, str(root), batch_size=3, data_seed=4, **CIFAR_AUG)
    single, memory, pil = make(with_indices=True), make(with_indices=True), make(in_memory=False)
    for dm in (single, memory, pil):
        dm.setup()
    reference = {}
    for x, _, idx in epoch_batches(single.train_dataloader(), 1):
        reference.update(zip(idx.tolist(), x))
    with _replace_dunder_methods(DataLoader, "dataset"):  # as in Lightning's *_dataloader hooks
        wrapped = memory.train_dataloader()
    seen = []
    for rank in (0, 1):
        for loader in (memory.train_dataloader(), wrapped):
            sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            shard = _update_dataloader(loader, sampler)
            assert type(shard) is InMemoryLoader and shard.with_indices and shard.sampler is sampler
            batches = epoch_batches(shard, 1)
            order = torch.cat([b[2] for b in batches]).tolist()
            assert order == list(sampler)
            assert all(torch.equal(x, reference[i]) for b in batches for i, x in zip(b[2].tolist(), b[0]))
        tv_sampler = DistributedSampler(pil.train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        tv_sampler.set_epoch(1)
        tv = _update_dataloader(pil.train_dataloader(), tv_sampler)
        assert torch.cat([b[1] for b in tv]).tolist() == torch.cat([b[1] for b in batches]).tolist()
        seen += order
    assert sorted(seen) == list(range(20))


# ---------------------------------------------------------------- options
def test_with_indices_and_device(cifar):
    root, _ = cifar
    dm = CIFAR10DataModule(str(root), batch_size=8, with_indices=True, augment=False)
    dm.setup()
    x, y, idx = next(iter(dm.train_dataloader()))
    assert idx.dtype == torch.long and torch.equal(x, dm.train_set.images[idx])
    assert torch.equal(y, dm.train_set.labels[idx])
    assert len(next(iter(dm.val_dataloader()))) == 2  # evaluation batches stay (x, y)
    assert dm.train_set.device.type == "cpu"  # device "auto" without a Trainer
    on_meta = CIFAR10DataModule(str(root), batch_size=8, **CIFAR_AUG)  # "auto": the Trainer's root device
    on_meta.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    on_meta.setup()
    x, y = next(iter(on_meta.train_dataloader()))
    assert x.device.type == y.device.type == on_meta.test_set.device.type == "meta" and x.shape == (8, 3, 32, 32)
    pinned = CIFAR10DataModule(str(root), device="cpu")
    pinned.trainer = on_meta.trainer
    pinned.setup()
    assert pinned.train_set.device.type == "cpu"


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (CIFAR10DataModule, {"num_workers": 2}, "num_workers"),
        (FashionMNISTDataModule, {"in_memory": "yes"}, "in_memory"),
        (FashionMNISTDataModule, {"device": "cuda"}, "device"),
        (MNISTDataModule, {"with_indices": True, "in_memory": False}, "with_indices"),
        (DigitsDataModule, {"num_workers": 1}, "num_workers"),
        (DigitsDataModule, {"device": "gpu"}, "device"),
    ],
)
def test_bad_memory_arguments(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        factory(**kwargs)
    if name == "num_workers" and factory is CIFAR10DataModule:
        factory(num_workers=2, in_memory=False)  # workers are fine on torchvision's path


def test_in_memory_images_refuse_mismatched_labels():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        InMemoryImages(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(IndexError):
        InMemoryImages(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))[3]
