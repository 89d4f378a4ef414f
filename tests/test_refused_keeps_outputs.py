"""A stage command refused for a stale input leaves its last good output as it was.

Found in review: after a by-hand ``kiln train-vae`` (a new VAE), ``kiln train-unet``
rightly stopped with "data/latents were made by other models", but the stage adapter
had emptied its outs before the phase checked its inputs: ``dvc status`` said
``deleted: data/models/unet`` and ``kiln generate`` had no U-Net. The model folders
here are configs and stand-in weights only: every refusal comes before a model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.phases.latent_cache import model_fingerprint
from training.phases.reuse import TRAINED_ON


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _stale_project(project: Path) -> dict[str, Path]:
    """Every stage's inputs and a previous output, the U-Net and the latents made with
    the VAE that ``kiln train-vae`` has since replaced."""
    data = project / "data"
    d = {k: data / "models" / k for k in ("vae", "clip", "unet", "controlnet")}
    d.update(clean=data / "clean", latents=data / "latents", eval=data / "eval")
    for name, folder in d.items():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"name": name}))
    old = {"vae": "0123456789abcdef", "clip": model_fingerprint(d["clip"])}  # the old VAE
    manifest = {k: {"fingerprint": v} for k, v in old.items()}
    (d["latents"] / "manifest.json").write_text(json.dumps(manifest))
    (d["unet"] / TRAINED_ON).write_text(json.dumps(old))
    for name in ("unet", "controlnet"):
        (d[name] / "diffusion_pytorch_model.safetensors").write_bytes(b"the last good weights")
        (d[name] / "resolved_params.json").write_text('{"the": "run that made them"}')
    (d["eval"] / "report.html").write_text("<p>the last evaluation</p>")
    return d


def _refused(project: Path, stage: str, monkeypatch):
    """Run ``stage``'s command in ``project`` (one process, none of the suite's Kiln
    environment) and expect it to stop: the ``typer.Exit`` it raised."""
    import typer

    from training.cli.stage import _stage_command

    monkeypatch.chdir(project)
    for name in ("KILN_NPROC", "KILN_DATA_REMOTE", "KILN_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(typer.Exit) as stopped:
        _stage_command(stage)()
    return stopped


@pytest.mark.parametrize(
    ("stage", "out", "needle"),
    [
        ("train_unet", "unet", "data/latents were made by other models (VAE 0123456789abcdef"),
        ("train_controlnet", "controlnet", "was trained on the latents of other models"),
        ("evaluate", "eval", "was trained on the latents of other models"),
    ],
)
def test_a_refused_stage_leaves_its_last_output_byte_identical(
    project: Path, monkeypatch, capsys, stage: str, out: str, needle: str
):
    from training import config

    d = _stale_project(project)
    config.set_values(project / "params.yaml", {"train_controlnet.enabled": True})
    before = _files(d[out])
    stopped = _refused(project, stage, monkeypatch)  # what `kiln train-unet` runs
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kiln: error:")]
    assert stopped.value.exit_code == 1 and len(errors) == 1 and needle in errors[0], errors
    assert _files(d[out]) == before
    note = json.loads((project / ".kiln" / f"failed-{stage}.json").read_text())
    assert note["retry"] is False  # the flow is told, as before


def test_a_missing_input_leaves_the_last_output_too(project: Path, monkeypatch, capsys):
    """``require`` refused before the outs were cleared, but the failure handler emptied
    them anyway: ``kiln evaluate`` without data/models/controlnet deleted data/eval."""
    import shutil

    d = _stale_project(project)
    shutil.rmtree(d["controlnet"])
    before = _files(d["eval"])
    _refused(project, "evaluate", monkeypatch)
    assert "missing stage input data/models/controlnet" in capsys.readouterr().err
    assert _files(d["eval"]) == before


def test_refused_precompute_latents_leaves_the_last_latents_byte_identical(
    project: Path, monkeypatch, capsys
):
    """data/latents is kept between runs (DVC persist), and the adapter wrote this run's
    resolved_params.json into it before the phase ran: a run refused for a clean shard
    changed since validate left the old latents with a file they never had (the
    finished run's swapped-in folder had none), and DVC called them modified."""

    from training.intake.index import write_index

    d = _stale_project(project)
    (d["latents"] / "train").mkdir()
    (d["latents"] / "train" / "train-00000.safetensors").write_bytes(b"the last latents")
    for split in ("train", "val"):
        shard = d["clean"] / split / f"{split}-00000.tar"
        shard.parent.mkdir()
        shard.write_bytes(b"a shard as validate wrote it")
        write_index(shard.parent, {shard.name: 1}, split)
    (d["clean"] / "val" / "val-00000.tar").write_bytes(b"a shard changed since")
    before = _files(d["latents"])
    _refused(project, "precompute_latents", monkeypatch)
    assert "val-00000.tar is not the shard" in capsys.readouterr().err
    assert _files(d["latents"]) == before


def test_an_incremental_stage_records_its_config_once_it_finished(project: Path, monkeypatch):
    """A persist out (data/raw) gets the run's resolved_params.json after the phase
    finished: a failed run leaves the last one; a finished one writes its own."""
    from types import SimpleNamespace

    import typer

    from training.cli.stage import _run_stage
    from training.errors import UserError

    out = Path("data/raw")
    spec = SimpleNamespace(outs=(out,), inputs=(), persist=True, streamed=(),
                           checkpoints=False, model=None, records_config=True)  # fmt: skip

    def body(params, tr):
        raise UserError("the source is gone")

    monkeypatch.chdir(project)
    out.mkdir(parents=True)
    (out / "resolved_params.json").write_text('{"the": "last run"}')
    with pytest.raises(typer.Exit):
        _run_stage("ingest", spec, body, None)
    assert (out / "resolved_params.json").read_text() == '{"the": "last run"}'
    _run_stage("ingest", spec, lambda params, tr: {}, None)
    assert json.loads((out / "resolved_params.json").read_text())["ingest"]


@pytest.mark.parametrize(("stage", "name"), [("train_vae", "vae"), ("train_clip", "clip")])
def test_a_refused_reuse_leaves_the_last_model(project: Path, monkeypatch, capsys, stage, name):
    """``train_vae.reuse`` naming a folder that holds no VAE was refused by the phase
    after the adapter had emptied data/models/vae: the VAE every later stage and
    ``kiln generate`` pair with was gone."""
    import typer

    from training import config
    from training.cli.stage import _stage_command

    d = _stale_project(project)
    (d["clean"] / "x").write_bytes(b"x")
    (d[name] / "model.safetensors").write_bytes(b"the last good weights")
    not_a_model = project / "not-a-model"
    not_a_model.mkdir()
    config.set_values(project / "params.yaml", {f"{stage}.reuse": str(not_a_model)})
    before = _files(d[name])
    monkeypatch.chdir(project)
    for var in ("KILN_NPROC", "KILN_DATA_REMOTE", "KILN_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(typer.Exit):
        _stage_command(stage)()
    assert f"{not_a_model}: no " in capsys.readouterr().err
    assert _files(d[name]) == before
