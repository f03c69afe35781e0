"""Correctness of the two-pass step on the device: float64 against the CPU, and mixed precision.

Every step runs through a real Lightning ``Trainer.fit`` of ``flatminima.lightning_modules.Classifier`` on the
small BN CNN of :func:`gpu_check_common.bn_cnn` (SGD, lr 0.1, momentum 0.9):

* float64: SAM, ASAM and GSAM steps on the device equal the same steps on the CPU (max |Δ| ≤ 1e-9 over
  weights and BatchNorm buffers, after 2 steps);
* ``bf16-mixed`` and ``16-mixed`` (a real ``torch.amp.GradScaler``): for SAM, GSAM and USAM the perturbed
  weights w + ε and the final direction d are what the rule's formulas give from the *unscaled* pass-1
  and pass-2 gradients recorded during the step (for USAM: the ascent ρ·g/S, not ρ·g), and the new
  weights are w − lr·d (so w was restored exactly); the step is also within the format's precision of
  the float64 step; a step the scaler skips (an inf forced into the pass-2 gradient) leaves the
  weights bit-identical.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from gpu_check_common import LR, Row, Settings, bn_cnn, cpu64, fit, make_batches, max_abs_diff, rel_norm, verdict
from lightning.pytorch.plugins import MixedPrecision
from step_overhead import RULES

CPU = torch.device("cpu")
FP64_TOL = 1e-9
FORMULA_TOL = 1e-4  # fp32 rounding of w + ε and of w − lr·d, relative to ‖ε‖ and ‖lr·d‖
# ‖w_mixed − w_64‖ / ‖w_64 − w_0‖ after one step: the formats' precision (≤ 0.13 seen on the CPU; a lost
# or mis-scaled step gives ≥ 1). The sharp check of the AMP path is the formula row.
COARSE_TOL = 0.5
AMP_RULES = ("SAM", "GSAM", "USAM")


# ---------------------------------------------------------------------------------------- float64
def fp64_rows(s: Settings) -> Iterator[Row]:
    """SAM, ASAM, GSAM: 2 float64 steps on the device equal the same steps on the CPU."""
    batches = make_batches(2, s.batch, s.side, seed=1, dtype=torch.float64)
    for name in ("SAM", "ASAM", "GSAM"):
        start = time.perf_counter()
        net = bn_cnn(s.side).double()
        ref, _ = fit(copy.deepcopy(net), RULES[name](), batches, CPU, steps=2, precision="64-true")
        rule = RULES[name]()
        if "step" in s.faults:  # test hook: a deliberately different step on the device
            rule.rho *= 1.01
        dev, _ = fit(copy.deepcopy(net), rule, batches, s.device, steps=2, precision="64-true")
        expected = cpu64(ref.net.state_dict().values())
        diff = max_abs_diff(cpu64(dev.net.state_dict().values()), expected)
        update = max_abs_diff(cpu64(net.parameters()), cpu64(ref.net.parameters()))
        yield Row(
            "steps",
            f"{name} step, float64, {s.device.type} = cpu (2 steps, BN CNN)",
            verdict(diff <= FP64_TOL and update > 0),
            f"max abs diff {diff:.1e} (largest update {update:.1e})",
            f"≤ {FP64_TOL:g}",
            time.perf_counter() - start,
            dict(max_abs_diff=diff, max_update=update),
        )


# ---------------------------------------------------------------------------------------- mixed precision
class StepRecorder(pl.Callback):
    """Record the first step: w, pass-1 gradient and loss scale, w + ε, pass-2 gradient, d and the new w.

    ``inject_inf`` writes an inf into the pass-2 gradient (a step the GradScaler must skip).
    """

    def __init__(self, inject_inf: bool = False) -> None:
        self.inject_inf = inject_inf
        self.r: dict[str, object] = {}

    @staticmethod
    def _grads(module: pl.LightningModule) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.r["w"] = [p.detach().clone() for p in pl_module.parameters()]
            self.r["names"] = [n for n, _ in pl_module.named_parameters()]

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step != 0:
            return
        if pl_module.pass_index == 1:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.r["scale"] = 1.0 if scaler is None else float(scaler.get_scale())
            self.r["g"] = self._grads(pl_module)
        elif pl_module.pass_index == 2:
            self.r["w_pert"] = [p.detach().clone() for p in pl_module.parameters()]
            self.r["gp"] = self._grads(pl_module)
            if self.inject_inf:
                next(pl_module.parameters()).grad.view(-1)[0] = float("inf")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:  # after the scaler's unscale_: the direction the optimizer gets
            self.r["d"] = self._grads(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.r["w_new"] = [p.detach().clone() for p in pl_module.parameters()]


def _amp_kwargs(precision: str, device: torch.device, init_scale: float) -> dict:
    """Trainer arguments: ``bf16-mixed``, or ``16-mixed`` with a real GradScaler of the given initial scale."""
    if precision == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
    return {"plugins": [MixedPrecision("16-mixed", device.type, scaler=scaler)]}


def formula_errors(rule, r: dict) -> dict[str, float]:
    """Relative errors of the recorded ε, d and new weights against the rule's formulas on unscaled gradients."""
    w = r["w"]
    g = [t / r["scale"] for t in r["g"]]
    gp = [t / r["scale"] for t in r["gp"]]
    with torch.no_grad():
        eps = rule.perturbation(w, g, names=r["names"] if rule.uses_names else None, lr=LR, lr_max=LR)
        d = [t.clone() for t in gp]
        if rule.uses_clean_grad:
            rule.descent_(g, d)
    w64, d_seen = cpu64(w), cpu64(r["d"])
    eps_seen = [a - b for a, b in zip(cpu64(r["w_pert"]), w64)]
    stepped = [a - LR * b for a, b in zip(w64, d_seen)]  # SGD's first step (momentum buffer = d)
    return dict(
        eps=rel_norm(eps_seen, cpu64(eps)),
        d=rel_norm(d_seen, cpu64(d)),
        step=rel_norm(cpu64(r["w_new"]), stepped, base=w64),
    )


def amp_rows(s: Settings) -> Iterator[Row]:
    """bf16-mixed and 16-mixed steps: formulas on unscaled gradients, closeness to float64, skipped steps."""
    batches = make_batches(1, s.batch, s.side, seed=3, dtype=torch.float32)
    net = bn_cnn(s.side)
    refs = {}
    for name in AMP_RULES:
        ref, _ = fit(
            copy.deepcopy(net).double(),
            RULES[name](),
            [(x.double(), y) for x, y in batches],
            CPU,
            steps=1,
            precision="64-true",
        )
        refs[name] = cpu64(ref.net.parameters())
    w0 = cpu64(net.parameters())
    if not s.on_cuda:
        yield Row(
            "amp",
            "Trainer(precision='16-mixed') on cpu",
            "skip",
            "Lightning silently runs bf16 on the CPU: the 16-mixed rows use an explicit CPU GradScaler plugin",
        )
    for precision in ("bf16-mixed", "16-mixed"):
        for name in AMP_RULES:
            yield from _amp_rule_rows(s, precision, name, net, batches, refs[name], w0)
    yield _skipped_step_row(s, net, batches)


def _amp_rule_rows(s: Settings, precision: str, name: str, net, batches, ref, w0) -> Iterator[Row]:
    start = time.perf_counter()
    recorder = StepRecorder()
    # a modest initial scale: 2**16 can overflow fp16 in the first step of a fresh net and skip it
    kwargs = _amp_kwargs(precision, s.device, init_scale=2.0**10)
    model, trainer = fit(copy.deepcopy(net), RULES[name](), batches, s.device, steps=1, callbacks=[recorder], **kwargs)
    err = formula_errors(RULES[name](), recorder.r)
    scale = recorder.r["scale"]
    worst = max(err["eps"], err["d"], err["step"])
    what = "ε = ρ·g/S, unscaled" if name == "USAM" else "ε, d"
    tag = f"{precision}" + (f" (GradScaler on {s.device.type})" if precision == "16-mixed" else "")
    seconds = time.perf_counter() - start
    limit = f"≤ {FORMULA_TOL:g}"
    if name == "USAM" and scale != 1:
        limit += f" (a scaled ascent: {scale - 1:g})"
    yield Row(
        "amp",
        f"{name} step, {tag}: {what} and w − lr·d from the recorded unscaled grads",
        verdict(worst <= FORMULA_TOL),
        f"ε {err['eps']:.1e}, d {err['d']:.1e}, w {err['step']:.1e} (S={scale:g})",
        limit,
        seconds,
        dict(err, scale=scale),
    )
    coarse = rel_norm(cpu64(model.net.parameters()), ref, base=w0)
    yield Row(
        "amp",
        f"{name} step, {precision}: weights ≈ the float64 step (coarse: the format's precision)",
        verdict(coarse <= COARSE_TOL),
        f"‖Δ‖/‖update‖ {coarse:.3f}",
        f"≤ {COARSE_TOL:g}",
        None,
        dict(rel_err=coarse, global_step=trainer.global_step),
    )


def _skipped_step_row(s: Settings, net, batches) -> Row:
    """16-mixed: an inf in the pass-2 gradient makes the scaler skip the step; the weights stay bit-identical."""
    start = time.perf_counter()
    recorder = StepRecorder(inject_inf=True)
    # on CUDA the Trainer's own 16-mixed precision (stock GradScaler); on the CPU an explicit scaler plugin
    kwargs = {"precision": "16-mixed"} if s.on_cuda else _amp_kwargs("16-mixed", s.device, init_scale=2.0**16)
    model, trainer = fit(copy.deepcopy(net), RULES["SAM"](), batches, s.device, steps=1, callbacks=[recorder], **kwargs)
    scaler = trainer.precision_plugin.scaler
    same = all(torch.equal(a.detach().cpu(), b.detach()) for a, b in zip(model.net.parameters(), net.parameters()))
    injected = not all(bool(torch.isfinite(t).all()) for t in recorder.r["d"])
    before, after = recorder.r["scale"], float(scaler.get_scale())
    no_state = len(trainer.optimizers[0].state) == 0
    ok = same and injected and after < before and no_state
    how = "Trainer(precision='16-mixed')" if s.on_cuda else "GradScaler on cpu"
    return Row(
        "amp",
        f"SAM step, 16-mixed ({how}), inf forced into the pass-2 grad: scaler skips, weights bit-identical",
        verdict(ok),
        f"identical {same}, scale {before:g} → {after:g}, optimizer state empty {no_state}",
        "bit-identical",
        time.perf_counter() - start,
        dict(identical=same, injected=injected, scale_before=before, scale_after=after),
    )
