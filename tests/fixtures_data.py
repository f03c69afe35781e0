"""Write tiny data files in torchvision's exact on-disk formats, and find the shared real data.

CIFAR-10, FashionMNIST and MNIST cannot be downloaded here, so the tests write a few images in
the formats torchvision 0.29 reads, and load them through the data modules' real code path:

- CIFAR-10: ``<root>/cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` (pickled dicts with
  ``data``: uint8 ``(n, 3072)`` rows of R, G, B planes and ``labels``: list of ints) plus
  ``batches.meta`` (``label_names``). torchvision also checks the files' MD5 sums, which tiny files
  cannot match: :func:`skip_md5` patches only that check.
- MNIST / FashionMNIST: ``<root>/<Name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
  idx files (big-endian magic ``0x0803``/``0x0801``, dimensions, uint8 data), uncompressed or as
  ``.gz`` archives (``gzip=True``). The data modules check the MD5 of the decompressed files, which tiny
  files cannot match either: :func:`skip_md5` patches that comparison too.
"""

from __future__ import annotations

import gzip as gzip_module
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def shared_datasets() -> Path | None:
    """The shared real data folder (``$FLATMINIMA_SHARED_DATASETS`` or ``<repo>/../shared/datasets``), or None."""
    for candidate in (os.environ.get("FLATMINIMA_SHARED_DATASETS"), REPO.parent / "shared" / "datasets"):
        if candidate and (Path(candidate) / "abalone" / "abalone.data").is_file():
            return Path(candidate)
    return None


SKIP_SHARED = (
    "the real Abalone/Cora files are not here: the tests look for ../shared/datasets beside the repository "
    "(or $FLATMINIMA_SHARED_DATASETS); a user's clone does not have it"
)


def copy_abalone(dst: Path) -> Path:
    """Copy the shared ``abalone/abalone.data`` to ``dst/abalone/``; return ``dst``."""
    src = shared_datasets()
    (dst / "abalone").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "abalone" / "abalone.data", dst / "abalone" / "abalone.data")
    return dst


def copy_cora_raw(dst: Path) -> Path:
    """Copy the shared ``Cora/raw/`` folder to ``dst/Cora/raw/`` (Planetoid writes ``processed/`` beside it)."""
    src = shared_datasets()
    shutil.copytree(src / "Cora" / "raw", dst / "Cora" / "raw")
    return dst


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny CIFAR-10 (5 training batches of ``per_batch`` images, ``test`` test images).

    Returns the arrays written: ``train_x`` (n, 32, 32, 3) uint8 HWC, ``train_y``, ``test_x``, ``test_y``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        chw = _images(rng, n, (3, 32, 32))
        labels = rng.integers(0, 10, size=n).tolist()
        entry = {
            "batch_label": f"{name} of 6",
            "labels": labels,
            "data": chw.reshape(n, 3072),
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        out[f"{split}_x"].append(chw.transpose(0, 2, 3, 1))
        out[f"{split}_y"].extend(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return {
        "train_x": np.concatenate(out["train_x"]),
        "train_y": np.array(out["train_y"]),
        "test_x": np.concatenate(out["test_x"]),
        "test_y": np.array(out["test_y"]),
    }


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file: magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dimensions, then the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    data = idx_bytes(array)
    if compress:
        Path(f"{path}.gz").write_bytes(gzip_module.compress(data, mtime=0))
    else:
        Path(path).write_bytes(data)


def write_mnist(
    root: Path,
    name: str = "MNIST",
    train: int = 12,
    test: int = 6,
    seed: int = 0,
    *,
    gzip: bool = False,
    folder: Path | None = None,
) -> dict[str, np.ndarray]:
    """Write tiny idx-ubyte files to ``<root>/<name>/raw/`` (``name``: MNIST or FashionMNIST), or to ``folder``.

    With ``gzip`` each file is written as ``<file>.gz`` (gzip-compressed) instead.
    Returns the arrays written: ``train_x`` (n, 28, 28) uint8, ``train_y``, ``test_x``, ``test_y``.
    """
    rng = np.random.default_rng(seed)
    raw = Path(folder) if folder is not None else Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": _images(rng, train, (28, 28)),
        "train_y": rng.integers(0, 10, size=train, dtype=np.uint8),
        "test_x": _images(rng, test, (28, 28)),
        "test_y": rng.integers(0, 10, size=test, dtype=np.uint8),
    }
    _write_idx(raw / "train-images-idx3-ubyte", arrays["train_x"], gzip)
    _write_idx(raw / "train-labels-idx1-ubyte", arrays["train_y"], gzip)
    _write_idx(raw / "t10k-images-idx3-ubyte", arrays["test_x"], gzip)
    _write_idx(raw / "t10k-labels-idx1-ubyte", arrays["test_y"], gzip)
    return arrays


def skip_md5(monkeypatch) -> None:
    """Let the tiny files through the MD5 checks: torchvision's (CIFAR-10) and the idx reader's (MNIST,
    FashionMNIST); only the comparisons are patched, everything else (format, shapes) is still checked."""
    import torchvision.datasets.utils as tv_utils

    import flatminima.datamodules._idx as idx

    monkeypatch.setattr(tv_utils, "check_md5", lambda fpath, md5, **kwargs: True)
    monkeypatch.setattr(idx, "check_md5", lambda data, expected: None)
