"""Networks: parameter counts against published or hand-computed numbers, output shapes, one SAM step."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch_geometric.data import Data

from flatminima.lightning_modules import SAM, Classifier, NodeClassifier, Regressor
from flatminima.lightning_modules.networks import (
    FCNN,
    GAT,
    MLP,
    VGG16,
    ComplexBatch,
    ConvNet,
    LeNet5,
    MatrixFactorization,
    MiddleBatch,
    PyramidNet,
    ResNet,
    ResNet18,
    SimpleBatch,
    SmallCNN,
    WideResNet,
)
from flatminima.lightning_modules.networks.convnet import COMPLEX_BATCH, MIDDLE_BATCH, SIMPLE_BATCH, VGG16_LAYERS

pytestmark = pytest.mark.usefixtures("one_thread")


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- hand computations (layer shapes only)
def conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def bn(c: int) -> int:
    return 2 * c


def convnet_count(cin: int, layers, image_size: int, hidden: list[int], classes: int = 10) -> int:
    """3x3 conv (no bias) + BN per width, 2x2 pools, then linear layers."""
    total, c, side = 0, cin, image_size
    for v in layers:
        if v == "M":
            side //= 2
            continue
        total += conv(c, v, 3, bias=False) + bn(v)
        c = v
    width = c * side * side
    for h in hidden:
        total += linear(width, h)
        width = h
    return total + linear(width, classes)


def resnet_basic_count(cin: int, blocks: list[int], width: int, classes: int = 10) -> int:
    """3x3 stem (no bias) + BN, basic blocks (two 3x3 conv + BN; 1x1 conv + BN projection when the shape changes)."""
    total, c = conv(cin, width, 3, False) + bn(width), width
    for i, n in enumerate(blocks):
        out = width * 2**i
        for j in range(n):
            total += conv(c, out, 3, False) + bn(out) + conv(out, out, 3, False) + bn(out)
            if (i > 0 and j == 0) or c != out:
                total += conv(c, out, 1, False) + bn(out)
            c = out
    return total + linear(c, classes)


def pyramidnet_basic_count(depth: int, alpha: float, classes: int = 10) -> int:
    n = (depth - 2) // 6
    widths = [round(16 + alpha * k / (3 * n)) for k in range(1, 3 * n + 1)]
    total, c = conv(3, 16, 3, False) + bn(16), 16
    for w in widths:  # BN(c) conv(c, w) BN(w) conv(w, w) BN(w)
        total += bn(c) + conv(c, w, 3, False) + bn(w) + conv(w, w, 3, False) + bn(w)
        c = w
    return total + bn(c) + linear(c, classes)


LENET5_BY_HAND = (
    conv(1, 6, 5, True)
    + bn(6)  # 156 + 12
    + conv(6, 16, 5, True)
    + bn(16)  # 2416 + 32
    + linear(16 * 5 * 5, 120)
    + linear(120, 84)
    + linear(84, 10)  # 48120 + 10164 + 850
)
LENET5_NOTEBOOK_BY_HAND = (
    conv(1, 12, 5, True)
    + bn(12)
    + conv(12, 32, 5, True)
    + bn(32)  # 28 -> 24 -> 12 -> 8 -> 4
    + linear(32 * 4 * 4, 256)
    + linear(256, 128)
    + linear(128, 10)
)
GAT_ONE_HEAD_BY_HAND = 1433 * 8 + 3 * 8 + 8 * 7 + 3 * 7  # lin + att_src/att_dst/bias per layer
GAT_BY_HAND = (
    1433 * 64
    + 64
    + 64
    + 64  # lin (no bias) + att_src + att_dst (8 heads x 8) + bias
    + 64 * 7
    + 7
    + 7
    + 7  # output layer, 1 head, 7 classes
)

# name: (factory, expected count, tolerance (relative), where the number comes from)
COUNTS = {
    "ResNet18": (ResNet18, 11_173_962, 0.0, "CIFAR ResNet-18, 10 classes (pytorch-cifar and every SAM repo)"),
    "VGG16": (VGG16, 15.0e6, 0.005, "VGG-16-BN CIFAR, one 512 hidden layer: about 15.0M"),
    "VGG16 hand": (VGG16, convnet_count(3, VGG16_LAYERS, 32, [512]), 0.0, "hand count of the layer shapes"),
    "VGG16 no hidden": (
        lambda: VGG16(hidden=[]),
        14_728_266 - 4_224,
        0.0,
        "pytorch-cifar's VGG16 (14,728,266) without its 4,224 conv biases, which BN makes redundant",
    ),
    "WRN-16-8": (WideResNet, 11.0e6, 0.005, "Zagoruyko & Komodakis (2016), table: WRN-16-8 11.0M"),
    "PyramidNet-110-48": (PyramidNet, 1.7e6, 0.05, "Han et al. (2017), table 4: 1.7M"),
    "PyramidNet-110-48 hand": (PyramidNet, pyramidnet_basic_count(110, 48), 0.0, "hand count of the unit widths"),
    "PyramidNet-272-200": (
        lambda: PyramidNet(depth=272, alpha=200, bottleneck=True),
        26.0e6,
        0.01,
        "Han et al. (2017), table 4: 26.0M",
    ),
    "LeNet5": (LeNet5, LENET5_BY_HAND, 0.0, "hand count of the layer shapes: 61,750"),
    "SmallCNN": (SmallCNN, 1_199_882, 0.0, "the Keras MNIST CNN example's summary"),
    "FCNN": (FCNN, linear(10, 64) + linear(64, 64) + linear(64, 1), 0.0, "hand count: 4,929"),
    "MLP": (MLP, linear(2, 32) + 2 * linear(32, 32) + linear(32, 2), 0.0, "hand count"),
    "GAT": (GAT, GAT_BY_HAND, 0.0, "hand count: 92,373 (PyG's GAT example on Cora)"),
    "SimpleBatch FMNIST": (SimpleBatch, convnet_count(1, SIMPLE_BATCH, 28, [256]), 0.0, "hand count"),
    "MiddleBatch FMNIST": (MiddleBatch, convnet_count(1, MIDDLE_BATCH, 28, [256]), 0.0, "hand count"),
    "ComplexBatch FMNIST": (ComplexBatch, convnet_count(1, COMPLEX_BATCH, 28, [256]), 0.0, "hand count"),
    "SimpleBatch CIFAR": (lambda: SimpleBatch(3, 10, 32), convnet_count(3, SIMPLE_BATCH, 32, [256]), 0.0, "hand count"),
    "ComplexBatch CIFAR": (
        lambda: ComplexBatch(3, 10, 32),
        convnet_count(3, COMPLEX_BATCH, 32, [256]),
        0.0,
        "hand count",
    ),
    "MatrixFactorization": (MatrixFactorization, 100 * 100, 0.0, "U is d x width"),
    "SimpleBatch digits": (lambda: SimpleBatch(1, 10, 8), convnet_count(1, SIMPLE_BATCH, 8, [256]), 0.0, "hand count"),
    "MiddleBatch digits": (lambda: MiddleBatch(1, 10, 8), convnet_count(1, MIDDLE_BATCH, 8, [256]), 0.0, "hand count"),
    "ComplexBatch digits": (
        lambda: ComplexBatch(1, 10, 8),
        convnet_count(1, COMPLEX_BATCH, 8, [256]),
        0.0,
        "hand count",
    ),
    "ResNet digits": (
        lambda: ResNet(1, 10, [2, 2, 2, 2], 8),
        resnet_basic_count(1, [2, 2, 2, 2], 8),
        0.0,
        "hand count of configs/model/resnet_digits.yaml: 176,258",
    ),
    "ResNet18 hand": (ResNet18, resnet_basic_count(3, [2, 2, 2, 2], 64), 0.0, "hand count = 11,173,962"),
    "LeNet5 notebook": (
        lambda: LeNet5(channels=[12, 32], hidden=[256, 128], padding=0),
        LENET5_NOTEBOOK_BY_HAND,
        0.0,
        "hand count of Hammoud et al.'s notebook LeNet: 175,546",
    ),
    "GAT one head": (lambda: GAT(heads=1), GAT_ONE_HEAD_BY_HAND, 0.0, "hand count = PyG GAT(1433, 8, 2, 7): 11,565"),
    "FCNN ELU output": (
        lambda: FCNN(activation="elu", output_activation="elu"),
        linear(10, 64) + linear(64, 64) + linear(64, 1),
        0.0,
        "activations have no parameters",
    ),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_count(name):
    factory, expected, rel, source = COUNTS[name]
    n = count(factory())
    print(f"{name}: {n:,d} parameters; reference {expected:,.0f} ({source})")
    if rel == 0.0:
        assert n == expected
    else:
        assert abs(n - expected) <= rel * expected, f"{n:,d} vs {expected:,.0f} ({source})"


def test_lenet5_hand_count_is_61750():
    assert LENET5_BY_HAND == 61_750
    assert LENET5_NOTEBOOK_BY_HAND == 175_546 and GAT_ONE_HEAD_BY_HAND == 11_565


def test_digit_nets_pool_8x8_down_to_one_pixel():
    """8 -> 4 -> 2 (SimpleBatch, two pools) and 8 -> 4 -> 2 -> 1 (MiddleBatch, ComplexBatch, ResNet stages 2-4)."""
    for factory, side, channels in ((SimpleBatch, 2, 64), (MiddleBatch, 1, 128), (ComplexBatch, 1, 128)):
        net = factory(1, 10, 8)
        flat = [m for m in net if isinstance(m, nn.Linear)][0]
        assert flat.in_features == channels * side * side
    resnet = ResNet(1, 10, [2, 2, 2, 2], 8).eval()
    maps = resnet.stages(resnet.stem(torch.randn(1, 1, 8, 8)))
    assert maps.shape == (1, 64, 1, 1)
    with pytest.raises(ValueError, match="Invalid image_size: 4"):
        MiddleBatch(1, 10, 4)  # three poolings need image_size >= 8


# ---------------------------------------------------------------- shapes and one SAM step
IMAGE_NETS = {  # name: (factory, input shape (C, H, W)); tiny inputs where the net allows them
    "SimpleBatch": (SimpleBatch, (1, 28, 28)),
    "MiddleBatch": (MiddleBatch, (1, 28, 28)),
    "ComplexBatch": (lambda: ComplexBatch(3, 10, 32), (3, 32, 32)),
    "LeNet5": (LeNet5, (1, 28, 28)),
    "SmallCNN": (SmallCNN, (1, 28, 28)),
    "VGG16": (VGG16, (3, 32, 32)),
    "ResNet18": (ResNet18, (3, 8, 8)),
    "WideResNet": (WideResNet, (3, 8, 8)),
    "PyramidNet": (lambda: PyramidNet(depth=20, alpha=12), (3, 8, 8)),  # the default 110 layers cost seconds
    "PyramidNet bottleneck": (lambda: PyramidNet(depth=29, alpha=12, bottleneck=True), (3, 8, 8)),
    "SimpleBatch digits": (lambda: SimpleBatch(1, 10, 8), (1, 8, 8)),
    "MiddleBatch digits": (lambda: MiddleBatch(1, 10, 8), (1, 8, 8)),
    "ComplexBatch digits": (lambda: ComplexBatch(1, 10, 8), (1, 8, 8)),
    "ResNet digits": (lambda: ResNet(1, 10, [2, 2, 2, 2], 8), (1, 8, 8)),
    "LeNet5 notebook": (lambda: LeNet5(channels=[12, 32], hidden=[256, 128], padding=0), (1, 28, 28)),
}


def one_sam_step(module: pl.LightningModule, batch) -> None:
    """Fit one step with SAM; the weights must move and stay finite."""
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    assert trainer.global_step == 1
    after = list(module.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "SAM step left every weight unchanged"


@pytest.mark.parametrize("name", list(IMAGE_NETS))
def test_image_net_shape_and_sam_step(name):
    factory, shape = IMAGE_NETS[name]
    torch.manual_seed(0)
    net = factory()
    x = torch.randn(2, *shape)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 10) == (2, net.out_features)
    net.train()
    one_sam_step(Classifier(net, minimizer=SAM(rho=0.05)), (x, torch.tensor([0, 1])))


@pytest.mark.parametrize("net", [FCNN(), MLP(10, [8], 1)], ids=["FCNN", "MLP-regression"])
def test_regression_net_shape_and_sam_step(net):
    x = torch.randn(4, 10)
    assert net(x).shape == (4, 1)
    one_sam_step(Regressor(net, minimizer=SAM()), (x, torch.randn(4)))


def test_gat_shape_and_sam_step():
    torch.manual_seed(0)
    n = 12
    edge_index = torch.randint(0, n, (2, 40))
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
    masks["train_mask"][:6] = True
    graph = Data(x=torch.rand(n, 1433), edge_index=edge_index, y=torch.randint(0, 7, (n,)), **masks)
    net = GAT()
    net.eval()
    assert net(graph.x, graph.edge_index).shape == (n, 7)
    net.train()
    one_sam_step(NodeClassifier(net, minimizer=SAM()), graph)


def test_matrix_factorization_predicts_the_inner_product_and_steps():
    torch.manual_seed(0)
    net = MatrixFactorization(dim=6, width=4, init_scale=0.5)
    a = torch.randn(5, 6, 6)
    expected = torch.stack([torch.trace(net.U.T @ a_i @ net.U) for a_i in a])  # <A, U U^T> = tr(U^T A U)
    torch.testing.assert_close(net(a), expected)
    assert net(a).shape == (5,) and net.out_features == 1
    torch.testing.assert_close(net.product(), net.U @ net.U.T)
    one_sam_step(Regressor(net, minimizer=SAM()), (a, torch.randn(5)))


def test_matrix_factorization_identity_init():
    net = MatrixFactorization(dim=3, width=5, init="identity", init_scale=0.1)
    torch.testing.assert_close(net.U.detach(), 0.1 * torch.eye(3, 5))


def test_image_size_and_channels_shape_the_nets():
    """The same class serves FashionMNIST (1×28×28) and CIFAR-10 (3×32×32)."""
    for factory in (SimpleBatch, MiddleBatch, ComplexBatch, LeNet5, SmallCNN):
        for c, s in ((1, 28), (3, 32)):
            net = factory(in_channels=c, num_classes=7, image_size=s).eval()
            assert net(torch.randn(1, c, s, s)).shape == (1, 7)


# ---------------------------------------------------------------- structure
@pytest.mark.parametrize("factory", [SimpleBatch, MiddleBatch, ComplexBatch, VGG16, LeNet5, SmallCNN, FCNN])
def test_feed_forward_nets_are_plain_chains(factory):
    """Layer-wise measures walk these nets: an nn.Sequential of standard layers, nothing nested."""
    net = factory()
    assert isinstance(net, nn.Sequential)
    allowed = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear, nn.Dropout)
    assert all(isinstance(m, allowed) for m in net), [type(m).__name__ for m in net]


def test_presets_are_one_class():
    for preset, layers in ((SimpleBatch, SIMPLE_BATCH), (MiddleBatch, MIDDLE_BATCH), (ComplexBatch, COMPLEX_BATCH)):
        net = preset()
        assert isinstance(net, ConvNet)
        convs = [m for m in net if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [v for v in layers if v != "M"]
        assert len([m for m in net if isinstance(m, nn.Linear)]) == 2  # "then two linear layers"
    convs = [len([m for m in p() if isinstance(m, nn.Conv2d)]) for p in (SimpleBatch, MiddleBatch, ComplexBatch)]
    assert convs == [4, 6, 9]
    assert len([m for m in VGG16() if isinstance(m, nn.Conv2d)]) == 13
    assert isinstance(ResNet18(), ResNet) and isinstance(FCNN(), MLP)


def test_lenet5_layout():
    """BN right after each conv, dropout 0.5 after the first two linear layers."""
    types = [type(m) for m in LeNet5()]
    assert types[:3] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] and types[4:7] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    linears = [i for i, t in enumerate(types) if t is nn.Linear]
    dropouts = [m.p for m in LeNet5() if isinstance(m, nn.Dropout)]
    assert len(linears) == 3 and dropouts == [0.5, 0.5]
    assert types[linears[0] + 2] is nn.Dropout and types[linears[1] + 2] is nn.Dropout


def test_gat_layers():
    net = GAT()
    assert (net.conv1.heads, net.conv1.out_channels, net.conv1.concat, net.conv1.dropout) == (8, 8, True, 0.6)
    assert (net.conv2.heads, net.conv2.out_channels, net.conv2.concat) == (1, 7, False)
    assert net.input_dropout == 0.6 and net.conv2.dropout == 0.6
    split = GAT(dropout=0.5, input_dropout=0.0, attention_dropout=0.1)
    assert (split.dropout, split.input_dropout, split.conv1.dropout, split.conv2.dropout) == (0.5, 0.0, 0.1, 0.1)


def test_one_head_gat_is_pyg_gat_of_the_notebook():
    """Hammoud et al.'s notebook builds torch_geometric.nn.GAT(1433, 8, 2, 7, dropout=0.6, act="elu")."""
    from torch_geometric.nn import GAT as PygGAT

    torch.manual_seed(0)
    ours = GAT(heads=1, output_heads=1, dropout=0.6, input_dropout=0.0, attention_dropout=0.6)
    ref = PygGAT(1433, 8, num_layers=2, out_channels=7, dropout=0.6, act="elu")
    assert count(ours) == count(ref) == 11_565
    assert [c.dropout for c in ref.convs] == [ours.conv1.dropout, ours.conv2.dropout]  # attention dropout 0.6
    with torch.no_grad():
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            a.copy_(b.view_as(a))
    x = torch.rand(30, 1433)
    edge_index = torch.randint(0, 30, (2, 90))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, edge_index), ref(x, edge_index))


def test_output_activation():
    net = FCNN(activation="elu", output_activation="elu", weight_init="default")
    assert [type(m) for m in net] == [nn.Linear, nn.ELU, nn.Linear, nn.ELU, nn.Linear, nn.ELU]
    assert net(torch.randn(50, 10) * 100).min() >= -1.0  # ELU floor: the notebook's outputs cannot go below -1
    assert type(FCNN()[-1]) is nn.Linear and type(MLP(out_features=1, weight_init="xavier")[-1]) is nn.Linear


def test_wide_resnet_depth_gives_blocks():
    net = WideResNet(depth=22, width=2)
    assert [len(g) for g in net.groups] == [3, 3, 3]
    assert net.groups[-1][-1].conv2.out_channels == 128


def test_xavier_init_zeroes_biases():
    net = FCNN(weight_init="xavier")
    assert all(torch.count_nonzero(m.bias) == 0 for m in net if isinstance(m, nn.Linear))
    bound = math.sqrt(6 / (10 + 64))
    assert net[0].weight.abs().max() <= bound


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (SimpleBatch, {"in_channels": 0}, "in_channels"),
        (SimpleBatch, {"num_classes": 0}, "num_classes"),
        (ComplexBatch, {"image_size": 4}, "image_size"),
        (ConvNet, {"layers": ["M"]}, "layers"),
        (ConvNet, {"layers": [8, "X"]}, "layers"),
        (ConvNet, {"dropout": 1.0}, "dropout"),
        (VGG16, {"image_size": 28}, "image_size"),
        (LeNet5, {"image_size": 8}, "image_size"),
        (LeNet5, {"weight_init": "he"}, "weight_init"),
        (SmallCNN, {"hidden": 0}, "hidden"),
        (ResNet, {"blocks": []}, "blocks"),
        (ResNet18, {"in_channels": 0}, "in_channels"),
        (WideResNet, {"depth": 15}, "depth"),
        (WideResNet, {"dropout": -0.1}, "dropout"),
        (PyramidNet, {"depth": 111}, "depth"),
        (PyramidNet, {"alpha": 0}, "alpha"),
        (GAT, {"heads": 0}, "heads"),
        (FCNN, {"hidden": [64, 0]}, "hidden"),
        (MLP, {"activation": "gelu"}, "activation"),
        (MLP, {"output_activation": "sigmoid"}, "output_activation"),
        (GAT, {"input_dropout": 1.0}, "input_dropout"),
        (GAT, {"attention_dropout": -0.1}, "attention_dropout"),
        (LeNet5, {"channels": [6]}, "channels"),
        (LeNet5, {"hidden": [0]}, "hidden"),
        (LeNet5, {"padding": -1}, "padding"),
        (LeNet5, {"padding": 0, "image_size": 13}, "image_size"),
        (MatrixFactorization, {"init_scale": 0.0}, "init_scale"),
        (MatrixFactorization, {"init": "zeros"}, "init"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        factory(**kwargs)


def test_matrix_factorization_refuses_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expected \(batch, 4, 4\)"):
        MatrixFactorization(dim=4)(torch.randn(2, 3, 3))
