"""Graph attention network (Veličković et al., 2018): the Cora network of Hammoud et al. 2023."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv

from ..validation import check_fraction, check_int


class GAT(nn.Module):
    """Two-layer graph attention network for node classification (Veličković et al., 2018).

    ``dropout_in(x) → GATConv(in → hidden × heads, concatenated) → ELU → dropout → GATConv(hidden·heads
    → classes, output_heads averaged)``; each GATConv also drops attention coefficients with
    probability ``attention_dropout``. With the paper's Cora setting (8 hidden channels × 8 heads,
    dropout 0.6 everywhere, ELU; Hammoud et al.'s text) it has 92,373 parameters. Hammoud et al.'s
    notebook builds PyG's ``GAT(1433, 8, num_layers=2, out_channels=7, dropout=0.6, act="elu")``
    instead: one head (``heads: 1``), no dropout on the input features (``input_dropout: 0``), dropout
    0.6 between the layers and on the attention coefficients; 11,565 parameters. Call it as
    ``net(x, edge_index)`` (``NodeClassifier``).

    Args:
        in_features: Node feature dimension (1433 for Cora) (must match the data).
        num_classes: Number of output logits per node (must match the data).
        hidden_channels: Hidden channels per attention head.
        heads: Attention heads of the first layer (concatenated).
        output_heads: Attention heads of the output layer (averaged).
        dropout: Dropout probability on the hidden features between the layers.
        input_dropout: Dropout probability on the input features (None: ``dropout``).
        attention_dropout: Dropout probability on the attention coefficients of both layers (None: ``dropout``).
    """

    def __init__(
        self,
        in_features: int = 1433,
        num_classes: int = 7,
        hidden_channels: int = 8,
        heads: int = 8,
        output_heads: int = 1,
        dropout: float = 0.6,
        input_dropout: float | None = None,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        in_features = check_int("in_features", in_features)
        num_classes = check_int("num_classes", num_classes)
        hidden_channels = check_int("hidden_channels", hidden_channels)
        heads = check_int("heads", heads)
        output_heads = check_int("output_heads", output_heads)
        self.dropout = check_fraction("dropout", dropout)
        self.input_dropout = self.dropout if input_dropout is None else check_fraction("input_dropout", input_dropout)
        attention = dropout if attention_dropout is None else check_fraction("attention_dropout", attention_dropout)
        self.conv1 = GATConv(in_features, hidden_channels, heads=heads, dropout=attention)
        self.conv2 = GATConv(hidden_channels * heads, num_classes, heads=output_heads, concat=False, dropout=attention)
        self.in_features = in_features
        self.out_features = num_classes

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.dropout(x, p=self.input_dropout, training=self.training)
        x = F.elu(self.conv1(x, edge_index))
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.conv2(x, edge_index)
