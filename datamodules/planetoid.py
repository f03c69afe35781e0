"""Planetoid citation graphs (Cora, CiteSeer, PubMed) as one full batch: the GAT data of Hammoud et al."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from flatminima.lightning_modules.validation import check_choice, check_int

from ._base import check_net, data_not_found, missing_files
from ._loaders import first, make_loader

# name: (node features, classes); known before the files are read, so the CLI can link them.
PLANETOID = {"Cora": (1433, 7), "CiteSeer": (3703, 6), "PubMed": (500, 3)}
_RAW = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


class FullGraph(Dataset):
    """A one-element dataset holding a whole graph (a PyG ``Data``): one full batch per epoch."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        if index != 0:
            raise IndexError(f"FullGraph has one element; got index {index}")
        return self.data


class TrainNodes(Dataset):
    """The training nodes of a graph, one item per node (its index): minibatches of nodes."""

    def __init__(self, data: Any, mask: str = "train_mask") -> None:
        self.nodes = getattr(data, mask).nonzero().flatten().tolist()

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> int:
        return self.nodes[index]


class NodeBatch:
    """Collate a list of node indices into the whole graph whose ``train_mask`` marks only those nodes.

    The graph is a shallow copy (features and edges are shared, not copied); a node listed twice
    counts once, as in a boolean mask.
    """

    def __init__(self, data: Any, mask: str = "train_mask") -> None:
        self.data = data
        self.mask = mask

    def __call__(self, nodes: list[int]) -> Any:
        mask = torch.zeros(self.data.num_nodes, dtype=torch.bool)
        mask[torch.as_tensor(nodes, dtype=torch.long)] = True
        batch = copy.copy(self.data)
        setattr(batch, self.mask, mask)
        return batch


class PlanetoidDataModule(pl.LightningDataModule):
    """A Planetoid citation graph (Cora, CiteSeer or PubMed) for full-batch node classification.

    Hammoud et al. 2023 (section III.C) train a GAT on Cora with the public split of Yang et al.
    (2016): 140 training, 500 validation and 1000 test nodes (``train_mask``/``val_mask``/``test_mask``),
    2708 nodes, 1433 binary word features, 7 classes. Every loader yields the whole graph (a PyG
    ``Data`` with ``x``, ``edge_index``, ``y`` and the masks) as one batch; ``NodeClassifier`` picks the
    stage's mask. With ``train_batch_nodes = k`` the training loader instead yields, per epoch,
    ``ceil(n_train / k)`` copies of the graph whose ``train_mask`` holds k training nodes each (the
    last one the rest), shuffled per epoch from ``data_seed``: the authors' notebook takes three SGD
    steps per epoch on masks of 64, 64 and 12 of the 140 training nodes (it pads the last mask with a
    repeated node, which a boolean mask ignores). The files are torch_geometric's ``Planetoid`` layout:
    the eight raw files ``<data_dir>/<name>/raw/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``;
    Planetoid writes ``<data_dir>/<name>/processed/`` beside them (``data_dir`` must be writable).

    Args:
        data_dir: Root folder of the data (Planetoid's ``root``).
        name: ``"Cora"``, ``"CiteSeer"`` or ``"PubMed"``.
        split: Planetoid's ``"public"`` split (20 labelled nodes per class), or ``"full"`` (every node
            outside the validation and test sets trains).
        normalize_features: Row-normalise the node features (the GAT paper does; Hammoud et al.'s text
            does not transform the data, and their notebook's ``NormalizeFeatures`` never takes effect:
            it reads ``dataset.data.x``, which bypasses the dataset's transform).
        num_workers: DataLoader worker processes.
        download: Download the raw files from the Planetoid repository when missing (needs internet).
        train_batch_nodes: Training nodes per training batch (None: the full training mask, one step per epoch).
        data_seed: Seed of the per-epoch shuffling of the training nodes (with ``train_batch_nodes``).
    """

    def __init__(
        self,
        data_dir: str = "./data",
        name: Literal["Cora", "CiteSeer", "PubMed"] = "Cora",
        split: Literal["public", "full"] = "public",
        normalize_features: bool = False,
        num_workers: int = 0,
        download: bool = False,
        train_batch_nodes: int | None = None,
        data_seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("name", name, tuple(PLANETOID))
        check_choice("split", split, ("public", "full"))
        num_workers = check_int("num_workers", num_workers, 0)
        train_batch_nodes = check_int("train_batch_nodes", train_batch_nodes, 1, optional=True)
        data_seed = check_int("data_seed", data_seed, 0)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.data: Any = None

    @property
    def num_features(self) -> int:
        """Node feature dimension of the data set (1433 for Cora)."""
        return PLANETOID[self.hparams.name][0]

    @property
    def num_classes(self) -> int:
        """Number of node classes (7 for Cora)."""
        return PLANETOID[self.hparams.name][1]

    @property
    def raw_dir(self) -> Path:
        """Where the raw files are expected: ``<data_dir>/<name>/raw``."""
        return self.data_dir / self.hparams.name / "raw"

    def _raw_files(self) -> list[str]:
        return [f"ind.{self.hparams.name.lower()}.{suffix}" for suffix in _RAW]

    def _missing_error(self, reason: str = ""):
        from torch_geometric.datasets import Planetoid

        how = (
            f"Copy the eight Planetoid files ind.{self.hparams.name.lower()}.* from {Planetoid.url} into "
            f"{self.raw_dir}/, or pass download=True (data.init_args.download: true) on a machine with internet access."
        )
        missing = missing_files(self.raw_dir, self._raw_files())
        return data_not_found(self.hparams.name, missing or [self.raw_dir / self._raw_files()[0]], how, reason)

    def _dataset(self):
        from torch_geometric.datasets import Planetoid
        from torch_geometric.transforms import NormalizeFeatures

        h = self.hparams
        transform = NormalizeFeatures() if h.normalize_features else None
        return Planetoid(str(self.data_dir), h.name, split=h.split, transform=transform)

    def prepare_data(self) -> None:
        """Download (if allowed) and process the raw files once; refuse clearly if they are missing."""
        if missing_files(self.raw_dir, self._raw_files()):
            if not self.hparams.download:
                raise self._missing_error()
            try:
                self._dataset()
            except Exception as err:  # noqa: BLE001 - URLError, HTTPError, OSError from the download
                raise self._missing_error(f"The download failed ({type(err).__name__}: {err}).") from None
        self._dataset()  # writes processed/ on rank 0 before setup() reads it on every rank

    def setup(self, stage: str | None = None) -> None:
        """Load the graph (one ``Data`` object with its masks)."""
        check_net(self, in_features=self.num_features)
        if self.data is not None:
            return
        if missing_files(self.raw_dir, self._raw_files()):
            raise self._missing_error()
        dataset = self._dataset()
        data = dataset[0]
        if dataset.num_features != self.num_features or dataset.num_classes != self.num_classes:
            raise ValueError(
                f"Invalid {self.hparams.name} files in {self.raw_dir}: {dataset.num_features} features and "
                f"{dataset.num_classes} classes; expected {self.num_features} and {self.num_classes}"
            )
        self.data = data

    def _loader(self) -> DataLoader:
        if self.data is None:
            raise RuntimeError(f"{type(self).__name__} loaders called before setup()")
        return make_loader(
            FullGraph(self.data), 1, shuffle=False, num_workers=self.hparams.num_workers, collate_fn=first
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if h.train_batch_nodes is None:
            return self._loader()
        if self.data is None:
            raise RuntimeError(f"{type(self).__name__} loaders called before setup()")
        return make_loader(
            TrainNodes(self.data),
            h.train_batch_nodes,
            shuffle=True,
            seed=h.data_seed,
            num_workers=h.num_workers,
            collate_fn=NodeBatch(self.data),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
