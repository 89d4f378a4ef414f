"""REST serving of ``kiln-text2image``: correct under concurrency, bounded per request.

A random-weight pipeline with the tiny profile's exact architectures (built by Kiln's own
phase builders, tokenizer trained on a few captions: nothing downloaded) is registered
the way the evaluate stage registers it (``tracking.register_text2image``, in an MLflow
run, SQLite store in a temporary folder) and served by a real ``mlflow models serve`` on
loopback. No training: the whole file takes about a minute on 2 cores.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import BIN, REPO, background, free_port, project_env, run_ok, wait_http
from training.inference import sampling

MODEL = "kiln-text2image"
COLUMNS = ["prompt", "seed", "steps", "guidance", "negative_prompt"]
CAPTIONS = [
    f"a {size} {colour} {shape} at the {where}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "white")
    for shape in ("circle", "square", "cross", "triangle")
    for where in ("top", "bottom", "center")
]


# ---- helpers (benchmarks/serving.py uses them too) --------------------------------------
def build_tiny_pipeline(out: Path, backbone: str = "unet2d") -> Path:
    """A saved pipeline with random weights and the tiny profile's sizes: what
    ``evaluate`` saves, minus the training. Returns the pipeline directory."""
    import torch

    from training import config
    from training.backbones import TextDims
    from training.phases import clip, unet, vae

    params = config.resolve({"profile": "tiny", "train_unet": {"backbone": backbone}})
    torch.manual_seed(0)
    vae.build(params).save_pretrained(out / "vae", safe_serialization=True)
    c = params.train_clip
    tokenizer = clip.train_tokenizer(CAPTIONS, c.vocab_size, 24, out / "clip")
    model = clip.build(params, len(tokenizer), tokenizer.model_max_length)
    model.save_pretrained(out / "clip", safe_serialization=True)
    v = params.train_vae
    latent = params.ingest.image_size // 2 ** (len(v.block_out_channels) - 1)
    net = unet.build(params, v.latent_channels, latent, TextDims(c.hidden_size, c.projection_dim))
    net.save_pretrained(out / "unet", safe_serialization=True)
    unet.noise_scheduler(params).save_pretrained(out / "unet")
    pipe = sampling.assemble(out / "vae", out / "clip", out / "unet")
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    return out / "pipeline"


REGISTER = """
import sys
from pathlib import Path
from training import tracking
root, pipeline = Path(sys.argv[1]), Path(sys.argv[2])
(root / "resolved.yaml").write_text("profile: tiny\\n")
params = {"profile": "tiny", "seed": 0, "evaluate": {}}
with tracking.stage_run("evaluate", params, root / "resolved.yaml", root=root) as run:
    name = tracking.MODEL_NAMES["evaluate"]
    print(tracking.register_text2image(run, name, pipeline, {"acc_all": 0.0}))
"""


def register(root: Path, pipeline: Path) -> str:
    """Register ``pipeline`` as a new version of kiln-text2image in ``root/mlflow.db``, by
    the evaluate stage's own code, in a process of its own (mlflow's state is global)."""
    env = {**project_env(root), "PYTHONPATH": str(REPO)}
    out = run_ok(env, root, str(BIN / "python"), "-c", REGISTER, str(root), str(pipeline))
    return out.strip().splitlines()[-1]


@contextlib.contextmanager
def serve(root: Path, version: str, log: Path, extra_env: dict | None = None) -> Iterator[str]:
    """``mlflow models serve`` of ``models:/kiln-text2image/VERSION`` on a loopback port;
    yields its base URL and stops the whole process group afterwards."""
    port = free_port()
    env = {
        **project_env(root),
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        **(extra_env or {}),
    }
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/{version}"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    base = f"http://127.0.0.1:{port}"
    with background(cmd, env, root, log) as server:
        wait_http(f"{base}/ping", server, log, timeout=240)
        yield base


def invoke(
    base: str, rows: list[list], timeout: float = 120, columns: list[str] = COLUMNS
) -> tuple[int, dict | str]:
    """POST rows (in ``columns`` order) to /invocations: (status, parsed JSON or text)."""
    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
    req = urllib.request.Request(
        f"{base}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def pixels(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


# ---- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def registry(tiny: Path, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("registry")
    return root, register(root, tiny)


@pytest.fixture(scope="module")
def server(registry: tuple[Path, str]) -> Iterator[str]:
    root, version = registry
    # one intra-op thread: this machine's 2 cores are shared; the results do not depend on it
    with serve(root, version, root / "serve.log", {"OMP_NUM_THREADS": "1"}) as base:
        yield base


# ---- check_request ----------------------------------------------------------------------
def test_check_request_accepts_good_requests():
    for r in (
        sampling.Request("a red circle", 0),
        sampling.Request("a red circle", np.int64(7), np.int64(4), 1.0, "blurry"),
        sampling.Request("x", sampling.MAX_SEED, sampling.MAX_STEPS, 1),
        sampling.Request("x" * sampling.MAX_PROMPT_CHARS, 3, 1, 100),
    ):
        sampling.check_request(r)


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (sampling.Request("a red circle", 1, 0), "steps must be a whole number in [1, 1000]"),
        (sampling.Request("a red circle", 1, -3), "got -3"),
        (sampling.Request("a red circle", 1, 1001), "steps must be"),
        (sampling.Request("a red circle", 1, 4.5), "steps must be a whole number"),  # type: ignore[arg-type]
        (sampling.Request("a red circle", 1, True), "steps must be"),  # type: ignore[arg-type]
        (sampling.Request("a red circle", 1, 4, -1.0), "guidance must be a number in [1, 100]"),
        (sampling.Request("a red circle", 1, 4, math.nan), "guidance must be"),
        (sampling.Request("a red circle", 1, 4, math.inf), "guidance must be"),
        (sampling.Request("a red circle", 1, 4, "4"), "guidance must be"),  # type: ignore[arg-type]
        (sampling.Request("", 1), "prompt must be a non-empty string"),
        (sampling.Request("   ", 1), "prompt must be a non-empty string"),
        (sampling.Request(None, 1), "prompt must be a string"),  # type: ignore[arg-type]
        (sampling.Request("x" * 5000, 1), "prompt is 5000 characters long; at most 4096"),
        (sampling.Request("a", 1, 4, 4.0, 3), "negative_prompt must be a string"),  # type: ignore[arg-type]
        # half an emoji (JSON "\ud83d"), argv bytes that are not UTF-8: was the tokenizer's
        # TypeError mid-job (the playground's bare 500, kiln generate's traceback)
        (sampling.Request("a red \ud83d circle", 1), "prompt is not valid Unicode text"),
        (sampling.Request("a", 1, 4, 4.0, "a \udce9"), "negative_prompt is not valid Unicode"),
        (sampling.Request("a red circle", -1), "seed must be a whole number in [0, "),
        (sampling.Request("a red circle", 2**63), "seed must be"),
        (sampling.Request("a red circle", 1.5), "seed must be"),  # type: ignore[arg-type]
        (sampling.Request("a", 1, 4, 4.0, "", 0), "width must be a whole number of pixels"),
        (sampling.Request("a", 1, 4, 4.0, "", 32, 1.5), "height must be a whole number"),  # type: ignore[arg-type]
    ],
)
def test_check_request_refuses_with_a_one_line_message(request_, says):
    with pytest.raises(ValueError) as err:
        sampling.check_request(request_)
    assert says in str(err.value) and "\n" not in str(err.value)


# ---- generate, in process ---------------------------------------------------------------
def test_generate_never_touches_the_shared_pipeline_and_honours_a_deadline(tiny):
    pipe = sampling.load(tiny)
    scheduler = pipe.scheduler
    sampling.generate(pipe, [sampling.Request("a red circle", 1, 5)])
    assert pipe.scheduler is scheduler
    assert scheduler.step_index is None and scheduler.num_inference_steps is None
    with pytest.raises(TimeoutError):
        r = sampling.Request("a red circle", 1, 5)
        sampling.generate(pipe, [r], deadline=time.monotonic() - 1)


def test_nan_pictures_are_an_error_not_black_images(tiny):
    """diffusers turns NaN pixels into black ones without a word: a broken model (an
    fp16 VAE's overflow, diverged weights) answered black pictures as a success, and
    evaluate scored them (black samples: no copies, the best memorisation figure)."""
    import torch

    from training.errors import UserError

    pipe = sampling.load(tiny)
    ok = sampling.generate(pipe, [sampling.Request("a red circle", 1, 3)])
    assert ok[0].mode == "RGB" and ok[0].size == (32, 32)
    with torch.no_grad():
        pipe.vae.post_quant_conv.weight.fill_(float("nan"))
    with pytest.raises(sampling.NonFiniteSamples, match="1 of 2 samples|2 of 2 samples"):
        sampling.generate(
            pipe, [sampling.Request("a red circle", 1, 3), sampling.Request("a blue square", 2, 3)]
        )
    # one line from `kiln generate` and the stages (a UserError), a RuntimeError to
    # the champion's re-score, which then falls back to the recorded number
    assert issubclass(sampling.NonFiniteSamples, UserError)
    assert issubclass(sampling.NonFiniteSamples, RuntimeError)


def test_concurrent_generate_calls_on_one_pipeline_match_sequential_ones(tiny):
    """The bug's core without HTTP: threads sharing one pipeline, mixed step counts."""
    pipe = sampling.load(tiny)
    jobs = [[sampling.Request(c, 10 + i, (4, 6, 9)[i % 3])] for i, c in enumerate(CAPTIONS[:12])]
    alone = [np.asarray(sampling.generate(pipe, j)[0]) for j in jobs]
    start = threading.Barrier(6)

    def run(j: list) -> np.ndarray:
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(timeout=10)
        return np.asarray(sampling.generate(pipe, j)[0])

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(run, jobs))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert np.array_equal(a, b), f"job {i} differs when run concurrently"


def test_other_sizes_are_drawn_and_impossible_ones_refused(tiny):
    from training.inference.text2image_model import BadRequest, parse_requests

    pipe = sampling.load(tiny)
    geometry = sampling.Geometry.of(pipe)
    # tiny: 32 px, VAE /4 and U-Net /4 -> sides in multiples of 16, up to 4 x 32
    assert (geometry.native, geometry.stride, geometry.sizes[-1]) == (32, 16, 128)
    wide = sampling.Request("a red circle", 1, 3, 4.0, "", width=48, height=16)
    square = sampling.Request("a red circle", 1, 3)
    a, b = sampling.generate(pipe, [wide, square])
    assert (a.size, b.size) == ((48, 16), (32, 32))
    with pytest.raises(ValueError, match=r"width 40 is not a size this model draws: a multiple"):
        geometry.size(sampling.Request("a", 1, width=40))
    with pytest.raises(ValueError, match=r"height 144 .* from 16 to 128 px \(trained at 32\)"):
        geometry.size(sampling.Request("a", 1, height=144))
    # the step budget counts trained-size images: 300 steps at 64 x 64 are 1200
    big = pd.DataFrame({"prompt": ["a"], "steps": [300], "width": [64], "height": [64]})
    with pytest.raises(BadRequest, match="needs 1200 denoising steps"):
        parse_requests(big, 64, 1000, geometry)
    assert parse_requests(big.assign(width=32, height=32), 64, 1000, geometry)[0].width == 32


# ---- the REST server --------------------------------------------------------------------
def _request_mix() -> list[list[list]]:
    """32 requests for 8 clients: mixed seeds, steps 4/6/9, guidance, negative prompts,
    one or two rows each."""
    mix = []
    for k in range(32):
        row = [CAPTIONS[(7 * k) % len(CAPTIONS)], 100 + k, (4, 6, 9)[k % 3]]
        row += [(4.0, 1.0, 7.5, 2.0)[k % 4], "blurry" if k % 5 == 0 else ""]
        rows = [row]
        if k % 4 == 1:  # a second row with other steps: two groups inside one request
            rows.append([CAPTIONS[k], 500 + k, (9, 4, 6)[k % 3], 4.0, ""])
        mix.append(rows)
    return mix


def test_concurrent_clients_get_the_images_they_would_get_alone(server):
    mix = _request_mix()
    alone = []
    for rows in mix:
        status, body = invoke(server, rows)
        assert status == 200, body
        alone.append([pixels(p["image"]) for p in body["predictions"]])
    # the images are not trivially equal: seeds and step counts matter
    assert not np.array_equal(alone[0][0], alone[1][0])
    again = invoke(server, [[mix[0][0][0], mix[0][0][1], 9, mix[0][0][3], mix[0][0][4]]])
    assert not np.array_equal(alone[0][0], pixels(again[1]["predictions"][0]["image"]))
    # a row's image does not depend on the other rows of its request
    for rows, images in zip(mix, alone, strict=True):
        for row, img in list(zip(rows, images, strict=True))[1:]:
            status, body = invoke(server, [row])
            assert np.array_equal(pixels(body["predictions"][0]["image"]), img), row

    clients = 8
    start = threading.Barrier(clients)
    results: dict[int, tuple[int, dict | str]] = {}

    def client(c: int) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(timeout=30)
        for k in range(c, len(mix), clients):
            results[k] = invoke(server, mix[k])

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    failed = {k: r for k, r in results.items() if r[0] != 200}
    assert not failed, (
        f"{len(failed)} of {len(mix)} requests failed, e.g. {next(iter(failed.values()))}"
    )
    for k, rows in enumerate(mix):
        preds = results[k][1]["predictions"]  # type: ignore[index]
        assert [(p["prompt"], p["seed"]) for p in preds] == [(r[0], r[1]) for r in rows]
        for i, p in enumerate(preds):
            assert np.array_equal(pixels(p["image"]), alone[k][i]), f"request {k} row {i} differs"


def _refused(base: str, rows: list[list], says: str) -> str:
    t0 = time.monotonic()
    status, body = invoke(base, rows, timeout=60)
    took = time.monotonic() - t0
    assert status == 400, (status, str(body)[:500])
    assert isinstance(body, dict), body
    message = body["message"]
    assert says in message, message
    assert "\n" not in message and "Traceback" not in message and len(message) < 300, message
    assert "stack_trace" not in body and "Traceback" not in json.dumps(body)
    assert took < 20, f"refusal took {took:.1f} s"
    return message


def test_oversized_requests_are_refused_at_once_and_the_server_keeps_serving(server):
    prompts = [[f"prompt {i}", i, 20, 4.0, ""] for i in range(10_000)]
    _refused(server, prompts, "request has 10000 rows; at most 64 per request")
    _refused(server, prompts[:65], "KILN_SERVE_MAX_ROWS")
    big = [["a red circle", i, 1000, 4.0, ""] for i in range(3)]
    _refused(server, big, "request needs 3000 denoising steps")
    _refused(
        server,
        [["a", i, 250, 4.0, ""] for i in range(4)] + [["a", 9, 1, 4.0, ""]],
        "KILN_SERVE_MAX_STEPS_TOTAL",
    )
    _refused(server, [["a red circle", 1, 1001, 4.0, ""]], "steps must be a whole number")
    t0 = time.monotonic()
    status, body = invoke(server, [["a red circle", 1, 4, 4.0, ""]])
    assert status == 200 and time.monotonic() - t0 < 20, body


@pytest.mark.parametrize(
    ("row", "says"),
    [
        (
            ["a red circle", 1, 0, 4.0, ""],
            "row 0: steps must be a whole number in [1, 1000], got 0",
        ),
        (["a red circle", 1, -2, 4.0, ""], "steps must be a whole number in [1, 1000]"),
        (["a red circle", 1, 4, 0.5, ""], "row 0: guidance must be a number in [1, 100]"),
        (["a red circle", 1, 4, math.inf, ""], "guidance must be a number in [1, 100]"),
        (["", 1, 4, 4.0, ""], "row 0: prompt must be a non-empty string"),
        (["a red circle", -5, 4, 4.0, ""], "row 0: seed must be a whole number in [0, "),
    ],
)
def test_bad_values_are_400_with_a_one_line_message(server, row, says):
    _refused(server, [row], says)


def test_width_and_height_columns_ask_for_other_sizes(server):
    cols = [*COLUMNS, "width", "height"]
    status, body = invoke(server, [["a red circle", 1, 3, 4.0, "", 64, 32]], columns=cols)
    assert status == 200, body
    assert pixels(body["predictions"][0]["image"]).shape == (32, 64, 3)
    status, body = invoke(server, [["a red circle", 1, 3, 4.0, "", 40, 32]], columns=cols)
    assert status == 400 and "row 0: width 40 is not a size this model draws" in str(body)


def test_a_bad_row_is_named_by_its_number(server):
    rows = [["a red circle", 1, 4, 4.0, ""], ["a blue square", 2, 4, 4.0, ""], ["", 3, 4, 4.0, ""]]
    _refused(server, rows, "row 2: prompt must be a non-empty string")


def test_a_request_past_the_scoring_timeout_stops_computing(registry):
    """The scoring server answers 504 at its timeout; the work must stop then too, or it
    holds the worker and every request behind it waits (the bug: ten more minutes)."""
    root, version = registry
    env = {"OMP_NUM_THREADS": "1", "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "2"}
    with serve(root, version, root / "serve-timeout.log", env) as base:
        status, body = invoke(base, [["a red circle", 1, 4, 4.0, ""]])  # warm
        assert status == 200, body
        # 40 rows x 25 steps: the largest request allowed, >= 8 s of work; past 2 s
        big = [[CAPTIONS[i], i, 25, 4.0, ""] for i in range(40)]
        t0 = time.monotonic()
        status, body = invoke(base, big)
        assert status == 504 and time.monotonic() - t0 < 10, (status, str(body)[:300])
        t0 = time.monotonic()
        status, body = invoke(base, [["a red circle", 2, 4, 4.0, ""]])
        took = time.monotonic() - t0
    assert status == 200 and took < 3, f"the next request took {took:.1f} s ({status})"


def test_serving_limits_come_from_the_environment(monkeypatch):
    from training.inference import text2image_model as T

    monkeypatch.setenv("KILN_SERVE_MAX_ROWS", "3")
    assert T._limit("KILN_SERVE_MAX_ROWS") == 3
    monkeypatch.setenv("KILN_SERVE_MAX_ROWS", "0")
    with pytest.raises(ValueError, match="KILN_SERVE_MAX_ROWS must be a whole number >= 1"):
        T._limit("KILN_SERVE_MAX_ROWS")
    monkeypatch.delenv("KILN_SERVE_MAX_ROWS")
    assert T._limit("KILN_SERVE_MAX_ROWS") == 64
    # the scoring server rewrites an exception's message; BadRequest's stays one line
    e = T.BadRequest("row 0: steps must be a whole number in [1, 1000], got 0")
    e.message = f"Failed to predict data '{'x' * 50}'. \nError: {e.message}"
    assert e.message.startswith("row 0: steps") and "Failed" not in e.serialize_as_json()
    assert e.get_http_status_code() == 400 and "stack_trace" not in e.serialize_as_json()
    assert os.environ.get("KILN_SERVE_MAX_ROWS") is None


def test_more_steps_than_training_timesteps_and_boolean_numbers_are_refused(tiny):
    """A model trained on 100 timesteps asked for 101 steps: DPM-Solver++ repeated
    timesteps and answered a black picture as a success (DDIM and DDPM raised inside
    diffusers). And a boolean guidance was read as 1.0 (guidance_start False as 0.0)."""
    from training.inference.text2image_model import BadRequest, parse_requests

    pipe = sampling.load(tiny)
    pipe.scheduler = sampling.make_scheduler(
        "dpm++", {**pipe.scheduler.config, "num_train_timesteps": 100}
    )
    geometry = sampling.Geometry.of(pipe)
    assert geometry.timesteps == 100
    with pytest.raises(ValueError, match="steps 101 is more than the 100 timesteps"):
        sampling.generate(pipe, [sampling.Request("a red circle", 1, 101)])
    (img,) = sampling.generate(pipe, [sampling.Request("a red circle", 1, 100)])
    assert np.asarray(img).std() > 0  # a picture, not a black square
    rows = pd.DataFrame({"prompt": ["a"], "steps": [150]})
    with pytest.raises(BadRequest, match="row 0: steps 150 is more than the 100"):
        parse_requests(rows, 64, 1000, geometry)
    for column, value in (("guidance", True), ("guidance_start", False)):
        with pytest.raises(BadRequest, match=f"row 0: {column}"):
            parse_requests(pd.DataFrame({"prompt": ["a"], column: [value]}), 64, 1000)


def test_a_smaller_picture_is_charged_a_whole_step(tiny):
    """A 16 px step was charged a quarter of a 32 px one by area, and costs about 0.87 of
    it on this CPU: 64 rows x 62 steps at 16 px passed a budget of 1,000 with 3.5x the
    work it allows."""
    from training.inference.text2image_model import BadRequest, parse_requests

    geometry = sampling.Geometry.of(sampling.load(tiny))
    small = pd.DataFrame({"prompt": ["a"] * 64, "steps": [62] * 64, "width": [16] * 64,
                          "height": [16] * 64})  # fmt: skip
    with pytest.raises(BadRequest, match="needs 3968 denoising steps"):
        parse_requests(small, 64, 1000, geometry)
    assert geometry.cost(sampling.Request("a", 1, width=64, height=64)) == 4.0  # as before
