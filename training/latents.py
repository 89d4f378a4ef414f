"""Phase ``precompute_latents``: encode every clean sample once, for the U-Net to reuse.

Per sample: the VAE posterior mean and std (so training can *sample* latents, as the
VAE's KL term intends, instead of freezing one draw) and the CLIP text encoder's last
hidden states for its caption, made exactly as ``StableDiffusionPipeline`` makes prompt
embeddings (padded to max length, no attention mask). Streamed batch by batch into
safetensors shards, so memory is flat in dataset size. ``manifest.json`` records
counts, shapes, dtypes and the fingerprints of the models and data they came from;
``null_text.safetensors`` is the empty-prompt embedding used for caption dropout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from training import mechanics as M
from training.config import Params


def dir_fingerprint(directory: Path) -> str:
    """Content hash of a model/data directory (file names + bytes) for the manifest."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load_text_encoder(clip_dir: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The text half of the trained CLIPModel, as the pipeline will load it."""
    from transformers import CLIPModel

    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text = CLIPModel.from_pretrained(clip_dir).text_model.eval()
    return tokenizer, text


@torch.no_grad()
def text_states(
    tokenizer: CLIPTokenizer, encoder: CLIPTextModel, captions: list[str]
) -> torch.Tensor:
    from training.clip import encode_text

    ids = encode_text(tokenizer, captions).to(encoder.device)
    return encoder(ids).last_hidden_state.float().cpu()


PREVIEW_PROMPTS = 8


def preview_prompts(params: Params, val_captions: list[str]) -> list[str]:
    """The few fixed prompts ``train_unet`` samples while it trains: a seeded spread of
    the built-in set's evaluation prompts, or the first distinct validation captions."""
    ds = params.ingest.dataset
    if ds not in ("shapes", "digits"):
        return list(dict.fromkeys(val_captions))[:PREVIEW_PROMPTS]
    from training.builtin import eval_prompts

    prompts = list(dict.fromkeys(p.prompt for p in eval_prompts(ds)))
    pick = np.random.default_rng(params.seed).permutation(len(prompts))[:PREVIEW_PROMPTS]
    return [prompts[i] for i in sorted(pick)]


def _batches(records: Iterator, size: int) -> Iterator[list]:
    batch = []
    for r in records:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Buffers per-sample tensors and writes ``{split}-NNNNN.safetensors`` atomically."""

    def __init__(self, out_dir: Path, split: str, per_shard: int):
        self.out_dir, self.split, self.per_shard = out_dir, split, per_shard
        self.index, self.count = 0, 0
        self.keys: list[str] = []
        self.buf: dict[str, list[torch.Tensor]] = {}

    def add(self, keys: list[str], **tensors: torch.Tensor) -> None:
        self.keys.extend(keys)
        self.count += len(keys)
        for name, t in tensors.items():
            self.buf.setdefault(name, []).append(t)
        if len(self.keys) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in self.buf.items()}
        name = f"{self.split}-{self.index:05d}.safetensors"
        tmp = self.out_dir / f".{name}.tmp"
        save_file(tensors, tmp, metadata={"keys": ",".join(self.keys)})
        tmp.replace(self.out_dir / name)
        self.index += 1
        self.keys, self.buf = [], {}


def run(params: Params, clean_dir: Path, vae_dir: Path, clip_dir: Path, out_dir: Path) -> dict:
    from tqdm.auto import tqdm

    from training import shards
    from training.images import to_tensor

    c = params.precompute_latents
    dev = M.device()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(dev)
    tokenizer, encoder = load_text_encoder(clip_dir)
    encoder.to(dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "vae": {
            "path": str(vae_dir),
            "fingerprint": dir_fingerprint(vae_dir),
            "scaling_factor": vae.config.scaling_factor,
        },
        "clip": {"path": str(clip_dir), "fingerprint": dir_fingerprint(clip_dir)},
        "splits": {},
    }
    val_captions: list[str] = []
    for split in ("train", "val"):
        writer = _ShardWriter(out_dir, split, c.samples_per_shard)
        bar = tqdm(desc=f"latents/{split}", unit="img", mininterval=5)
        with torch.no_grad():
            for batch in _batches(shards.read(shards.shard_paths(clean_dir / split)), c.batch_size):
                x = to_tensor(np.stack([np.asarray(r.image(), dtype=np.uint8) for r in batch]))
                post = vae.encode(x.to(dev)).latent_dist
                if split == "val":
                    val_captions.extend(r.caption for r in batch)
                text = text_states(tokenizer, encoder, [r.caption for r in batch])
                writer.add(
                    [r.key for r in batch], mean=post.mean.cpu(), std=post.std.cpu(), text=text
                )
                bar.update(len(batch))
        writer.flush()
        bar.close()
        manifest["splits"][split] = {
            "count": writer.count,
            "shards": writer.index,
            "data_fingerprint": dir_fingerprint(clean_dir / split),
        }
    null = text_states(tokenizer, encoder, [""])[0]
    save_file({"text": null.contiguous()}, out_dir / "null_text.safetensors")
    manifest["preview_prompts"] = preview_prompts(params, val_captions)
    preview = text_states(tokenizer, encoder, manifest["preview_prompts"])
    save_file({"text": preview.contiguous()}, out_dir / "preview_text.safetensors")
    first = load_file(next(iter(sorted(out_dir.glob("train-*.safetensors")))))
    manifest["tensors"] = {
        k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in first.items()
    }
    M.write_json(out_dir / "manifest.json", manifest)
    M.say(
        f"precompute_latents: {manifest['splits']['train']['count']} train, "
        f"{manifest['splits']['val']['count']} val; latent {manifest['tensors']['mean']['shape']}"
        f", text {manifest['tensors']['text']['shape']}"
    )
    return {
        "train_count": manifest["splits"]["train"]["count"],
        "val_count": manifest["splits"]["val"]["count"],
    }


def load_split(latent_dir: Path, split: str) -> dict[str, torch.Tensor]:
    """All latent shards of a split concatenated (the tiny/small sets fit in memory)."""
    parts = [load_file(p) for p in sorted(latent_dir.glob(f"{split}-*.safetensors"))]
    if not parts:
        raise FileNotFoundError(f"no {split} latent shards in {latent_dir}")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
