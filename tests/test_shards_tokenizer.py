import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from transformers import CLIPTokenizer

from training.inference import text
from training.intake import shards
from training.phases import clip


def _png(colour=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_shard_round_trip_and_atomic_names(tmp_path):
    with shards.ShardWriter(tmp_path, "train", per_shard=3) as w:
        for i in range(7):
            w.write(shards.Record(f"k{i}", _png(), "png", f"caption {i}", {"i": i}))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.json", "train-00000.tar", "train-00001.tar", "train-00002.tar"]
    index = json.loads((tmp_path / "index.json").read_text())  # the loaders' view of it
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [
        ("train-00000.tar", 3),
        ("train-00001.tar", 3),
        ("train-00002.tar", 1),
    ]
    recs = list(shards.read(shards.shard_paths(tmp_path)))
    assert [r.caption for r in recs] == [f"caption {i}" for i in range(7)]
    assert recs[3].meta == {"i": 3} and recs[0].image().size == (8, 8)


def test_split_read_deals_shards_to_ranks_and_batches_stay_inside_a_shard(tmp_path, monkeypatch):
    """What each of 2 processes reads with split=True (webdataset's split_by_node reads
    RANK/WORLD_SIZE as torchrun sets them), and the latents stage's batching on top."""
    from training.phases.latents import shard_batches

    with shards.ShardWriter(tmp_path, "train", per_shard=3) as w:
        for i in range(7):
            w.write(shards.Record(f"k{i}", _png(), "png", f"caption {i}", {}))
    paths = shards.shard_paths(tmp_path)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen[rank] = [(r.key, r.shard) for r in shards.read(paths, split=True)]
    assert [k for k, _ in seen[0]] == ["k0", "k1", "k2", "k6"]  # shards 0 and 2
    assert [k for k, _ in seen[1]] == ["k3", "k4", "k5"]  # shard 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    batches = list(shard_batches(shards.read(paths, split=True), size=2))
    assert [b["keys"] for b in batches] == [["k0", "k1"], ["k2"], ["k3", "k4"], ["k5"], ["k6"]]
    assert [b["last"] for b in batches] == [False, True, False, True, True]
    names = [Path(b["shard"]).name for b in batches]
    assert names == ["train-00000.tar"] * 2 + ["train-00001.tar"] * 2 + ["train-00002.tar"]
    assert batches[0]["pixels"].shape == (2, 8, 8, 3)


def test_reader_refuses_pickles_and_pipes(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("x.png", _png()), ("x.pyd", b"\x80\x04pickle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="unsafe"):
        list(shards.read([path]))
    with pytest.raises(ValueError, match="pipe"):
        list(shards.read(["pipe:curl http://example.invalid/x.tar"]))


def test_tokenizer_is_clip_style_and_loads_with_transformers(tmp_path):
    caps = ["a small red circle at the top", "a large blue square on the left"] * 50
    clip.train_tokenizer(caps, vocab_size=320, max_length=16, out_dir=tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    ids = tok("a small red circle").input_ids
    assert ids[0] == 0 and ids[-1] == 1
    assert "circle</w>" in tok.convert_ids_to_tokens(ids)
    # characters never seen in training still map to real tokens, never to end-of-text
    odd = tok("Zebra ☃ ünïcode #42!").input_ids
    assert 1 not in odd[1:-1]
    padded = text.encode_text(tok, ["a red circle"])
    assert padded.shape == (1, 16) and padded[0, -1] == 1
    # a caption that spells the special tokens is text: was an end of text mid-caption,
    # where CLIP pools (the rest of the caption lost to it)
    ids = text.encode_text(tok, ["red <|endoftext|> blue <|startoftext|> top"])[0].tolist()
    assert 0 not in ids[1:] and ids[1 : ids.index(1)] and all(i == 1 for i in ids[ids.index(1) :])
    assert ids.index(1) > 8


def test_text_context_is_chosen_from_the_captions_and_cuts_are_counted(tmp_path):
    """``max_length: auto`` takes the smallest multiple of 8 holding 95% of the captions
    whole (within the cap); what it still cuts is measured, not hidden; a fixed
    ``max_length`` is kept as the user set it."""
    from collections import Counter

    from training import config
    from training.intake import captions

    short = [f"a red circle number {i}" for i in range(90)]
    long = [" ".join(["a very long caption"] * 12)] * 10  # 10% of them, ~50 tokens
    tok = clip.train_tokenizer(short + long, 320, 77, tmp_path)
    hist = clip.token_lengths(tok, iter(short + long), batch=7)
    assert sum(hist.values()) == 100
    assert hist == Counter(len(tok(t).input_ids) for t in short + long)
    c = config.resolve({}).train_clip
    assert c.max_length == "auto"
    p95 = captions.percentile(hist, 0.95)
    context = clip.choose_context(hist, c)
    assert context % 8 == 0 and context >= p95 > context - 8 and context > 24
    stats = clip.caption_stats(hist, context)
    assert stats["captions_truncated_frac"] == 0.0  # the long ones fit under 77
    assert stats["caption_tokens_max"] == max(hist) and stats["context_length"] == context
    capped = c.model_copy(update={"max_length_cap": 24})
    assert clip.choose_context(hist, capped) == 24
    assert clip.caption_stats(hist, 24)["captions_truncated_frac"] == 0.1
    assert clip.choose_context(hist, c.model_copy(update={"max_length": 12})) == 12
    # validate's word count is a lower bound: tokens >= words + 2 (start and end)
    for t in short + long + ["Zebra's ☃ ünïcode #42!"]:
        assert len(tok(t).input_ids) >= captions.words(t) + 2


def test_identical_captions_are_positives(tmp_path):
    """Positives are captions the text encoder cannot tell apart: the same tokens after
    CLIP's lower-casing and whitespace normalisation."""
    tok = clip.train_tokenizer(["a red circle", "a blue square"] * 20, 300, 16, tmp_path)
    ids = text.encode_text(tok, ["a red circle", "A  red circle", "a blue square"])
    assert clip.groups_of(ids).tolist() in ([0, 0, 1], [1, 1, 0])


def test_recall_is_logged_beside_what_a_random_ranking_scores():
    """Repeated captions count as positives, so a random CLIP's recall@1 is the share of
    a query's positives among the keys, not 1/N: 1.0 on a split of one caption."""
    import torch

    one = torch.zeros(64, dtype=torch.long)
    sim = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    assert clip.recall_at(sim, one, one, 1) == 1.0 == clip.chance_at1(one)
    ten = torch.arange(10).repeat_interleave(20)  # 10 captions x 20 pictures
    assert abs(clip.chance_at1(ten) - 0.1) < 1e-12
    mixed = torch.tensor([0, 0, 0, 1])  # 3/4 of the queries see 3 of 4 keys positive
    assert abs(clip.chance_at1(mixed) - (0.75 * 0.75 + 0.25 * 0.25)) < 1e-12


def test_tokenizer_ids_are_the_same_in_every_process(tmp_path):
    """The BPE trainer numbers symbols in hash-set order, which differs per process;
    Kiln renumbers canonically, or CLIP training would not be reproducible."""
    import json
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from training.phases import clip\n"
        "caps = ['a small red circle at the top', 'a large blue square on the left',\n"
        "        'the digit 7', 'green cross bottom right'] * 40\n"
        "clip.train_tokenizer(caps, vocab_size=300, max_length=16, out_dir=Path(sys.argv[1]))\n"
    )
    vocabs = []
    for i in range(3):
        out = tmp_path / str(i)
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
        vocabs.append(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_a_reused_clips_cut_captions_point_at_what_can_change_them(capsys):
    """A reused CLIP keeps its tokenizer's context: the note told the user to raise
    `train_clip.context_coverage`, which a reused tokenizer never reads."""
    from training import config

    c = config.resolve({}).train_clip
    text = {
        "context_length": 24, "captions_truncated_frac": 0.027, "caption_tokens_p50": 12,
        "caption_tokens_p95": 30, "caption_tokens_max": 40,
    }  # fmt: skip
    clip.say_context(text, c, how=clip.REUSED)
    said = capsys.readouterr()
    said = said.out + said.err
    assert "2.7% of the captions" in said and "mode: scratch" in said
    assert "context_coverage" not in said
    clip.say_context(text, c)  # a CLIP trained here: its coverage setting is the knob
    said = capsys.readouterr()
    assert "context_coverage" in said.out + said.err


def test_captions_without_spaces_are_tokenized_by_character_not_by_caption(tmp_path):
    """CLIP's pre-tokeniser makes a Chinese or Japanese caption one word, and BPE made
    each caption seen twice one token (60 captions: 60 ids, nothing shared); a prompt
    that was no caption fell apart into bytes. Each such character is one token now,
    inside a run as at its end; words of spaced scripts merge as before."""
    import itertools

    colours, things = ["红色的", "蓝色的", "绿色的"], ["汽车", "猫", "狗", "房子"]
    caps = [c + t + "在左边" for c, t in itertools.product(colours, things)] * 10
    caps += ["ねこがいます", "a red car"] * 10
    tok = clip.train_tokenizer(caps, 512, 32, tmp_path)
    for prompt in ("蓝色的房子在左边", "红色的狗", "ねこがいます"):  # the first: no caption
        pieces = [tok.decode([i]) for i in tok(prompt).input_ids[1:-1]]
        assert pieces == list(prompt)
    assert tok.convert_ids_to_tokens(tok("a red car").input_ids)[1:-1] == [
        "a</w>", "red</w>", "car</w>"
    ]  # fmt: skip


def test_a_prompt_the_captions_never_had_is_named_and_survives_saving(tmp_path):
    """Byte-level tokens never lose a character, but tokens no caption used were never
    trained: "🚗🚗" to a model of shapes was drawn from untrained embeddings, with no
    word said. The ids travel in the tokenizer's config, through a save and a load."""
    from training import config
    from training.inference import untrained

    caps = ["a small red circle at the top", "a large blue square on the left"] * 50
    tok = clip.train_tokenizer(caps, 320, 77, tmp_path / "a")
    assert untrained.untrained_note(tok, "🚗🚗") is None  # not recorded: nothing to say
    clip.fit_context(tok, caps, config.resolve({}).train_clip)
    tok.save_pretrained(tmp_path / "b")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "b")
    assert untrained.untrained_note(tok, "A large RED circle") is None
    note = untrained.untrained_note(tok, "a red 🚗 at the top")
    assert "'🚗'" in note and "never had" in note
    assert "nothing in the prompt" in untrained.untrained_note(tok, "🚗🚗")


def test_rest_the_playground_and_generate_name_a_prompts_untrained_text(tmp_path, capsys):
    """Was: the note existed but nothing said it; REST rows, the playground and `kiln
    generate` drew '🚗🚗' to a model of shapes as if it were a prompt."""
    from training import config
    from training.cli.outputs import warn_prompts
    from training.inference.text import cut_notes

    caps = ["a small red circle at the top", "a large blue square on the left"] * 50
    tok = clip.train_tokenizer(caps, 320, 77, tmp_path / "a")
    clip.fit_context(tok, caps, config.resolve({}).train_clip)
    assert cut_notes(tok, "a red circle", "a blue square") == []
    notes = cut_notes(tok, "🚗🚗", "a red 🦓")
    assert "nothing in the prompt was in the training captions" in notes[0], notes
    assert notes[1].startswith("the negative prompt has text the training captions"), notes
    warn_prompts(tok, ["🚗🚗", "a red circle"])
    err = capsys.readouterr().err
    assert "kiln: warning: nothing in prompt '🚗🚗' was in the training captions" in err, err
    assert "'a red circle'" not in err
