"""Network architectures of the studies: plain ``nn.Module``s injected into the LightningModules (``net=``).

Each takes typed constructor arguments (its input shape and number of outputs are set in the model
configs; the data modules refuse a net built for another input) and exposes ``out_features``, its
number of outputs, which the tasks check against the data's ``num_classes``.
"""

from .convnet import VGG16, ComplexBatch, ConvNet, MiddleBatch, SimpleBatch
from .gat import GAT
from .lenet import LeNet5
from .matrix_factorization import MatrixFactorization
from .mlp import FCNN, MLP
from .pyramidnet import PyramidNet
from .resnet import ResNet, ResNet18
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet

__all__ = [
    "MLP",
    "FCNN",
    "ConvNet",
    "SimpleBatch",
    "MiddleBatch",
    "ComplexBatch",
    "VGG16",
    "LeNet5",
    "SmallCNN",
    "ResNet",
    "ResNet18",
    "WideResNet",
    "PyramidNet",
    "GAT",
    "MatrixFactorization",
]
