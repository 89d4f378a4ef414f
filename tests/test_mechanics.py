"""Shared training mechanics: checkpoints, resume, NaN guard, determinism."""

import json

import pytest
import torch

from training import engine as E


def _setup(tmp_path, steps=12, every=4, fp="fp"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = E.LoopCfg(
        steps=steps,
        lr=1e-2,
        warmup_steps=2,
        grad_clip=1.0,
        batch_size=8,
        checkpoint_every=every,
        log_every=2,
    )
    trainer = E.Trainer(
        "toy", model, opt, cfg, E.Checkpointer(tmp_path / "ck", fp), ema=E.EMA(model, 0.9)
    )
    data = torch.randn(64, 4)
    target = data.sum(1, keepdim=True)

    def step_fn(step):
        idx = E.batch_indices(len(data), 8, step, seed=0)
        noise = torch.randn(8, 1, generator=E.step_generator(0, step)) * 0.01
        return ((model(data[idx]) - target[idx] - noise) ** 2).mean(), {}

    return trainer, step_fn


def test_resume_is_bitwise_identical(tmp_path):
    full, fn = _setup(tmp_path / "a")
    uninterrupted = full.fit(fn)
    # interrupted run: Ctrl-C during step 9 (checkpoint 8 is on disk), then a fresh
    # trainer — as after a restart — resumes from it
    part, fn2 = _setup(tmp_path / "b", steps=12)

    def interrupted(step):
        if step == 9:
            raise KeyboardInterrupt
        return fn2(step)

    with pytest.raises(KeyboardInterrupt):
        part.fit(interrupted)
    resumed, fn3 = _setup(tmp_path / "b", steps=12)
    summary = resumed.fit(fn3)
    assert summary["resumed_from_step"] == 8
    # the decay of the 12th update, counted across the restart: the warm-up's
    # 13/22 = 0.59, not the 0.9 asked for
    assert summary["ema_decay_reached"] == uninterrupted["ema_decay_reached"]
    assert summary["ema_decay_reached"] == pytest.approx(13 / 22)
    for a, b in zip(
        full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_a_run_resumed_at_its_end_reports_its_loss_and_draws_its_last_preview(tmp_path):
    """Killed after the last checkpoint (during the stage's final measurement or its
    registration), the re-run resumes at step == steps: it reported ``final_loss`` NaN
    and drew no final preview (found in review)."""
    drawn: list[int] = []
    full, fn = _setup(tmp_path)
    done = full.fit(fn, every=4, on_every=drawn.append)
    assert drawn == [4, 8, 12]

    def no_training(step):
        raise AssertionError(f"step {step} trained again")

    drawn.clear()
    again, _ = _setup(tmp_path)
    summary = again.fit(no_training, every=4, on_every=drawn.append)
    assert summary["resumed_from_step"] == 12
    assert summary["final_loss"] == done["final_loss"]
    assert drawn == [12]


def test_stop_ends_training_early_and_a_resume_stops_at_the_same_step(tmp_path):
    """``stop`` (e.g. the VAE's val-PSNR target) ends a run at a check step, never at the
    last; a run interrupted before that point, resumed, ends at the same step with the
    same weights, and a finished early-stopped run asked again trains nothing."""
    asked: list[int] = []

    def stop_at_6(step):
        asked.append(step)
        return step >= 6

    full, fn = _setup(tmp_path / "a")  # 12 steps, checkpoints every 4
    summary = full.fit(fn, every=3, stop=stop_at_6)
    assert asked == [3, 6] and summary["steps_trained"] == 6
    # 6 is no checkpoint step: the stop saves one there for a resume to find
    assert (tmp_path / "a" / "ck" / "step-00000006" / "COMPLETE").is_file()

    part, fn2 = _setup(tmp_path / "b")

    def interrupted(step):
        if step == 5:
            raise KeyboardInterrupt
        return fn2(step)

    with pytest.raises(KeyboardInterrupt):
        part.fit(interrupted, every=3, stop=stop_at_6)
    resumed, fn3 = _setup(tmp_path / "b")
    summary = resumed.fit(fn3, every=3, stop=stop_at_6)
    assert (summary["resumed_from_step"], summary["steps_trained"]) == (4, 6)
    uninterrupted, resumed_ = full.model.state_dict(), resumed.model.state_dict()
    weights = zip(uninterrupted.values(), resumed_.values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)

    def no_training(step):
        raise AssertionError(f"step {step} trained again")

    again, _ = _setup(tmp_path / "a")
    summary = again.fit(no_training, every=3, stop=stop_at_6)
    assert (summary["resumed_from_step"], summary["steps_trained"]) == (6, 6)

    last, fn4 = _setup(tmp_path / "c", steps=6)  # a stop due at the last step is not asked
    asked.clear()
    assert last.fit(fn4, every=3, stop=stop_at_6)["steps_trained"] == 6 and asked == [3]


def test_a_resumed_run_asks_stop_again_of_its_restored_weights(tmp_path):
    """A stop that reads the weights (as the VAE's val PSNR does): resumed at a check
    step where the first run went on, it goes on again, and stops where an
    uninterrupted run stops, with the same weights."""
    probe = torch.randn(16, 4)

    def score(trainer):
        with torch.no_grad():
            return float(((trainer.model(probe) - probe.sum(1, keepdim=True)) ** 2).mean())

    reference, fn = _setup(tmp_path / "ref")  # 12 steps; checks at 4 and 8
    seen: dict[int, float] = {}
    reference.fit(fn, every=4, stop=lambda step: seen.setdefault(step, score(reference)) < 0)
    assert seen[8] < seen[4]  # it is learning; stop once the probe loss is at 8's
    target = seen[8]

    full, fn = _setup(tmp_path / "a")
    assert full.fit(fn, every=4, stop=lambda step: score(full) <= target)["steps_trained"] == 8

    part, fn2 = _setup(tmp_path / "b")

    def interrupted(step):
        if step == 5:  # checkpoint 4 on disk, where the check said: go on
            raise KeyboardInterrupt
        return fn2(step)

    with pytest.raises(KeyboardInterrupt):
        part.fit(interrupted, every=4, stop=lambda step: score(part) <= target)
    resumed, fn3 = _setup(tmp_path / "b")
    asked: list[int] = []

    def stop(step):
        asked.append(step)
        return score(resumed) <= target

    summary = resumed.fit(fn3, every=4, stop=stop)
    assert asked == [4, 8] and (summary["resumed_from_step"], summary["steps_trained"]) == (4, 8)
    for a, b in zip(
        full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_keeps_last_two_complete_checkpoints(tmp_path):
    trainer, fn = _setup(tmp_path)
    trainer.fit(fn)
    kept = sorted(p.name for p in (tmp_path / "ck").glob("step-*"))
    assert kept == ["step-00000008", "step-00000012"]
    assert all((tmp_path / "ck" / k / "COMPLETE").is_file() for k in kept)
    state = json.loads((tmp_path / "ck" / kept[-1] / "state.json").read_text())
    assert state["step"] == 12


def test_corrupt_newest_checkpoint_falls_back(tmp_path, capsys):
    trainer, fn = _setup(tmp_path)
    trainer.fit(fn)
    (tmp_path / "ck" / "step-00000012" / "model.safetensors").write_bytes(b"garbage")
    again, fn2 = _setup(tmp_path)
    assert again.checkpoints.restore(again.model, again.optimizer, again.ema) == 8
    assert "unreadable" in capsys.readouterr().err


def test_a_checkpoint_with_one_damaged_file_leaves_nothing_behind(tmp_path):
    """The bug: restore loaded the weights before it read the optimizer and EMA files;
    with the optimizer file damaged and no older checkpoint it returned 0 with the
    trained weights still in the model (and a fresh optimizer and EMA): a run "from
    step 0" that was neither a fresh run nor a resumed one."""
    trainer, fn = _setup(tmp_path, steps=4)  # one checkpoint, at step 4
    trainer.fit(fn)
    (tmp_path / "ck" / "step-00000004" / "optimizer.safetensors").write_bytes(b"garbage")
    again, _ = _setup(tmp_path, steps=4)
    init = {k: v.clone() for k, v in again.model.state_dict().items()}
    assert again.checkpoints.restore(again.model, again.optimizer, again.ema) == 0
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, init[k]), k


def test_checkpoint_from_other_config_is_not_resumed(tmp_path):
    trainer, fn = _setup(tmp_path)
    trainer.fit(fn)
    other, fn2 = _setup(tmp_path, fp="other", steps=4)
    assert other.checkpoints.restore(other.model, other.optimizer, other.ema) == 0
    other.fit(fn2)  # its own checkpoints survive pruning; the stale ones are gone
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == ["step-00000004"]


def test_incomplete_checkpoint_is_ignored(tmp_path):
    trainer, fn = _setup(tmp_path)
    trainer.fit(fn)
    (tmp_path / "ck" / "step-00000012" / "COMPLETE").unlink()
    again, _ = _setup(tmp_path)
    assert again.checkpoints.restore(again.model, again.optimizer, again.ema) == 8


def test_nan_loss_stops_with_clear_error(tmp_path):
    trainer, _ = _setup(tmp_path)
    with pytest.raises(E.TrainingDiverged, match="loss is nan at step 0"):
        trainer.fit(lambda step: (torch.tensor(float("nan"), requires_grad=True), {}))


def test_batch_order_is_a_function_of_seed_and_step():
    a = E.batch_indices(100, 16, 13, seed=1)
    assert torch.equal(a, E.batch_indices(100, 16, 13, seed=1))
    assert not torch.equal(a, E.batch_indices(100, 16, 13, seed=2))
    epoch = torch.cat([E.batch_indices(100, 16, s, seed=1) for s in range(6)])
    assert len(set(epoch.tolist())) == 96  # one epoch: no repeats


def test_cosine_lr_warms_up_then_decays():
    lrs = [E.cosine_lr(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] < lrs[20] and lrs[-1] == pytest.approx(0.1, abs=0.01)
    # a run shorter than its warm-up (a 60-step fine-tune under warmup_steps 100): warmed
    # up over half of it, then decayed to the floor (was: ended at 0.6 of the peak)
    short = [E.cosine_lr(s, 1.0, 100, 60) for s in range(60)]
    assert short[29] == pytest.approx(1.0) and short[-1] == pytest.approx(0.1, abs=0.01)


def test_device_follows_kiln_device_and_cpu_runs_full_precision(monkeypatch):
    monkeypatch.setenv("KILN_DEVICE", "cpu")
    dev = E.device()
    assert dev == torch.device("cpu")
    with E.autocast(dev):
        assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_on_cuda_trains_under_bf16_autocast(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_DEVICE", raising=False)
    assert E.device().type == "cuda"
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    section = E.LoopCfg(
        steps=60,
        lr=1e-2,
        warmup_steps=2,
        grad_clip=1.0,
        batch_size=8,
        checkpoint_every=30,
        log_every=10,
    )
    trainer = E.Trainer(
        "toy", model, opt, section, E.Checkpointer(tmp_path, "fp"), ema=None, device=E.device()
    )
    model.to(trainer.device)
    data = torch.randn(64, 4)
    seen_dtypes, losses = set(), []

    def step_fn(step):
        idx = E.batch_indices(len(data), 8, step, seed=0)
        x = data[idx].to(trainer.device)
        out = model(x)
        seen_dtypes.add(out.dtype)
        loss = ((out.float() - x.sum(1, keepdim=True)) ** 2).mean()
        losses.append(float(loss))
        return loss, {}

    trainer.fit(step_fn)
    assert seen_dtypes == {torch.bfloat16}
    assert sum(losses[-10:]) < sum(losses[:10])
    assert next(model.parameters()).device.type == "cuda"


def test_ema_warm_up_caps_the_decay_of_short_runs():
    """tiny's 1,800 U-Net steps end at decay 0.995 whatever ema_decay says above it: the
    report must say what was averaged, not what was configured."""
    ema = E.EMA(torch.nn.Linear(2, 2), 0.999)
    assert ema.reached == 0.0
    assert ema.decay_at(1800) == pytest.approx(1801 / 1810)
    assert ema.decay_at(8990) == pytest.approx(0.999) and ema.decay_at(20_000) == 0.999
    short = E.EMA(torch.nn.Linear(2, 2), 0.9)
    for _ in range(100):
        short.update(torch.nn.Linear(2, 2))
    assert short.reached == 0.9  # the warm-up reaches 0.9 at update 80


RANK_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.test_mechanics import _setup
from training import engine as E

E.init_distributed()
trainer, fn = _setup(Path(sys.argv[1]) / f"rank{E.rank()}", steps=8)
try:
    trainer.fit(fn)
except RuntimeError as exc:
    print("refused:", exc, flush=True)
    sys.exit(3)
print("trained", flush=True)
"""


def test_ranks_that_would_resume_from_different_steps_stop_together(tmp_path):
    """The bug: each rank restored its own checkpoint folder, and only rank 0 writes one.
    On nodes without a shared data/ rank 0 resumed at step 4 while the others started at
    0 from fresh weights, and the gradients of two different models were averaged. Now
    every rank sees the disagreement before any step and stops with one clear error."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    first, fn = _setup(tmp_path / "rank0", steps=4)  # rank 0's node: a checkpoint at 4
    first.fit(fn)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_RUN, str(tmp_path), repo],
            env={
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "KILN_DEVICE": "cpu",
                "OMP_NUM_THREADS": "1",
            },  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs
    for r, out in enumerate(outs):
        assert f"the ranks found different checkpoints to resume from (rank {r}: step " in out
    assert not (tmp_path / "rank1" / "ck").exists()  # rank 1 trained nothing, saved nothing


def test_networks_named_in_clip_groups_are_clipped_apart(tmp_path):
    """The bug: the VAE and its discriminator, one module for the Trainer, had their
    gradients clipped as one vector, so a large discriminator gradient shrank the VAE's
    step. Now each group named by ``clip_groups()`` is clipped on its own."""

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def clip_groups(self):
            return [self.a.parameters(), self.b.parameters()]

    model = Pair()
    cfg = E.LoopCfg(steps=1, lr=1e-2, warmup_steps=0, grad_clip=1.0, batch_size=1,
                    checkpoint_every=10, log_every=1)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    trainer = E.Trainer("pair", model, opt, cfg, E.Checkpointer(tmp_path / "ck", "fp"))
    for p in model.a.parameters():
        p.grad = torch.full_like(p, 0.01)  # 6 values: norm 0.0245, under the clip
    for p in model.b.parameters():
        p.grad = torch.full_like(p, 100.0)  # a discriminator's spike
    norms = trainer._clip()  # each group's; the first is logged
    assert float(norms[0]) == pytest.approx(0.01 * 6**0.5)
    assert float(norms[1]) == pytest.approx(100.0 * 6**0.5)
    assert all(torch.allclose(p.grad, torch.full_like(p, 0.01)) for p in model.a.parameters())
    b = torch.cat([p.grad.flatten() for p in model.b.parameters()])
    assert float(b.norm()) == pytest.approx(1.0, rel=1e-4)


def test_non_finite_gradients_of_a_finite_loss_stop_before_any_save(tmp_path):
    """Was: the guard read the loss alone; sqrt at 0 is a finite loss (0) with an infinite
    derivative, clipping scaled every gradient by NaN and the NaN weights were
    checkpointed and returned as if trained."""
    trainer, _ = _setup(tmp_path)
    weight = next(trainer.model.parameters())

    def sqrt_at_zero(step):
        return torch.sqrt(weight.sum() * 0.0), {}

    with pytest.raises(E.TrainingDiverged, match="gradient norm is nan at step 0"):
        trainer.fit(sqrt_at_zero)
    assert not list((tmp_path / "ck").glob("step-*"))


def test_a_preview_that_fails_closes_the_progress_bar(tmp_path):
    """Was: left open, the bar printed its line again after the stage's error line."""
    from tqdm.auto import tqdm

    trainer, fn = _setup(tmp_path)
    bars = []  # held here: a bar nobody holds is closed by the garbage collector

    def broken_preview(step):
        bars.extend(bar for bar in list(tqdm._instances) if bar.desc == "toy")
        raise RuntimeError("preview")

    with pytest.raises(RuntimeError, match="preview"):
        trainer.fit(fn, every=4, on_every=broken_preview)
    assert bars and all(bar.disable for bar in bars)  # tqdm.close() sets disable


@pytest.mark.parametrize("edit", [{"log_every": 1}, {"checkpoint_every": 3}, {"lr": 1e-3}])
def test_a_stage_stopped_to_log_or_save_more_often_resumes(tmp_path, edit):
    """Was: a U-Net stopped at step 4, its checkpoint_every or log_every edited and run
    again, had its checkpoints removed as "other config/data" and trained from step 0;
    how often a loop logs and saves changes no weight. Its learning rate still does."""
    from training.config import resolve

    section = resolve({}).train_unet.model_copy(update={"steps": 6, "checkpoint_every": 2})

    def trainer(section):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=section.lr)
        return E.stage_trainer("toy", model, opt, section, 0, tmp_path, "data", E.NullLogger())

    def step_fn(step):
        if step == 4:
            raise KeyboardInterrupt
        x = torch.randn(8, 4, generator=E.step_generator(0, step))
        return (first.model(x) ** 2).mean(), {}

    first = trainer(section)
    with pytest.raises(KeyboardInterrupt):
        first.fit(step_fn)
    again = trainer(section.model_copy(update=edit))
    resumed = again.checkpoints.restore(again.model, again.optimizer, again.ema)
    assert resumed == (0 if "lr" in edit else 4)
