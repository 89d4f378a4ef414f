"""Component reuse (#16): ``train_vae.reuse`` / ``train_clip.reuse`` install a registered
model instead of training one, measure it on this data, and register nothing new; a
reference that cannot be reused stops the stage before anything is written. And
precompute_latents encodes only the samples it has not encoded with those same models.

The real stage commands (``kiln train-vae``, ``kiln train-clip``) on a project copy
with its own MLflow store, on a small synthetic clean split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import copy_project, kiln, py, sigkill_after_checkpoint
from tests.loaderkit import image_split
from training import config

STEPS = {
    f"{stage}.{key}": value
    for stage in ("train_vae", "train_clip")
    for key, value in (("steps", 6), ("batch_size", 8), ("warmup_steps", 0), ("val_samples", 16))
}
REGISTRY = """
import json
from mlflow import MlflowClient
from training import tracking
tracking.setup()
c = MlflowClient()
print(json.dumps({n: sorted(int(v.version) for v in c.search_model_versions(f"name='{n}'"))
                  for n in ("kiln-vae", "kiln-clip")}))
"""
ALIAS = """
from mlflow import MlflowClient
from training import tracking
tracking.setup()
MlflowClient().set_registered_model_alias("kiln-unet", "champion", "{version}")
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A project copy whose VAE and CLIP were trained (briefly) and registered as v1."""
    project = copy_project(tmp_path_factory.mktemp("reuse") / "kiln")
    image_split(project / "data" / "clean" / "train", n=64, per_shard=32, size=32)
    image_split(project / "data" / "clean" / "val", n=16, size=32, seed=1, prefix="val")
    config.set_values(project / "params.yaml", STEPS)
    kiln(project, "train-vae")
    kiln(project, "train-clip")
    shutil.copytree(project / "data" / "models", project.parent / "v1")  # as registered
    return project


def _registry(project: Path) -> dict[str, list[int]]:
    return json.loads(py(project, REGISTRY).strip().splitlines()[-1])


def _metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "data" / "metrics" / f"{stage}.json").read_text())


def test_a_registered_version_is_installed_measured_and_not_registered_again(trained):
    project = trained
    weights = {
        "vae": "diffusion_pytorch_model.safetensors",
        "clip": "model.safetensors",
    }
    before = {k: (project / "data" / "models" / k / f).read_bytes() for k, f in weights.items()}
    assert _registry(project) == {"kiln-vae": [1], "kiln-clip": [1]}
    config.set_values(
        project / "params.yaml",
        {"train_vae.reuse": "models:/kiln-vae/1", "train_clip.reuse": "models:/kiln-clip/1"},
    )
    shutil.rmtree(project / "data" / "models")
    try:
        vae_run = kiln(project, "train-vae")
        clip_run = kiln(project, "train-clip")
    finally:
        config.set_values(
            project / "params.yaml", {"train_vae.reuse": None, "train_clip.reuse": None}
        )
    assert "train_vae: reusing models:/kiln-vae/1" in vae_run.stderr
    for k, f in weights.items():  # the very weights of version 1
        assert (project / "data" / "models" / k / f).read_bytes() == before[k], k
        # and the config that made them (was: this run's, so the output's DVC hash moved
        # with any train_vae edit and DVC fine-tuned the U-Net again on the same data)
        made = project.parent / "v1" / k / "resolved_params.json"
        assert (project / "data" / "models" / k / "resolved_params.json").read_bytes() == (
            made.read_bytes()
        ), k
    assert (project / "data" / "models" / "clip" / "tokenizer_config.json").is_file()
    vae_m, clip_m = _metrics(project, "train_vae"), _metrics(project, "train_clip")
    assert vae_m["reused_version"] == vae_m["registered_version"] == "1"
    assert clip_m["reused_version"] == clip_m["registered_version"] == "1"
    # measured on this data all the same
    assert vae_m["val_samples"] == 16 and 0 < vae_m["val_psnr"] < 60
    assert clip_m["val_samples"] == 16 and 0 <= clip_m["val_i2t_r1"] <= 1
    assert 1 / 16 <= clip_m["val_r1_chance"] <= 1
    assert clip_m["context_length"] > 0 and "the reused tokenizer's" in clip_run.stderr
    assert "train_seconds" not in vae_m and "train_seconds" not in clip_m  # none trained
    assert _registry(project) == {"kiln-vae": [1], "kiln-clip": [1]}  # nothing new


@pytest.mark.parametrize(
    "stage,ref,says",
    [
        ("train_vae", "models:/kiln-vae/7", "not in the registry"),
        ("train_vae", "models:/kiln-nope@champion", "not in the registry"),
        ("train_vae", "{v1}/clip", "not a AutoencoderKL folder"),
        ("train_vae", "{v1}/no-such-dir", "is not a directory"),
        ("train_vae", "{other_profile}", "the VAE downsamples 8x, the tiny profile's 4x"),
        # an SD3-style VAE: was installed, and the DiT's pipeline decoded every sample
        # shifted by it while training had never subtracted it
        ("train_vae", "{shifted}", "the VAE has shift_factor 0.3; Kiln trains its"),
        ("train_clip", "{v1}/vae", "not a clip folder"),
    ],
    ids=["no-version", "no-model", "wrong-kind", "no-dir", "other-profile", "shifted",
         "clip-wrong-kind"],
)  # fmt: skip
def test_what_cannot_be_reused_stops_the_stage_before_anything_is_written(
    trained, tmp_path, stage, ref, says
):
    project = trained
    other = tmp_path / "vae-f8"  # a VAE with one more downsampling level than tiny's
    v1 = project.parent / "v1"
    shutil.copytree(v1 / "vae", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["block_out_channels"] = [*cfg["block_out_channels"], cfg["block_out_channels"][-1]]
    (other / "config.json").write_text(json.dumps(cfg))
    shifted = tmp_path / "vae-shift"  # tiny's VAE, with a latent shift in its config
    shutil.copytree(v1 / "vae", shifted)
    cfg = json.loads((shifted / "config.json").read_text())
    (shifted / "config.json").write_text(json.dumps({**cfg, "shift_factor": 0.3}))
    ref = ref.format(v1=v1, other_profile=other, shifted=shifted)
    config.set_values(project / "params.yaml", {f"{stage}.reuse": ref})
    out = project / "data" / "models" / ("vae" if stage == "train_vae" else "clip")
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    try:
        proc = kiln(project, stage.replace("_", "-"), check=False)
    finally:
        config.set_values(project / "params.yaml", {f"{stage}.reuse": None})
    assert proc.returncode != 0
    assert says in proc.stderr, proc.stderr[-2000:]
    # refused before the adapter cleared it: the last model stays as it was (was: removed)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    assert _registry(project) == {"kiln-vae": [1], "kiln-clip": [1]}


def _rows(latents: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """content key -> (posterior mean, text states) of every train row."""
    from training.phases import latent_cache

    out = {}
    for f in sorted((latents / "train").glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            keys = latent_cache.read_rows_meta(fh.metadata())["content"]
            mean, text = fh.get_tensor("mean"), fh.get_tensor("text")
        out.update({k: (mean[i], text[i]) for i, k in enumerate(keys)})
    return out


def test_latents_are_encoded_once_per_sample_and_models(trained):
    project = trained
    models = project / "data" / "models"
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(project.parent / "v1", models)  # the registered v1 VAE and CLIP
    latents = project / "data" / "latents"
    first = kiln(project, "precompute-latents")
    m = _metrics(project, "precompute_latents")
    assert (m["latents_encoded"], m["latents_reused"]) == (80, 0)
    assert "reusable: no earlier latents" in first.stderr
    before = _rows(latents)

    # the data grows: 16 more training pictures, the first 64 as they were
    shutil.rmtree(project / "data" / "clean" / "train")
    image_split(project / "data" / "clean" / "train", n=80, per_shard=32, size=32)
    kiln(project, "precompute-latents")
    m = _metrics(project, "precompute_latents")
    assert (m["latents_encoded"], m["latents_reused"]) == (16, 80)
    after = _rows(latents)
    assert len(after) == 80 and set(before) < set(after)
    for k, (mean, text) in before.items():  # copied, not encoded again
        assert torch.equal(after[k][0], mean) and torch.equal(after[k][1], text)
    assert not list(project.glob("data/.latents*"))  # nothing left beside the output

    # a new VAE is a new latent space: everything is encoded again
    config.set_values(project / "params.yaml", {"train_vae.steps": 7})
    kiln(project, "train-vae")
    again = kiln(project, "precompute-latents")
    m = _metrics(project, "precompute_latents")
    assert (m["latents_encoded"], m["latents_reused"]) == (96, 0)
    assert "reusable: the VAE or CLIP changed" in again.stderr


def test_the_unet_starts_from_a_registered_one_or_says_why_it_cannot(trained):
    project = trained
    if not (project / "data" / "latents" / "manifest.json").is_file():  # run alone (-k)
        kiln(project, "precompute-latents")
    weights = project / "data" / "models" / "unet" / "diffusion_pytorch_model.safetensors"
    short = {"train_unet.batch_size": 8, "train_unet.preview_every": 0,
             "train_unet.val_samples": 8, "train_unet.warmup_steps": 0}  # fmt: skip
    # v1: 20 steps at a high rate, saved without averaging, far from any initialisation
    v1_cfg = {"train_unet.steps": 20, "train_unet.lr": 0.01, "train_unet.ema_decay": 0.0}
    config.set_values(project / "params.yaml", {**short, **v1_cfg})
    kiln(project, "train-unet")
    v1 = load_file(weights)
    # then two steps at a low rate: from v1 they stay near v1, from scratch near the init
    two_steps = {"train_unet.steps": 2, "train_unet.finetune_steps": 2,
                 "train_unet.lr": 1.0e-4, "train_unet.ema_decay": 0.999}  # fmt: skip
    config.set_values(project / "params.yaml", two_steps)

    def distance(state: dict) -> float:  # largest difference from v1, any tensor
        return max(float((state[k] - v1[k]).abs().max()) for k in v1)

    config.set_values(project / "params.yaml", {"train_unet.init_from": "models:/kiln-unet/1"})
    warm = kiln(project, "train-unet")
    assert "train_unet: starting from models:/kiln-unet/1" in warm.stderr
    m = _metrics(project, "train_unet")
    assert m["init_version"] == "1" and m["registered_version"] == "2"  # a new version
    assert m["finetune_steps"] == 2
    # two steps on: the saved (EMA) weights are v1's plus at most a whisker
    assert distance(load_file(weights)) < 1e-3

    config.set_values(project / "params.yaml", {"train_unet.init_from": None})
    kiln(project, "train-unet")  # the same two steps from a fresh initialisation
    assert distance(load_file(weights)) > 0.05

    # a fine-tune from @champion killed mid-run, then run again after the alias moved: it
    # starts over from the new parent (was: resumed the old parent's checkpoint, and the
    # result named the new parent). The section is unchanged, so only the parent differs.
    ckpt = project / "data" / "checkpoints" / "train_unet"
    py(project, ALIAS.format(version=1))
    champion = "models:/kiln-unet@champion"
    config.set_values(project / "params.yaml", {"train_unet.init_from": champion,
        "train_unet.finetune_steps": 120, "train_unet.checkpoint_every": 2})  # fmt: skip
    assert sigkill_after_checkpoint(project, "train-unet", ckpt, 2) < 120
    py(project, ALIAS.format(version=2))
    other = kiln(project, "train-unet")
    assert "resuming from step-" not in other.stderr
    assert _metrics(project, "train_unet")["init_version"] == "2"
    config.set_values(project / "params.yaml", {"train_unet.init_from": None,
        "train_unet.finetune_steps": 2, "train_unet.checkpoint_every": 200})  # fmt: skip

    # another width: refused before any step, with the first tensor that differs
    config.set_values(
        project / "params.yaml",
        {"train_unet.init_from": "models:/kiln-unet/1", "train_unet.layers_per_block": 2},
    )
    bad = kiln(project, "train-unet", check=False)
    assert bad.returncode != 0
    assert "models:/kiln-unet/1 does not fit the tiny profile's U-Net" in bad.stderr
    assert "tensors differ, e.g. " in bad.stderr

    # the same tensors trained to predict another target: refused too (was: fine-tuned
    # for finetune_steps as if it knew the task, and registered)
    config.set_values(
        project / "params.yaml",
        {
            "train_unet.layers_per_block": 1,
            "train_unet.prediction_type": "epsilon",
            "train_unet.beta_schedule": "scaled_linear",
        },
    )
    bad = kiln(project, "train-unet", check=False)
    assert bad.returncode != 0
    assert "models:/kiln-unet/1 was trained on another objective (prediction_type" in bad.stderr

    # the same objective and shapes in another latent space: a VAE trained again (mode
    # scratch, init_from kept) for 9 steps, none of this module's runs (6, 7: the same
    # steps would make the same VAE, bit for bit, and rightly pass), its latents again.
    # Refused (was: fine-tuned weights that predict for the old VAE's latents, every
    # shape check passed, and registered)
    config.set_values(
        project / "params.yaml",
        {"train_unet.prediction_type": "v_prediction",
         "train_unet.beta_schedule": "squaredcos_cap_v2", "train_vae.steps": 9},
    )  # fmt: skip
    kiln(project, "train-vae")
    kiln(project, "precompute-latents")
    bad = kiln(project, "train-unet", check=False)
    assert bad.returncode != 0
    assert "models:/kiln-unet/1 was trained in another latent or text space (VAE " in bad.stderr
    assert "CLIP" not in bad.stderr.split("space (")[1].split(")")[0]  # CLIP is the same


def test_latents_made_by_other_code_are_not_reused(tmp_path: Path):
    """The bug: the latent cache was keyed on the models, the data and the text type
    only. A fix to how a row is made (the picture's scaling, the text states) re-runs
    precompute_latents (DVC sees the code change), which then copied every old row
    made by the old code. Now the manifest records the row-making code too."""
    from safetensors.torch import save_file

    from training.intake.index import write_index
    from training.phases.latent_cache import ROW_CODE, LatentCache, code_fingerprint

    old = tmp_path / "latents"
    (old / "train").mkdir(parents=True)
    save_file({"mean": torch.zeros(2, 4, 8, 8)}, old / "train" / "part-0.safetensors",
              metadata={"content": "k1,k2"})  # fmt: skip
    write_index(old / "train", {"part-0.safetensors": 2}, "train")  # as the stage does
    manifest = {
        "vae": {"fingerprint": "v"},
        "clip": {"fingerprint": "c"},
        "backbone": "unet2d",
        "code": "made-by-old-code",
        "tensors": {"text": {"dtype": "torch.float16"}},
    }
    (old / "manifest.json").write_text(json.dumps(manifest))
    same = LatentCache(old, "v", "c", "float16", "unet2d", code_fp="made-by-old-code")
    assert set(same.where) == {"k1", "k2"}
    other = LatentCache(old, "v", "c", "float16", "unet2d", code_fp="made-by-new-code")
    assert other.where == {} and other.reason == "the code that encodes a row changed"

    # the fingerprint follows every file of ROW_CODE
    repo = Path(__file__).resolve().parents[1]
    for entry in ROW_CODE:
        src, dst = repo / entry, tmp_path / "repo" / entry
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    before = code_fingerprint(tmp_path / "repo")
    assert before == code_fingerprint(repo)
    text = tmp_path / "repo" / "training/backbones/unet2d.py"
    text.write_text(text.read_text() + "\n# a fix to the text states\n")
    assert code_fingerprint(tmp_path / "repo") != before


@pytest.mark.parametrize("setting", [{"attention_head_dim": 8}, {"norm_num_groups": 8}])
def test_a_parent_built_with_other_heads_or_groups_is_not_warm_started(tmp_path, setting):
    """Heads and norm groups split the same tensors another way: every shape check
    passes, and the parent's weights would compute something else (was: loaded and
    fine-tuned for finetune_steps as if it knew the task)."""
    from training.backbones import TextDims
    from training.phases import reuse
    from training.phases.unet import build, objective

    def made(**train_unet):
        params = config.resolve({"profile": "tiny", "train_unet": train_unet})
        return params, build(params, 4, 8, TextDims(hidden=64, pooled=64))

    params, parent = made()
    parent.save_pretrained(tmp_path / "parent")
    same, model = made()
    assert reuse.warm_start(model, str(tmp_path / "parent"), same, objective(same), {})
    loaded = zip(model.state_dict().values(), parent.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in loaded)
    other, model = made(**setting)
    key = next(iter(setting))
    with pytest.raises(reuse.ReuseError, match=f"built with other settings \\({key}"):
        reuse.warm_start(model, str(tmp_path / "parent"), other, objective(other), {})
