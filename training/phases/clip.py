"""Phase ``train_clip``: a BPE tokenizer and a ``transformers.CLIPModel`` from scratch.

Tokenizer: CLIP's own normaliser and pre-tokeniser (lower-case, NFC, byte-level) with a
BPE model trained on the captions by the ``tokenizers`` library, ``</w>`` word ends and
``<|startoftext|>``/``<|endoftext|>`` specials. Every byte symbol is in the vocabulary
both bare and with ``</w>``, so no character ever falls back to the unknown (end-of-text)
id. Saved so ``CLIPTokenizer.from_pretrained`` loads it.

Model: symmetric InfoNCE (Radford et al. 2021, eq. in Fig. 3) with one change: many
images share a caption, so every pair with an identical caption is a positive (the
target row is uniform over them) instead of a false negative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from training import engine as E
from training import paths as P
from training.config import Params
from training.engine import loaders
from training.engine.images import to_tensor
from training.inference.text import embed, encode_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(
    captions: list[str], vocab_size: int, max_length: int, out_dir: Path
) -> CLIPTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # Build an untrained CLIPTokenizer only to borrow its exact normaliser and
    # pre-tokeniser, so training splits text the way inference will.
    template = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    tok = Tokenizer(
        models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix="")
    )
    tok.normalizer = template.backend_tokenizer.normalizer
    tok.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Ids in a canonical order: the trainer numbers its initial symbols in hash-set order,
    # which differs between runs and made CLIP training irreproducible. Specials, then
    # the single symbols sorted, then each merge's product in merge order.
    merged = [a + b for a, b in merges]
    singles = sorted(set(model["vocab"]) - {BOS, EOS} - set(merged))
    vocab: dict[str, int] = {}
    for piece in [BOS, EOS, *singles, *merged]:
        vocab.setdefault(piece, len(vocab))
    # Guarantee every byte symbol alone and word-final, whatever the corpus contained.
    for sym in sorted(alphabet):
        for piece in (sym, sym + "</w>"):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def build(params: Params, vocab_size: int) -> CLIPModel:
    c = params.train_clip
    text = {
        "vocab_size": vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": 4 * c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "max_position_embeddings": c.max_length,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": c.vision_hidden_size,
        "intermediate_size": 4 * c.vision_hidden_size,
        "num_hidden_layers": c.vision_layers,
        "num_attention_heads": c.num_heads,
        "image_size": params.ingest.image_size,
        "patch_size": c.patch_size,
    }
    return CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim)
    )


def caption_groups(captions: list[str]) -> torch.Tensor:
    """Integer id per distinct (normalised) caption: equal ids are positives."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(" ".join(c.lower().split()), len(ids)) for c in captions])


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * img @ txt.T
    pos = (groups[:, None] == groups[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def recall_at(sim: torch.Tensor, groups_q: torch.Tensor, groups_k: torch.Tensor, k: int) -> float:
    """Fraction of queries whose top-k keys contain one with the same caption group."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return float((groups_k[top] == groups_q[:, None]).any(1).float().mean())


def run(
    params: Params,
    clean_dir: Path,
    out_dir: Path,
    ckpt_dir: Path,
    log: E.MetricLogger | None = None,
) -> dict:
    from training.engine.images import grid
    from training.intake import shards

    log = log or E.NullLogger()
    c = params.train_clip
    torch.manual_seed(params.seed)
    train_u8, train_caps = shards.load_images(clean_dir / "train")
    val_u8, val_caps = shards.load_images(clean_dir / "val")
    if E.is_main():  # data parallel: one writer; the others load what it saved
        tokenizer = train_tokenizer(train_caps, c.vocab_size, c.max_length, out_dir)
    E.barrier()
    if not E.is_main():
        tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    E.say(
        f"train_clip: tokenizer with {len(tokenizer)} tokens; "
        f"{len(train_caps)} train / {len(val_caps)} val pairs"
    )
    train_px, val_px = to_tensor(train_u8), to_tensor(val_u8)
    train_ids, val_ids = encode_text(tokenizer, train_caps), encode_text(tokenizer, val_caps)
    train_groups = caption_groups(train_caps)

    model = build(params, len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.1)
    data_fp = E.fingerprint(len(train_caps), train_caps[:32])
    trainer = E.stage_trainer("train_clip", model, opt, c, params.seed, ckpt_dir, data_fp, log)
    dev = trainer.device
    tensors = {"ids": train_ids, "px": train_px, "groups": train_groups}
    batches = loaders.make(c.loader, tensors, c.batch_size, params.seed)

    def step_fn(step: int) -> tuple[torch.Tensor, E.StepMetrics]:
        b = batches.batch(step)
        # this process's slice of the global batch; the group ids stay global
        ids, px = E.local(b["ids"], b["px"])
        ids, px, groups = E.to_device(dev, ids, px, b["groups"])
        out = model(input_ids=ids, pixel_values=px)
        scale = model.logit_scale.exp().clamp(max=100)
        # the loss contrasts the whole global batch: gather every process's embeddings
        img, txt = E.gather(out.image_embeds.float()), E.gather(out.text_embeds.float())
        loss = contrastive_loss(img, txt, scale, groups)
        return loss, {"logit_scale": scale.detach()}

    summary = trainer.fit(step_fn)
    if not E.is_main():
        return summary

    img_e, txt_e = embed(model, pixels=val_px), embed(model, ids=val_ids)
    sim = img_e @ txt_e.T
    g = caption_groups(val_caps)
    metrics = {
        "val_i2t_r1": recall_at(sim, g, g, 1),
        "val_i2t_r5": recall_at(sim, g, g, 5),
        "val_t2i_r1": recall_at(sim.T, g, g, 1),
        "val_t2i_r5": recall_at(sim.T, g, g, 5),
        "vocab_size": len(tokenizer),
        "params": sum(p.numel() for p in model.parameters()),
        **summary,
    }
    model.save_pretrained(out_dir, safe_serialization=True)

    # Similarity heatmap of the first 32 val pairs (diagonal = matching pairs).
    k = min(32, len(val_caps))
    s = sim[:k, :k].numpy()
    heat = ((s - s.min()) / max(1e-6, float(s.max() - s.min())) * 255).astype(np.uint8)
    from PIL import Image

    heat_path = out_dir / "similarity.png"
    grid([Image.fromarray(heat).convert("RGB")], nrow=1, scale=8).save(heat_path)
    log.log_image(heat_path)
    E.say(
        f"train_clip: val recall@1 image->text {metrics['val_i2t_r1']:.2f}, "
        f"text->image {metrics['val_t2i_r1']:.2f}"
    )
    return metrics


def stage(params: Params, log: E.MetricLogger) -> dict:
    E.init_distributed()  # torch's threads; the process group under torchrun
    return run(params, P.CLEAN, P.CLIP, P.CKPT / "train_clip", log)
