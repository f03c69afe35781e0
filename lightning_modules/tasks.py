"""Tasks on top of the two-pass step: classification (multi-class and binary), regression, node classification."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from .minimizers import Minimizer
from .two_pass import TwoPassModule
from .validation import check_float, check_fraction, check_int, is_integer


def _out_features(net: nn.Module) -> int | None:
    value = getattr(net, "out_features", None)
    return int(value) if is_integer(value) else None


class Classifier(TwoPassModule):
    """Classification with cross-entropy: logs ``{train,val,test}/loss`` and ``{train,val,test}/acc``.

    ``train/loss`` is the clean pass-1 loss L_B(w), ``train/loss_perturbed`` the pass-2 loss
    L_B(w + ε), ``train/grad_norm`` the pass-1 gradient norm ‖∇L_B(w)‖₂; all are epoch means.

    Args:
        net: Network mapping inputs to ``num_classes`` logits.
        num_classes: Number of classes (≥ 2); None takes the net's ``out_features``.
        optimizer: Base optimizer factory (see :class:`TwoPassModule`).
        minimizer: SAM-family rule, or None for the base optimizer alone.
        lr_scheduler: Optional lr scheduler factory.
        label_smoothing: Cross-entropy label smoothing in [0, 1).
        **kwargs: Further :class:`TwoPassModule` options (``lr_scheduler_interval``, ``ascent``,
            ``gradient_clip_val``, ``on_nonfinite``, ``share_dropout_rng``, ``log_train_steps``, ...).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        minimizer: Minimizer | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, optimizer, minimizer, lr_scheduler, **kwargs)
        out = _out_features(net)
        if num_classes is None:
            if out is None:
                raise ValueError(
                    f"Invalid num_classes: None, and the net ({type(net).__name__}) has no out_features; "
                    "pass num_classes"
                )
            num_classes = out
        num_classes = check_int("num_classes", num_classes, 2)
        if out is not None and out != num_classes:
            raise ValueError(
                f"Invalid net for Classifier: {type(net).__name__} has out_features={out} but num_classes="
                f"{num_classes}; a classifier needs one output per class (a regression net has 1 output; "
                "use Regressor for regression)"
            )
        self.num_classes = num_classes
        self.label_smoothing = check_fraction("label_smoothing", label_smoothing)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(
            num_classes, average="micro", validate_args=False
        )
        self.val_acc = self.train_acc.clone()
        self.test_acc = self.train_acc.clone()

    def forward_loss(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, int]:
        x, y = batch[0], batch[1]  # a trailing idx (dataset indices, for SAF) is ignored
        logits = self.net(x)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Invalid net output for Classifier: shape {tuple(logits.shape)}; expected (batch, num_classes="
                f"{self.num_classes}) logits"
            )
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, logits, y, y.shape[0]

    supports_sample_losses = True
    softmax_outputs = True

    def sample_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """The cross-entropy of each sample (with the label smoothing): the batch loss is their mean."""
        return F.cross_entropy(output, target, reduction="none", label_smoothing=self.label_smoothing)

    def update_metrics(self, stage: str, output: Tensor, target: Tensor) -> None:
        getattr(self, f"{stage}_acc").update(output, target)

    def stage_metrics(self, stage: str) -> dict[str, torchmetrics.Metric]:
        return {"acc": getattr(self, f"{stage}_acc")}

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch[0]).softmax(dim=-1)


class Regressor(TwoPassModule):
    """Regression with the (scaled) mean squared error: logs ``{stage}/loss`` and ``{stage}/mae``.

    The loss of a batch of n targets is ``loss_scale · (1/n) Σ_i (f(x_i) − y_i)²``. ``loss_scale=0.5``
    gives the ``(1/2m) Σ_i (⟨A_i, U Uᵀ⟩ − b_i)²`` of matrix sensing (Dai, Ahn & Sra 2023; Wong et al.,
    appendix B). The scale multiplies the gradients, so it changes plain SGD only as a learning-rate
    factor would, but it changes USAM's ascent ε = ρ·∇L (SAM's normalised ascent does not see it).
    The logged ``loss`` is the scaled one; ``mae`` is unscaled.

    Args:
        net: Network mapping inputs to ``num_outputs`` values (``out_features``).
        num_outputs: Number of regression targets per example.
        optimizer: Base optimizer factory (see :class:`TwoPassModule`).
        minimizer: SAM-family rule, or None for the base optimizer alone.
        lr_scheduler: Optional lr scheduler factory.
        loss_scale: Factor c > 0 of the loss c · MSE (0.5: the ``1/(2m)`` convention).
        **kwargs: Further :class:`TwoPassModule` options.
    """

    def __init__(
        self,
        net: nn.Module,
        num_outputs: int = 1,
        optimizer: OptimizerCallable = torch.optim.SGD,
        minimizer: Minimizer | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        loss_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, optimizer, minimizer, lr_scheduler, **kwargs)
        num_outputs = check_int("num_outputs", num_outputs, 1)
        loss_scale = check_float("loss_scale", loss_scale, strict=True)
        out = _out_features(net)
        if out is not None and out != num_outputs:
            raise ValueError(
                f"Invalid net for Regressor: {type(net).__name__} has out_features={out} but num_outputs="
                f"{num_outputs}; a classification net (one output per class) needs Classifier"
            )
        self.num_outputs = num_outputs
        self.loss_scale = loss_scale
        self.train_mae = torchmetrics.MeanAbsoluteError()
        self.val_mae = torchmetrics.MeanAbsoluteError()
        self.test_mae = torchmetrics.MeanAbsoluteError()

    def forward_loss(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, int]:
        x, y = batch[0], batch[1]
        pred = self.net(x)
        if y.ndim == 1 and pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred.squeeze(1)
        if pred.shape != y.shape:
            raise ValueError(
                f"Invalid net output for Regressor: shape {tuple(pred.shape)} does not match the targets' "
                f"{tuple(y.shape)}; a classification net (one output per class) needs Classifier"
            )
        y = y.to(pred.dtype)
        loss = F.mse_loss(pred, y)
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        return loss, pred, y, y.shape[0]

    supports_sample_losses = True

    def sample_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """The (scaled) squared error of each sample, averaged over its targets: the batch loss is their mean."""
        errors = (output - target.to(output.dtype)) ** 2
        errors = errors.reshape(errors.shape[0], -1).mean(dim=1)
        return errors * self.loss_scale if self.loss_scale != 1.0 else errors

    def update_metrics(self, stage: str, output: Tensor, target: Tensor) -> None:
        getattr(self, f"{stage}_mae").update(output, target)

    def stage_metrics(self, stage: str) -> dict[str, torchmetrics.Metric]:
        return {"mae": getattr(self, f"{stage}_mae")}

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch[0])


class BinaryClassifier(TwoPassModule):
    """Binary classification from one logit per example: BCE with logits; logs ``{stage}/loss``, ``{stage}/acc``.

    The net returns one value z per example (shape ``(batch,)`` or ``(batch, 1)``); the loss is the
    binary cross-entropy of σ(z) against the 0/1 targets, computed stably from the logit
    (``binary_cross_entropy_with_logits``); the prediction is class 1 when z > 0 (σ(z) > 0.5).
    This is the Keras setup of the Adaptive-GSAM moons study: a single sigmoid output unit trained
    with ``binary_crossentropy`` (Keras computes it from the logit as well). The keys logged are
    those of :class:`Classifier`; ``predict`` returns σ(z).

    Args:
        net: Network with one output (``out_features`` 1).
        num_classes: The data's number of classes (linked from the data module); must be 2.
        optimizer: Base optimizer factory (see :class:`TwoPassModule`).
        minimizer: SAM-family rule, or None for the base optimizer alone.
        lr_scheduler: Optional lr scheduler factory.
        **kwargs: Further :class:`TwoPassModule` options.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 2,
        optimizer: OptimizerCallable = torch.optim.SGD,
        minimizer: Minimizer | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, optimizer, minimizer, lr_scheduler, **kwargs)
        if num_classes != 2 or isinstance(num_classes, bool):
            raise ValueError(
                f"Invalid num_classes: {num_classes!r}; expected 2 (BinaryClassifier; use Classifier for more classes)"
            )
        out = _out_features(net)
        if out is not None and out != 1:
            raise ValueError(
                f"Invalid net for BinaryClassifier: {type(net).__name__} has out_features={out}; expected 1 "
                "(one logit per example; set model.init_args.net.init_args.out_features: 1)"
            )
        self.num_classes = 2
        self.train_acc = torchmetrics.classification.BinaryAccuracy(validate_args=False)
        self.val_acc = self.train_acc.clone()
        self.test_acc = self.train_acc.clone()

    def logits(self, x: Tensor) -> Tensor:
        """The net's logits as a ``(batch,)`` tensor."""
        z = self.net(x)
        if z.ndim == 2 and z.shape[1] == 1:
            z = z.squeeze(1)
        if z.ndim != 1:
            raise ValueError(
                f"Invalid net output for BinaryClassifier: shape {tuple(z.shape)}; expected (batch,) or (batch, 1)"
            )
        return z

    def forward_loss(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, int]:
        x, y = batch[0], batch[1]
        z = self.logits(x)
        loss = F.binary_cross_entropy_with_logits(z, y.to(z.dtype))
        return loss, z, y, y.shape[0]

    supports_sample_losses = True

    def sample_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """The binary cross-entropy of each sample, from its logit: the batch loss is their mean."""
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="none")

    def update_metrics(self, stage: str, output: Tensor, target: Tensor) -> None:
        # integer predictions: torchmetrics would read logits that happen to lie in [0, 1] as probabilities
        getattr(self, f"{stage}_acc").update((output > 0).long(), target.long())

    def stage_metrics(self, stage: str) -> dict[str, torchmetrics.Metric]:
        return {"acc": getattr(self, f"{stage}_acc")}

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return torch.sigmoid(self.logits(batch[0]))


class NodeClassifier(Classifier):
    """Node classification on one graph (PyG ``Data`` with ``train_mask``/``val_mask``/``test_mask``).

    Both passes run on the full graph; the loss and the accuracy of a stage use the nodes of its mask.
    The net is called as ``net(x, edge_index)``.

    Args:
        net: Graph network called as ``net(x, edge_index)``, one logit per class and node.
        num_classes: Number of classes (None: the net's ``out_features``).
        optimizer: Base optimizer factory (see :class:`TwoPassModule`).
        minimizer: SAM-family rule, or None for the base optimizer alone.
        lr_scheduler: Optional lr scheduler factory.
        label_smoothing: Cross-entropy label smoothing in [0, 1).
        train_subgraph_hops: Train on the subgraph induced by the k-hop neighbourhood of the batch's
            training nodes (``torch_geometric.utils.k_hop_subgraph``, k = this value) instead of the whole
            graph. For a network of k message-passing layers the masked loss and its gradient are those of
            the whole graph (equal up to summation order without dropout; with dropout equal in
            distribution, the masks being drawn for the subgraph's nodes and edges only). With
            minibatches of training nodes (Cora, 64 nodes: about 1200 of 2708 nodes) a step takes about
            a third of the time. None (default): the whole graph. Validation and test use the whole graph.
        **kwargs: Further :class:`TwoPassModule` options.
    """

    _MASKS = {"train": "train_mask", "val": "val_mask", "test": "test_mask"}
    # one graph per batch: no samples to select (ESAM's data selection), no per-sample ids (SAF),
    # and the network's outputs are masked after the forward pass (MESA)
    supports_sample_losses = False
    softmax_outputs = False

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        minimizer: Minimizer | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        train_subgraph_hops: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, num_classes, optimizer, minimizer, lr_scheduler, label_smoothing, **kwargs)
        self.train_subgraph_hops = check_int("train_subgraph_hops", train_subgraph_hops, 1, optional=True)

    def forward_loss(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, int]:
        for key in ("x", "edge_index", "y", self._MASKS[stage]):
            if getattr(batch, key, None) is None:
                raise ValueError(f"Invalid batch for NodeClassifier: a PyG Data object with '{key}' is needed")
        x, edge_index, y, mask = batch.x, batch.edge_index, batch.y, getattr(batch, self._MASKS[stage])
        if stage == "train" and self.train_subgraph_hops is not None:
            x, edge_index, y, mask = _k_hop(x, edge_index, y, mask, self.train_subgraph_hops)
        logits = self.net(x, edge_index)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Invalid net output for NodeClassifier: shape {tuple(logits.shape)}; expected (num_nodes, "
                f"num_classes={self.num_classes})"
            )
        logits, y = logits[mask], y[mask]
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, logits, y, 1

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch.x, batch.edge_index).softmax(dim=-1)


def _k_hop(x: Tensor, edge_index: Tensor, y: Tensor, mask: Tensor, hops: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The subgraph induced by the ``hops``-hop neighbourhood of the masked nodes (relabelled), and its mask."""
    from torch_geometric.utils import k_hop_subgraph

    subset, sub_edges, mapping, _ = k_hop_subgraph(
        mask.nonzero().flatten(), hops, edge_index, relabel_nodes=True, num_nodes=x.shape[0]
    )
    sub_mask = torch.zeros(subset.numel(), dtype=torch.bool, device=mask.device)
    sub_mask[mapping] = True
    return x[subset], sub_edges, y[subset], sub_mask
