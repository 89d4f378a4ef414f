"""MLflow pyfunc for ``kiln-text2image`` (logged as code: MLflow "models from code").

Input: a DataFrame with a ``prompt`` column and optional ``seed``, ``steps``,
``guidance``, ``guidance_start``, ``negative_prompt``, ``width``, ``height`` columns
(missing or null -> defaults: seed = row index, 20 steps, the guidance scale and start the
version's evaluation chose (``inference/defaults.py``; 2.0 and 0 for a version saved
without them), no negative prompt, the trained size; ``sampling.Geometry`` says which
sizes a model draws).
Output: a DataFrame with ``prompt``, ``seed``, ``image``: the PNG bytes, base64
encoded (``PIL.Image.open(io.BytesIO(base64.b64decode(s)))`` reads it back), and
``note``: what the row's answer should say, "" for nothing: a prompt or negative prompt
longer than the text encoder's context (only its start is read; was: cut without a
word), what was done to a control (resized to the sample's size).

Control images (a version whose pipeline carries a ControlNet: ``train_controlnet`` was
on and trained on this U-Net; ``inference/control.py``, ``ship``): optional columns
``control`` (a picture, PNG or JPEG bytes base64-encoded; its Canny edges steer the
layout, as ``kiln generate --control``), ``control_scale`` (0-10; default: the scale the
ControlNet's stage evaluated it at, its ``kiln_control.json``'s ``conditioning_scale``, 1.0
for one saved without it) and ``control_is_map`` (true: ``control`` is already an edge
map). A row without a control
is drawn by the base model. A row's control is decoded once its request has a turn
(below), so waiting requests hold their base64 text only. A control
sent to a version without a ControlNet, or one that is no image, empty or under 8
pixels, is refused (HTTP 400) naming the row. A control row's steps count as one
image-step each in the budget below, though the ControlNet adds about half a U-Net's
work to each.

Serving (``mlflow models serve``) runs each HTTP request's ``predict`` in its own thread,
all on this one loaded model. So:

* No per-request state on shared objects: ``sampling.generate`` runs every call on a
  pipeline object and scheduler of its own around the shared, read-only modules.
* Each row is computed alone (batch size 1), so an image depends only on its own row
  (prompt, seed, steps, guidance, its start, negative prompt): the same whether sent alone, inside
  a larger request or while other clients are served (batching changes CPU convolution
  results by 1/255 here and there; ``sampling.generate``).
* Every request is checked before anything is computed (``sampling.check_request`` per
  row, plus the size limits below); a bad one is HTTP 400 with a one-line message.
* Requests are bounded: at most ``KILN_SERVE_MAX_ROWS`` rows (default 64) and at most
  ``KILN_SERVE_MAX_STEPS_TOTAL`` denoising steps summed over the rows (default 1000),
  a row's steps counted in trained-size images (a 2x2-larger image's step counts 4, a
  smaller image's 1).
  On the tiny profile one image-step costs ~8 ms on 2 idle CPU cores and ~30 ms when
  other jobs load them 5-9 deep (benchmarks/RESULTS.md, "REST serving"), so the largest
  request takes ~8-35 s, inside MLflow's 60 s scoring timeout. Raise both for bigger
  hardware, lower the budget for bigger models.
* At most ``KILN_SERVE_CONCURRENCY`` requests compute at once (default 2); the others
  wait their turn. Measured with the trained tiny model on the quiet 2-core machine,
  8 clients (benchmarks/RESULTS.md, "REST serving"): 1 at a time gave 1.4 images/s
  (p95 10.0 s), 2 gave 3.5 (p95 2.6 s), 4 gave 3.2 and 8 gave 3.1. A batch-1 tiny
  denoiser does not keep both cores busy alone, and more at once only share the same
  cores. A bound also keeps each request's compute time near its own, so the step
  budget above stays inside the scoring timeout under overload (requests finish in
  turn instead of all timing out together), and activation memory stays bounded. Set
  it to about the cores (or GPU streams) a server has.
* When MLflow's scoring timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, set by
  ``mlflow models serve``) has expired for a request, the server has already answered
  504; its work then stops at the next denoising step (or before it starts, if it was
  still waiting its turn) instead of holding the worker for minutes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import os
import threading
import time

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from training.config import SAMPLER

DEFAULTS = {
    "steps": SAMPLER.steps,
    "guidance": SAMPLER.guidance,
    "guidance_start": SAMPLER.guidance_start,
    "negative_prompt": SAMPLER.negative_prompt,
}
COLUMNS = (
    "prompt", "seed", "steps", "guidance", "guidance_start", "negative_prompt", "width", "height"
)  # fmt: skip
CONTROL_COLUMNS = ("control", "control_scale", "control_is_map")
LIMITS = {  # env var -> default
    "KILN_SERVE_MAX_ROWS": 64,
    "KILN_SERVE_MAX_STEPS_TOTAL": 1000,
    "KILN_SERVE_CONCURRENCY": 2,
}
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"


class BadRequest(MlflowException):
    """A refused request: HTTP 400 whose JSON body is ``error_code`` + this message.

    MLflow's scoring server answers an ``MlflowException`` from ``predict`` with its
    status code and serialised message (no ``stack_trace`` field unless one is passed;
    any other exception becomes a 400 *with* the traceback). But it first rewrites the
    message to ``"Failed to predict data '<the input DataFrame>'. \\nError: <message>"``:
    several lines echoing the client's own rows. The message here is fixed when the
    exception is made, so the client reads one line saying what to change."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if "_message" not in self.__dict__:  # MlflowException.__init__ sets it first
            self._message = value


def _limit(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return LIMITS[name]
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {raw!r}")
    return int(raw)


def _missing(v: object) -> bool:
    """Null in any of pandas' spellings: None, NaN (a float column's), and ``pd.NA``
    (a nullable ``Int64``/``string`` column's, ``convert_dtypes()``; was: refused as
    "seed must be a whole number, got <NA>" where a null means the default)."""
    return v is None or (pd.api.types.is_scalar(v) and bool(pd.isna(v)))


def _whole(v: object) -> object:
    """A whole number as a Python int. JSON numbers arrive as float when a column has
    nulls; 4.0 means 4, 4.5 is refused by ``check_request``. A numpy integer (a nullable
    ``Int64`` column after MLflow's schema check, an object column) is made an int too:
    torch's ``manual_seed`` refuses one (was: ``TypeError: an integer is required``
    with a traceback, after the checks)."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    return int(v) if isinstance(v, float) and v.is_integer() else v


def parse_requests(
    model_input: pd.DataFrame,
    max_rows: int,
    max_steps_total: int,
    geometry=None,
    defaults: dict | None = None,
) -> list:
    """The ``sampling.Request`` of each row, or ``BadRequest`` naming the first problem
    (row number, field, allowed range). Nothing is computed before this passes.
    ``geometry`` (the model's ``sampling.Geometry``) checks the sizes and weighs each
    row's steps by its area; without it every row counts as the trained size.
    ``defaults``: what a row leaves out (the model's, ``Text2Image.defaults``; else
    ``DEFAULTS``)."""
    defaults = defaults or DEFAULTS
    from training.inference.sampling import Request, check_request

    if not isinstance(model_input, pd.DataFrame):
        raise BadRequest(f"input must be a table of rows, got {type(model_input).__name__}")
    if "prompt" not in model_input.columns:
        raise BadRequest("input needs a 'prompt' column")
    rows = len(model_input)
    if rows == 0:
        raise BadRequest("request has no rows")
    if rows > max_rows:
        raise BadRequest(
            f"request has {rows} rows; at most {max_rows} per request (KILN_SERVE_MAX_ROWS)"
        )
    cols = {c: model_input[c].tolist() for c in COLUMNS if c in model_input.columns}

    def value(col: str, i: int, default: object) -> object:
        v = cols[col][i] if col in cols else None
        return default if _missing(v) else v

    requests = []
    for i in range(rows):
        prompt = cols["prompt"][i]
        guidance = value("guidance", i, defaults["guidance"])
        start = value("guidance_start", i, defaults["guidance_start"])
        r = Request(
            prompt="" if _missing(prompt) else prompt,
            seed=_whole(value("seed", i, i)),
            steps=_whole(value("steps", i, defaults["steps"])),
            guidance=_number(guidance),
            negative=value("negative_prompt", i, defaults["negative_prompt"]),
            width=_whole(value("width", i, None)),
            height=_whole(value("height", i, None)),
            guidance_start=_number(start),
        )
        try:
            check_request(r)
            cost = geometry.cost(r) if geometry is not None else 1.0
        except ValueError as exc:
            raise BadRequest(f"row {i}: {exc}") from None
        requests.append((r, cost))
    total = math.ceil(sum(r.steps * cost for r, cost in requests))
    if total > max_steps_total:
        raise BadRequest(
            f"request needs {total} denoising steps (steps summed over its rows, in "
            f"trained-size images); at most {max_steps_total} per request "
            "(KILN_SERVE_MAX_STEPS_TOTAL)"
        )
    return [r for r, _ in requests]


def _number(x):
    """A number column's value as float, a bool left as it is for check_request to
    refuse (was: True read as guidance 1.0, False as guidance_start 0.0)."""
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else x


def parse_controls(model_input: pd.DataFrame, sizes: list, detector: dict | None) -> list:
    """Each row's ``(control map, scale, note)``, or None for a row without a control;
    ``sizes``: each row's (width, height). ``detector``: the ControlNet's
    ``kiln_control.json`` (None: the version has none). ``BadRequest`` names the first
    row that cannot be used. ``predict`` runs the two halves apart: the checks before a
    request waits for its turn, the decoding once it has one."""
    return load_controls(check_controls(model_input, detector), sizes, detector)


def check_controls(model_input: pd.DataFrame, detector: dict | None) -> list:
    """Each row's ``(image bytes, scale, is_map)``, or None: every check that needs no
    decoded picture (base64, scale, flag, a ControlNet to send it to)."""
    from training.inference.control import MAX_SCALE, own_scale

    rows = len(model_input)
    cols = {c: model_input[c].tolist() for c in CONTROL_COLUMNS if c in model_input.columns}
    if "control" not in cols:
        for c in ("control_scale", "control_is_map"):
            if c in cols and not all(_missing(v) for v in cols[c]):
                raise BadRequest(f"'{c}' needs a 'control' column")
        return [None] * rows
    if detector is None and not all(_missing(v) for v in cols["control"]):
        raise BadRequest(
            "this model version has no ControlNet (train_controlnet was off, or trained "
            "on another U-Net, when it was made); send no 'control' column"
        )
    # a row without a scale: the one the ControlNet's stage evaluated it at, as kiln generate
    default_scale = 1.0 if detector is None else own_scale(detector)
    out = []
    for i in range(rows):
        raw = cols["control"][i]
        if _missing(raw):
            out.append(None)
            continue
        if not isinstance(raw, str):
            raise BadRequest(f"row {i}: control must be an image's bytes, base64-encoded")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"row {i}: control is not valid base64") from None
        scale = cols.get("control_scale", [None] * rows)[i]
        scale = default_scale if _missing(scale) else scale
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise BadRequest(f"row {i}: control_scale must be a number, got {scale!r}")
        if not 0.0 <= scale <= MAX_SCALE:
            raise BadRequest(f"row {i}: control_scale {scale} is outside 0..{MAX_SCALE:g}")
        is_map = cols.get("control_is_map", [None] * rows)[i]
        is_map = False if _missing(is_map) else is_map
        if not isinstance(is_map, bool):
            raise BadRequest(f"row {i}: control_is_map must be true or false, got {is_map!r}")
        out.append((data, float(scale), is_map))
    return out


def load_controls(checked: list, sizes: list, detector: dict | None) -> list:
    """``check_controls``' rows decoded into control maps at each row's size (the memory
    and the work: a picture up to the control module's pixel limit, and its edges)."""
    from training.inference.control import ControlImageError, load_control

    out = []
    for i, row in enumerate(checked):
        if row is None:
            out.append(None)
            continue
        data, scale, is_map = row
        try:
            image, notes = load_control(
                data, sizes[i], is_map, detector["canny_low"], detector["canny_high"],
                name=f"row {i}: control", background=detector.get("background", "#ffffff"),
            )  # fmt: skip
        except ControlImageError as exc:
            raise BadRequest(str(exc)) from None
        out.append((image, scale, "; ".join(notes)))
    return out


class Text2Image(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from training.env import offline_defaults
        from training.inference.defaults import recommended
        from training.inference.sampling import Geometry, load

        if os.environ.get(TIMEOUT_ENV):  # MLflow's scoring server: a process of its own
            offline_defaults()  # never reach for a hub; no library progress bars in serving
        # Elsewhere the caller's own process (a notebook, a batch job): Kiln's process-wide
        # defaults would stay after the load (was: every warning the user's code raised
        # afterwards silenced, and HF_HUB_OFFLINE/PYTHONWARNINGS=ignore set for its
        # children). The load needs none of them: it reads local files only.

        self.max_rows = _limit("KILN_SERVE_MAX_ROWS")
        self.max_steps_total = _limit("KILN_SERVE_MAX_STEPS_TOTAL")
        self.turns = threading.BoundedSemaphore(_limit("KILN_SERVE_CONCURRENCY"))
        self.pipe = load(context.artifacts["pipeline"])
        # a row without a guidance (or guidance_start) gets what this version's
        # evaluation chose
        own = recommended(context.artifacts["pipeline"])
        self.defaults = DEFAULTS | {"guidance": own.guidance, "guidance_start": own.guidance_start}
        self.geometry = Geometry.of(self.pipe)
        self.detector = self.control_pipe = None
        if context.artifacts.get("controlnet"):  # shipped by evaluate (control.ship)
            from training.inference.control import attach, own_scale

            self.control_pipe, self.detector = attach(self.pipe, context.artifacts["controlnet"])
            own_scale(self.detector)  # a bad recorded scale fails the load, not each request

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from training.inference.sampling import generate

        # The scoring server answers 504 this long after the request came in; past it
        # nobody reads the result. Unset (a notebook's predict): no deadline.
        timeout = os.environ.get(TIMEOUT_ENV)
        deadline = time.monotonic() + float(timeout) if timeout else None
        requests = parse_requests(
            model_input, self.max_rows, self.max_steps_total, self.geometry, self.defaults
        )
        sizes = [self.geometry.size(r) for r in requests]
        checked = check_controls(model_input, self.detector)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.turns.acquire(timeout=wait):
            raise TimeoutError("waited past the scoring timeout for a free turn")
        try:
            # decoded in turn: requests waiting for one hold no decoded pictures
            controls = load_controls(checked, sizes, self.detector)
            # row by row (batch 1 either way): each row its own control, or none
            images = [
                generate(self.pipe if c is None else self.control_pipe, [r], 1, deadline,
                         control=None if c is None else c[:2])[0]
                for r, c in zip(requests, controls, strict=True)
            ]  # fmt: skip
        finally:
            self.turns.release()
        encoded = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return pd.DataFrame(
            {
                "prompt": [r.prompt for r in requests],
                "seed": [r.seed for r in requests],
                "image": encoded,
                "note": [self._note(r, c) for r, c in zip(requests, controls, strict=True)],
            }
        )

    def _note(self, request, control) -> str:
        """What a row's answer should say: its prompt or negative prompt cut to the text
        encoder's context (as ``kiln generate`` warns), what was done to its control."""
        from training.inference.text import cut_notes

        notes = cut_notes(self.pipe.tokenizer, request.prompt, request.negative)
        return "; ".join([*notes, *([control[2]] if control and control[2] else [])])


mlflow.models.set_model(Text2Image())
