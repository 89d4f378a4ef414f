"""CLIP's token table (``training/phases/clip_data.py``): the captions are tokenized
once per split, and the training batches carry exactly the ids per-batch tokenizing
gave, with either loader and with a broken shard; the table is reused while split,
tokenizer and context stay, and rebuilt (the old one removed) when one changes."""

from __future__ import annotations

import pytest
import torch

from training.config import load, resolve
from training.engine import loaders
from training.engine.images import caption, decode_image
from training.inference.text import encode_text
from training.phases import clip, clip_data

from .loaderkit import collate, image_split

SIZE = 16  # the smallest image_size the config allows (the bucket stride)


def decode(sample: dict):
    return decode_image(sample, SIZE), caption(sample)


def _params(loader: str):
    base = load("params.yaml").to_dict()
    base["ingest"]["image_size"] = SIZE
    base["train_clip"].update(loader=loader, batch_size=16, block_shards=2)
    return resolve(base)


def _tokenizer(split: str, out):
    return clip.train_tokenizer(clip_data.captions_of(split, 10**6, 0), 300, 32, out)


@pytest.mark.parametrize("loader", ["stream", "memory"])
@pytest.mark.parametrize("broken", [False, True], ids=["clean", "truncated-shard"])
def test_training_batches_carry_the_captions_token_ids(tmp_path, loader, broken):
    directory = image_split(tmp_path / "train", size=SIZE)
    tok = _tokenizer(str(directory), tmp_path / "tok")
    if broken:
        bad = directory / "train-00002.tar"
        bad.write_bytes(bad.read_bytes()[:6000])
    params = _params(loader)
    pairs = clip_data.pair_split(params, str(directory), tok, tokens=tmp_path / "tokens")
    # the same batches through the plain loader, whose samples say which sample they are
    plain = loaders.make(loader, str(directory), decode, collate, 16, params.seed, 2,
                         by_bucket=False)  # fmt: skip
    try:
        for step in [*range(14), 30, 7]:  # two epochs, then a jump back (a resume)
            got, want = pairs.batch(step), plain.batch(step)
            captions = [f"a {('red', 'green', 'blue')[n % 3]} thing number {n}"
                        for n in want["n"].tolist()]  # fmt: skip
            expected = torch.from_numpy(encode_text(tok, captions, tensors="np")).long()
            assert torch.equal(got["ids"], expected), step
            assert torch.equal(got["px"], want["x"])
    finally:
        pairs.close(), plain.close()
    assert pairs._closed  # the table's file closed with the split (the memory loader: at once)


def test_table_is_reused_until_split_tokenizer_or_context_changes(tmp_path):
    directory = str(image_split(tmp_path / "train"))
    tok = _tokenizer(directory, tmp_path / "tok")
    first = clip_data.build(directory, tok, tmp_path / "tokens")
    first.close()
    stamp = first.path.stat().st_mtime_ns
    encode_text(tok, ["a call sets the backend's padding and truncation"])
    again = clip_data.build(directory, tok, tmp_path / "tokens")  # a resumed stage
    again.close()
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    assert first.path.stat().st_size == 200 * 32 * 2  # uint16 rows of the context

    tok.model_max_length = 20
    shorter = clip_data.build(directory, tok, tmp_path / "tokens")
    assert shorter.path != first.path and not first.path.exists()
    assert shorter.rows([3]).shape == (1, 20)
    shorter.close()
    image_split(tmp_path / "train", n=150)  # the data changed
    other = clip_data.build(directory, tok, tmp_path / "tokens")
    other.close()
    assert other.path != shorter.path and [p.name for p in (tmp_path / "tokens").iterdir()] == [
        other.path.name
    ]


def test_a_checkpoint_of_another_tokenizer_is_not_taken_up(tmp_path, monkeypatch, capsys):
    """A CLIP checkpoint was fingerprinted by its config, seed and data only: after a
    Kiln whose tokenizer training changed (new merges shift the ids), the rerun stage
    took the old finished checkpoint as done and saved its weights, trained on other
    ids, beside the new tokenizer."""
    image_split(tmp_path / "clean" / "train", n=24, per_shard=8, size=SIZE)
    image_split(tmp_path / "clean" / "val", n=8, per_shard=8, size=SIZE, seed=1, prefix="val")
    one = {"steps": 1, "batch_size": 8, "checkpoint_every": 1, "log_every": 1}
    params = resolve({"ingest": {"image_size": SIZE}, "train_clip": one})
    isolate = clip.isolate
    with monkeypatch.context() as m:  # the older Kiln: its BPE learnt other merges
        m.setattr(clip, "isolate", lambda caps: (f"{c} zq zq" for c in isolate(caps)))
        clip.run(params, tmp_path / "clean", tmp_path / "old", tmp_path / "ck")
    capsys.readouterr()
    clip.run(params, tmp_path / "clean", tmp_path / "new", tmp_path / "ck")
    said = capsys.readouterr()
    assert "removing stale checkpoint" in said.out + said.err
    vocab = [(tmp_path / d / "tokenizer.json").read_text() for d in ("old", "new")]
    assert vocab[0] != vocab[1]  # the two Kilns' tokenizers did differ
