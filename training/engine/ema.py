"""Exponential moving average of the weights (the U-Net samples from it)."""

from __future__ import annotations

import torch


# ---- EMA ------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of parameters, with the usual warm-up on the decay
    (``min(decay, (1 + n) / (10 + n))``, diffusers' ``EMAModel`` without
    ``use_ema_warmup``) so early averages are not dominated by init.

    The warm-up reaches a decay d only after ``(10 d - 1) / (1 - d)`` updates: 0.999
    after 8,990, so a short run never averages as long as its ``ema_decay`` says
    (tiny's 1,800 U-Net steps end at 0.995). ``reached`` is the decay of the last
    update, which the trainings report beside the configured one."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def decay_at(self, n: int) -> float:
        """The decay the ``n``-th update uses (``n`` from 1)."""
        return min(self.decay, (1 + n) / (10 + n))

    @property
    def reached(self) -> float:
        """The decay of the last update so far (0 before the first)."""
        return self.decay_at(self.updates) if self.updates else 0.0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        live = model.state_dict()
        floats = [k for k, v in live.items() if v.dtype.is_floating_point]
        shadows = [self.shadow[k] for k in floats]
        # one fused op over all tensors instead of a Python loop over hundreds
        if all(live[k].dtype == torch.float32 for k in floats):
            torch._foreach_lerp_(shadows, [live[k] for k in floats], 1 - d)
        else:
            for sh, k in zip(shadows, floats, strict=True):
                sh.lerp_(live[k].float(), 1 - d)
        for k, v in live.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        model.load_state_dict({k: v.to(current[k].dtype) for k, v in self.shadow.items()})
