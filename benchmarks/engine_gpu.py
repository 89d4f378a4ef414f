"""The data engine on a GPU: does one process's streaming loader keep the denoiser fed?

Usage (from the repository root, on a machine with a CUDA GPU; ``--device cpu`` with
``--profiles tiny`` is a dry run of the script itself):
    python benchmarks/engine_gpu.py [--profiles small base] [--samples 8192]
        [--backbones unet2d dit] [--steps 10] [--rounds 3] [--dir /tmp/kiln-engine-gpu]

For each profile it writes a latents split laid out as ``precompute_latents`` writes it
(random values in the profile's shapes: posterior mean and std, 16-bit text states of
the CLIP's longest context and a pooled vector, 2,000 samples a safetensors shard), then
measures, in this one process:

1. **The loader alone.** ``train_unet``'s own ``latent_split`` with ``loader: stream``
   and ``loader: memory`` at the profile's batch size, batches read back to back and
   made float as the step makes them (the stream loader with its look-ahead and
   ``KILN_LOADER_THREADS`` decode threads). Samples/s, and the time before the first
   batch (the memory loader reads the whole split then). The stream loader is measured
   twice: from the page cache (the split was just written) and, where the machine lets
   root drop the page cache, cold from the disk.
2. **Training.** Kiln's ``Trainer.fit`` (bf16 autocast, EMA, deferred NaN guard) on the
   step ``train_unet`` builds (``make_step_fn``), fed by each loader; rounds alternate
   between the loaders so drift hits both. Images/s per backbone and the stream/memory
   ratio: the issue's criterion is the ratio, not the absolute number.

"GPUs one process feeds" = the loader's samples/s / the training's images/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.unet_gpu import NoCheckpoints  # noqa: E402
from tests.loaderkit import latents_dir  # noqa: E402
from training import config  # noqa: E402
from training import engine as E  # noqa: E402
from training.backbones import TextDims  # noqa: E402
from training.env import loader_threads  # noqa: E402
from training.phases import clip, unet, vae  # noqa: E402

LOADERS = ("memory", "stream")


def profile_params(profile: str, **unet_knobs) -> config.Params:
    return config.resolve({"profile": profile, "train_unet": unet_knobs})


def with_unet(params: config.Params, **knobs) -> config.Params:
    """``params`` with these ``train_unet`` settings (the loader, the backbone)."""
    return params.model_copy(update={"train_unet": params.train_unet.model_copy(update=knobs)})


def latent_shapes(params: config.Params) -> tuple[tuple[int, int, int], tuple[int, int], int]:
    """(latent (c, h, w), text states (length, width), pooled width) for the profile."""
    with torch.device("meta"):
        ae = vae.build(params)
        context = clip.context_bound(params.train_clip)  # the longest the data may ask for
        model = clip.build(params, 1000, context)
    size = params.ingest.image_size // 2 ** (len(params.train_vae.block_out_channels) - 1)
    latent = (ae.config.latent_channels, size, size)
    text = (context, model.text_model.config.hidden_size)
    return latent, text, model.config.projection_dim


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages (root only); True if it took."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def loader_alone(params: config.Params, source: str, loader: str, steps: int) -> dict:
    p = with_unet(params, loader=loader)
    t0 = time.perf_counter()
    split = unet.latent_split(p, source)
    first = split.batch(0)
    ready = time.perf_counter() - t0
    n = len(first["mean"])
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        b = split.batch(step)
        for k in ("mean", "std", "text", "pooled"):
            if k in b:
                b[k].float()
    rate = n * steps / (time.perf_counter() - t0)
    split.close()
    return {"first_batch_s": ready, "samples_per_s": rate}


def trainer_run(params: config.Params, backbone: str, source: str, dev: torch.device):
    """``run(steps) -> s/step`` per loader for one model; both loaders train the same
    model in turn (a throughput measurement: the weights' values do not matter)."""
    c = params.train_unet
    p = with_unet(params, backbone=backbone)
    latent, text, pooled = latent_shapes(p)
    model = unet.build(p, latent[0], latent[1], TextDims(hidden=text[1], pooled=pooled)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01)
    ema = E.EMA(model, c.ema_decay)
    null = {"text": torch.zeros(1, *text), "pooled": torch.zeros(1, pooled)}
    splits = {}
    fns = {}
    for loader in LOADERS:
        split = splits[loader] = unet.latent_split(with_unet(p, loader=loader), source)

        def precomputed(step: int, split=split):
            b = split.batch(step)
            return (
                b["mean"].float(),
                b["std"].float(),
                {"text": b["text"].float(), "pooled": b["pooled"].float()},
            )

        fns[loader] = unet.make_step_fn(
            p, model, unet.noise_scheduler(p), precomputed, null, 1.0, dev
        )
    done = {"n": 0}

    def run(loader: str, steps: int) -> float:
        loop = E.LoopCfg(
            steps=steps, lr=c.lr, warmup_steps=c.warmup_steps, grad_clip=c.grad_clip,
            batch_size=c.batch_size, checkpoint_every=10**9, log_every=10**9,
        )  # fmt: skip
        trainer = E.Trainer("bench", model, opt, loop, NoCheckpoints(), ema=ema, device=dev)
        start = done["n"]  # NoCheckpoints restores to step 0: carry on the step count
        done["n"] += steps
        sync(dev)
        t0 = time.perf_counter()
        trainer.fit(lambda step: fns[loader](start + step))
        sync(dev)
        model.train()
        return (time.perf_counter() - t0) / steps

    n = sum(x.numel() for x in model.parameters())
    return run, splits, n


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", nargs="+", default=["small", "base"])
    ap.add_argument("--backbones", nargs="+", default=["unet2d", "dit"])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loader-steps", type=int, default=30)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-engine-gpu"))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("engine_gpu.py needs a CUDA GPU (or --device cpu for a dry run)")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
    print(
        f"{name}, torch {torch.__version__}, {os.cpu_count()} CPUs, {loader_threads()} "
        f"loader threads; {args.samples} samples a split; training: {args.rounds} rounds x "
        f"{args.steps} steps per loader after a warm-up (medians)\n",
        flush=True,
    )
    loader_rows, train_rows = [], []
    for profile in args.profiles:
        params = profile_params(profile)
        latent, text, pooled = latent_shapes(params)
        root = args.dir / profile
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        latents_dir(root, args.samples, latent=latent, text=text, pooled=pooled)
        size_gb = sum(f.stat().st_size for f in (root / "train").iterdir()) / 1e9
        print(
            f"{profile}: latents {latent}, text {text} + pooled {pooled}; wrote "
            f"{size_gb:.2f} GB in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        source = str(root / "train")
        batch = params.train_unet.batch_size
        cases = [("stream", "page cache"), ("memory", "page cache")]
        if drop_page_cache():
            cases.insert(0, ("stream", "cold (page cache dropped)"))
        for loader, where in cases:
            r = loader_alone(params, source, loader, args.loader_steps)
            loader_rows.append((profile, batch, loader, where, r))
            print(f"  loader {loader} ({where}): {r}", flush=True)
        for backbone in args.backbones:
            torch.manual_seed(0)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            run, splits, n = trainer_run(params, backbone, source, dev)
            for loader in LOADERS:
                run(loader, max(3, args.steps // 2))  # warm-up: kernels, the memory load
            times = {k: [] for k in LOADERS}
            for r in range(args.rounds):
                for loader in LOADERS if r % 2 == 0 else LOADERS[::-1]:
                    times[loader].append(run(loader, args.steps))
            ips = {k: batch / statistics.median(v) for k, v in times.items()}
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
            train_rows.append((profile, backbone, n, batch, ips, peak))
            print(f"  train {backbone} ({n / 1e6:.0f} M): {ips}, peak {peak:.1f} GiB", flush=True)
            for s in splits.values():
                s.close()
            del run, splits
        shutil.rmtree(root, ignore_errors=True)

    print("\n| profile | loader | read from | first batch | samples/s (1 process) |")
    print("|---|---|---|---:|---:|")
    for profile, batch, loader, where, r in loader_rows:
        print(
            f"| {profile} (batch {batch}) | {loader} | {where} | {r['first_batch_s']:.2f} s "
            f"| {r['samples_per_s']:.0f} |"
        )
    print(
        "\n| profile | backbone | images/s, memory | images/s, stream | stream / memory "
        "| GPUs one stream process feeds | peak GPU memory |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for profile, backbone, n, batch, ips, peak in train_rows:
        worst_stream = min(  # cold from disk where it was measured
            r["samples_per_s"] for p, _, ld, _, r in loader_rows if p == profile and ld == "stream"
        )
        print(
            f"| {profile} (batch {batch}) | {backbone} ({n / 1e6:.0f} M) | {ips['memory']:.0f} "
            f"| {ips['stream']:.0f} | {ips['stream'] / ips['memory']:.2f}x "
            f"| {worst_stream / ips['stream']:.1f} | {peak:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
