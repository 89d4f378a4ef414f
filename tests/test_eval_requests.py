"""What evaluate asks the sampler for: every sample its own noise, and the report's
figures drawn with the evaluation's negative prompt. Found in review."""

from __future__ import annotations

from training import config
from training.intake.builtin import EvalPrompt


def test_every_sample_gets_its_own_seed_past_1000_prompts():
    """Were: seed + 1000 * j + i, so past 1,000 prompts (user data: one per distinct
    val caption) sample j+1 of prompt i drew the noise of sample j of prompt i+1000."""
    from training.evaluation.prompts import sample_requests

    params = config.resolve({"evaluate": {"samples_per_prompt": 3}})
    for n in (144, 1001, 2500):
        prompts = [EvalPrompt(f"caption {i}", {}) for i in range(n)]
        reqs = sample_requests(params, prompts, 2.0, 0.0)
        assert len({r.seed for r in reqs}) == len(reqs) == 3 * n
    # up to 1,000 prompts the seeds are those of every earlier evaluation
    small = sample_requests(params, [EvalPrompt("a", {}), EvalPrompt("b", {})], 2.0, 0.0)
    assert [r.seed for r in small] == [0, 1, 1000, 1001, 2000, 2001]


def test_the_reports_figures_use_the_evaluations_negative_prompt(monkeypatch):
    """Were: the guidance sweep and the steps table drew with no negative prompt (and
    the trajectory with ""), while the evaluation's samples used evaluate.negative_prompt:
    the table's row for the evaluated sampler was not the evaluated setting."""
    from training.evaluation import figures
    from training.inference import sampling

    asked: list = []

    def generate(pipe, reqs, **kw):
        asked.extend(reqs)
        return []

    monkeypatch.setattr(sampling, "generate", generate)
    monkeypatch.setattr("training.engine.images.grid", lambda *a, **k: None)
    figures.guidance_sweep(None, ["a", "b"], (1.0, 3.0), 0, 2, "blurry")
    assert asked and {r.negative for r in asked} == {"blurry"}
