"""The held-out denoising loss measures the model against the right target, at fixed
timesteps and noise, however the samples are batched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from training.evaluation.heldout import denoising_loss, timesteps

SCALING = 0.5


class Oracle(torch.nn.Module):
    """Knows z0 (smuggled in as its "text" states), so it can give the exact target:
    its loss must be zero. ``zero=True`` predicts zeros instead."""

    def __init__(self, sched: DDPMScheduler, zero: bool = False):
        super().__init__()
        self.sched, self.zero = sched, zero

    def forward(self, zt, t, encoder_hidden_states):
        if self.zero:
            return SimpleNamespace(sample=torch.zeros_like(zt))
        z0 = encoder_hidden_states.reshape(zt.shape) * SCALING
        abar = self.sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (zt - abar.sqrt() * z0) / (1 - abar).sqrt()
        if self.sched.config.prediction_type == "epsilon":
            return SimpleNamespace(sample=eps)
        return SimpleNamespace(sample=abar.sqrt() * eps - (1 - abar).sqrt() * z0)


def _batches(mean: torch.Tensor, size: int):
    for lo in range(0, len(mean), size):
        m = mean[lo : lo + size]
        yield {"mean": m, "text": m.reshape(len(m), 1, -1)}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_an_oracle_scores_zero_and_batching_changes_nothing(prediction):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    mean = torch.randn(40, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    dev = torch.device("cpu")
    perfect = denoising_loss(Oracle(sched), sched, _batches(mean, 16), SCALING, 5, dev)
    assert perfect["val_loss"] < 1e-8 and perfect["val_loss_samples"] == 40
    assert sorted(k for k in perfect if k.startswith("val_loss_t")) == [
        f"val_loss_t{t}" for t in (100, 300, 500, 700, 900)
    ]
    zero = Oracle(sched, zero=True)
    a = denoising_loss(zero, sched, _batches(mean, 7), SCALING, 5, dev)
    b = denoising_loss(zero, sched, _batches(mean, 40), SCALING, 5, dev)
    assert a == pytest.approx(b, rel=1e-6)  # the same noise for each sample
    if prediction == "epsilon":  # predicting 0 costs E[eps^2] = 1 at every timestep
        assert all(abs(a[f"val_loss_t{t}"] - 1) < 0.05 for t in timesteps(1000, 5))
    else:  # v -> z0 as t -> T: the error moves from the noise to the (smaller) latents
        assert a["val_loss_t100"] > a["val_loss_t900"]


def test_no_samples_no_loss():
    sched = DDPMScheduler(num_train_timesteps=1000)
    assert denoising_loss(Oracle(sched), sched, iter(()), SCALING, 5, torch.device("cpu")) == {}
