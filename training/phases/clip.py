"""Phase ``train_clip``: a BPE tokenizer and a ``transformers.CLIPModel`` from scratch.

Tokenizer: CLIP's own normaliser and pre-tokeniser (lower-case, NFC, byte-level) with a
BPE model trained on the captions by the ``tokenizers`` library, ``</w>`` word ends and
``<|startoftext|>``/``<|endoftext|>`` specials. Every byte symbol is in the vocabulary
both bare and with ``</w>``, so no character ever falls back to the unknown (end-of-text)
id. A character of a script written without spaces (Chinese, Japanese, Thai) is a token
of its own, never merged with its neighbours (``clip_merges``). Saved so
``CLIPTokenizer.from_pretrained`` loads it.

Model: symmetric InfoNCE (Radford et al. 2021, eq. in Fig. 3) with one change: many
images share a caption, so every pair with an identical caption is a positive (the
target row is uniform over them) instead of a false negative.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable
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
from training.inference import untrained
from training.inference.text import embed
from training.intake.captions import percentile, summary
from training.phases import clip_data
from training.phases.clip_data import captions_of, pair_split
from training.phases.clip_merges import isolate, with_inner

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(
    captions: Iterable[str], vocab_size: int, max_length: int, out_dir: Path
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
    tok.train_from_iterator(isolate(captions), trainer=trainer)  # no merge across 猫
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Ids in a canonical order: the trainer numbers its initial symbols in hash-set order,
    # which differs between runs and made CLIP training irreproducible. Specials, then
    # the single symbols sorted, then each merge's product in merge order.
    singles = sorted(set(model["vocab"]) - {BOS, EOS} - {a + b for a, b in merges})
    merges = with_inner(merges)  # a Chinese/Japanese... character inside a run too
    vocab: dict[str, int] = {}
    for piece in [BOS, EOS, *singles, *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    # Guarantee every byte symbol alone and word-final, whatever the corpus contained.
    for sym in sorted(alphabet):
        for piece in (sym, sym + "</w>"):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    # split_special_tokens (saved with it, so diffusers' pipelines read prompts the same
    # way): a caption that spells "<|endoftext|>" is text, not an end of text where CLIP
    # pools and the rest of the caption is lost
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=max_length, split_special_tokens=True
    )
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def token_lengths(
    tokenizer: CLIPTokenizer,
    captions: Iterable[str],
    batch: int = 1024,
    first: dict[int, int] | None = None,
) -> Counter:
    """How many captions have each length in tokens (specials included, nothing cut):
    a histogram, so memory stays flat however many captions there are. ``first``, if
    given, gets each id's earliest position in any caption (inside the context or not)."""
    hist: Counter = Counter()
    it = iter(captions)
    while chunk := list(itertools.islice(it, batch)):
        for ids in tokenizer(chunk, truncation=False).input_ids:
            hist[len(ids)] += 1
            if first is not None:
                for pos, i in enumerate(ids):
                    if first.get(i, pos + 1) > pos:
                        first[i] = pos
    return hist


def choose_context(hist: Counter, c) -> int:
    """``train_clip.max_length``, or for ``auto`` the smallest multiple of 8 that
    holds ``context_coverage`` of the captions, within [8, max_length_cap]."""
    if c.max_length != "auto":
        return c.max_length
    need = percentile(hist, c.context_coverage)
    return min(c.max_length_cap, max(8, math.ceil(need / 8) * 8))


def fit_context(tok: CLIPTokenizer, captions: Iterable[str], c) -> Counter:
    """Measure the captions in ``tok``'s tokens, set its context from them
    (``choose_context``) and record the tokens the context never holds (``untrained``):
    the token-length histogram."""
    first: dict[int, int] = {}
    hist = token_lengths(tok, captions, first=first)
    tok.model_max_length = choose_context(hist, c)
    # the tokens CLIP trains: those inside the context (its last place is end of text)
    untrained.record(tok, {i for i, pos in first.items() if pos < tok.model_max_length - 1})
    return hist


def context_bound(c) -> int:
    """The most tokens the context can hold: ``max_length``, or for ``auto`` its cap
    (what a cost benchmark sizes text states by before any data is seen)."""
    return c.max_length if c.max_length != "auto" else c.max_length_cap


def caption_stats(hist: Counter, context: int) -> dict[str, float]:
    """The token-length distribution and what the context cuts, for the metrics."""
    total = max(1, sum(hist.values()))
    cut = sum(n for length, n in hist.items() if length > context)
    return {
        **{f"caption_tokens_{k}": float(v) for k, v in summary(hist).items()},
        "context_length": float(context),
        "captions_truncated_frac": cut / total,
        "captions_measured": float(sum(hist.values())),
    }


def build(params: Params, vocab_size: int, max_length: int) -> CLIPModel:
    c = params.train_clip
    text = {
        "vocab_size": vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": 4 * c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "max_position_embeddings": max_length,
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


def chance_at1(groups: torch.Tensor) -> float:
    """recall@1 of a CLIP that ranks at random: the mean share of the keys that are a
    query's positives. Repeated captions (a class a picture, shapes' grammar) make it
    high: a random CLIP read 1.0 on a val split of one caption, 0.075 on ten captions
    where 1/N is 0.005, with nothing beside it to say so."""
    counts = torch.bincount(groups)
    return float((counts[groups].double() / len(groups)).mean())


def groups_of(ids: torch.Tensor) -> torch.Tensor:
    """Integer id per distinct token sequence of the global batch: equal ids are
    positives (captions the text encoder cannot tell apart)."""
    return torch.unique(ids, dim=0, return_inverse=True)[1]


def run(
    params: Params,
    clean: str | Path,
    out_dir: Path,
    ckpt_dir: Path,
    log: E.MetricLogger | None = None,
) -> dict:
    """Train the tokenizer and CLIP on ``clean/train`` (a directory or an ``s3://``
    prefix), validate on ``clean/val``, save to ``out_dir``."""
    log = log or E.NullLogger()
    c = params.train_clip
    torch.manual_seed(params.seed)
    text: dict[str, float] = {}
    if E.is_main():  # data parallel: one writer; the others load what it saved
        source = f"{clean}/train"
        captions = captions_of(source, c.tokenizer_samples, params.seed)
        tok = train_tokenizer(captions, c.vocab_size, c.max_length_cap, out_dir)
        # the context from the data: the same captions, now measured in tokens
        hist = fit_context(tok, captions_of(source, c.tokenizer_samples, params.seed), c)
        tok.save_pretrained(out_dir)
        text = caption_stats(hist, tok.model_max_length)
        say_context(text, c)
    E.barrier()
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    tokens = ckpt_dir / "tokens"
    # one process builds the token table; the others find it (or, on a node without
    # the shared directory, build their own)
    if E.is_main():
        clip_data.build(f"{clean}/train", tokenizer, tokens).close()
    E.barrier()
    batches = pair_split(params, f"{clean}/train", tokenizer, tokens=tokens)
    val = pair_split(params, f"{clean}/val", tokenizer)
    try:
        return {**text, **_train(params, tokenizer, batches, val, out_dir, ckpt_dir, log)}
    finally:
        batches.close()
        val.close()


REUSED = "the reused tokenizer's"


def say_context(text: dict[str, float], c, how: str | None = None) -> None:
    """One line on the captions' lengths and the context; a warning when it cuts."""
    context, frac = int(text["context_length"]), text["captions_truncated_frac"]
    how = how or ("from the data" if c.max_length == "auto" else "train_clip.max_length")
    E.say(
        f"train_clip: captions are {text['caption_tokens_p50']:.0f} tokens (median), "
        f"{text['caption_tokens_p95']:.0f} (p95), {text['caption_tokens_max']:.0f} (max); "
        f"context {context} ({how})"
    )
    if frac == 0:
        return
    if how == REUSED:  # its context is the reused tokenizer's: no setting of this run's
        kind = "warning"
        fix = "a reused CLIP keeps its context: train a new one (mode: scratch) to change it"
    elif c.max_length != "auto":
        kind, fix = "warning", f"set train_clip.max_length: auto, or raise it (now {context})"
    elif context >= c.max_length_cap:
        kind, fix = "warning", f"raise train_clip.max_length_cap (now {c.max_length_cap})"
    else:  # the coverage asked for: the longest few percent are cut by design
        kind = "note"
        fix = f"train_clip.context_coverage is {c.context_coverage:g}; raise it to keep more"
    E.say(
        f"train_clip: {kind}: {frac:.1%} of the captions are longer than {context} tokens "
        f"and are cut: the model never sees their ends ({fix})"
    )


def _train(params, tokenizer, batches, val, out_dir: Path, ckpt_dir: Path, log) -> dict:
    c = params.train_clip
    E.say(
        f"train_clip: tokenizer with {len(tokenizer)} tokens; "
        f"{len(batches)} train / {len(val)} val pairs"
    )
    model = build(params, len(tokenizer), tokenizer.model_max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.1)
    data_fp = f"{batches.index.fingerprint()}:{clip_data.tokenizer_digest(tokenizer)}"
    trainer = E.stage_trainer("train_clip", model, opt, c, params.seed, ckpt_dir, data_fp, log)
    dev = trainer.device

    def step_fn(step: int) -> tuple[torch.Tensor, E.StepMetrics]:
        b = batches.batch(step)  # this process's slice of the step's global batch
        ids, px = E.to_device(dev, b["ids"], to_tensor(b["px"]))
        out = model(input_ids=ids, pixel_values=px)
        scale = model.logit_scale.exp().clamp(max=100)
        # the loss contrasts the whole global batch: gather every process's embeddings
        img, txt = E.gather(out.image_embeds.float()), E.gather(out.text_embeds.float())
        loss = contrastive_loss(img, txt, scale, groups_of(E.gather(ids)))
        return loss, {"logit_scale": scale.detach()}

    summary = {**trainer.fit(step_fn), **batches.stats()}
    if not E.is_main():
        return summary

    model.save_pretrained(out_dir, safe_serialization=True)
    return {**measure(model, val, params, out_dir, log), **summary}


def measure(model: CLIPModel, val, params: Params, out_dir: Path, log) -> dict:
    """Recall@1/5 both ways on ``val_samples`` val pairs spread over the split (each
    bucket in proportion: ``Split.picked``), and a heatmap of the first 32 pairs'
    similarities in ``out_dir`` (diagonal = matching pairs)."""
    from PIL import Image

    from training.engine.images import grid

    c = params.train_clip
    px, ids = zip(
        *((to_tensor(b["px"]), b["ids"]) for b in val.scan(256, c.val_samples)), strict=True
    )
    val_px, val_ids = torch.cat(px), torch.cat(ids)
    img_e, txt_e = embed(model, pixels=val_px), embed(model, ids=val_ids)
    sim = img_e @ txt_e.T
    g = groups_of(val_ids)
    metrics = {
        "val_i2t_r1": recall_at(sim, g, g, 1),
        "val_i2t_r5": recall_at(sim, g, g, 5),
        "val_t2i_r1": recall_at(sim.T, g, g, 1),
        "val_t2i_r5": recall_at(sim.T, g, g, 5),
        "val_r1_chance": chance_at1(g),  # the recall@1 of a random ranking, both ways
        "val_samples": len(val_ids),
        "vocab_size": model.config.text_config.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
    }
    k = min(32, len(val_ids))
    s = sim[:k, :k].numpy()
    heat = ((s - s.min()) / max(1e-6, float(s.max() - s.min())) * 255).astype(np.uint8)
    heat_path = out_dir / "similarity.png"
    grid([Image.fromarray(heat).convert("RGB")], nrow=1, scale=8).save(heat_path)
    log.log_image(heat_path)
    E.say(
        f"train_clip: val recall@1 image->text {metrics['val_i2t_r1']:.2f}, "
        f"text->image {metrics['val_t2i_r1']:.2f} (a random ranking: "
        f"{metrics['val_r1_chance']:.2f})"
    )
    return metrics


def reuse(params: Params, clean: str | Path, out_dir: Path, log, ref: str) -> dict:
    """``train_clip.reuse`` (or the champion's, ``mode: continue``): install that CLIP
    and tokenizer instead of training them
    (the text states stay those the U-Net knows), then measure them on this data:
    how its captions fit the tokenizer's context, and val recall."""
    from training.phases import reuse as R

    c = params.train_clip
    info = R.install("train_clip", ref, out_dir, params)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    hist = token_lengths(tokenizer, captions_of(f"{clean}/train", c.tokenizer_samples, params.seed))
    text = caption_stats(hist, tokenizer.model_max_length)
    say_context(text, c, how=REUSED)
    model = CLIPModel.from_pretrained(out_dir).eval()
    val = pair_split(params, f"{clean}/val", tokenizer)
    try:
        return {**info, **text, **measure(model, val, params, out_dir, log)}
    finally:
        val.close()


def check_inputs(params: Params) -> None:
    """A model to reuse that cannot be, refused while ``data/models/clip`` is whole."""
    from training.phases.reuse import check_reused

    check_reused("train_clip", params)


def stage(params: Params, log: E.MetricLogger) -> dict:
    E.init_distributed()  # torch's threads; the process group under torchrun
    clean = loaders.split_source(P.CLEAN, "clean")
    from training.phases.reuse import builds_on

    ref = builds_on("train_clip", params)
    if ref:
        return reuse(params, clean, P.CLIP, log, ref) if E.is_main() else {}
    return run(params, clean, P.CLIP, P.CKPT / "train_clip", log)
