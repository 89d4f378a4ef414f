"""The ControlNet without a pipeline run: its config checks, the control-image detector
and the checks on a user's control image, the zero start (a fresh ControlNet leaves the
U-Net's prediction exactly as it was) and the U-Net fingerprint that ``kiln generate``
compares. Training, evaluation, registry and generation are in tests/test_controlnet_e2e.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_serving import build_tiny_pipeline
from training import config
from training.inference.control import (
    ControlImageError,
    edges,
    load_control,
    weights_fingerprint,
)
from training.intake import builtin as B


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"train_controlnet": {"canny_low": 210, "canny_high": 200}},
            "train_controlnet.canny_low 210 is above canny_high 200",
        ),
        (
            {
                "train_controlnet": {"enabled": True},
                "train_unet": {"backbone": "dit"},
                "evaluate": {"scheduler": "euler"},
            },
            "train_controlnet.enabled needs train_unet.backbone unet2d",
        ),  # fmt: skip
    ],
)
def test_a_controlnet_that_cannot_work_fails_at_config_load_naming_the_key(raw, message):
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(raw)


def test_every_profile_sizes_the_controlnet_and_the_default_run_skips_it():
    for profile in config.profiles():
        c = config.resolve({"profile": profile}).train_controlnet
        assert c.steps > 0 and c.batch_size > 0
    assert not config.load().train_controlnet.enabled  # params.yaml: make run stays fast


def _square() -> np.ndarray:
    spec = B.ShapeSpec("square", "red", "large", "middle", "center")
    return np.asarray(B.render_shape(spec, 32, side=18.0, cx=16.0, cy=16.0))


def test_canny_edges_outline_the_object_and_nothing_else():
    img = _square()
    e = edges(img, 100, 200)
    assert e.shape == img.shape and e.dtype == np.uint8
    assert set(np.unique(e)) == {0, 255}
    obj = img.max(axis=2) > 48
    from scipy import ndimage

    inner = ndimage.binary_erosion(obj, iterations=2)
    ring = ndimage.binary_dilation(obj, iterations=2) & ~inner
    on = e[..., 0] > 0
    assert on.sum() > 20  # an outline, not a dot
    assert not (on & inner).any() and not (on & ~ring).any()  # only near the border


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_a_control_image_of_another_size_is_resized_with_a_note():
    big = Image.fromarray(_square()).resize((96, 96), Image.Resampling.NEAREST)
    img, notes = load_control(_png(big), (32, 32), False, 100, 200)
    assert img.size == (32, 32) and len(notes) == 1 and "96x96 resized to 32x32" in notes[0]
    # the edges are taken after the resize, at the size the ControlNet learnt them
    assert np.array_equal(
        np.asarray(img),
        edges(np.asarray(big.resize((32, 32), Image.Resampling.BILINEAR)), 100, 200),
    )
    same, notes = load_control(_png(Image.fromarray(_square())), (32, 32), False, 100, 200)
    assert notes == [] and np.array_equal(np.asarray(same), edges(_square(), 100, 200))
    as_map, _ = load_control(_png(Image.fromarray(_square())), (32, 32), True, 100, 200)
    # --control-is-map: white where any channel is at least half, as every map is made
    white = np.where(_square().max(axis=2, keepdims=True) >= 128, 255, 0).astype(np.uint8)
    assert np.array_equal(np.asarray(as_map), np.repeat(white, 3, axis=2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"this is not a picture", "not an image"),
        (_png(Image.new("RGB", (1, 1))), "1x1 pixels, too small"),
    ],
)
def test_a_control_that_is_no_usable_image_is_refused_by_name(data, message):
    with pytest.raises(ControlImageError, match=message):
        load_control(data, (32, 32), False, 100, 200)


def test_a_fresh_controlnet_leaves_the_unet_prediction_unchanged(tmp_path):
    """from_unet's zero convolutions: training starts from the base model exactly, so
    the ControlNet can only add what the control teaches."""
    from diffusers import UNet2DConditionModel

    from training.phases.controlnet import build, control_tensor

    pipe_dir = build_tiny_pipeline(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet").eval()
    net = build(unet, 3).eval()
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 24, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    control = control_tensor(np.stack([edges(_square(), 100, 200)] * 2))
    with torch.no_grad():
        down, mid = net(zt, t, text, controlnet_cond=control, return_dict=False)
        plain = unet(zt, t, text).sample
        steered = unet(
            zt, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert all(float(r.abs().max()) == 0 for r in (*down, mid))
    assert torch.equal(plain, steered)


def test_the_unet_fingerprint_follows_the_tensors_not_the_files(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe_dir = build_tiny_pipeline(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    unet.save_pretrained(tmp_path / "again", safe_serialization=True)
    assert weights_fingerprint(tmp_path / "again") == weights_fingerprint(pipe_dir / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)
    unet.save_pretrained(tmp_path / "changed", safe_serialization=True)
    assert weights_fingerprint(tmp_path / "changed") != weights_fingerprint(pipe_dir / "unet")


def test_a_controlnet_for_a_dit_pipeline_is_refused_before_anything_loads(tmp_path):
    from training.cli.base import UserError
    from training.cli.control import controlnet_dir

    pipe_dir = build_tiny_pipeline(tmp_path / "dit", backbone="dit")
    with pytest.raises(UserError, match="has a DiT; a Kiln ControlNet steers a U-Net"):
        controlnet_dir(str(tmp_path / "no-controlnet"), pipe_dir)
    unet_pipe = build_tiny_pipeline(tmp_path / "unet")
    with pytest.raises(UserError, match="no ControlNet at .*train_controlnet.enabled: true"):
        controlnet_dir(str(tmp_path / "no-controlnet"), unet_pipe)


def _b64_png(size: tuple[int, int]) -> str:
    import base64

    buf = io.BytesIO()
    B.render_shape(B.ShapeSpec("circle", "red", "large", "middle", "centre"), 32, 12, 10, 10
                   ).resize(size).save(buf, format="PNG")  # fmt: skip
    return base64.b64encode(buf.getvalue()).decode()


DETECTOR = {"canny_low": 100, "canny_high": 200}


@pytest.mark.parametrize(
    ("columns", "detector", "message"),
    [
        ({"control_scale": [1.0]}, DETECTOR, "'control_scale' needs a 'control' column"),
        ({"control": [_b64_png((32, 32))]}, None, "this model version has no ControlNet"),
        ({"control": [""]}, DETECTOR, "row 0: control: empty file, not an image"),
        ({"control": ["%%%"]}, DETECTOR, "row 0: control is not valid base64"),
        ({"control": [_b64_png((1, 1))]}, DETECTOR, "row 0: control: 1x1 pixels, too small"),
        (
            {"control": [_b64_png((32, 32))], "control_scale": [11.0]},
            DETECTOR,
            "row 0: control_scale 11.0 is outside 0..10",
        ),
        (
            {"control": [_b64_png((32, 32))], "control_is_map": ["yes"]},
            DETECTOR,
            "row 0: control_is_map must be true or false",
        ),
    ],  # fmt: skip
)
def test_a_request_control_it_cannot_use_is_refused_naming_the_row(columns, detector, message):
    import pandas as pd

    from training.inference.text2image_model import BadRequest, parse_controls

    with pytest.raises(BadRequest, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        parse_controls(pd.DataFrame({"prompt": ["a"], **columns}), [(32, 32)], detector)


def test_request_controls_are_made_into_maps_of_the_row_size_with_a_note():
    import pandas as pd

    from training.inference.text2image_model import parse_controls

    frame = pd.DataFrame(
        {"prompt": ["a", "b", "c"], "control": [_b64_png((64, 64)), None, _b64_png((32, 32))],
         "control_scale": [0.5, None, None]}
    )  # fmt: skip
    first, none, third = parse_controls(frame, [(32, 32)] * 3, DETECTOR)
    assert none is None
    image, scale, note = first
    assert image.size == (32, 32) and scale == 0.5
    assert note == "row 0: control: 64x64 resized to 32x32, the sample's size"
    assert set(np.unique(np.asarray(image))) <= {0, 255}  # an edge map, not the picture
    assert third[1:] == (1.0, "")
    # without a control column nothing changes: every row is the base model's
    assert parse_controls(frame[["prompt"]], [(32, 32)] * 3, None) == [None] * 3


def test_grade_reads_layout_from_the_control_and_colour_from_the_prompt():
    """``evaluation.control.grade`` (the stage's scores and the hand-drawn benchmark's):
    shape, size and position against the control's reading, colour against the
    prompt's; a control the oracle could not read is left out, a sample it cannot read
    is wrong."""
    from types import SimpleNamespace as NS

    from training.evaluation.control import grade

    def reading(found=True, shape="square", size="small", row="top", col="left", colour="red"):
        return NS(found=found, shape=shape, size=size, row=row, col=col, colour=colour)

    samples = {
        "right": reading(),
        "moved": reading(col="right"),
        "other colour": reading(colour="blue"),
        "nothing": reading(found=False),
        "for the unread control": reading(),
    }
    truths = [reading(colour="white")] * 4 + [reading(found=False)]
    oracle = NS(read=lambda name: samples[name])
    got = grade(oracle, truths, ["a red square"] * 5, list(samples))
    assert got == {
        "shape": 0.75, "size": 0.75, "position": 0.5, "layout": 0.5, "colour": 0.5,
    }  # fmt: skip


def test_a_16_bit_control_picture_keeps_its_edges():
    """Was: a 16-bit grey PNG (Pillow's mode I;16) was convert("RGB")-ed, which clips
    every value above 255 to white: a blank picture, no edge found, and the answer was
    silently the base model's. Now 0..65535 is scaled to 0..255 first."""
    eight = _square().max(axis=2)  # the grey picture, 0..255
    wide = Image.fromarray(eight.astype(np.uint16) * 257)  # the same picture in 16 bits
    assert wide.mode == "I;16"
    opened = Image.open(io.BytesIO(_png(wide)))
    assert opened.mode == "I;16"
    img, _ = load_control(_png(wide), (32, 32), False, 100, 200)
    rgb = np.repeat(eight[..., None], 3, axis=2)
    assert np.asarray(img).max() == 255  # edges found
    assert np.array_equal(np.asarray(img), edges(rgb, 100, 200))  # the 8-bit picture's
    # mode I (older Pillows' and TIFFs' 16-bit grey) likewise
    as_i = load_control(opened.convert("I"), (32, 32), False, 100, 200)[0]
    assert np.array_equal(np.asarray(as_i), edges(rgb, 100, 200))


def test_a_float_control_picture_keeps_its_edges_or_is_refused_with_its_range():
    """Was: a float picture (mode F, the 0..1 convention) was convert("RGB")-ed as is:
    all black, no edge found, and the answer was silently the base model's."""
    eight = _square().max(axis=2)
    rgb = np.repeat(eight[..., None], 3, axis=2)
    for values in (eight / 255.0, eight.astype(np.float64)):  # 0..1 and 0..255
        img = load_control(
            Image.fromarray(values.astype(np.float32), "F"), (32, 32), False, 100, 200
        )[0]
        assert np.array_equal(np.asarray(img), edges(rgb, 100, 200))
    top = float(eight.max())
    for bad, said in ((eight * 4.0, f"values 0..{4 * top:g};"), (eight - 10.0, "values -10..")):
        with pytest.raises(ControlImageError, match=said):
            load_control(Image.fromarray(bad.astype(np.float32), "F"), (32, 32), False, 100, 200)


def _lines_map(side: int) -> np.ndarray:
    """An edge map of 1-px white lines on black, 0/255 as Canny draws them."""
    m = np.zeros((side, side, 3), np.uint8)
    m[side // 4, :] = 255  # a horizontal line
    m[:, side // 2 + 1] = 255  # a vertical one
    m[side // 2 : side // 2 + side // 4, side // 8] = 255
    return m


@pytest.mark.parametrize("side", [128, 96, 50, 16])
def test_a_ready_map_of_another_size_stays_a_binary_map_with_every_line(side):
    """Was: resized bilinearly, so a 4x larger map's 1-px lines came out as faint greys
    (40-56/255) where the ControlNet learnt only 0/255 maps. Now every line is kept,
    white on black, at the sample's size (a box maximum, nearest when upscaling)."""
    big = _lines_map(side)
    img, notes = load_control(_png(Image.fromarray(big)), (32, 32), True, 100, 200)
    out = np.asarray(img)
    assert img.size == (32, 32) and "resized to 32x32" in notes[0]
    assert set(np.unique(out)) == {0, 255}  # binary
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    on = out[..., 0] > 0
    # each line is still there, where it was: a full row and a full column
    for full, at in ((on.all(axis=1), side // 4), (on.all(axis=0), side // 2 + 1)):
        lines = np.flatnonzero(full)
        assert 1 <= lines.size <= 2, lines  # one line (two pixels wide when upscaled)
        assert abs(lines.mean() - (at + 0.5) * 32 / side) <= 1.0, (lines, at)
    if side >= 32:  # downscaled: lines stay one pixel wide, no smear
        assert on.sum() <= 32 + 32 + 8 + 2
    # the same size: the map as given
    same = _lines_map(32)
    assert np.array_equal(np.asarray(load_control(_png(Image.fromarray(same)), (32, 32),
                                                  True, 100, 200)[0]), same)  # fmt: skip


def test_the_control_evaluation_draws_each_sample_at_its_controls_size(tmp_path):
    """Were: every sample drawn at the square default size, so a wide or tall val
    control (aspect-ratio buckets) was compared with a squashed picture, with and
    without the ControlNet; a batch never mixes sizes."""
    from training.evaluation.control import _sample
    from training.inference import sampling

    pipe = sampling.load(build_tiny_pipeline(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    params = config.resolve({"evaluate": {"steps": 2, "batch_size": 2}})
    sizes = [(64, 32), (64, 32), (64, 32), (32, 64), (32, 32)]
    images = _sample(pipe, ["a red circle"] * 5, list(range(5)), sizes, params, "the U-Net alone")
    assert [im.size for im in images] == sizes


def test_a_rest_row_without_control_is_map_is_read_as_a_picture(tmp_path):
    """The registered signature typed ``control_is_map`` boolean, and MLflow's scoring
    server cast a row's missing value to True in ``dataframe_records`` (to False in
    ``dataframe_split``): a photo sent without the flag was used as a ready edge map,
    no edge detection. Through the real scoring server, with Kiln's signature."""
    import json

    import mlflow
    import pandas as pd
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from training.tracking.signatures import text2image_signature

    class Echo(mlflow.pyfunc.PythonModel):  # what predict is given, per row
        def predict(self, context, model_input, params=None):
            flags = model_input["control_is_map"].tolist()
            return pd.DataFrame({"seen": [json.dumps([None if f != f else f for f in flags])]})

    sig = text2image_signature()
    mlflow.pyfunc.save_model(tmp_path / "echo", python_model=Echo(), signature=sig)
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(tmp_path / "echo"))))
    rows = [{"prompt": "a photo", "control": "AAAA"},
            {"prompt": "a map", "control": "BBBB", "control_is_map": True}]  # fmt: skip
    got = client.post("/invocations", json={"dataframe_records": rows})
    assert got.status_code == 200, got.text
    flags = json.loads(got.json()["predictions"][0]["seen"])
    assert flags[0] in (None, False) and flags[1] is True  # was: [true, true]


def _quadrants(img: Image.Image) -> list[int]:
    """Edge pixels in the top-left, top-right, bottom-left, bottom-right quarters."""
    on = np.asarray(img)[..., 0] > 0
    h, w = on.shape
    return [int(on[r : r + h // 2, c : c + w // 2].sum()) for r in (0, h // 2) for c in (0, w // 2)]


def test_a_control_picture_is_read_upright_and_its_transparency_lies_on_white():
    """Found in review: a phone photo (EXIF orientation 6) steered the layout rotated,
    and a dark drawing on a transparent background was laid on black: no edge at all,
    silently the base model's picture. Ingest stores pictures upright and on
    ``ingest.background`` (white), which is what the ControlNet learnt from."""
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[4:12, 4:12] = 255  # top-left as stored; EXIF 6 shows it rotated a quarter turn
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    img, _ = load_control(buf.getvalue(), (32, 32), False, 100, 200)
    top_left, top_right, *_ = _quadrants(img)
    assert top_right > 20 and top_left == 0, _quadrants(img)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (0, 0, 0, 255)  # a black square; all else transparent
    img, _ = load_control(_png(Image.fromarray(rgba, "RGBA")), (32, 32), False, 100, 200)
    assert sum(_quadrants(img)) > 40
    # a ready map's transparency stays black, the maps' background
    rgba[8:24, 8:24] = (255, 255, 255, 255)
    img, _ = load_control(_png(Image.fromarray(rgba, "RGBA")), (32, 32), True, 100, 200)
    assert (np.asarray(img)[8:24, 8:24] == 255).all() and np.asarray(img)[:8].max() == 0


@pytest.mark.parametrize(("colour", "fmt"), [((255, 0, 0), "PNG"), ((160, 160, 160), "PNG"),
                                             ((255, 255, 255), "JPEG")])  # fmt: skip
def test_a_ready_map_is_made_binary_at_its_own_size_as_at_any_other(colour, fmt):
    """Found in review: a map at the sample's size went in as given (a red line in one
    channel, a grey line at 160, a JPEG's ringing), while the same map at another size
    was made white on black: what the ControlNet saw depended on the file's size."""
    maps = []
    for side in (32, 64):
        m = np.zeros((side, side, 3), np.uint8)
        k = side // 8
        m[k : side - k, k : k + side // 32] = colour  # a vertical stroke
        m[k : k + side // 32, k : side - k] = colour  # and a horizontal one
        buf = io.BytesIO()
        Image.fromarray(m).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        out = np.asarray(load_control(buf.getvalue(), (32, 32), True, 100, 200)[0])
        assert set(np.unique(out)) == {0, 255}, (side, np.unique(out))
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
        maps.append(out)
    assert np.array_equal(maps[0], maps[1])
