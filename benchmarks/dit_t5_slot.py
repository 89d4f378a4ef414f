"""What SD3's 256 zero T5 tokens cost a tiny DiT, and what collapsing them saves (#17).

Usage (from the repository root, alone on the machine; under a minute):
    .venv/bin/python benchmarks/dit_t5_slot.py [--steps 5]

The tiny profile's DiT (training/profiles.yaml) on a batch of 64 tiny latents (4x8x8)
with tiny CLIP's text states (24 tokens): the time of a training step (forward,
backward, AdamW) with the T5 slot as the pipeline fills it (256 zero tokens, diffusers'
attention processor) and as Kiln trains it (one token counted 256 times,
``training/backbones/dit.py``). Both in this one invocation, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402

from training import config  # noqa: E402
from training.backbones import TextDims, dit  # noqa: E402


def step_seconds(model, t5_tokens: int, steps: int) -> float:
    torch.manual_seed(0)
    cond = {"text": torch.randn(64, 24, 64), "pooled": torch.randn(64, 64)}
    states, pooled = dit.joint(cond, t5_tokens)
    x, t = torch.randn(64, 4, 8, 8), torch.rand(64) * 1000
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=states,
                    pooled_projections=pooled).sample  # fmt: skip
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    params = config.resolve({"train_unet": {"backbone": "dit"}})
    model = dit.build(params, 4, 8, TextDims(64, 64))
    print(f"tiny DiT, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for r in range(args.rounds):
        model.set_attn_processor(JointAttnProcessor2_0())
        full = step_seconds(model, dit.T5_TOKENS, args.steps)
        dit.collapse_zeros(model)
        one = step_seconds(model, 1, args.steps)
        print(f"round {r}: 256 zero tokens {full:.3f} s/step, collapsed {one:.3f} s/step, "
              f"ratio {full / one:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
