"""Phase ``train_unet``: the denoiser on precomputed latents, a U-Net or a diffusion
transformer (``train_unet.backbone``, ``backbones/``); the stage keeps its name.

The latent-diffusion objective (Rombach et al. 2022, eq. 2): sample z0 from the VAE
posterior (scaled by the measured scaling factor), a timestep t and noise eps; train
the U-Net, cross-attending to CLIP text states, to predict eps (or v, Salimans & Ho
2022) from the DDPM-noised z_t. The DiT learns SD3's rectified flow instead (Esser et
al. 2024): z_t = (1 - t) z0 + t eps on a straight line, t logit-normal, and the target
is the velocity eps - z0. Captions are dropped to the empty-prompt embedding
with probability ``caption_dropout`` so one network learns both the conditional and
unconditional scores that classifier-free guidance (Ho & Salimans 2022) combines.
Min-SNR-gamma loss weighting (Hang et al. 2023) and offset noise are optional; the
EMA of the weights is what gets saved and sampled. Every ``preview_every`` steps the EMA
weights sample the preview prompts (chosen by ``precompute_latents``) into a grid under
``previews/``, logged to MLflow, so a run can be watched, not only its loss.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from training import backbones
from training import engine as E
from training import paths as P
from training.backbones import TextDims
from training.config import Params
from training.engine import loaders
from training.engine.images import grid


def build(
    params: Params, latent_channels: int, latent_size: int, text: TextDims | int
) -> torch.nn.Module:
    """The denoiser named by ``train_unet.backbone`` (``backbones/``); ``text``:
    the text encoder's widths (an int: per-token states only, for the U-Net)."""
    if isinstance(text, int):
        text = TextDims(hidden=text, pooled=text)
    bb = backbones.get(params.train_unet.backbone)
    return bb.build(params, latent_channels, latent_size, text)


def noise_scheduler(params: Params) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training schedule, saved beside the weights: the pipeline's scheduler and
    every sampler (``inference/sampling.py``) are made from its config."""
    c = params.train_unet
    if backbones.get(c.backbone).objective == "flow":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=c.num_train_timesteps, shift=c.flow_shift
        )
    return DDPMScheduler(
        num_train_timesteps=c.num_train_timesteps,
        beta_schedule=c.beta_schedule,
        prediction_type=c.prediction_type,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )


def objective(params: Params) -> dict:
    """The training scheduler's config with its class: what a U-Net saved with it
    (``scheduler_config.json``) learnt to predict, for ``reuse.same_objective``."""
    sched = noise_scheduler(params)
    return {**sched.config, "_class_name": type(sched).__name__}


def snr_weights(
    sched: DDPMScheduler, t: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma weights expressed for the chosen prediction target."""
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    w = snr.clamp(max=gamma)
    return w / snr if prediction_type == "epsilon" else w / (snr + 1)


# The text tensors of a batch: {"text": per-token states} plus {"pooled": ...} for a
# backbone that takes a pooled vector (a bare tensor is {"text": it})
Cond = dict[str, torch.Tensor]
# step -> (posterior mean, posterior std, text): this process's slice of the step's
# global batch
BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor, Cond | torch.Tensor]]


def _cond(x: Cond | torch.Tensor) -> Cond:
    return x if isinstance(x, dict) else {"text": x}


def make_step_fn(
    params: Params,
    model: torch.nn.Module,
    sched: DDPMScheduler | FlowMatchEulerDiscreteScheduler,
    batch: BatchFn,
    null_text: Cond | torch.Tensor,
    scaling: float,
    dev: torch.device,
    predict: Callable | None = None,
) -> Callable[[int], tuple[torch.Tensor, E.StepMetrics]]:
    """The training step: ``batch(step) -> (posterior mean, std, text)`` gives the
    samples (precomputed latents from the loader in the pipeline; the benchmark and the
    ControlNet encode inside the step), everything else is the backbone's objective.
    ``predict(model, z_t, t, cond)``: the prediction, when it is not the backbone's
    (the ControlNet's: its residuals into the frozen U-Net); condition tensors without
    an empty-prompt counterpart in ``null_text`` (a control image) are never dropped."""
    c = params.train_unet
    bb = backbones.get(c.backbone)
    predict = predict or bb.predict
    null = _cond(null_text)

    def step_fn(step: int) -> tuple[torch.Tensor, E.StepMetrics]:
        # Every random draw is made for the whole global batch on the CPU from the
        # (seed, step) generator, then this process keeps its slice, so N processes make
        # the same update as one; only the network runs on `dev`.
        g = E.step_generator(params.seed, step)
        mean, std, text = batch(step)  # this process's slice of the global batch
        cond = _cond(text)
        b = len(mean) * E.world_size()
        shape = (b, *mean.shape[1:])
        eps = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        if c.noise_offset > 0:  # offset noise: lets the model shift whole-image brightness
            noise = noise + c.noise_offset * torch.randn((b, shape[1], 1, 1), generator=g)
        if bb.objective == "flow":  # logit-normal t in (0, 1), shifted as the sampler is
            u = torch.sigmoid(c.logit_mean + c.logit_std * torch.randn(b, generator=g))
            t = c.flow_shift * u / (1 + (c.flow_shift - 1) * u)
        else:
            t = torch.randint(0, c.num_train_timesteps, (b,), generator=g)
        drop = torch.rand(b, generator=g) < c.caption_dropout
        eps, noise, t, drop = E.local(eps, noise, t, drop)
        z0 = (mean + std * eps) * scaling
        for k, v in cond.items():  # caption dropout: the empty prompt's states
            if k not in null:
                continue
            dropped = drop.view(-1, *([1] * (v.dim() - 1)))
            cond[k] = torch.where(dropped, null[k].expand_as(v), v)
        if bb.objective == "flow":
            s = t.view(-1, 1, 1, 1)
            zt, target = (1 - s) * z0 + s * noise, noise - z0
            t, w = t * c.num_train_timesteps, torch.ones(len(t))  # the pipeline's timesteps
        else:
            zt = sched.add_noise(z0, noise, t)
            target = noise if c.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
            w = (
                snr_weights(sched, t, c.min_snr_gamma, c.prediction_type)
                if c.min_snr_gamma is not None
                else torch.ones(len(t))
            )
        zt, t, target, w = E.to_device(dev, zt, t, target, w)
        cond = dict(zip(cond, E.to_device(dev, *cond.values()), strict=True))
        pred = predict(model, zt, t, cond)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * w).mean(), {}

    return step_fn


def latent_split(params: Params, source: str):
    """The latent shards of a split as ``{"mean", "std", "text"}`` batches (text in its
    stored dtype), in the stage's batch order."""
    c = params.train_unet
    return loaders.make(
        c.loader, source, loaders.as_is, loaders.stack_rows, c.batch_size, params.seed,
        c.block_shards,
    )  # fmt: skip


def held_out(params: Params, model, sched, val: str, scaling: float, dev) -> dict[str, float]:
    """The held-out denoising loss of ``model`` on the first ``val_samples`` of the val
    latents at ``val``."""
    from training.evaluation.heldout import denoising_loss, val_batches

    c = params.train_unet
    batches = val_batches(val, c.val_samples)
    predict = backbones.get(c.backbone).predict
    return denoising_loss(model, sched, batches, scaling, c.val_timesteps, dev, predict)


def checked_manifest(
    params: Params, latents: str | Path, vae_dir: Path, clip_dir: Path | None
) -> dict:
    """The manifest of the latents at ``latents``, once they are known to be made by the
    VAE and CLIP in these folders (``latent_cache.check_made_by``) for this backbone."""
    from training.phases.latent_cache import check_made_by

    manifest = json.loads(loaders.Store.shared().read_bytes(f"{latents}/manifest.json"))
    check_made_by(str(latents), manifest, {"vae": vae_dir, "clip": clip_dir})
    made_for = manifest.get("backbone", "unet2d")
    if made_for != params.train_unet.backbone:
        raise ValueError(
            f"{latents}: text states made for the {made_for} backbone, and train_unet.backbone "
            f"is {params.train_unet.backbone}: run precompute_latents again"
        )
    return manifest


def run(
    params: Params,
    latents: str | Path,
    vae_dir: Path,
    out_dir: Path,
    ckpt_dir: Path,
    log: E.MetricLogger | None = None,
    clip_dir: Path | None = None,
) -> dict:
    """Train on the latents at ``latents`` (a directory or an ``s3://`` prefix), made by
    the VAE in ``vae_dir`` and the CLIP in ``clip_dir`` (None: not checked), checked
    before anything else (``latent_cache.check_made_by``)."""
    from safetensors.torch import load

    log = log or E.NullLogger()
    torch.manual_seed(params.seed)
    store = loaders.Store.shared()
    manifest = checked_manifest(params, latents, vae_dir, clip_dir)
    null_text = load(store.read_bytes(f"{latents}/null_text.safetensors"))
    preview_text = load(store.read_bytes(f"{latents}/preview_text.safetensors"))
    scaling = float(manifest["vae"]["scaling_factor"])
    # the held-out loss runs on rank 0 only, between steps like the previews
    val = f"{latents}/val" if E.is_main() and params.train_unet.val_samples else None
    if val is not None:  # its shards checked now, as train's (was: at the first preview)
        store.index(val)
    batches = latent_split(params, f"{latents}/train")
    try:
        return _train(params, manifest, batches, (null_text, preview_text, scaling), vae_dir,
                      out_dir, ckpt_dir, log, val)  # fmt: skip
    finally:
        batches.close()


def _train(params, manifest, batches, texts, vae_dir, out_dir, ckpt_dir, log, val) -> dict:
    """``texts``: the empty-prompt and preview text tensors and the latent scaling."""
    null_text, preview_text, scaling = texts
    c = params.train_unet
    bb = backbones.get(c.backbone)
    ch, size, _ = manifest["tensors"]["mean"]["shape"]
    text_shape = manifest["tensors"]["text"]["shape"]
    pooled = manifest["tensors"].get("pooled", {"shape": text_shape})["shape"][-1]
    E.say(
        f"train_unet: {bb.name} backbone ({bb.objective} objective); {len(batches)} latents "
        f"{ch}x{size}x{size}, text states {tuple(text_shape)} "
        f"({manifest['tensors']['text']['dtype']}), scaling factor {scaling:.4f}"
    )

    model = build(params, ch, size, TextDims(hidden=text_shape[-1], pooled=pooled))
    start: dict = {}
    from training.phases.reuse import TRAINED_ON, builds_on, warm_start

    # what made the latents (a manifest without fingerprints, as benchmarks make: none)
    spaces = {k: fp for k in ("vae", "clip") if (fp := manifest.get(k, {}).get("fingerprint"))}

    ref = builds_on("train_unet", params)
    if ref:  # continue from a registered U-Net (checked before any step) ...
        start = warm_start(model, ref, params, objective(params), spaces)
        # ... for fewer steps, at a lower peak rate: the parent is trained, and a restart
        # at the full rate undoes part of it (RESULTS.md, "Continuous training")
        tune = {"steps": c.finetune_steps or c.steps, "lr": c.lr * c.finetune_lr_scale}
        if c.finetune_steps and E.is_main():  # was: a `steps` edit re-ran this, unsaid
            E.say(
                f"train_unet: fine-tuning {ref} for finetune_steps ({c.finetune_steps}) at "
                f"lr x {c.finetune_lr_scale:g}; train_unet.steps ({c.steps}) and lr "
                "apply from scratch only"
            )
        c = c.model_copy(update=tune)
        start.update(finetune_steps=c.steps, finetune_lr=c.lr)
    if E.is_main():
        # the run's `steps` and `lr` params are the section's, the from-scratch values
        # (MLflow never changes a logged param): what it trained with, for every run
        log.log_params(
            {"trained_steps": c.steps, "trained_lr": c.lr, "trained_from": ref or "scratch"}
        )
    sched = noise_scheduler(params)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01)
    # a fine-tune's checkpoints belong to its parent too (was: resumed onto a parent the
    # alias no longer named, with the new parent's name on the result)
    data_id = {**manifest, "parent": start["init_fingerprint"]} if ref else manifest
    trainer = E.stage_trainer(
        "train_unet", model, opt, c, params.seed, ckpt_dir, data_id, log, c.ema_decay
    )
    dev = trainer.device

    def precomputed(step: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        b = batches.batch(step)  # text states: 16-bit on disk
        cond = {k: b[k].float() for k in ("text", "pooled") if k in b}
        return b["mean"].float(), b["std"].float(), cond

    step_fn = make_step_fn(params, model, sched, precomputed, null_text, scaling, dev)

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(dev)

    def preview(step: int) -> None:
        # The exported pipeline itself (the default sampler settings) on the EMA weights,
        # fed the precomputed text states, so the grid is what a user would get; and the
        # held-out loss of those weights.
        from training.config import SAMPLER
        from training.inference.sampling import finite_images, make_scheduler

        ema_model = copy.deepcopy(model).eval()
        trainer.ema.copy_to(ema_model)
        if val is not None:
            heldout = held_out(params, ema_model, sched, val, scaling, dev)
            log.log_metrics({f"train_unet/{k}": v for k, v in heldout.items()}, step)
        sampler = make_scheduler(SAMPLER.scheduler, sched.config)
        pipe = bb.assemble(vae, None, None, ema_model, sampler)
        pipe.set_progress_bar_config(disable=True)
        n = len(preview_text["text"])
        prompt = {k: v.to(dev) for k, v in bb.prompt_kwargs(preview_text).items()}
        empty = {k: v.expand(n, *v.shape) for k, v in null_text.items()}  # one, unbatched
        negative = {f"negative_{k}": v.to(dev) for k, v in bb.prompt_kwargs(empty).items()}
        arrays = pipe(
            **prompt,
            **negative,
            num_inference_steps=SAMPLER.steps,
            guidance_scale=SAMPLER.guidance,
            generator=torch.Generator().manual_seed(params.seed),
            output_type="np",  # was "pil": NaN drawn black, the run going on
        ).images
        # the loss guard does not cover this: the VAE's decoder is no part of the loss
        where = f"train_unet: the preview at step {step}"
        images = finite_images(arrays, manifest["preview_prompts"], where)
        path = out_dir / "previews" / f"step-{step:06d}.png"
        grid(images, nrow=len(images), scale=2).save(path)
        log.log_image(path, "previews")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "previews").mkdir(exist_ok=True)
    with open(out_dir / "previews" / "prompts.txt", "w") as f:
        f.write("\n".join(manifest["preview_prompts"]) + "\n")
    summary = {**trainer.fit(step_fn, every=c.preview_every, on_every=preview), **batches.stats()}
    if not E.is_main():  # data parallel: rank 0 saves
        return summary
    # fit leaves the EMA weights in `model`
    if val is not None:
        heldout = held_out(params, model, sched, val, scaling, dev)
        summary.update(heldout)
        if heldout:
            E.say(
                f"train_unet: held-out denoising loss {heldout['val_loss']:.4f} "
                f"({heldout['val_loss_samples']:.0f} val samples x "
                f"{params.train_unet.val_timesteps} fixed timesteps)"
            )
    model.save_pretrained(out_dir, safe_serialization=True)
    sched.save_pretrained(out_dir)  # scheduler_config.json beside the U-Net config
    (out_dir / TRAINED_ON).write_text(json.dumps(spaces) + "\n")
    return {"params": sum(p.numel() for p in model.parameters()), **start, **summary}


def _inputs() -> tuple[str | Path, Path, Path | None]:
    """The stage's latents, VAE and CLIP: the CLIP evaluate pairs the U-Net with (no
    input of this stage: checked when there), so the latents' text states must be its
    own."""
    return loaders.split_source(P.LATENTS, "latents"), P.VAE, P.CLIP if P.CLIP.is_dir() else None


def check_inputs(params: Params) -> None:
    """What ``run`` refuses first, checked before the stage adapter clears
    ``data/models/unet``: a refused run leaves the last U-Net as it was."""
    checked_manifest(params, *_inputs())


def stage(params: Params, log: E.MetricLogger) -> dict:
    E.init_distributed()  # torch's threads; the process group under torchrun
    latents, vae, clip = _inputs()
    return run(params, latents, vae, P.UNET, P.CKPT / "train_unet", log, clip_dir=clip)
