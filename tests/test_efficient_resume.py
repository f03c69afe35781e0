"""Every efficient SAM variant resumes bit for bit: its state (g_v, AE-SAM's statistics, the SAF store, MESA's
teacher, the optimizer's momentum for MSAM) is in the checkpoint (CPU, deterministic)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from flatminima.lightning_modules import SAM, Classifier
from flatminima.lightning_modules.minimizers import (
    ESAM,
    MESA,
    SAF,
    AdaptiveSteps,
    EveryK,
    LookSAM,
    MomentumSAM,
    RandomSteps,
)
from tests.helpers import bn_mlp, classification_batches, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS, RESUME_AT = 4, 2  # 3 steps per epoch: LookSAM(k=4) takes SAM steps at 0, 4, 8 and reuses g_v at 6, 7
VARIANTS = {
    "looksam": lambda: LookSAM(rho=0.05, k=4, alpha=0.7),
    "every_k": lambda: EveryK(SAM(0.05), k=2),
    "random": lambda: RandomSteps(SAM(0.05), p=0.5, seed=1),
    "adaptive": lambda: AdaptiveSteps(SAM(0.05)),
    "msam": lambda: MomentumSAM(rho=0.5),
    "msam_one_pass": lambda: MomentumSAM(rho=0.5, clean_loss=False),
    "esam": lambda: ESAM(rho=0.05, beta=0.6, gamma=0.5),
    "saf": lambda: SAF(lam=0.3, temperature=2.0, minus_epochs=1, start_epoch=0),
    "mesa": lambda: MESA(lam=0.5, temperature=2.0, decay=0.9, start_epoch=0),
}


def _model(variant):
    return Classifier(
        bn_mlp(dtype=torch.float32),
        num_classes=3,
        minimizer=VARIANTS[variant](),
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )


def _loader():
    batches = classification_batches(3, dtype=torch.float32)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=16, shuffle=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_equals_uninterrupted(tmp_path, variant):
    full = _model(variant)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = quiet_trainer(max_epochs=EPOCHS, deterministic=True, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(full, _loader())

    resumed = _model(variant)
    with torch.no_grad():  # prove that the weights come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    trainer = quiet_trainer(max_epochs=EPOCHS, deterministic=True)
    trainer.fit(resumed, _loader(), ckpt_path=str(tmp_path / f"epoch={RESUME_AT - 1}.ckpt"))

    assert trainer.global_step == EPOCHS * 3
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(full.named_buffers(), resumed.buffers()):
        assert torch.equal(a, b), name
    state_full, state_resumed = full.minimizer.state_dict(), resumed.minimizer.state_dict()
    assert _flat(state_full) == _flat(state_resumed)


def _flat(state):
    """The rule's state as nested Python values (tensors as lists), for an exact comparison."""
    if isinstance(state, dict):
        return {k: _flat(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_flat(v) for v in state]
    return state.tolist() if isinstance(state, torch.Tensor) else state
