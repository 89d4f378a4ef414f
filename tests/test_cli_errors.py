"""Bad input ends with one clear line and a non-zero exit — no traceback, nothing
half-written left looking valid."""

from pathlib import Path

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
