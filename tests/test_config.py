import pytest
import yaml

from training import config
from training.config import ConfigError

from .conftest import REPO


def test_repo_params_load_and_default_to_tiny():
    p = config.load(REPO / "params.yaml")
    assert p.profile == "tiny"
    assert p.ingest.dataset == "shapes"
    assert p.ingest.image_size == 32
    assert set(p.to_dict()) == {"profile", "seed", "mode", *config.STAGES}
    assert p.mode == "scratch" and p.train_unet.finetune_steps == p.train_unet.steps // 4


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"train_unet": {"lr": "fast"}}, "train_unet.lr"),
        ({"train_unet": {"lrr": 0.1}}, "unknown key 'train_unet.lrr'"),
        ({"trian_unet": {}}, "unknown key 'trian_unet'"),
        ({"profile": "huge"}, "profile"),
        ({"ingest": {"image_size": "32"}}, "ingest.image_size"),
        ({"ingest": {"dataset": "cats"}}, "ingest.dataset"),
        ({"validate": {"val_fraction": 2.0}}, "validate.val_fraction"),
        ({"train_vae": "big"}, "train_vae"),
        ({"mode": "resume"}, "mode"),
        ({"evaluate": {"oracle": "cats"}}, "evaluate.oracle"),
        # kiln_control.json records it as the serving default, which takes 0-10 (was: any
        # scale >= 0 accepted here, then served above the cap REST and the CLI refuse)
        ({"train_controlnet": {"conditioning_scale": 12.0}}, "train_controlnet.conditioning_scale"),
        # a gate metric the run cannot measure: refused before anything is sampled or
        # registered (the gate itself runs after evaluate registered the version)
        (
            {"ingest": {"dataset": "folder"}, "evaluate": {"gate_metric": "acc_all"}},
            "evaluate.gate_metric acc_all is an oracle's accuracy",
        ),
        # measured on each run's own val split, never re-scored for the champion (was:
        # accepted, and the gate compared it with the champion's number on other data)
        (
            {"ingest": {"dataset": "folder"}, "evaluate": {"gate_metric": "val_loss"}},
            "evaluate.gate_metric val_loss is measured on each run's own val split",
        ),
        ({"evaluate": {"gate_metric": "vae_psnr"}}, "cannot be re-scored for the champion"),
        # a name evaluate never measures: was accepted, and the gate refused it only after
        # a whole evaluation had sampled and registered a version (one per try)
        (
            {"ingest": {"dataset": "folder"}, "evaluate": {"gate_metric": "fd_clip_ration"}},
            "evaluate.gate_metric 'fd_clip_ration' is not a metric evaluate measures",
        ),
        ({"evaluate": {"gate_metric": "acc_al"}}, "not an accuracy the shapes oracle measures"),
        # was accepted, and ingest's numpy generator refused it mid-run
        ({"seed": -1}, "seed"),
        # were accepted, and failed when the stage built its model: the U-Net's after
        # ingest, the VAE, CLIP and the latents had run; CLIP's as a traceback
        ({"train_unet": {"norm_num_groups": 24}}, "train_unet.norm_num_groups 24 does not"),
        ({"train_vae": {"norm_num_groups": 12}}, "train_vae.norm_num_groups 12 does not divide"),
        ({"train_clip": {"num_heads": 3}}, "train_clip.num_heads 3 does not divide"),
        # were accepted, and evaluate's steps table, after all the training and its
        # samples, stopped on "evaluate: ZeroDivisionError: division by zero"
        ({"evaluate": {"sweep_steps": [5, 0]}}, "evaluate.sweep_steps.1: Input should be"),
        ({"evaluate": {"sweep_steps": [-2]}}, "evaluate.sweep_steps.0: Input should be"),
        (
            {"ingest": {"dataset": "digits"}, "evaluate": {"gate_metric": "acc_all_held_out"}},
            "not an accuracy the digits oracle measures (choose acc_all, acc_all_seen, ",
        ),
    ],
)
def test_bad_params_name_the_key_and_file(tmp_path, raw, needle):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train_unet: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path)
    with pytest.raises(ConfigError, match="no such params file"):
        config.load(tmp_path / "nope.yaml")


def test_profiles_change_sizes_only():
    tiny, small, base = (config.resolve({"profile": p}) for p in ("tiny", "small", "base"))
    assert (tiny.ingest.image_size, small.ingest.image_size, base.ingest.image_size) == (
        32,
        64,
        256,
    )
    assert small.train_unet.block_out_channels != tiny.train_unet.block_out_channels
    # tiny64: 64 px through tiny's f=4 VAE, so the U-Net sees 16x16 latents (one more
    # level than tiny's, without attention: test_plain_levels_...)
    t64 = config.resolve({"profile": "tiny64"})
    assert t64.train_vae.block_out_channels == tiny.train_vae.block_out_channels
    vae_down = 2 ** (len(t64.train_vae.block_out_channels) - 1)
    assert t64.ingest.image_size // vae_down == 16
    assert vae_down * t64.train_unet.downsampling() == t64.ingest.bucket_stride
    # ...whose VAE trains on 32 px windows (RESULTS.md "tiny64's VAE on crops"); tiny's,
    # at 32 px, on whole images
    assert (t64.train_vae.crop, tiny.train_vae.crop) == (32, None)
    # Non-size knobs are the same in every profile.
    for p in (small, base):
        assert p.train_unet.lr == tiny.train_unet.lr
        assert p.train_unet.prediction_type == tiny.train_unet.prediction_type
        assert p.evaluate.scheduler == tiny.evaluate.scheduler


def test_params_file_overrides_profile():
    p = config.resolve(
        {"profile": "small", "train_unet": {"steps": 7, "block_out_channels": [32, 64]}}
    )
    assert p.train_unet.steps == 7
    assert p.train_unet.block_out_channels == (32, 64)


def test_set_values_keeps_comments_and_validates(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    changed = config.set_values(path, {"ingest.dataset": "digits"})
    assert changed == {"ingest.dataset": ("shapes", "digits")}
    text = path.read_text()
    assert "# Kiln parameters" in text and "dataset: digits" in text
    assert config.load(path).ingest.dataset == "digits"
    assert config.set_values(path, {"ingest.dataset": "digits"}) == {}
    with pytest.raises(ConfigError):
        config.set_values(path, {"ingest.dataset": "cats"})
    assert config.load(path).ingest.dataset == "digits"  # nothing written on error


def test_plain_levels_leave_attention_out_of_the_highest_resolutions():
    """tiny64's U-Net attends to the text at 8x8 and 4x4, not over its 16x16 latents
    (SDXL's layout); tiny's attends at every level but the deepest, as SD's."""
    import torch

    from training.backbones import TextDims, unet2d

    plain, attn = "DownBlock2D", "CrossAttnDownBlock2D"
    t64 = unet2d.build(config.resolve({"profile": "tiny64"}), 4, 16, TextDims(64, 64))
    assert list(t64.config.down_block_types) == [plain, attn, attn, plain]
    up = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert list(t64.config.up_block_types) == up
    with torch.no_grad():
        out = t64(torch.randn(2, 4, 16, 16), 10, encoder_hidden_states=torch.randn(2, 5, 64))
    assert out.sample.shape == (2, 4, 16, 16)
    tiny = unet2d.build(config.resolve({}), 4, 8, TextDims(64, 64))
    assert list(tiny.config.down_block_types) == [attn, attn, plain]
    one = unet2d.build(config.resolve({"train_unet": {"plain_levels": 1}}), 4, 8, TextDims(64, 64))
    assert list(one.config.down_block_types) == [plain, attn, plain]
    with pytest.raises(ConfigError, match="plain_levels 2 leaves none of the 3 levels"):
        config.resolve({"train_unet": {"plain_levels": 2}})


def test_a_run_on_a_built_in_set_clears_an_earlier_source(tmp_path):
    """Found in review: `kiln run --dataset shapes` after a folder run changed only the
    dataset, and the shapes model's lineage tags (and the source probe) named the folder."""
    from training.intake.ingest import source_state
    from training.tracking.lineage import data_tags

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    config.set_values(path, config.run_choices("folder", str(tmp_path / "pets")))
    changed = config.set_values(path, config.run_choices("shapes"))
    assert changed["ingest.source"] == (str(tmp_path / "pets"), None)
    assert config.load(path).ingest.source is None
    # params.yaml edited by hand the same way: a built-in set still reads no source
    kept = config.resolve({"ingest": {"dataset": "shapes", "source": "/tmp/pets"}})
    assert data_tags(kept.to_dict()) == {"kiln.dataset": "shapes"}
    assert source_state(kept) == source_state(config.resolve({"ingest": {"dataset": "shapes"}}))
    assert config.run_choices(profile="tiny") == {"profile": "tiny"}  # nothing else touched


def test_near_duplicate_bits_reach_the_whole_hash():
    """Was capped at 64, the old hash's width: the hash has 192 bits since 2026-12-06."""
    from training.intake.checks import HASH_BITS

    assert (
        config.resolve({"validate": {"near_duplicate_bits": 100}}).validate_.near_duplicate_bits
        == 100
    )
    with pytest.raises(ConfigError, match="less than or equal to 192"):
        config.resolve({"validate": {"near_duplicate_bits": HASH_BITS + 1}})


def test_a_key_given_twice_is_refused_in_one_line(tmp_path):
    """PyYAML keeps the last of two equal keys without a word; DVC's parser refuses the
    file. Kiln ran the second `max_prompts`, then the run failed inside `dvc repro`
    after the flow's retries, naming no key; `kiln run --dataset` was a traceback."""
    path = tmp_path / "params.yaml"
    path.write_text("evaluate:\n  max_prompts: 4\n  steps: 3\n  max_prompts: 8\n")
    with pytest.raises(config.ConfigError, match=r"'max_prompts' given twice \(lines 2 and 4\)"):
        config.load(path)
    with pytest.raises(config.ConfigError, match="given twice"):
        config.set_values(path, {"seed": 3})
    assert path.read_text().count("max_prompts") == 2  # left as it was
    # anchors and merges are not duplicates
    from training.params_file import load_yaml

    merged = load_yaml("a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n")
    assert merged == {"a": {"b": 1}, "c": {"b": 1, "d": 2}}


def test_exponent_floats_are_numbers_as_dvc_reads_them(tmp_path):
    """`lr: 1e-4` is a float to DVC's YAML 1.2 parser, which tracked 0.0001, and was the
    string '1e-4' to PyYAML: Kiln refused the number with "Input should be a valid
    number (got '1e-4')", and `kiln run --profile` could not write the file."""
    path = tmp_path / "params.yaml"
    path.write_text("train_unet:\n  lr: 1e-4\n  min_snr_gamma: 5E0\ntrain_vae:\n  lr: 2.5e-3\n")
    p = config.load(path)
    assert (p.train_unet.lr, p.train_unet.min_snr_gamma, p.train_vae.lr) == (1e-4, 5.0, 2.5e-3)
    assert config.set_values(path, {"profile": "tiny64"}) == {"profile": (None, "tiny64")}
    assert config.load(path).train_unet.lr == 1e-4
    path.write_text("train_unet:\n  steps: 1e3\n")  # a float still: no count of steps
    with pytest.raises(ConfigError, match=r"train_unet.steps: .* integer \(got 1000.0\)"):
        config.load(path)
