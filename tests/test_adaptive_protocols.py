"""The PGA options of Hammoud et al.'s notebooks against plain-torch rewrites of their loops.

Their notebooks (github.com/HadiHammoud44/CS439_Sharpness) move the weights of a live module with
``torch.optim.SGD`` on the negated loss and clamp them back into the box; the loops below do exactly
that, independently of :mod:`flatminima.callbacks.adaptive`, whose flat-vector ascent must give the same numbers:
``box="signed"`` (the FCNN notebook's clamp with bounds w0 ∓ ρ·w0), ``score_batches`` (every iterate
scored by the training-set loss), batches drawn with replacement, ``train_mode`` (dropout on), and the
exact subgraph shortcut :func:`flatminima.callbacks.inputs.node_subgraph_inputs`.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torch_geometric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatminima.callbacks import AdaptiveSharpness, LossThresholdCheckpoint, measures
from flatminima.callbacks.inputs import masked_cross_entropy, mse_loss, node_inputs, node_subgraph_inputs
from flatminima.lightning_modules.networks import GAT

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- FCNN notebook
def elu_fcnn(seed: int = 0) -> nn.Module:
    """The notebook's NetFCNN at a small size: ELU after every layer, the output included (float64)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.ELU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 1), nn.ELU()]
    return nn.Sequential(*layers).double().eval()


def fcnn_notebook_sharpness(net: nn.Module, x, y, rho: float, lr: float, passes: int) -> float:
    """FCNN_model.ipynb's measurement with one step per pass: SGD on −MSE(train), clamp(w, w0 − ρw0, w0 + ρw0)."""
    network = copy.deepcopy(net)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    listt = [p.clone() for p in network.parameters()]
    with torch.no_grad():
        clean = float(nn.MSELoss()(network(x), y))
    worst = 0.0
    for _ in range(passes):
        optimizer.zero_grad()
        (-nn.MSELoss()(network(x), y)).backward()
        optimizer.step()
        with torch.no_grad():
            for i, param in enumerate(network.parameters()):
                param.data = torch.clamp(param.data, -listt[i] * rho + listt[i], listt[i] * rho + listt[i])
            worst = max(worst, float(nn.MSELoss()(network(x), y)))
    return worst - clean


def test_signed_box_reproduces_the_fcnn_notebook_projection():
    net = elu_fcnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = torch.randn(60, 1, generator=g, dtype=torch.float64)
    rho, lr, steps = 0.025, 0.5, 8
    expected = fcnn_notebook_sharpness(net, x, y, rho, lr, steps)
    kw = dict(method="pga", step_size=lr, n_iters=steps, loss_fn=mse_loss)
    got = measures.adaptive_sharpness(net, [(x, y)], rho, box="signed", **kw)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-14)
    # Scoring by the same whole set as a separate score set changes nothing here ...
    scored = measures.adaptive_sharpness(net, [(x, y)], rho, box="signed", score_batches=[(x, y)], **kw)
    assert scored == pytest.approx(expected, rel=1e-10, abs=1e-14)
    # ... while the exact box |δ| <= ρ|w| gives another value (the negative weights move too).
    assert measures.adaptive_sharpness(net, [(x, y)], rho, **kw) != pytest.approx(expected, rel=1e-3)
    assert measures.adaptive_sharpness(net, [(x, y)], rho, **kw) > expected


# ---------------------------------------------------------------------------------------- GAT notebook
def graph(seed: int = 0) -> torch_geometric.data.Data:
    g = torch.Generator().manual_seed(seed)
    n = 40
    return torch_geometric.data.Data(
        x=torch.randn(n, 6, generator=g, dtype=torch.float64),
        edge_index=torch.randint(0, n, (2, 90), generator=g),
        y=torch.randint(0, 3, (n,), generator=g),
        train_mask=torch.arange(n) < 20,
    )


def small_gat(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return GAT(in_features=6, num_classes=3, hidden_channels=4, heads=2, dropout=dropout).double()


def mask_of(data, nodes) -> torch.Tensor:
    mask = torch.zeros(data.num_nodes, dtype=torch.bool)
    mask[torch.as_tensor(nodes)] = True
    return mask


def gat_notebook_sharpness(net: nn.Module, data, masks, rho: float, lr: float, steps: int) -> float:
    """GAT_model.ipynb's measurement (eval mode; score: the mean CE over the whole training mask).

    For each trial mask: reload w0, ``steps`` SGD steps on −CE(mask), each followed by the projection
    clamp(w, w0 − ρ|w0|, w0 + ρ|w0|) and the training-set score; the trial's value is its best score.
    """
    x, e, y, train = data.x, data.edge_index, data.y, data.train_mask
    w0 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        clean = float(F.cross_entropy(net(x, e)[train], y[train]))
    total = 0.0
    for mask in masks:
        model = copy.deepcopy(net)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        best = 0.0
        for _ in range(steps):
            optimizer.zero_grad()
            (-F.cross_entropy(model(x, e)[mask], y[mask])).backward()
            optimizer.step()
            with torch.no_grad():
                for p, fixed in zip(model.parameters(), w0):
                    p.data = torch.clamp(p.data, fixed - rho * fixed.abs(), fixed + rho * fixed.abs())
                best = max(best, float(F.cross_entropy(model(x, e)[train], y[train])))
        total += best
    return total / len(masks) - clean


def test_training_set_score_and_node_batches_reproduce_the_gat_notebook_loop():
    data, net = graph(), small_gat().eval()
    nodes = data.train_mask.nonzero().flatten()
    g = torch.Generator().manual_seed(2)
    masks = [mask_of(data, nodes[torch.randint(len(nodes), (8,), generator=g)]) for _ in range(3)]
    rho, lr, steps = 0.05, 2.0, 4
    expected = gat_notebook_sharpness(net, data, masks, rho, lr, steps)
    batches = [node_inputs(data.clone().update({"train_mask": m})) for m in masks]
    kw = dict(method="pga", step_size=lr, n_iters=steps, loss_fn=masked_cross_entropy)
    got = measures.adaptive_sharpness(net, batches, rho, score_batches=[node_inputs(data)], **kw)
    assert got == pytest.approx(expected, rel=1e-9)
    # The subgraph shortcut changes no number: the two-layer GAT sees two hops.
    sub = [node_subgraph_inputs(data.clone().update({"train_mask": m})) for m in masks]
    assert measures.adaptive_sharpness(
        net, sub, rho, score_batches=[node_subgraph_inputs(data)], **kw
    ) == pytest.approx(expected, rel=1e-9)
    assert len(sub[0][0][0]) < data.num_nodes  # it did drop nodes


def test_train_mode_draws_dropout_in_a_documented_order_and_leaves_no_trace():
    """train_mode: the network runs with dropout (and BatchNorm on batch statistics, running stats untouched).

    The reference replays the documented order of forward passes on a deep copy in training mode with
    the same seed: the clean score once, then per batch the clean batch loss and gradient, and per step
    the score of the iterate and (but after the last step) the gradient there.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    batches, score_set = [(x[:10], y[:10]), (x[10:20], y[10:20])], [(x, y)]
    rho, lr, steps = 0.05, 0.5, 3
    buffers = [b.clone() for b in net.buffers()]

    model = copy.deepcopy(net).train()
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]

    def at(delta, xs, ys, grad=False):
        with torch.no_grad():
            for p, w, d in zip(params, w0, delta):
                p.copy_(w + d)
        loss = F.cross_entropy(model(xs), ys)
        return (loss, torch.autograd.grad(loss, params)) if grad else loss.detach()

    torch.manual_seed(11)
    zero = [torch.zeros_like(w) for w in w0]
    clean = float(at(zero, x, y))
    values = []
    for xb, yb in batches:
        _, grads = at(zero, xb, yb, grad=True)
        delta, best = zero, -math.inf
        for i in range(steps):
            delta = [torch.clamp(d + lr * gr, -rho * w.abs(), rho * w.abs()) for d, gr, w in zip(delta, grads, w0)]
            best = max(best, float(at(delta, x, y)))
            if i < steps - 1:
                _, grads = at(delta, xb, yb, grad=True)
        values.append(best - clean)
    expected = sum(values) / len(values)

    torch.manual_seed(11)
    state = torch.get_rng_state()
    kw = dict(method="pga", step_size=lr, n_iters=steps, score_batches=score_set)
    got = measures.adaptive_sharpness(net, batches, rho, train_mode=True, **kw)
    assert got == pytest.approx(expected, rel=1e-10)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is as it was
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers())) and net.training
    assert measures.adaptive_sharpness(net.eval(), batches, rho, **kw) != pytest.approx(got, rel=1e-3)


# ---------------------------------------------------------------------------------------- the callback
class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_draws_batches_with_replacement_and_scores_on_the_whole_training_set(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    measure = AdaptiveSharpness(
        rho=0.05,
        method="pga",
        n_iters=3,
        num_samples=40,
        batch_size=8,
        seed=5,
        sampling="replacement",
        score="train_set",
    )
    module = Tiny()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[LossThresholdCheckpoint(threshold=-math.inf, dirpath=str(tmp_path)), measure],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(data, batch_size=6))
    indices = torch.randint(24, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    assert measure.state_dict()["indices"] == indices  # 40 draws from 24 examples: repeats
    batches = [(x[indices[i : i + 8]], data.tensors[1][indices[i : i + 8]]) for i in range(0, 40, 8)]
    expected = measures.adaptive_sharpness(
        module.net, batches, 0.05, method="pga", n_iters=3, step_size=0.1, score_batches=[data.tensors]
    )
    assert measure.history[-1]["sharpness/adaptive"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="apgd", score="train_set"), "Invalid score: a score set with method='apgd'"),
        (dict(method="pga", box="signed", p=2.0), "Invalid box: 'signed'"),
        (dict(method="pga", box="sign"), "Invalid box: 'sign'"),
        (dict(sampling="bootstrap"), "Invalid sampling: 'bootstrap'"),
    ],
)
def test_bad_protocol_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveSharpness(rho=0.1, **kwargs)
