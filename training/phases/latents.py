"""Phase ``precompute_latents``: encode every clean sample once, for the U-Net to reuse.

Per sample: the VAE posterior mean and std (so training can *sample* latents, as the
VAE's KL term intends, instead of freezing one draw) and the CLIP text states for its
caption, made exactly as the backbone's pipeline makes prompt embeddings (padded to max
length, no attention mask; ``training/backbones/``: the last hidden states for the
U-Net, the penultimate ones and the pooled projection for the DiT), stored as
``text_dtype`` (16-bit by default). Streamed batch by batch into safetensors shards
under ``train/`` and ``val/``, each split with the training loaders' ``index.json``, so
memory is flat in dataset size; under ``KILN_NPROC=N`` the clean shards are split by
node and then by DataLoader worker (``run``). ``manifest.json`` records counts, shapes,
dtypes and the fingerprints of the models and data they came from;
``null_text.safetensors`` is the empty-prompt embedding used for caption dropout.

Incremental: ``data/latents`` persists, and a row already encoded by the same VAE and
CLIP (by its image bytes and caption) is copied from the last output instead of encoded
again (``phases/latent_cache.py``); the metrics count ``latents_encoded`` and
``latents_reused``, and ``latents_cache_files_rejected`` the old files left out because
they are not the files their split's ``index.json`` names (their rows are encoded again).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from training import backbones
from training import engine as E
from training import paths as P
from training.config import Params
from training.disk import replace_dir, restore_dir
from training.inference.text import encode_text
from training.intake.index import write_index
from training.phases.latent_cache import (
    MADE_BY,
    LatentCache,
    code_fingerprint,
    content_key,
    keep_partial,
    model_fingerprint,
    rows_meta,
)

PREVIEW_PROMPTS = 8


def preview_prompts(params: Params, val_captions: list[str]) -> list[str]:
    """The few fixed prompts ``train_unet`` samples while it trains: a seeded spread of
    the built-in set's evaluation prompts, or the first distinct validation captions."""
    ds = params.oracle()
    if ds is None:
        return list(dict.fromkeys(val_captions))[:PREVIEW_PROMPTS]
    from training.intake.builtin import eval_prompts

    prompts = list(dict.fromkeys(p.prompt for p in eval_prompts(ds)))
    pick = np.random.default_rng(params.seed).permutation(len(prompts))[:PREVIEW_PROMPTS]
    return [prompts[i] for i in sorted(pick)]


def shard_batches(records: Iterator, size: int) -> Iterator[dict]:
    """Batches of decoded samples that never cross a shard boundary, so how a shard is
    batched, and so its latents, do not depend on which process or worker read it."""
    batch: list = []
    for r in records:
        if batch and (r.shard != batch[0].shard or len(batch) == size):
            yield _decoded(batch, last=r.shard != batch[0].shard)
            batch = []
        batch.append(r)
    if batch:
        yield _decoded(batch, last=True)


def _decoded(batch: list, last: bool) -> dict:
    info = torch.utils.data.get_worker_info()
    return {
        "shard": batch[0].shard,
        "last": last,  # the shard's final batch: its writer can close
        "worker": info.id if info else 0,
        "keys": [r.key for r in batch],
        "content": [content_key(r.image_bytes, r.caption) for r in batch],
        "captions": [r.caption for r in batch],
        "pixels": np.stack([np.asarray(r.image(), dtype=np.uint8) for r in batch]),
    }


class _ShardBatches(torch.utils.data.IterableDataset):
    """This process's shards (split by node), dealt out to the DataLoader's workers
    (split by worker), which read and decode them in parallel."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __iter__(self) -> Iterator[dict]:
        from training.intake import shards

        return shard_batches(shards.read(self.paths, split=True), self.size)


def _as_is(item: dict) -> dict:
    return item


class _ShardWriter:
    """Latents of one input shard: ``{split}-SSSSS-KKK.safetensors`` files of at most
    ``per_shard`` samples (SSSSS: the input shard's position in the sorted list), each
    written to a temp name and renamed, so a crash never leaves a partial file."""

    def __init__(self, out_dir: Path, split: str, shard_no: int, per_shard: int):
        self.out_dir, self.per_shard = out_dir / split, per_shard
        self.prefix = f"{split}-{shard_no:05d}"
        self.files: dict[str, int] = {}
        self.captions: list[str] = []  # kept for val: the preview prompts come from them
        self.keys: list[str] = []
        self.content: list[str] = []  # each row's content key (phases/latent_cache.py)
        self.buf: dict[str, list[torch.Tensor]] = {}

    def add(self, keys: list[str], content: list[str], **tensors: torch.Tensor) -> None:
        self.keys.extend(keys)
        self.content.extend(content)
        for name, t in tensors.items():
            self.buf.setdefault(name, []).append(t)
        if len(self.keys) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in self.buf.items()}
        name = f"{self.prefix}-{len(self.files):03d}.safetensors"
        tmp = self.out_dir / f".{name}.tmp"
        save_file(tensors, tmp, metadata=rows_meta(self.keys, self.content))
        tmp.replace(self.out_dir / name)
        self.files[name] = len(self.keys)
        self.keys, self.content, self.buf = [], [], {}


@torch.no_grad()
def _text(bb, tokenizer, encoder, captions: list[str]) -> dict[str, torch.Tensor]:
    """The backbone's text tensors for ``captions``, in float32 on the CPU."""
    ids = encode_text(tokenizer, captions).to(encoder.device)
    return {k: v.float().cpu() for k, v in bb.text_states(encoder, ids).items()}


def run(params: Params, clean_dir: Path, vae_dir: Path, clip_dir: Path, out_dir: Path) -> dict:
    """Encode every clean sample. Under ``KILN_NPROC=N`` (torchrun) each process encodes
    its share of the shards and ``precompute_latents.workers`` DataLoader workers per
    process read and decode them; rank 0 then writes the manifest. The files and their
    contents are the same for any N and any number of workers (up to float rounding of
    a different thread count), because batches never cross an input shard."""
    from tqdm.auto import tqdm

    from training.engine.images import to_tensor
    from training.intake import shards

    c = params.precompute_latents
    for split in ("train", "val"):  # before any model loads or any file is moved
        check_clean(clean_dir / split)
    # the old output is the cache (and stays whole until the new one is complete)
    old_dir, out_dir = out_dir, out_dir.with_name(f".{out_dir.name}.new")
    partial = old_dir.with_name(f".{old_dir.name}.partial")  # an interrupted run's rows
    bb = backbones.get(params.train_unet.backbone)  # which text states its pipeline feeds
    fps = model_fingerprint(vae_dir), model_fingerprint(clip_dir)
    made_by = {"vae": fps[0], "clip": fps[1], "code": code_fingerprint(), "backbone": bb.name}
    if E.is_main():  # the staging folder empty, what a killed run finished kept aside
        restore_dir(old_dir, old_dir.with_name(f".{old_dir.name}.old"))  # killed mid-swap
        keep_partial(out_dir, partial, {**made_by, "text_dtype": c.text_dtype})
    E.barrier()  # rank 0 has cleared the staging folder before anyone writes
    dev = E.device()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(dev)
    tokenizer, encoder = bb.text_encoder(clip_dir)
    encoder.to(dev)
    for split in ("train", "val"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    text_dtype = getattr(torch, c.text_dtype)
    cache = LatentCache(old_dir, *fps, c.text_dtype, bb.name, made_by["code"], partial)
    if E.is_main():
        E.say(f"precompute_latents: reusable: {cache.reason}")
        for f, why in cache.rejected.items():  # checked against their index (latent_cache)
            E.say(f"precompute_latents: not reusing {f}: {why}; its rows are encoded again")
    # what this process wrote: files, counts, captions, who; rows encoded and reused
    part: dict = {"truncated": {}, "encoded": 0}
    context = tokenizer.model_max_length
    for split in ("train", "val"):
        cut = 0  # captions longer than the text encoder's context: counted, never silent
        paths = shards.shard_paths(clean_dir / split)
        shard_no = {str(path): i for i, path in enumerate(paths)}
        loader = torch.utils.data.DataLoader(
            _ShardBatches(paths, c.batch_size),
            batch_size=None,
            num_workers=c.workers,
            collate_fn=_as_is,
        )
        writers: dict[str, _ShardWriter] = {}
        files: dict[str, dict] = {}
        bar = tqdm(desc=f"latents/{split}", unit="img", mininterval=5, disable=not E.is_main())
        with torch.no_grad():
            for b in loader:
                w = writers.get(b["shard"])
                if w is None:
                    w = writers[b["shard"]] = _ShardWriter(
                        out_dir, split, shard_no[b["shard"]], c.samples_per_shard
                    )
                rows = [cache.get(k) for k in b["content"]]
                todo = [i for i, row in enumerate(rows) if row is None]
                if todo:  # through the VAE and the text encoder: what the cache lacks
                    post = vae.encode(to_tensor(b["pixels"][todo]).to(dev)).latent_dist
                    text = _text(bb, tokenizer, encoder, [b["captions"][i] for i in todo])
                    new = {"mean": post.mean.cpu(), "std": post.std.cpu()}
                    new.update({k: v.to(text_dtype) for k, v in text.items()})
                    for j, i in enumerate(todo):
                        rows[i] = {k: v[j : j + 1] for k, v in new.items()}
                    part["encoded"] += len(todo)
                lengths = map(len, tokenizer(b["captions"], truncation=False).input_ids)
                cut += sum(n > context for n in lengths)
                w.add(
                    b["keys"],
                    b["content"],
                    **{k: torch.cat([r[k] for r in rows]) for k in rows[0]},
                )
                if split == "val":
                    w.captions.extend(b["captions"])
                if b["last"]:
                    w.flush()
                    who = f"rank {E.rank()} worker {b['worker']}"  # one worker per shard
                    for name, n in w.files.items():
                        files[name] = {"count": n, "by": who}
                    if w.captions:  # val: in input order, for the preview prompts
                        files[next(iter(w.files))]["captions"] = w.captions
                    del writers[b["shard"]]
                bar.update(len(b["keys"]))
        bar.close()
        if writers:  # every shard ends with a batch marked last
            raise RuntimeError(f"latents: shards left unfinished: {sorted(writers)}")
        part[split] = files
        part["truncated"][split] = cut
    part["reused"], part["rejected"] = cache.hits, len(cache.rejected)
    E.write_json(out_dir / f".part-{E.rank()}.json", part)
    E.barrier()  # every process's files and part are written
    if not E.is_main():
        return {}
    models = (vae_dir, clip_dir, fps, vae, tokenizer, encoder, bb)
    metrics = _write_manifest(params, clean_dir, models, out_dir)
    (out_dir / MADE_BY).unlink()  # the manifest says it for the finished output
    replace_dir(out_dir, old_dir, old_dir.with_name(f".{old_dir.name}.old"))
    shutil.rmtree(partial, ignore_errors=True)
    return metrics


def _write_manifest(params: Params, clean_dir: Path, models: tuple, out_dir: Path) -> dict:
    """Rank 0: merge the processes' parts into ``manifest.json`` (files in input order),
    and write the empty-prompt and preview-prompt text states. ``models``: the VAE and
    CLIP folders, their fingerprints, the VAE, the tokenizer and the text encoder."""
    import json

    vae_dir, clip_dir, (vae_fp, clip_fp), vae, tokenizer, encoder, bb = models
    parts = sorted(out_dir.glob(".part-*.json"))
    merged: dict[str, dict] = {"train": {}, "val": {}}
    truncated = {"train": 0, "val": 0}
    counts = {"encoded": 0, "reused": 0}
    rejected = 0  # old files left out: every process checks them all, so the same count
    for path in parts:
        part = json.loads(path.read_text())
        rejected = max(rejected, part.pop("rejected"))
        for k in counts:
            counts[k] += part.pop(k)
        for split, n in part.pop("truncated").items():
            truncated[split] += n
        for split, files in part.items():
            merged[split].update(files)
        path.unlink()
    manifest: dict = {
        "vae": {
            "path": str(vae_dir),
            "fingerprint": vae_fp,
            "scaling_factor": vae.config.scaling_factor,
        },
        "clip": {"path": str(clip_dir), "fingerprint": clip_fp},
        "backbone": bb.name,  # whose pipeline's text states these are
        "code": code_fingerprint(),  # the code that made the rows (latent_cache.ROW_CODE)
        "splits": {},
    }
    by_process: dict[str, list[str]] = {}
    for split, files in merged.items():
        names = sorted(files)
        for name in names:
            by_process.setdefault(files[name]["by"], []).append(name)
        bucket = clean_buckets(clean_dir / split)  # a latent file's bucket is its shard's
        buckets = {n: bucket[int(n.split("-")[1])] for n in names}
        manifest["splits"][split] = {
            "count": sum(files[n]["count"] for n in names),
            "shards": len(names),
            "data_fingerprint": index_fingerprint(clean_dir / split),
            "captions_truncated": truncated[split],
        }
        if len(set(buckets.values())) > 1:
            manifest["splits"][split]["buckets"] = {
                b: sum(files[n]["count"] for n in names if buckets[n] == b)
                for b in dict.fromkeys(buckets.values())
            }
        write_index(out_dir / split, {n: files[n]["count"] for n in names}, split, buckets)
    val = merged["val"]
    val_captions = [cap for n in sorted(val) for cap in val[n].get("captions", [])]
    null = _text(bb, tokenizer, encoder, [""])
    save_file({k: v[0].contiguous() for k, v in null.items()}, out_dir / "null_text.safetensors")
    manifest["preview_prompts"] = preview_prompts(params, val_captions)
    preview = _text(bb, tokenizer, encoder, manifest["preview_prompts"])
    save_file({k: v.contiguous() for k, v in preview.items()}, out_dir / "preview_text.safetensors")
    first = load_file(next(iter(sorted((out_dir / "train").glob("*.safetensors")))))
    manifest["tensors"] = {
        k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in first.items()
    }
    # the latent at the square image size (the U-Net's sample size), whichever bucket
    # the first file holds
    side = params.ingest.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    for k in ("mean", "std"):
        manifest["tensors"][k]["shape"] = [vae.config.latent_channels, side, side]
    E.write_json(out_dir / "manifest.json", manifest)
    E.say(
        f"precompute_latents: {manifest['splits']['train']['count']} train, "
        f"{manifest['splits']['val']['count']} val; latent {manifest['tensors']['mean']['shape']}"
        f", text {manifest['tensors']['text']['shape']}"
    )
    total = manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]
    if sum(truncated.values()):
        E.say(
            f"precompute_latents: warning: {sum(truncated.values())} of {total} captions are "
            f"longer than the text encoder's {tokenizer.model_max_length} tokens; the U-Net "
            "is conditioned on their first tokens only (train_clip's log says which setting "
            "decides the context)"
        )
    E.say(
        f"precompute_latents: {counts['encoded']} encoded, {counts['reused']} reused from "
        "the last run"
        + (f" ({rejected} old files left out: not as their index names)" if rejected else "")
    )
    return {
        "latents_encoded": counts["encoded"],
        "latents_reused": counts["reused"],
        "latents_cache_files_rejected": rejected,
        "captions_truncated_train": truncated["train"],
        "captions_truncated_val": truncated["val"],
        "train_count": manifest["splits"]["train"]["count"],
        "val_count": manifest["splits"]["val"]["count"],
        # not a metric: which process and worker encoded which files (E.write_json
        # keeps it in data/metrics; MLflow takes only the numbers)
        "files_by_process": by_process,
    }


def check_clean(split_dir: Path) -> None:
    """``UserError`` unless every shard of the clean split is the one its index names
    (size and sha256), before anything is encoded. webdataset reads a truncated tar up
    to the cut and stops without a word: the latents held 7 of a shard's 10 samples,
    and the manifest still named the whole split (was: the U-Net trained on fewer
    samples than the data has, and nothing counted them)."""
    from training.errors import UserError
    from training.intake.index import INDEX, mismatch, parse_index

    path = split_dir / INDEX
    index = parse_index(path.read_text(), str(split_dir), str(path))
    for entry in index.shards:
        f = split_dir / entry.url
        if mismatch(f, entry):
            raise UserError(
                f"{f} is not the shard {path} names (missing, cut short or changed since "
                "validate wrote it): run validate again (dvc repro --force validate)"
            )


def clean_buckets(split_dir: Path) -> list[str | None]:
    """Each clean shard's bucket, in the split's order (None: not bucketed)."""
    from training.intake.index import INDEX, parse_index

    path = split_dir / INDEX
    return [s.bucket for s in parse_index(path.read_text(), str(split_dir), str(path)).shards]


def index_fingerprint(split_dir: Path) -> str:
    """The content hash of a clean split, from its index (the shards' sha256s)."""
    from training.intake.index import INDEX, parse_index

    path = split_dir / INDEX
    return parse_index(path.read_text(), str(split_dir), str(path)).fingerprint()


def stage(params: Params, log: E.MetricLogger) -> dict:
    E.init_distributed()  # torch's threads; the process group under torchrun
    return run(params, P.CLEAN, P.VAE, P.CLIP, P.LATENTS)
