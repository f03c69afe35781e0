"""CIFAR-10 (Krizhevsky, 2009), read by torchvision.

The data of Bejan, Sanchez Ndoye & Vuckovic, of Khalid, Ponraj & Mukherjee and of Wong, Yao & Huang.
"""

from __future__ import annotations

from torchvision.datasets import CIFAR10

from ._vision import VisionDataModule


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32×32 RGB images of 10 classes, batch 128 by default.

    Training augmentation (Khalid, Ponraj & Mukherjee): random 32×32 crop of the image zero-padded by 4 pixels and
    horizontal flip; per-channel normalisation with the training set's mean and standard deviation;
    optional Cutout (DeVries & Taylor 2017; davda54/sam, the base of Wong, Yao & Huang, uses 16 px with p 0.5).
    Files: torchvision's ``<data_dir>/cifar-10-batches-py/`` (``data_batch_1`` … ``data_batch_5``,
    ``test_batch``, ``batches.meta``; torchvision reads them and checks their MD5 sums). Held in memory by
    default (740 MB as float32), the crop, flip and Cutout then applied to whole batches. See
    :class:`~flatminima.datamodules._vision.VisionDataModule` for the arguments.
    """

    dataset_cls = CIFAR10
    title = "CIFAR-10"
    folder = "cifar-10-batches-py"
    files = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
    how_to_get = f"Download {CIFAR10.url} and extract it into data_dir (it unpacks to cifar-10-batches-py/)."
    num_classes = 10
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    crop_padding = 4
    horizontal_flip = True
