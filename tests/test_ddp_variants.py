"""Two-process CPU DDP (gloo) of the variants with per-rank state: every rank agrees, and the run equals a replay.

The replay (one process, from the formulas, tests/efficient_reference.py) uses the batches each rank recorded.
LookSAM forms g_v on each replica from its own g and g_s and averages it; AE-SAM averages the replicas' ‖g‖²;
RandomSteps draws from (seed, step); SAF all-gathers the rows it stores. DDP re-executes ``sys.argv``, so the runs
are a script in a subprocess (docs/design.md, "Decisions"), the one of tests/test_ddp.py (``ddp_step_runs``).
"""

from __future__ import annotations

import pytest
import torch

from tests import efficient_reference as ref

LR, RHO = 0.1, 0.05


@pytest.fixture(scope="module")
def runs(ddp_step_runs):
    """The variants' runs, made by tests/ddp_variants_script.py inside tests/ddp_step_script.py's processes."""
    return {
        name: [torch.load(ddp_step_runs / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for name in ("looksam", "adaptive", "random", "saf")
    }


def _as_dict(values):
    names = [n for n, _ in ref.tanh_mlp().named_parameters()]
    return dict(zip(names, values))


def _mean(dicts):
    return {n: sum(d[n] for d in dicts) / len(dicts) for n in dicts[0]}


def _step_batches(ranks, t):
    return [(r["batches"][t][0], r["batches"][t][1]) for r in ranks]


def _same_on_both_ranks(ranks):
    assert ranks[0]["world_size"] == 2
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["final"], ranks[1]["final"]))
    assert ranks[0]["two_pass"] == ranks[1]["two_pass"]


def _assert_close(values, expected):
    for a, (n, b) in zip(values, expected.items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), n


@pytest.mark.slow
def test_looksam_averages_g_v_over_the_replicas(runs):
    ranks = runs["looksam"]
    _same_on_both_ranks(ranks)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["state"]["g_v"], ranks[1]["state"]["g_v"]))
    net = ref.tanh_mlp()
    w, g_v = _as_dict(ranks[0]["initial"]), None
    for t in range(len(ranks[0]["batches"])):
        batches = _step_batches(ranks, t)
        if t % 2 == 0:  # per replica: ε from its own g; d and g_v averaged
            pairs = [ref.sam_direction(net, w, x, y, RHO) for x, y in batches]
            d = _mean([gs for _, gs in pairs])
            g_v = _mean([{n: gs[n] - ref.dot(g, gs) / ref.norm(g) ** 2 * g[n] for n in g} for g, gs in pairs])
        else:  # one pass with the all-reduced g
            g = _mean([ref.grad(net, w, x, y) for x, y in batches])
            d = {n: g[n] + 0.7 * ref.norm(g) / ref.norm(g_v) * g_v[n] for n in g}
        w = {n: w[n] - LR * d[n] for n in w}
    assert ranks[0]["two_pass"] == [t % 2 == 0 for t in range(len(ranks[0]["batches"]))]
    _assert_close(ranks[0]["final"], w)
    _assert_close(ranks[0]["state"]["g_v"], g_v)


@pytest.mark.slow
def test_adaptive_steps_decide_alike_from_the_replicas_mean_squared_norm(runs):
    ranks = runs["adaptive"]
    _same_on_both_ranks(ranks)
    assert ranks[0]["state"] == ranks[1]["state"]
    net, steps = ref.tanh_mlp(), len(ranks[0]["batches"])
    w, mu, var, plan = _as_dict(ranks[0]["initial"]), 0.0, 0.0, []
    for t in range(steps):
        batches = _step_batches(ranks, t)
        grads = [ref.grad(net, w, x, y) for x, y in batches]
        sq = sum(ref.norm(g) ** 2 for g in grads) / 2
        mu = 0.5 * mu + 0.5 * sq
        var = 0.5 * var + 0.5 * (sq - mu) ** 2
        plan.append(sq >= mu + (1.5 - 3.0 * t / steps) * var**0.5)
        d = _mean([ref.sam_direction(net, w, x, y, RHO)[1] for x, y in batches]) if plan[-1] else _mean(grads)
        w = {n: w[n] - LR * d[n] for n in w}
    assert ranks[0]["two_pass"] == plan and any(plan) and not all(plan)
    _assert_close(ranks[0]["final"], w)
    assert ranks[0]["state"]["mu"] == pytest.approx(mu, rel=1e-12)


@pytest.mark.slow
def test_random_steps_draw_the_same_steps_on_every_rank(runs):
    ranks = runs["random"]
    _same_on_both_ranks(ranks)
    plan = [ref.uniforms(1, t, 1)[0] < 0.5 for t in range(len(ranks[0]["batches"]))]
    assert ranks[0]["two_pass"] == plan and any(plan) and not all(plan)


@pytest.mark.slow
def test_saf_store_holds_every_ranks_samples_on_every_rank(runs):
    ranks = runs["saf"]
    _same_on_both_ranks(ranks)
    store = ranks[0]["state"]["store"]
    assert torch.equal(store, ranks[1]["state"]["store"])
    assert store.shape[:2] == (64, 2) and bool((store != 0).any(-1).all())  # both epochs' slots of all 64 samples
    net, steps = ref.tanh_mlp(), len(ranks[0]["batches"])  # 2 epochs of 4 steps per rank
    w, expected = _as_dict(ranks[0]["initial"]), torch.zeros_like(store)
    for t in range(steps):
        epoch, grads = t // (steps // 2), []
        for r in ranks:
            x, y, idx = r["batches"][t]
            z = ref.logits(net, w, x).detach()
            expected[idx, epoch % 2] = z
            old = expected[idx, (epoch - 1) % 2].clone()
            extra = None if epoch == 0 else (lambda z_, old=old: 0.3 * ref.kl_term(z_, old, 2.0))
            grads.append(ref.grad(net, w, x, y, extra=extra))
        w = {n: w[n] - LR * _mean(grads)[n] for n in w}
    _assert_close(ranks[0]["final"], w)
    assert torch.allclose(store, expected, rtol=0, atol=1e-12)
