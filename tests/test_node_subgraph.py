"""NodeClassifier(train_subgraph_hops=k): a step on the k-hop subgraph of the batch's nodes is the whole-graph step."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch_geometric
from helpers import quiet_trainer
from torch.utils.data import DataLoader

from flatminima.lightning_modules import SAM, NodeClassifier
from flatminima.lightning_modules.networks import GAT

pytestmark = pytest.mark.usefixtures("one_thread")


def graph_batches() -> list:
    g = torch.Generator().manual_seed(0)
    n = 60
    data = torch_geometric.data.Data(
        x=torch.randn(n, 6, generator=g, dtype=torch.float64),
        edge_index=torch.randint(0, n, (2, 100), generator=g),
        y=torch.randint(0, 3, (n,), generator=g),
    )
    batches = []
    for nodes in (torch.arange(0, 6), torch.arange(6, 12), torch.tensor([12, 13, 40])):
        batch = data.clone()
        batch.train_mask = torch.zeros(n, dtype=torch.bool)
        batch.train_mask[nodes] = True
        batches.append(batch)
    return batches


@pytest.mark.parametrize("rule", [None, "SAM"])
def test_training_on_the_two_hop_subgraph_gives_the_whole_graph_steps(rule):
    weights = []
    for hops in (None, 2):
        torch.manual_seed(0)
        net = GAT(in_features=6, num_classes=3, hidden_channels=4, heads=2, dropout=0.0).double()
        start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        model = NodeClassifier(
            net,
            optimizer=partial(torch.optim.SGD, lr=0.5),
            minimizer=SAM(rho=0.1) if rule else None,
            train_subgraph_hops=hops,
        )
        trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
        trainer.fit(model, DataLoader(graph_batches(), batch_size=None, shuffle=False))
        weights.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert (weights[0] - start).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-10, atol=1e-12)


def test_bad_hops_are_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="Invalid train_subgraph_hops: "):
            NodeClassifier(GAT(in_features=6, num_classes=3), train_subgraph_hops=bad)
