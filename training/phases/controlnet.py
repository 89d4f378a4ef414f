"""Phase ``train_controlnet``: a ControlNet (Zhang et al. 2023) on the trained U-Net.

``diffusers.ControlNetModel.from_unet`` copies the U-Net's encoder and middle block and
adds zero-initialised convolutions, so training starts from the base model's exact
predictions; only the ControlNet learns, the U-Net, VAE and CLIP stay frozen. The
objective is the U-Net's own (``phases/unet.py``'s step, with the ControlNet's residuals
added to the frozen U-Net's blocks): same schedule, prediction target, min-SNR weights and
caption dropout, so the ControlNet also serves the unconditional half of guidance.

Each training image gives its control image on the loader threads (Canny edges,
``inference/control.py``: the detector ``kiln generate --control`` uses); images are
encoded by the VAE and captions by CLIP inside the step, as diffusers' ControlNet
example does, so the stage needs no latents of its own. The shared engine gives it
resume, data parallelism, EMA, the NaN guard and checkpoints.

After training, rank 0 measures whether the control works and the text still matters
(``evaluation/control.py``). Off by default (``train_controlnet.enabled``): the stage
then writes only a note of the skip, and registers nothing.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from training import backbones
from training import engine as E
from training import paths as P
from training.config import ControlNetCfg, Params
from training.engine import loaders
from training.engine.images import caption, decode_image, grid, to_tensor
from training.inference.control import CONTROL_FILE, edges, weights_fingerprint
from training.inference.sampling import trained_scheduler
from training.inference.text import encode_text
from training.phases.latent_cache import model_fingerprint
from training.phases.unet import make_step_fn

SKIPPED_FILE = "skipped.json"  # the note a disabled stage leaves instead of a model
PREVIEWS = 8  # val controls sampled at every preview


def build(unet: UNet2DConditionModel, vae_levels: int) -> ControlNetModel:
    """The ControlNet of ``unet``: its encoder's weights, and a control-image embedding
    whose ``vae_levels - 1`` stride-2 convolutions bring pixels to the latent grid."""
    widths = tuple(min(16 * 2**i, 256) for i in range(vae_levels))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)


def save_control_file(
    c: ControlNetCfg, unet_dir: Path, out_dir: Path, background: str = "#ffffff"
) -> None:
    """``CONTROL_FILE`` beside the ControlNet's weights: what its users need to draw as it
    was trained and evaluated (``background``: ``ingest.background``, what a user's
    transparent picture is laid on, as ingest laid the training pictures)."""
    detector = {
        "detector": c.detector, "canny_low": c.canny_low, "canny_high": c.canny_high,
        "background": background,
        "unet": weights_fingerprint(unet_dir),  # the U-Net it steers (kiln generate checks)
        # the scale its evaluation samples at: kiln generate's and the REST model's
        # default, so users get the scale the reported control scores are for
        "conditioning_scale": c.conditioning_scale,
    }  # fmt: skip
    (out_dir / CONTROL_FILE).write_text(json.dumps(detector, indent=2) + "\n")


def control_split(params: Params, source: str, tokenizer, train: bool = True):
    """Clean images with their control images and token ids: ``{"x", "control"}`` uint8
    ``[N, H, W, 3]``, ``"ids"``; for training in the stage's batch order, else read in
    order with the captions."""
    c = params.train_controlnet
    sizes = params.image_sizes()

    def decode(sample: dict) -> tuple[np.ndarray, np.ndarray, str]:
        img = decode_image(sample, sizes)
        return img, edges(img, c.canny_low, c.canny_high), caption(sample)

    local = threading.local()  # a tokenizer per thread: a shared one is not thread-safe

    def collate(rows: list) -> dict:
        if not hasattr(local, "tok"):
            local.tok = copy.deepcopy(tokenizer)
        texts = [r[2] for r in rows]
        out: dict = {
            "x": np.stack([r[0] for r in rows]),
            "control": np.stack([r[1] for r in rows]),
            "ids": encode_text(local.tok, texts, tensors="np").astype(np.int64),
        }
        if not train:
            out["caption"] = texts
        return out

    if not train:
        return loaders.Split(source, decode, collate)
    return loaders.make(
        c.loader, source, decode, collate, c.batch_size, params.seed, c.block_shards
    )


def control_tensor(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` maps -> float ``[N, 3, H, W]`` in [0, 1], as the pipeline
    prepares a control image."""
    return torch.as_tensor(u8).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def _preview_rows(params: Params, val: str, tokenizer) -> tuple[list, list[str]] | None:
    """The first few val images' control maps (as pictures) and captions."""
    from PIL import Image

    split = control_split(params, val, tokenizer, train=False)
    try:
        b = next(iter(split.scan(PREVIEWS, limit=PREVIEWS)), None)
    finally:
        split.close()
    if b is None:
        return None
    return [Image.fromarray(np.asarray(m)) for m in b["control"]], list(b["caption"])


def skip_note(out_dir: Path, reason: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SKIPPED_FILE).write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
    E.say(f"train_controlnet: skipped ({reason})")
    return {"skipped": reason}


def run(
    params: Params,
    clean: str | Path,
    vae_dir: Path,
    clip_dir: Path,
    unet_dir: Path,
    out_dir: Path,
    ckpt_dir: Path,
    log: E.MetricLogger | None = None,
) -> dict:
    """Train on ``clean/train`` against the frozen models in the folders given; measure
    on ``clean/val``; save to ``out_dir``."""
    log = log or E.NullLogger()
    c = params.train_controlnet
    if not c.enabled:
        return skip_note(out_dir, "train_controlnet.enabled is false")
    from training.phases.reuse import check_trained_on

    check_trained_on(unet_dir, {"vae": vae_dir, "clip": clip_dir})  # a U-Net of this VAE's
    torch.manual_seed(params.seed)
    bb = backbones.get("unet2d")
    tokenizer, encoder = bb.text_encoder(clip_dir)
    batches = control_split(params, f"{clean}/train", tokenizer)
    try:
        return _train(params, batches, (tokenizer, encoder), (vae_dir, clip_dir, unet_dir),
                      out_dir, ckpt_dir, log, f"{clean}/val")  # fmt: skip
    finally:
        batches.close()


def check_inputs(params: Params) -> None:
    """What ``run`` refuses first, checked before the stage adapter clears
    ``data/models/controlnet``: a refused run leaves the last ControlNet as it was."""
    from training.phases.reuse import check_trained_on

    if params.train_controlnet.enabled:
        check_trained_on(P.UNET, {"vae": P.VAE, "clip": P.CLIP})


def _train(params, batches, text, dirs, out_dir, ckpt_dir, log, val) -> dict:
    tokenizer, encoder = text
    vae_dir, _, unet_dir = dirs  # (vae, clip, unet) folders
    c = params.train_controlnet
    bb = backbones.get("unet2d")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    sched = trained_scheduler(unet_dir)
    for frozen in (vae, unet, encoder):
        frozen.requires_grad_(False)
    model = build(unet, len(vae.config.block_out_channels))
    n_params = sum(p.numel() for p in model.parameters())
    E.say(
        f"train_controlnet: {len(batches)} images, Canny {c.canny_low}/{c.canny_high}; "
        f"ControlNet {n_params / 1e6:.2f} M parameters on the frozen U-Net"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01)
    # a checkpoint resumes only into a run on the same data and the same frozen models,
    # the text encoder included (was: VAE and U-Net only, so a run with another CLIP
    # resumed a ControlNet trained on the first one's text states, and finished it)
    data_id = [batches.index.fingerprint(), *map(model_fingerprint, dirs)]
    trainer = E.stage_trainer(
        "train_controlnet", model, opt, c, params.seed, ckpt_dir, data_id, log, c.ema_decay
    )
    dev = trainer.device
    for frozen in (vae, unet, encoder):
        frozen.to(dev)
    with torch.no_grad():
        null = bb.text_states(encoder, encode_text(tokenizer, [""]).to(dev))
    null = {k: v[0].float().cpu() for k, v in null.items()}  # one, unbatched

    def encoded(step: int):
        b = batches.batch(step)  # this process's slice of the global batch
        with torch.no_grad():
            post = vae.encode(to_tensor(b["x"]).to(dev)).latent_dist
            states = bb.text_states(encoder, b["ids"].to(dev))
        cond = {k: v.float().cpu() for k, v in states.items()}
        cond["control"] = control_tensor(b["control"])  # never dropped: only the caption is
        return post.mean.float().cpu(), post.std.float().cpu(), cond

    def predict(controlnet, zt, t, cond):
        down, mid = controlnet(
            zt, t, encoder_hidden_states=cond["text"], controlnet_cond=cond["control"],
            return_dict=False,
        )  # fmt: skip
        return unet(
            zt, t, encoder_hidden_states=cond["text"],
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample  # fmt: skip

    scaling = float(vae.config.scaling_factor)
    step_fn = make_step_fn(params, model, sched, encoded, null, scaling, dev, predict=predict)
    shown = _preview_rows(params, val, tokenizer) if E.is_main() and c.preview_every else None
    (out_dir / "previews").mkdir(parents=True, exist_ok=True)

    def preview(step: int) -> None:
        # the EMA ControlNet on the val controls with their captions, the default
        # sampler: row 1 the controls, row 2 what the ControlNet makes of them
        from training.config import SAMPLER
        from training.inference.control import with_controlnet
        from training.inference.sampling import finite_images, make_scheduler

        ema = copy.deepcopy(model).eval()
        trainer.ema.copy_to(ema)
        sampler = make_scheduler(SAMPLER.scheduler, sched.config)
        pipe = with_controlnet(bb.assemble(vae, tokenizer, encoder, unet, sampler), ema)
        controls, captions = shown
        with torch.no_grad():
            arrays = pipe(
                prompt=captions,
                negative_prompt=[SAMPLER.negative_prompt] * len(captions),
                image=controls,
                num_inference_steps=SAMPLER.steps,
                guidance_scale=SAMPLER.guidance,
                generator=torch.Generator().manual_seed(params.seed),
                output_type="np",  # was "pil": NaN drawn black, the run going on
            ).images
        # the loss guard does not cover this: the VAE's decoder is no part of the loss
        images = finite_images(arrays, captions, f"train_controlnet: the preview at step {step}")
        path = out_dir / "previews" / f"step-{step:06d}.png"
        grid([*controls, *images], nrow=len(images), scale=2).save(path)
        log.log_image(path, "previews")

    every = c.preview_every if shown else 0
    summary = {**trainer.fit(step_fn, every=every, on_every=preview), **batches.stats()}
    if not E.is_main():  # data parallel: rank 0 measures and saves
        return summary
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)  # fit left the EMA weights
    save_control_file(c, unet_dir, out_dir, params.ingest.background)
    metrics = {"params": n_params, **summary}
    if c.eval_samples:
        from training.evaluation.control import evaluate_control

        split = control_split(params, val, tokenizer, train=False)
        with torch.no_grad():
            metrics.update(evaluate_control(params, dirs, model, out_dir, split, log))
    return metrics


def stage(params: Params, log: E.MetricLogger) -> dict:
    E.init_distributed()  # torch's threads; the process group under torchrun
    return run(
        params,
        loaders.split_source(P.CLEAN, "clean"),
        P.VAE,
        P.CLIP,
        P.UNET,
        P.CONTROLNET,
        P.CKPT / "train_controlnet",
        log,
    )
