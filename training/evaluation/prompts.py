"""What evaluate samples: the prompts (a built-in set's own list, or the val captions
of user data: those FD compares first, as often as that half holds them, then the other
distinct ones) and one request per sample of each, each with its own seed."""

from __future__ import annotations

from pathlib import Path

from training.config import Params


def prompt_set(params: Params, clean_dir: Path) -> list:
    from training.engine import loaders
    from training.evaluation.metrics import distribution
    from training.intake import builtin, shards

    ds = params.oracle()
    if ds:  # a built-in set, or an export of one (evaluate.oracle)
        prompts = builtin.eval_prompts(ds)
    else:  # user data: the captions of the validation split
        caps = [r.caption for r in shards.read(shards.shard_paths(clean_dir / "val"))]
        # those FD and CMMD compare first (the second real half of the images they read,
        # metrics/distribution.py ``paired``: a pick spread over the buckets, not the
        # first in shard order, which are the square bucket's), so that an
        # evaluate.max_prompts cap keeps them rather than the first captions in the
        # collection's order, which is often by category
        real = loaders.records(str(clean_dir / "val"), distribution.LIMIT)
        first = [real[i].caption for i in distribution.halves(distribution.picture_ids(real))[1]]
        # with their repeats: FD pairs one sample with each image of that half, so a
        # caption k images share needs k samples (was: distinct captions only, and class
        # captions, "a photo of a cat" x 20, fell back to 2 or 3 samples spread)
        compared = set(first)
        rest = [c for c in dict.fromkeys(caps) if c not in compared]
        prompts = [builtin.EvalPrompt(c, {}) for c in first + rest]
    if params.evaluate.max_prompts:
        prompts = prompts[: params.evaluate.max_prompts]
    return prompts


def sample_requests(params: Params, prompts: list, guidance: float, start: float) -> list:
    """``samples_per_prompt`` requests a prompt, each with its own noise: seeds 1,000
    apart a round as always, further apart past 1,000 prompts (where sample j+1 of
    prompt i drew the noise of sample j of prompt i+1000: the copy check's and CLIP
    score's samples were not independent)."""
    from training.inference import sampling

    c = params.evaluate
    stride = max(1000, len(prompts))
    return [
        sampling.Request(
            p.prompt,
            seed=params.seed + stride * j + i,
            steps=c.steps,
            guidance=guidance,
            negative=c.negative_prompt,
            guidance_start=start,
        )
        for j in range(c.samples_per_prompt)
        for i, p in enumerate(prompts)
    ]
