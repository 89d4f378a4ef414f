"""Fixes to serving and drawing: REST/pyfunc rows that leave out seed, steps, width or
height (null) are drawn at the defaults instead of MLflow refusing the whole request, a
seed is at most 2**53 - 1 everywhere, and ``kiln generate --model DIR`` on a
ControlNet pipeline directory (``kiln export --controlnet``) draws with and without
``--control``.

On a random-weight pipeline with the tiny profile's architectures
(``test_serving.build_tiny_pipeline``: nothing trained, nothing downloaded), registered
by the evaluate stage's own code (``test_serving.register``) and loaded in process with
``mlflow.pyfunc.load_model``. REST requests go through MLflow's own scoring function
(``scoring_server.invocations``: JSON parsing, the signature's casts, predict), without
starting a server.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations
from PIL import Image
from typer.testing import CliRunner

from tests.test_serving import MODEL, build_tiny_pipeline, register
from training import paths as P
from training.cli.user import app
from training.inference import sampling

PROMPT = "a red circle at the top"


# ---- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def served(tiny: Path, tmp_path_factory) -> mlflow.pyfunc.PyFuncModel:
    """The tiny pipeline registered as kiln-text2image (real registry, this code's
    signature) and loaded as a pyfunc, as ``mlflow models serve`` loads it."""
    root = tmp_path_factory.mktemp("registry")
    version = register(root, tiny)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        return mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    finally:
        mlflow.set_tracking_uri(before)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _rest(model: mlflow.pyfunc.PyFuncModel, body: dict) -> list[dict]:
    """A JSON request through MLflow's scoring function: its predictions (MlflowException
    for a refused request, as the server answers 400)."""
    schema = model.metadata.get_input_schema()
    answer = invocations(json.dumps(body), "application/json", model, schema)
    assert answer.status == 200, answer.response
    return json.loads(answer.response)["predictions"]


def _refused(model: mlflow.pyfunc.PyFuncModel, body: dict) -> str:
    schema = model.metadata.get_input_schema()
    with pytest.raises(MlflowException) as err:
        invocations(json.dumps(body), "application/json", model, schema)
    message = err.value.message
    assert "\n" not in message, message  # one line, not the DataFrame echoed back
    return message


# ---- 1. null seed / steps / width / height -------------------------------------------------
def test_rows_without_seed_steps_or_size_are_drawn_at_the_defaults(served):
    """Was: the signature's "long" columns could not hold a null row (pandas makes them
    float64 with NaN), so MLflow refused the whole request before predict ran."""
    rows = pd.DataFrame(
        [
            {"prompt": PROMPT, "seed": 5, "steps": 3, "width": 48, "height": 16},
            {"prompt": "a blue square"},  # seed: its row number; steps, size: defaults
            {"prompt": "a blue square", "seed": 1, "steps": sampling.SAMPLER.steps,
             "width": 32, "height": 32},
            {"prompt": "a green cross", "seed": 7, "steps": 2, "height": 16},
        ]
    )  # fmt: skip
    assert rows["seed"].dtype == np.float64 and rows["seed"].hasnans  # what a client sends
    out = served.predict(rows)
    assert list(out["seed"]) == [5, 1, 1, 7]
    images = [_pixels(b) for b in out["image"]]
    assert [i.shape for i in images] == [(16, 48, 3), (32, 32, 3), (32, 32, 3), (16, 32, 3)]
    # the null row is exactly the row that spells the defaults out
    assert np.array_equal(images[1], images[2])


def test_int_columns_without_nulls_still_work(served):
    """A pyfunc caller's DataFrame({"seed": [1, 2]}) is int64: still taken (a "double"
    signature, MLflow's advice for integers with nulls, would refuse it)."""
    rows = pd.DataFrame({"prompt": [PROMPT, "a blue square"], "seed": [1, 2], "steps": [2, 2]})
    assert rows["seed"].dtype == np.int64
    assert list(served.predict(rows)["seed"]) == [1, 2]
    # whole-number scales too (were "double": MLflow refused the int64 column)
    rows = rows.assign(guidance=[4, 2], guidance_start=[0, 0])
    assert rows["guidance"].dtype == np.int64
    assert list(served.predict(rows)["seed"]) == [1, 2]


@pytest.mark.parametrize(
    ("body", "seeds", "shapes"),
    [
        ({"dataframe_records": [{"prompt": "a", "seed": 1, "steps": 2},
                                {"prompt": "b", "steps": 2}]},
         [1, 1], [(32, 32, 3)] * 2),
        ({"dataframe_split": {"columns": ["prompt", "seed", "steps"],
                              "data": [["a red circle", 1, 2], ["b", None, None]]}},
         [1, 1], [(32, 32, 3)] * 2),
        ({"dataframe_split": {"columns": ["prompt", "seed", "steps", "width", "height"],
                              "data": [["a", None, 2, 48, None], ["b", 3, 2, None, 16]]}},
         [0, 3], [(32, 48, 3), (16, 32, 3)]),
    ],
)  # fmt: skip
def test_rest_requests_with_null_rows_are_answered(served, body, seeds, shapes):
    """The brief's triggers, through MLflow's JSON parsing and the signature's casts: a
    null seed is the row's number, a null side the trained size."""
    got = _rest(served, body)
    assert [p["seed"] for p in got] == seeds
    assert [_pixels(p["image"]).shape for p in got] == shapes


def test_fractional_steps_are_still_refused_in_one_line(served):
    body = {"dataframe_split": {"columns": ["prompt", "seed", "steps"],
                                "data": [["a", 1, 20], ["b", None, 4.5]]}}  # fmt: skip
    message = _refused(served, body)
    assert "row 1: steps must be a whole number in [1, 1000], got 4.5" in message


@pytest.mark.parametrize(
    "data",
    [
        [["a", 2**53]],  # an int64 column: exact, but past the bound
        [["a", 2**53 + 1], ["b", None]],  # a float64 column: rounded to 2**53, refused too
    ],
)
def test_a_seed_above_max_seed_is_refused_in_one_line(served, data):
    body = {"dataframe_split": {"columns": ["prompt", "seed"], "data": data}}
    message = _refused(served, body)
    assert f"row 0: seed must be a whole number in [0, {2**53 - 1}]" in message


def test_max_seed_is_the_largest_seed_a_double_holds_exactly():
    """Every seed that passes survives a float64 column (a REST column with a null row,
    a browser's number) unchanged; any larger one rounds to 2**53 or more."""
    assert sampling.MAX_SEED == 2**53 - 1
    assert int(float(sampling.MAX_SEED)) == sampling.MAX_SEED
    sampling.check_request(sampling.Request(PROMPT, sampling.MAX_SEED))
    for seed in (2**53, int(float(2**53 + 1))):
        with pytest.raises(ValueError, match=r"seed must be a whole number in \[0, "):
            sampling.check_request(sampling.Request(PROMPT, seed))


# ---- 2. kiln generate --model <a ControlNet pipeline directory> -----------------------------
@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory) -> Path:
    """``kiln export --controlnet`` of the tiny pipeline with a fresh (untrained)
    ControlNet made the way train_controlnet makes one, with its detector file."""
    from diffusers import UNet2DConditionModel

    from training.inference.control import CONTROL_FILE, weights_fingerprint
    from training.phases.controlnet import build

    root = tmp_path_factory.mktemp("controlnet")
    unet = UNet2DConditionModel.from_pretrained(tiny / "unet")
    net_dir = root / "trained-controlnet"  # not where generate would look without --model's own
    build(unet, 3).save_pretrained(net_dir, safe_serialization=True)
    detector = {"detector": "canny", "canny_low": 100, "canny_high": 200,
                "unet": weights_fingerprint(tiny / "unet")}  # fmt: skip
    (net_dir / CONTROL_FILE).write_text(json.dumps(detector))
    out = root / "exported"
    res = CliRunner().invoke(
        app, ["export", str(out), "--model", str(tiny), "--controlnet", str(net_dir)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionControlNetPipeline"
    )
    return out


def test_export_keeps_the_controlnets_detector_file(exported):
    """Was: save_pretrained wrote only the ControlNet's weights and config, so the
    export lost its edge thresholds and the U-Net it was trained on."""
    from training.inference.control import CONTROL_FILE

    assert json.loads((exported / "controlnet" / CONTROL_FILE).read_text())["canny_low"] == 100


def test_export_refuses_a_controlnet_trained_on_another_unet(exported, tiny, tmp_path):
    """Was: exported silently, a ControlNet beside a U-Net it never saw (the gate kept
    an older champion than the one train_controlnet trained on). Now one line, and no
    folder written."""
    import shutil

    from training.inference.control import CONTROL_FILE

    other = shutil.copytree(exported / "controlnet", tmp_path / "other-unets")
    det = json.loads((other / CONTROL_FILE).read_text())
    (other / CONTROL_FILE).write_text(json.dumps(det | {"unet": "0123456789abcdef"}))
    out = tmp_path / "export"
    res = CliRunner().invoke(
        app, ["export", str(out), "--model", str(tiny), "--controlnet", str(other)]
    )
    assert res.exit_code == 1, res.output
    (line,) = res.output.strip().splitlines()
    assert line.startswith("kiln: error: the ControlNet at ") and "another U-Net" in line
    assert not out.exists()


def test_export_writes_a_new_folder_and_a_stray_transformer_folder_is_no_dit(
    exported, tiny, tmp_path
):
    """Found in review: export added to whatever OUT held, so a DiT export's
    ``transformer/`` stayed beside a later U-Net + ControlNet export, and that folder's
    own ControlNet was then refused as "has a DiT" (decided by the folder, not by
    ``model_index.json``)."""
    import shutil

    from training.cli.control import controlnet_dir

    before = sorted(p.name for p in exported.iterdir())
    res = CliRunner().invoke(app, ["export", str(exported), "--model", str(tiny)])
    assert res.exit_code == 1 and "is not an empty folder" in res.output, res.output
    assert sorted(p.name for p in exported.iterdir()) == before
    (tmp_path / "empty").mkdir()  # an empty folder is a new one
    res = CliRunner().invoke(app, ["export", str(tmp_path / "empty"), "--model", str(tiny)])
    assert res.exit_code == 0 and (tmp_path / "empty" / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    stray = shutil.copytree(exported, tmp_path / "stray")
    (stray / "transformer").mkdir()
    assert controlnet_dir(str(stray / "controlnet"), stray) == stray / "controlnet"


def _generate(*args: str):
    return CliRunner().invoke(app, ["generate", *args], catch_exceptions=False)


def _drawn(out: Path) -> tuple[np.ndarray, dict]:
    (line,) = [json.loads(t) for t in (out / "manifest.jsonl").read_text().splitlines()]
    return np.asarray(Image.open(out / line["file"])), line


def test_generate_without_control_draws_a_controlnet_directorys_base_model(
    tiny, exported, tmp_path
):
    """Was: the ControlNet pipeline was called without an image: diffusers' TypeError,
    a traceback."""
    common = [PROMPT, "--steps", "2", "--seed", "3", "--guidance", "2"]
    res = _generate(*common, "--model", str(exported), "--out", str(tmp_path / "cn"))
    assert res.exit_code == 0, res.output
    plain = _generate(*common, "--model", str(tiny), "--out", str(tmp_path / "plain"))
    assert plain.exit_code == 0, plain.output
    # the same VAE, text encoder and U-Net: the picture the plain pipeline draws
    assert np.array_equal(_drawn(tmp_path / "cn")[0], _drawn(tmp_path / "plain")[0])


def test_generate_with_control_uses_the_directorys_own_controlnet(
    exported, control_png, tmp_path, monkeypatch
):
    """Was: data/models/controlnet, not the one inside the directory (here that folder
    does not exist, so the old code refused: "no ControlNet at ...")."""
    monkeypatch.setattr(P, "CONTROLNET", tmp_path / "no-controlnet")
    out = tmp_path / "o"
    res = _generate(PROMPT, "--steps", "2", "--model", str(exported), "--out", str(out),
                    "--control", str(control_png))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output  # its detector file is there, its U-Net the same
    image, line = _drawn(out)
    assert image.shape == (32, 32, 3)
    assert line["controlnet"] == str(exported / "controlnet")


def test_generate_with_control_takes_another_controlnet_when_named(exported, control_png, tmp_path):
    import shutil

    other = shutil.copytree(exported / "controlnet", tmp_path / "other")
    out = tmp_path / "o"
    res = _generate(PROMPT, "--steps", "2", "--model", str(exported), "--out", str(out),
                    "--control", str(control_png), "--controlnet", str(other))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _drawn(out)[1]["controlnet"] == str(other)


def test_a_controlnet_without_its_detector_file_gets_the_defaults_with_a_warning(
    exported, control_png, tmp_path
):
    """A directory exported before export copied kiln_control.json: drawn with
    train_controlnet's default thresholds, said in a warning, no traceback."""
    import shutil

    from training.inference.control import CONTROL_FILE

    old = tmp_path / "old-export"
    shutil.copytree(exported, old)
    (old / "controlnet" / CONTROL_FILE).unlink()
    out = tmp_path / "o"
    res = _generate(PROMPT, "--steps", "2", "--model", str(old), "--out", str(out),
                    "--control", str(control_png))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"has no {CONTROL_FILE}" in res.output and "Canny 100/200" in res.output
    assert _drawn(out)[1]["controlnet"] == str(old / "controlnet")


# ---- 5. prompts cut to the text encoder's context are said so; controls decoded in turn ---
def test_a_rest_answer_says_when_a_prompt_or_negative_prompt_was_cut(served):
    """Was: REST cut a prompt past the text encoder's 24 tokens without a word (only
    ``kiln generate`` warned), and the answer had no ``note`` without a control column."""
    long = "a large red circle in the center of a plain black background, " * 3
    out = _rest(
        served,
        {"dataframe_records": [
            {"prompt": PROMPT, "seed": 1, "steps": 2},
            {"prompt": long, "seed": 1, "steps": 2},
            {"prompt": PROMPT, "seed": 1, "steps": 2, "negative_prompt": long},
        ]},
    )  # fmt: skip
    assert [row["note"] for row in out][0] == ""
    # the registered signature names it (was: prompt, seed, image only)
    assert served.metadata.get_output_schema().input_names() == ["prompt", "seed", "image", "note"]
    assert (
        out[1]["note"].startswith("the prompt is ")
        and "reads 24, so only 'a large" in out[1]["note"]
    )
    assert out[2]["note"].startswith("the negative prompt is "), out[2]["note"]


def test_the_playground_notes_a_cut_negative_prompt(tiny):
    from training.playground.jobs import Settings, _truncation_note

    pipe = sampling.load(tiny)
    long = "a large red circle in the center of a plain black background, " * 3
    assert _truncation_note(pipe, Settings(prompt=PROMPT, negative="")) is None
    note = _truncation_note(pipe, Settings(prompt=PROMPT, negative=long))
    assert note is not None and note.startswith("the negative prompt is "), note


def test_control_pictures_are_decoded_only_once_the_request_has_a_turn(tiny, monkeypatch):
    """Was: every waiting request decoded its controls (up to 64 pictures of the control
    module's pixel limit each) before the concurrency gate, so many waiting requests held
    that memory at once. A request that never gets a turn now decodes nothing."""
    import threading

    from training.inference import control
    from training.inference import text2image_model as T
    from training.inference.defaults import recommended

    model = T.Text2Image()
    model.max_rows, model.max_steps_total = 64, 1000
    model.turns = threading.BoundedSemaphore(1)
    model.pipe = sampling.load(tiny)
    own = recommended(tiny)
    model.defaults = T.DEFAULTS | {"guidance": own.guidance, "guidance_start": own.guidance_start}
    model.geometry = sampling.Geometry.of(model.pipe)
    model.detector, model.control_pipe = {"canny_low": 100, "canny_high": 200}, None
    decoded = []
    real = control.load_control
    monkeypatch.setattr(control, "load_control", lambda *a, **k: decoded.append(1) or real(*a, **k))
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    frame = pd.DataFrame(
        {"prompt": [PROMPT], "steps": [2], "control": [base64.b64encode(buf.getvalue()).decode()]}
    )
    monkeypatch.setenv(T.TIMEOUT_ENV, "0.2")
    model.turns.acquire()  # another request is computing
    try:
        with pytest.raises(TimeoutError, match="free turn"):
            model.predict(None, frame)
    finally:
        model.turns.release()
    assert decoded == []
    # a bad control is still refused before the wait
    frame["control"] = ["not base64!"]
    with pytest.raises(T.BadRequest, match="row 0: control is not valid base64"):
        model.predict(None, frame)
