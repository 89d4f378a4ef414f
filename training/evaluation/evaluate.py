"""Phase ``evaluate``: assemble the text-to-image pipeline, sample the evaluation prompt
set and score it.

Metrics (all offline, with Kiln's own models) come from the registry in
``training/evaluation/metrics/``: the attribute oracle of the built-in sets, CLIP score,
Fréchet distance and CMMD in CLIP image space, VAE reconstruction PSNR. Pictures
(``figures``): a sample grid, a guidance sweep, a denoising trajectory and a
steps-vs-quality table per scheduler; everything lands in one self-contained HTML
report. ``prompts.json`` lists the prompts sampled.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from training import engine as E
from training import paths as P
from training.config import Params
from training.evaluation.prompts import prompt_set, sample_requests


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_report(
    out: Path,
    metrics: dict,
    images: dict[str, Path],
    title: str,
    tables: dict[str, str] | None = None,
) -> Path:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
        if isinstance(v, float)
        else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
    )
    figs = "".join(
        f"<figure>{_img_tag(p)}<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, p in images.items()
    )
    figs += "".join(f"<h2>{html.escape(cap)}</h2>{table}" for cap, table in (tables or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}
img{{image-rendering:pixelated;max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>{html.escape(title)}</h1><h2>Metrics</h2><table>{rows}</table>{figs}</body></html>"""
    out.write_text(page)
    return out


def run(
    params: Params,
    clean_dir: Path,
    vae_dir: Path,
    clip_dir: Path,
    unet_dir: Path,
    out_dir: Path,
    log: E.MetricLogger | None = None,
    latents_dir: Path | None = None,
    controlnet_dir: Path | None = None,
) -> dict:
    """Sample, score and report; ``latents_dir`` (the precomputed val latents) adds the
    held-out denoising loss. A ControlNet in ``controlnet_dir`` trained on this U-Net
    ships with the pipeline (``pipeline/`` beside ``controlnet/``): the registered
    model then takes control images, and the report shows its evaluation."""
    from training.engine.images import grid
    from training.evaluation import guidance as G
    from training.evaluation import oracle as O
    from training.evaluation.metrics import Samples, score_all
    from training.inference import defaults, sampling

    log = log or E.NullLogger()
    c = params.evaluate
    from training.evaluation import ruler as R
    from training.phases.reuse import check_trained_on

    check_trained_on(unet_dir, {"vae": vae_dir, "clip": clip_dir})  # a U-Net of this VAE's
    ruler = R.resolve(params)  # checked before any sampling
    if ruler is not None:
        E.say(f"evaluate: fd_clip and cmmd_clip measured with the fixed ruler {c.ruler}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = sampling.assemble(vae_dir, clip_dir, unet_dir, scheduler=c.scheduler)
    pipe_dir = out_dir / "pipeline"
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    pipe = sampling.load(pipe_dir)  # evaluate exactly what was saved
    from training.inference import control

    E.say(f"evaluate: {control.ship(controlnet_dir, unet_dir, out_dir / P.SHIPPED_CONTROLNET)}")

    prompts = prompt_set(params, clean_dir)
    E.write_json(out_dir / "prompts.json", [p.prompt for p in prompts])
    metrics: dict = {}
    tables: dict[str, str] = {}
    guidance, start = G.adopt(
        params, pipe, clean_dir, ruler[0] if ruler else clip_dir, clip_dir, metrics, tables,
    )  # fmt: skip
    # the registered pipeline carries the guidance it was evaluated at: its callers' default
    E.write_json(
        pipe_dir / defaults.SAMPLER_FILE,
        {"guidance": guidance, "guidance_start": start, "source": metrics["guidance_source"]},
    )
    requests = sample_requests(params, prompts, guidance, start)
    truths = [p for _ in range(c.samples_per_prompt) for p in prompts]
    E.say(
        f"evaluate: {len(requests)} samples ({len(prompts)} prompts x "
        f"{c.samples_per_prompt}), {c.scheduler} {c.steps} steps, guidance "
        f"{G.describe(guidance, start)}"
    )
    import time

    t0 = time.perf_counter()
    images = sampling.generate(pipe, requests, batch_size=c.batch_size)
    gen_s = time.perf_counter() - t0

    metrics.update({"samples": len(images), "images_per_s": len(images) / gen_s})
    oracle = O.grader(params)
    samples = Samples(
        params=params,
        images=images,
        prompts=[r.prompt for r in requests],
        truths=truths,
        oracle=oracle,
        clean_dir=clean_dir,
        vae_dir=vae_dir,
        clip_dir=clip_dir,
        ruler_dir=ruler[0] if ruler else None,
    )
    if ruler is not None:  # a string: the report and metrics JSON show it, MLflow does not
        metrics["ruler"] = ruler[1]
    metrics.update(score_all(samples))
    champion = champion_scores(samples, requests, c.batch_size, pipe_dir)
    metrics.update(champion.pop("metrics", {}))
    from training.evaluation import figures as X

    copies = [(images[i], px, d) for i, px, d in metrics.pop("memorisation_pairs", [])]
    if latents_dir is not None and params.train_unet.val_samples:
        metrics.update(_held_out(params, pipe, unet_dir, latents_dir))

    for k, why in metrics.items():
        if k.endswith("_skipped"):
            E.say(f"evaluate: {k.removesuffix('_skipped')} skipped: {why}")

    figures: dict[str, Path] = {}
    if oracle is None:  # user data: the prompts are val captions, each has a real image
        # the first 24 distinct ones (a caption repeats as often as FD compares it)
        first = {p.prompt: i for i, p in reversed(list(enumerate(prompts)))}
        shown = sorted(first.values())[:24]
        real = _real_by_caption(clean_dir, {prompts[i].prompt for i in shown})
        tables["Val captions: the real image, then the samples from its caption"] = (
            X.captions_table(
                [
                    (
                        prompts[i].prompt,
                        real.get(prompts[i].prompt),
                        [images[j * len(prompts) + i] for j in range(c.samples_per_prompt)],
                    )
                    for i in shown
                ]
            )
        )
    tables[
        f"Memorisation: samples within {c.copy_distance:g} RMS of a training image "
        f"({metrics.get('copies', 0)} of {len(images)}; real val images: "
        f"{metrics.get('copies_frac_val', float('nan')):.1%})"
    ] = X.copies_table(copies, c.copy_distance)
    if c.sweep_prompts:
        stride = max(1, len(prompts) // c.sweep_prompts)
        subset = prompts[::stride][: c.sweep_prompts]
        sweep = out_dir / "guidance_sweep.png"
        X.guidance_sweep(
            pipe, [p.prompt for p in subset[:6]], c.sweep_guidance, params.seed, c.steps,
            c.negative_prompt,
        ).save(sweep)  # fmt: skip
        figures[
            "Guidance sweep: columns are guidance "
            + ", ".join(f"{g:g}" for g in c.sweep_guidance)
            + "; rows: "
            + "; ".join(p.prompt for p in subset[:6])
        ] = sweep
        traj = out_dir / "trajectory.png"
        X.trajectory(
            pipe, subset[0].prompt, params.seed, c.steps, guidance, start, c.negative_prompt
        ).save(traj)
        figures[
            f"Denoising trajectory of '{subset[0].prompt}' ({c.scheduler}, {c.steps} steps): "
            "top, the noisy latents after each step; bottom, the sampler's clean estimate"
        ] = traj
        rows = X.steps_table(
            pipe, subset, c.sweep_steps, guidance, params.seed, oracle, clip_dir, start,
            c.negative_prompt,
        )  # fmt: skip
        E.write_json(out_dir / "steps_table.json", rows)
        tables[
            f"Steps vs quality per scheduler ({len(subset)} prompts, guidance "
            f"{G.describe(guidance, start)})"
        ] = X.table_html(rows)
        for path in (sweep, traj, out_dir / "steps_table.json"):
            log.log_image(path)

    n_show = min(len(prompts), 24)
    rows = [
        images[j * len(prompts) + i] for i in range(n_show) for j in range(c.samples_per_prompt)
    ]
    grid_path = out_dir / "samples.png"
    grid(rows, nrow=c.samples_per_prompt * 4, scale=3).save(grid_path)
    log.log_image(grid_path)
    if champion.get("images"):  # the gate's other side, on the same prompts and seeds
        theirs = champion["images"]
        champ_rows = [
            theirs[j * len(prompts) + i] for i in range(n_show) for j in range(c.samples_per_prompt)
        ]
        champ_path = out_dir / "champion_samples.png"
        grid(champ_rows, nrow=c.samples_per_prompt * 4, scale=3).save(champ_path)
        log.log_image(champ_path)
        figures = {
            f"The champion (v{metrics['champion_version']}), re-scored in this run: the same "
            f"prompts and seeds, at its own guidance "
            f"{G.describe(metrics['champion_guidance'], metrics['champion_guidance_start'])}": (
                champ_path
            ),
            **figures,
        }
    shipped = out_dir / P.SHIPPED_CONTROLNET
    if (shipped / "control_eval.json").is_file():
        cn = json.loads((shipped / "control_eval.json").read_text())
        scores = ", ".join(
            f"{k} {cn[f'base_{k}']:.2f} -> {cn[f'controlnet_{k}']:.2f}"
            for k in ("shape", "size", "position", "colour")
            if f"controlnet_{k}" in cn
        )
        figures[
            "ControlNet (shipped with this pipeline; train_controlnet's evaluation on val "
            "images). Each row: the control (a val image's edges), that image, the base "
            "model, the base model with the ControlNet, on a prompt that changes only the "
            f"colour. Base -> with ControlNet: {scores or 'no oracle for this data'}. Rows: "
            + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(cn["prompts"]))
        ] = shipped / "control_eval.png"
    legend = "; ".join(
        f"row {i // 4 + 1}.{i % 4 + 1}: {p.prompt}" for i, p in enumerate(prompts[:n_show])
    )
    write_report(
        out_dir / "report.html",
        metrics,
        {f"Samples ({legend})": grid_path, **figures},
        title=f"Kiln evaluation — {params.ingest.dataset}, profile {params.profile}",
        tables=tables,
    )
    summary = {
        k: (f"{v:.3f}" if isinstance(v, float) else v)
        for k, v in metrics.items()
        if k
        in (
            "guidance",
            "guidance_start",
            "acc_all",
            "acc_all_seen",
            "acc_all_held_out",
            "clip_score",
            "vae_psnr",
            "ceiling_acc_all_vae_recon",
            "fd_clip",
            "cmmd_clip",
            "val_loss",
            "copies_frac",
            "copies_frac_val",
        )
    }
    E.say(f"evaluate: {summary}")
    return metrics


# What the champion is re-scored on: the metrics of its samples (not the VAE's
# reconstructions, which are this run's VAE's, nor the held-out loss on this run's latents)
SAMPLE_METRICS = ("oracle_accuracy", "clip_score", "distribution", "memorisation")


def champion_scores(samples, requests: list, batch_size: int, pipe_dir: Path | None = None) -> dict:
    """The registered ``@champion`` pipeline sampled and scored exactly as this run's
    was: the same requests (prompts, seeds, steps), this run's sampler, the same metric
    code, scoring CLIP and reference images; each pipeline at the guidance it is served
    at (``inference/defaults.py``: chosen by its own evaluation). So the promotion gate compares
    two numbers measured side by side, not this run's against one recorded under other
    prompts, another sampler or older code (``tracking/gate.py``, ``promote``).
    ``{"metrics": {"champion_version": N, "champion.<metric>": value, ...}, "images":
    [...]}``, or ``{}`` when there is no champion yet.

    When the gate already judged these weights (``pipe_dir``'s) and a stop kept their
    registration from finishing (``tracking/resume.py``), the re-run does not judge them
    again; it re-scores the champion they were judged against, whom the card compares
    them with, not the current ``@champion``: that may be this very version."""
    import dataclasses

    from training.evaluation.metrics import METRICS
    from training.inference import defaults, sampling
    from training.stages import PIPELINE_MODEL
    from training.tracking import components, resume

    version = components.champion(PIPELINE_MODEL)
    pending = judged = None
    if pipe_dir is not None:
        pending = resume.unfinished(PIPELINE_MODEL, resume.weights_fingerprint(pipe_dir))
        judged = resume.recorded_decision(pending) if pending is not None else None
    if pending is not None and judged is not None:
        version = judged.get("gate_champion_version")
        E.say(
            f"evaluate: these weights are {PIPELINE_MODEL} v{pending.version}, judged "
            f"@{judged['gate_decision']} against {f'v{version}' if version else 'no champion'} "
            "before a stop: re-scoring that one, as its card compares them"
        )
    if version is None:
        return {}
    c = samples.params.evaluate
    E.say(f"evaluate: re-scoring the champion {PIPELINE_MODEL} v{version} on the same requests")
    out: dict = {"champion_version": int(version)}
    try:
        root, _ = components.fetch(f"models:/{PIPELINE_MODEL}/{version}")
        pipe = sampling.load(root / "artifacts" / "pipeline")
        sampling.set_scheduler(pipe, c.scheduler)
        # at the guidance it is served at (its evaluation chose it), as this run is
        own = defaults.recommended(root / "artifacts" / "pipeline")
        out["champion_guidance"] = own.guidance
        out["champion_guidance_start"] = own.guidance_start
        requests = [
            dataclasses.replace(r, guidance=own.guidance, guidance_start=own.guidance_start)
            for r in requests
        ]
        images = sampling.generate(pipe, requests, batch_size=batch_size)
        # its copies are judged against training images drawn through its own VAE: a
        # perfect copy is ~0 from its own rendering, but ~0.03 from another VAE's, over
        # the copy distance (was: this run's VAE, and a memorising champion read 0.05
        # copies_frac where its own VAE reads 1.0)
        theirs = dataclasses.replace(
            samples, images=images, vae_dir=root / "artifacts" / "pipeline" / "vae"
        )
        for name in SAMPLE_METRICS:
            for k, v in METRICS[name](theirs).items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"champion.{k}"] = v
    except ConnectionError:
        raise  # the registry went away: a retry may help, a fallback would hide it
    except (ValueError, RuntimeError, OSError, LookupError) as exc:
        # e.g. another profile's pipeline, or an artifact store that lost its files
        # the gate then uses the number recorded with the champion, and says so
        out["champion_skipped"] = f"could not re-score v{version}: {str(exc)[:300]}"
        return {"metrics": out}
    return {"metrics": out, "images": images}


def _real_by_caption(clean_dir: Path, captions: set[str]) -> dict:
    from training.intake import shards

    found: dict = {}
    for r in shards.read(shards.shard_paths(clean_dir / "val")):
        if r.caption in captions and r.caption not in found:
            found[r.caption] = r.image()
            if len(found) == len(captions):
                break
    return found


def _held_out(params: Params, pipe, unet_dir: Path, latents_dir: Path) -> dict:
    """The held-out denoising loss of the pipeline's U-Net, as train_unet measures it
    (the same val latents, timesteps and noise): the registered version carries it."""
    import json

    from training import backbones
    from training.evaluation.heldout import denoising_loss, val_batches
    from training.inference.sampling import trained_scheduler

    c = params.train_unet
    scaling = json.loads((latents_dir / "manifest.json").read_text())["vae"]["scaling_factor"]
    sched = trained_scheduler(unet_dir)
    batches = val_batches(str(latents_dir / "val"), c.val_samples)
    bb = backbones.of_pipeline(pipe)
    net = backbones.denoiser(pipe)
    return denoising_loss(net, sched, batches, scaling, c.val_timesteps, pipe.device, bb.predict)


def check_inputs(params: Params) -> None:
    """What ``run`` refuses first, checked before the stage adapter clears
    ``data/eval``: a refused run leaves the last evaluation as it was."""
    from training.evaluation import ruler as R
    from training.phases.reuse import check_trained_on

    check_trained_on(P.UNET, {"vae": P.VAE, "clip": P.CLIP})
    R.resolve(params)


def stage(params: Params, log: E.MetricLogger) -> dict:
    E.init_distributed()  # torch's threads; the process group under torchrun
    return run(
        params, P.CLEAN, P.VAE, P.CLIP, P.UNET, P.EVAL, log,
        latents_dir=P.LATENTS, controlnet_dir=P.CONTROLNET,
    )  # fmt: skip
