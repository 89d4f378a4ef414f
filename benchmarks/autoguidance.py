"""Autoguidance (Karras et al. 2024) against Kiln's classifier-free guidance, pooled FD.

Usage (from the repository root, alone on the machine, on a project that ran ``kiln run``):
    .venv/bin/python benchmarks/autoguidance.py PROJECT --guide UNET_DIR
        [--mode cond|uncond] [--guidance 1.5,2] [--guidance-start F]

Autoguidance steers a model with a worse version of itself instead of with its own
unconditional prediction: ``bad(x, c) + w (good(x, c) - bad(x, c))``, where ``bad`` is,
in the paper, a smaller or shorter-trained model with the same kind of errors. It
reported large FID gains on ImageNet where CFG narrows the samples' spread. Here the
guide is a U-Net directory of the same latent and text spaces (e.g. the project's U-Net
trained again for fewer steps: a copy of the project, ``train_unet: steps: 450``, ``kiln
train-unet``, then ``--guide COPY/data/models/unet``). ``--mode uncond`` guides with the
worse model's *unconditional* prediction instead (CFG and autoguidance at once, still two
evaluations a step).

The measure is ``pooled_own.py``'s train-caption protocol: one sample for each of 640
training captions against 1,024 other training images, the floor the captions' own
images, in the project's own CLIP. Samples are drawn by the project's pipeline
(``sampling.generate``: DPM-Solver++ 20 steps, the guidance interval honoured), its
U-Net's calls answered by the pair: diffusers' SD pipeline evaluates ``[unconditional,
conditional]`` as one batch and forms ``u + w (c - u)``, so the wrapper hands the first
half to the guide. Results: RESULTS.md, "autoguidance".
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common_space import draw, pooled, train_pool  # noqa: E402
from benchmarks.pooled_own import own_copies, reconstruct  # noqa: E402


def with_guide(pipe, guide_dir: Path, mode: str):
    """``pipe`` with its U-Net's batched CFG call split: the unconditional half is
    answered by the guide U-Net (on the conditional text for ``cond``), the conditional
    half by the pipeline's own U-Net."""
    import torch
    from diffusers import UNet2DConditionModel

    good = pipe.unet
    bad = UNet2DConditionModel.from_pretrained(guide_dir).to(good.device).eval()
    own = good.forward

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        n = sample.shape[0] // 2
        if n == 0 or sample.shape[0] % 2:  # an unguided call: the model alone
            return own(sample, timestep, encoder_hidden_states, *args, **kwargs)
        kwargs = {**kwargs, "return_dict": False}
        text = encoder_hidden_states[n:] if mode == "cond" else encoder_hidden_states[:n]

        def half(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            return t if t.ndim == 0 else t[lo:hi]

        out_bad = bad(sample[:n], half(timestep, 0, n), text, *args, **kwargs)[0]
        out_good = own(sample[n:], half(timestep, n, 2 * n), encoder_hidden_states[n:],
                       *args, **kwargs)[0]  # fmt: skip
        return (torch.cat([out_bad, out_good]),)

    good.forward = forward
    return pipe


def main() -> None:
    import training.inference.sampling as sampling
    from training.evaluation.metrics.clip_score import clip_scores
    from training.evaluation.metrics.distribution import clip_image_embeddings

    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--guide", type=Path, required=True, help="a U-Net directory")
    ap.add_argument("--mode", choices=["cond", "uncond"], default="cond")
    ap.add_argument("--guidance", type=lambda v: [float(g) for g in v.split(",")],
                    default=[1.5, 2.0])  # fmt: skip
    ap.add_argument("--guidance-start", type=float, default=0.0, metavar="F")
    ap.add_argument("--ref", type=int, default=1024)
    ap.add_argument("--pool", type=int, default=640)
    args = ap.parse_args()
    if not (args.guide / "config.json").is_file():
        ap.error(f"--guide {args.guide}: no U-Net there (config.json missing)")

    load = sampling.load
    sampling.load = lambda path: with_guide(load(path), args.guide, args.mode)
    clip = args.project / "data/models/clip"
    ref, pool, caps = train_pool(args.project, args.ref, args.pool)
    ref_e, floor_e = clip_image_embeddings(clip, ref), clip_image_embeddings(clip, pool)
    recons = reconstruct(args.project / "data/models/vae", pool)
    # the cache key (common_space.draw) knows the pipeline's weights, not the guide's:
    # one folder per guide's weights and mode
    cache = args.project.parent / "autoguidance-samples" / args.project.name
    weights = hashlib.sha256()
    for f in sorted(args.guide.glob("*.safetensors")):
        weights.update(f.read_bytes())
    guide = f"{args.guide.resolve().parent.parent.parent.name}-{args.mode}"
    print("| project | guide | guidance | from | fd_clip | floor | fd / floor | cmmd_clip "
          "| CLIP score | own-image copies (median RMS) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for g in args.guidance:
        folder = cache / f"{guide}-{weights.hexdigest()[:12]}-g{g:g}-from{args.guidance_start:g}"
        samples = draw(args.project, caps, 0, g, folder, None, args.guidance_start)
        q = pooled(clip_image_embeddings(clip, samples), ref_e, floor_e)
        k, d = own_copies(args.project, samples, recons)
        score = float(clip_scores(clip, caps, samples).mean())
        print(f"| {args.project} | {guide} | {g:g} | {args.guidance_start:g} "
              f"| {q['fd_clip']:.4f} | {q['fd_floor']:.4f} | **{q['fd_ratio']:.2f}** "
              f"| {q['cmmd_clip']:.3f} | {score:.3f} | {k} ({d:.3f}) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
