"""Hammoud et al.'s FCNN notebook, re-typed in plain torch: pools of 50 to set beside ours and theirs.

An independent reference, sharing no code with this project: FCNN_model.ipynb
(github.com/HadiHammoud44/CS439_Sharpness, commit 36e9b7d1) step by step — the UCI file read with pandas'
header quirk (the first snail becomes the header), sex one-hot appended after the 7 measurements, split by
``train_test_split(test_size=0.2, random_state=42)``, features and rings standardised with the training
rows' ``torch`` mean and (unbiased) std; ``NetFCNN`` (10-64-64-1, ELU after every layer, the output
included, PyTorch's default initialisation); SGD lr 0.102, 53 steps an epoch each on the loss of the whole
training set, the notebook's stopping rule (a first epoch, then more while the summed epoch loss falls by
>= 5 %, at most 11 more); the ascent: 6 passes of 53 SGD steps on the negated training MSE, each followed by
``clamp(w, w0 - 0.025 w0, w0 + 0.025 w0)``, keeping the weights at the end of the pass with the largest summed
MSE; sharpness = their training MSE minus the clean one; test MSE of the trained weights.

The notebook seeds nothing; model i here is built after ``torch.manual_seed(seed)``. Prints one CSV row per
model: seed, epochs, the last printed training loss (the notebook's), L, A, sharpness, test loss, the number
of ascent steps that lowered the loss. Usage (from the repository root; about 2 s a model on one thread)::

    python docs/abalone/notebook_replica.py data/abalone/abalone.data 0 50 > /tmp/replica_0_49.csv
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch import nn

LR, EPSILON, BATCH, PASSES = 1.02e-01, 0.025, 64, 6


class NetFCNN(nn.Module):
    def __init__(self, channels=(10, 64, 64, 1)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(channels[:-1], channels[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = nn.functional.elu(layer(x))
        return x


def load(path: str):
    data = pd.read_csv(path)  # the first snail becomes the header, as in the notebook
    columns = list(data.columns)  # ['M', '0.455', ..., '0.15', '15']
    x = data[columns[:8]].copy()
    for name, sex in (("Ma", "M"), ("Fe", "F"), ("In", "I")):
        x[name] = (x[columns[0]] == sex).astype(float)
    del x[columns[0]]
    y = data[columns[8]]
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=0.2, random_state=42)
    tr_x, te_x = torch.tensor(tr_x.to_numpy()).float(), torch.tensor(te_x.to_numpy()).float()
    tr_y = torch.tensor(tr_y.to_numpy()).float().reshape(-1, 1)
    te_y = torch.tensor(te_y.to_numpy()).float().reshape(-1, 1)
    a1, b1, a2, b2 = tr_x.mean(0), tr_x.std(0), tr_y.mean(0), tr_y.std(0)
    return (tr_x - a1) / b1, (te_x - a1) / b1, (tr_y - a2) / b2, (te_y - a2) / b2


def epoch(network, optimizer, x, y) -> tuple[torch.Tensor, float]:
    """One epoch of the notebook: 53 steps, each on the whole training set; (summed loss, last printed loss).

    The sum is a float32 tensor, as the notebook's ``b += trainLoss``."""
    total, last = torch.zeros(()), 0.0
    for _ in range(0, x.size(0), BATCH):
        optimizer.zero_grad()
        loss = nn.MSELoss()(network(x), y)
        total = total + loss.detach()
        last = float(loss)
        loss.backward()
        optimizer.step()
    return total, last


def train(network, x, y, criterion: float = 0.05, nbepochs: int = 10) -> tuple[int, float]:
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    b, last = epoch(network, optimizer, x, y)
    a, epochs = 100, 1
    for _ in range(nbepochs + 1):
        if float((a - b) / a) >= criterion:
            a = b
            b, last = epoch(network, optimizer, x, y)
            epochs += 1
        else:
            break
    return epochs, last


def ascent(network, x, y) -> tuple[dict, int]:
    """The notebook's 6 passes; (the weights at the end of the pass with the largest summed MSE, falling steps)."""
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    w0 = [p.clone() for p in network.parameters()]
    saved, maximum_, falls = None, 0, 0
    with torch.no_grad():
        prev = float(nn.MSELoss()(network(x), y))
    for _ in range(PASSES):
        maximum = np.float32(0)  # the notebook adds float32 numpy scalars
        for _ in range(0, x.size(0), BATCH):
            optimizer.zero_grad()
            (-nn.MSELoss()(network(x), y)).backward()
            optimizer.step()
            with torch.no_grad():
                for p, w in zip(network.parameters(), w0):
                    p.data = torch.clamp(p.data, -w * EPSILON + w, w * EPSILON + w)
                loss = nn.MSELoss()(network(x), y).numpy()
            maximum += loss
            falls += bool(loss < prev)
            prev = float(loss)
        if maximum > maximum_:
            saved, maximum_ = {k: v.clone() for k, v in network.state_dict().items()}, maximum
    return saved, falls


def main(path: str, first: int, count: int) -> None:
    torch.set_num_threads(1)
    x, xt, y, yt = load(path)
    print("seed,epochs,printed_train_loss,L,A,sharpness,test_loss,falls,seconds")
    for seed in range(first, first + count):
        t = time.perf_counter()
        torch.manual_seed(seed)
        network = NetFCNN()
        epochs, printed = train(network, x, y)
        localmin = {k: v.clone() for k, v in network.state_dict().items()}
        network.eval()
        saved, falls = ascent(network, x, y)
        with torch.no_grad():
            network.load_state_dict(saved)
            a = float(nn.MSELoss()(network(x), y))
            network.load_state_dict(localmin)
            low, test = float(nn.MSELoss()(network(x), y)), float(nn.MSELoss()(network(xt), yt))
        print(
            f"{seed},{epochs},{printed:.6f},{low:.6f},{a:.6f},{a - low:.6f},{test:.6f},{falls},"
            f"{time.perf_counter() - t:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
