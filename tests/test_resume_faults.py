"""Resume after faults the other resume tests do not make: a checkpoint of another
model (the stage's code changed while it was interrupted)."""

from __future__ import annotations

import torch

from training import engine as E


def _model(out: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, E.EMA]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, out))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), E.EMA(model, 0.9)


def test_a_checkpoint_of_another_model_is_refused_whole(tmp_path, capsys):
    """The bug: the checkpoint's fingerprint sees config and data, not code, so a
    stage whose model changed while it was interrupted found a readable checkpoint
    whose first layer still fit. ``load_state_dict`` copied that layer before it raised
    on the next, and the run "from step 0" started half-trained."""
    model, opt, ema = _model(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # trained weights, unlike a fresh model's
    E.Checkpointer(tmp_path, "fp").save(4, model, opt, ema)

    other, opt2, ema2 = _model(2)  # the code now makes a wider last layer
    fresh = {k: v.clone() for k, v in other.state_dict().items()}
    assert E.Checkpointer(tmp_path, "fp").restore(other, opt2, ema2) == 0
    for k, v in other.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    err = capsys.readouterr().err
    assert "2.bias is (1,), here (2,)" in err
    assert "no checkpoint could be resumed; training from step 0" in err
