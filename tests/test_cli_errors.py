"""Bad input ends with one clear line and a non-zero exit — no traceback, nothing
half-written left looking valid."""

from pathlib import Path

import pytest

from .conftest import kiln


def _assert_one_line_error(proc, needle: str):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0], errors[0]


def test_malformed_params(project: Path):
    (project / "params.yaml").write_text("profile: tiny\ntrain_unet: {lr: fast}\n")
    _assert_one_line_error(kiln(project, "ingest", check=False), "train_unet.lr")
    (project / "params.yaml").write_text("train_unet: [unclosed\n")
    _assert_one_line_error(kiln(project, "validate", check=False), "not valid YAML")


def test_unknown_dataset(project: Path):
    proc = kiln(project, "run", "--dataset", "cats", check=False)
    _assert_one_line_error(proc, "ingest.dataset")
    assert "dataset: shapes" in (project / "params.yaml").read_text()  # unchanged


def test_a_refused_source_leaves_params_yaml_as_it_was(project: Path):
    """Were: --dataset/--source were written into params.yaml, then the source was found
    missing; the next plain `kiln run` or `dvc repro` failed on the folder never given."""
    before = (project / "params.yaml").read_bytes()
    proc = kiln(project, "run", "--dataset", "folder", "--source", "nope/pics", check=False)
    _assert_one_line_error(proc, "ingest: image folder nope/pics does not exist")
    assert (project / "params.yaml").read_bytes() == before


@pytest.mark.parametrize(
    "args", [["--source", "pics"], ["--dataset", "digits", "--source", "pics"]]
)
def test_a_source_for_a_built_in_set_is_refused(project: Path, args):
    """Was: written into params.yaml and the run started, on the built-in set's own
    pictures: the folder named on the command line was never read (`--dataset folder`
    forgotten, or shapes still params.yaml's dataset)."""
    (project / "pics").mkdir()
    before = (project / "params.yaml").read_bytes()
    proc = kiln(project, "run", *args, check=False)
    kind = "digits" if "digits" in args else "shapes"
    _assert_one_line_error(proc, f"--source pics: ingest.dataset {kind} is a built-in set")
    assert (project / "params.yaml").read_bytes() == before
    assert not (project / "data" / "raw").exists()


@pytest.mark.parametrize("name, value", [("KILN_LOADER_THREADS", "0"), ("KILN_THREADS", "two")])
def test_a_bad_thread_setting_stops_the_run_before_any_work(project: Path, name, value):
    """Were: KILN_LOADER_THREADS=0 silently meant 1, and a bad KILN_THREADS stopped
    ``kiln run`` at its first training stage, after ingest and validate had run."""
    proc = kiln(project, "run", check=False, env={name: value})
    _assert_one_line_error(proc, f"{name} must be a whole number >= 1")
    assert not (project / "data" / "raw").exists()


def test_missing_stage_input(project: Path):
    proc = kiln(project, "train-unet", check=False)
    _assert_one_line_error(proc, "missing stage input data/latents")
    assert not (project / "data" / "models" / "unet").exists()


def test_unwritable_output_dir(project: Path):
    (project / "data" / "models").write_text("a file where a directory should be")
    (project / "data" / "clean").mkdir(parents=True)
    (project / "data" / "clean" / "x").write_text("")
    proc = kiln(project, "train-vae", check=False)
    _assert_one_line_error(proc, "not writable")


def test_generate_with_unknown_model(project: Path, tmp_path: Path):
    proc = kiln(
        project,
        "generate",
        "a red circle",
        "--model",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    _assert_one_line_error(proc, "cannot resolve model")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--steps", "0"], "--steps"),
        (["-n", "0"], "'-n'"),
        (["--guidance", "-3"], "--guidance"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_generate_rejects_out_of_range_arguments_before_loading(project, tmp_path, args, needle):
    """Were: a ZeroDivisionError traceback (steps 0, leaving an empty folder), success
    writing nothing (-n 0), negative guidance accepted."""
    out = tmp_path / "o"
    proc = kiln(project, "generate", "a red circle", "--out", str(out), *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "Invalid value" in proc.stderr and needle in proc.stderr, proc.stderr
    assert not out.exists()


def test_generate_checks_scheduler_model_path_and_prompt_before_loading(project, tmp_path):
    out = tmp_path / "o"
    # the scheduler is checked first: no registry exists here, yet that is not the error
    proc = kiln(project, "generate", "a red circle", "--scheduler", "nosuch", "--out", str(out),
                check=False)  # fmt: skip
    _assert_one_line_error(proc, "unknown scheduler 'nosuch' (choose ddpm, ddim, dpm++, euler)")
    proc = kiln(project, "generate", "x", "--model", "/nonexistent", "--out", str(out),
                check=False)  # fmt: skip
    _assert_one_line_error(proc, "'/nonexistent': no such pipeline directory")
    _assert_one_line_error(
        kiln(project, "generate", "  ", "--out", str(out), check=False), "a prompt is empty"
    )
    assert not out.exists()


def test_a_switched_off_stage_writes_the_same_output_whatever_its_params(project: Path):
    """Was: train_controlnet, switched off, kept the whole config in its DVC out, so any
    edit of its params changed the out's hash and evaluate ran again on unchanged weights,
    registering a duplicate version."""
    from training import config

    for name in ("clean", "models/vae", "models/clip", "models/unet"):
        (project / "data" / name).mkdir(parents=True)
        (project / "data" / name / "x").write_text("")
    out = project / "data" / "models" / "controlnet"
    seen = []
    for steps in (7, 9):
        config.set_values(project / "params.yaml", {"train_controlnet.steps": steps})
        kiln(project, "train-controlnet")
        seen.append({p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert seen[0] == seen[1] and "skipped.json" in seen[0], seen


def test_an_error_of_no_known_kind_is_one_line_a_note_and_nothing_half_written(
    project: Path, monkeypatch, capsys
):
    """Found in review: huggingface_hub's StrictDataclassClassValidationError (an
    Exception, not a ValueError) went past every handler: a traceback, no failure note
    (so the flow retried the stage) and the stage's half output left behind."""
    import json
    from types import SimpleNamespace

    import typer

    from training.cli.stage import _run_stage

    class Odd(Exception):
        pass

    out = Path("data/models/odd")

    def body(params, tr):
        (out / "half.bin").write_bytes(b"x")
        raise Odd("a library's own error\nwith a second line")

    monkeypatch.chdir(project)
    monkeypatch.delenv("KILN_DEBUG", raising=False)
    spec = SimpleNamespace(
        outs=(out,), inputs=(), persist=False, streamed=(), checkpoints=False, model=None
    )
    with pytest.raises(typer.Exit) as stopped:
        _run_stage("train_clip", spec, body, None)
    assert stopped.value.exit_code == 1
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kiln: error:")]
    assert errors == [
        "kiln: error: train_clip: Odd: a library's own error (KILN_DEBUG=1 shows where)"
    ]
    note = json.loads((project / ".kiln" / "failed-train_clip.json").read_text())
    assert note["retry"] is False  # the same error again: no retry
    assert not out.exists()


def test_a_resumed_training_stage_keeps_the_previews_drawn_before_its_checkpoint(
    project: Path, monkeypatch
):
    """Found in review: the re-run emptied the stage's outs, previews/ included, and a
    resumed run draws only the steps after its checkpoint: the U-Net's previews/ (and
    so its DVC out) differed from an uninterrupted run's."""
    from types import SimpleNamespace

    import typer

    from training import paths as P
    from training.cli.stage import _run_stage

    out = Path("data/models/fake")
    spec = SimpleNamespace(
        outs=(out,), inputs=(), persist=False, streamed=(), checkpoints=True, model=None
    )

    def trained(first: int, last: int, stop: int | None = None):
        def body(params, tr):
            (out / "previews").mkdir(parents=True, exist_ok=True)
            for step in range(first, last + 1):
                (out / "previews" / f"step-{step:06d}.png").write_bytes(b"step %d" % step)
                if step == 2:  # a checkpoint at step 2
                    (P.CKPT / "fake" / "step-00000002").mkdir(parents=True, exist_ok=True)
                    (P.CKPT / "fake" / "step-00000002" / "COMPLETE").write_text("fp")
                if step == stop:
                    raise KeyboardInterrupt
            return {"resumed_from_step": first - 1}

        return body

    monkeypatch.chdir(project)
    with pytest.raises(typer.Exit):
        _run_stage("fake", spec, trained(1, 4, stop=3), None)  # Ctrl-C during step 3
    assert not out.exists()  # a failed stage's outs are removed, as before
    _run_stage("fake", spec, trained(3, 4), None)  # resumes at 2
    drawn = sorted(f.name for f in (out / "previews").iterdir())
    assert drawn == [f"step-{s:06d}.png" for s in (1, 2, 3, 4)]
    assert (out / "previews" / "step-000001.png").read_bytes() == b"step 1"
    assert not (P.CKPT / "fake").exists()  # resume state is gone once the stage succeeds
