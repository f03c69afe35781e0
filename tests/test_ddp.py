"""Two-process CPU DDP (gloo): per-replica vs global ascent, replayed independently in one process.

DDP re-executes ``sys.argv`` for rank 1, so the run is a script in a subprocess (docs/design.md, "Decisions").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ALPHA, RHO, LR = 0.3, 0.05, 0.1


@pytest.fixture(scope="module")
def runs(ddp_step_runs):
    """The runs of tests/ddp_step_script.py (the subprocess is started once, in tests/conftest.py)."""
    return {
        name: [torch.load(ddp_step_runs / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        for name in ("replica", "global", "replica_sam", "global_acc", "replica_sam_acc")
    }


def _net():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _grad(w, batch):
    x, y = batch
    w = [t.detach().requires_grad_(True) for t in w]
    names = [n for n, _ in _net().named_parameters()]
    loss = F.cross_entropy(functional_call(_net(), dict(zip(names, w)), (x,)), y)
    return list(torch.autograd.grad(loss, w))


def _norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def _gsam_direction(g, gp):
    dot = sum(float((a * b).sum()) for a, b in zip(g, gp))
    c = dot / _norm(gp) ** 2
    return [b - ALPHA * (a - c * b) for a, b in zip(g, gp)]


def _replay(ranks, mode, rule="gsam"):
    """The expected weights after the recorded steps, from the formulas, in one process."""
    direction = _gsam_direction if rule == "gsam" else (lambda g, gp: gp)
    w = [t.clone() for t in ranks[0]["initial"]]
    for step in range(len(ranks[0]["batches"])):
        batches = [r["batches"][step] for r in ranks]
        grads = [_grad(w, b) for b in batches]
        if mode == "replica":  # ε and d on each replica from its own sub-batch, then d averaged
            ds = []
            for g, b in zip(grads, batches):
                gp = _grad([wi + RHO * gi / (_norm(g) + 1e-12) for wi, gi in zip(w, g)], b)
                ds.append(direction(g, gp))
        else:  # ε from the averaged gradient; g_p averaged; d from the averages
            g = [(a + b) / 2 for a, b in zip(*grads)]
            gps = [_grad([wi + RHO * gi / (_norm(g) + 1e-12) for wi, gi in zip(w, g)], b) for b in batches]
            ds = [direction(g, [(a + b) / 2 for a, b in zip(*gps)])]
        d = [sum(parts) / len(ds) for parts in zip(*ds)]
        w = [wi - LR * di for wi, di in zip(w, d)]
    return w


@pytest.mark.slow
def test_replica_ascent_uses_each_ranks_own_gradient(runs):
    r0, r1 = runs["replica"]
    assert r0["world_size"] == 2
    assert not torch.equal(r0["batches"][0][0], r1["batches"][0][0])  # different sub-batches
    for g0, g1 in zip(r0["grads1"], r1["grads1"]):
        assert not torch.allclose(g0, g1)  # pass 1 was not all-reduced
    for a, b in zip(r0["final"], r1["final"]):
        assert torch.equal(a, b)  # the final directions were averaged: identical weights


@pytest.mark.slow
def test_global_ascent_uses_the_averaged_gradient(runs):
    r0, r1 = runs["global"]
    for g0, g1 in zip(r0["grads1"], r1["grads1"]):
        assert torch.equal(g0, g1)
    for a, b in zip(r0["final"], r1["final"]):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replica", "global"])
def test_ddp_weights_equal_an_independent_replay(runs, mode):
    expected = _replay(runs[mode], mode)
    for a, b in zip(runs[mode][0]["final"], expected):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    other = _replay(runs[mode], "global" if mode == "replica" else "replica")
    assert not all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(runs[mode][0]["final"], other))


@pytest.mark.slow
def test_ddp_sam_per_replica_ascent_equals_an_independent_replay(runs):
    r0, r1 = runs["replica_sam"]
    for g0, g1 in zip(r0["grads1"], r1["grads1"]):
        assert not torch.allclose(g0, g1)
    for a, b, c in zip(r0["final"], r1["final"], _replay(runs["replica_sam"], "replica", rule="sam")):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name, reference", [("global_acc", "global"), ("replica_sam_acc", "replica_sam")])
def test_ddp_with_accumulation_in_the_module_equals_the_step_on_the_whole_sub_batch(runs, name, reference):
    # micro-batches under no_sync, the DDP all-reduce once at the last one: the same step as without accumulation
    for a, b in zip(runs[name][0]["final"], runs[reference][0]["final"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    for a, b in zip(runs[name][0]["final"], runs[name][1]["final"]):
        assert torch.equal(a, b)
    assert len(runs[name][0]["grads1"]) == len(runs[reference][0]["grads1"]) == 3  # read once per step, complete
    for g, h in zip(runs[name][0]["grads1"], runs[reference][0]["grads1"]):
        assert torch.allclose(g, h, rtol=0, atol=1e-12)
