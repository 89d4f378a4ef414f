"""The playground's web app: a page (``static/``) and a small JSON API.

FastAPI and uvicorn because the stack already ships them (Prefect's and MLflow's
servers run on them): no new dependency, and sync endpoints run in uvicorn's thread
pool, so a slow registry call never blocks the page. The page is plain HTML, CSS and
JavaScript served from this package: no fonts, scripts or styles from elsewhere, so
it works offline.

Every failure is an answer with ``{"error": message}``: 400 for bad input, 404 for a
version (or job) that does not exist, 403 for promotion when it is off (or a cancel
without the job's token), 429 when the queue is full, 503 when the registry does not
answer. The server itself never goes down on a
request.

A client, for the queue's fair share (``fair.py``), is the address a request comes
from: the playground has no login, and an address is what a script cannot change at
will (uvicorn reads it from ``X-Forwarded-For`` only when the connection comes from a
proxy on this machine).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from training.playground.fair import Busy
from training.playground.jobs import MAX_IMAGES, Settings, Worker
from training.tracking.versions import UnknownVersion

STATIC = Path(__file__).parent / "static"
KIND_NAMES = {str: "text", int: "a whole number", float: "a number"}
ALIASES = {"negative_prompt": "negative"}  # the REST model's name -> the job's


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _failure(exc: Exception) -> JSONResponse:
    """The HTTP answer for an exception of the registry or of bad input."""
    if isinstance(exc, ConnectionError):
        return _error(503, f"the model registry cannot be reached: {exc}")
    if isinstance(exc, Busy):
        return _error(429, str(exc))
    if isinstance(exc, UnknownVersion):
        return _error(404, str(exc))
    return _error(400, str(exc))


def _settings(body: dict[str, Any]) -> Settings:
    """The request's sampling settings; ``ValueError`` naming a field of the wrong type,
    or one a job does not take: dropping it would answer 200 with a job drawn without
    it (a ``width`` or ``guidance_start`` the client believes it set)."""
    types = {
        "prompt": str, "negative": str, "seed": int, "steps": int, "guidance": float,
        "scheduler": str, "n": int,
    }  # fmt: skip
    for key in body:
        if key != "models" and key not in types:
            hint = f"; the same setting here is {ALIASES[key]!r}" if key in ALIASES else ""
            raise ValueError(
                f"unknown field {key!r} (a job takes models, {', '.join(types)}){hint}"
            )
    values: dict[str, Any] = {}
    for key, kind in types.items():
        if key not in body or body[key] is None:
            continue
        v = body[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ValueError(f"{key} must be {KIND_NAMES[kind]}, got {v!r}")
        values[key] = v
    # what the body leaves out: SAMPLER's defaults; guidance: each version's own
    return Settings(**values)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
EVERY_INTERFACE = ("", "0", "0.0.0.0", "::")


def host_names(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The ``Host`` headers the app answers: this machine's loopback names, the address
    it listens on (unless that is every interface) and ``extra`` (``--allowed-host``).
    Any other is refused (400): a page of another site whose name its owner re-points
    at 127.0.0.1 (DNS rebinding) is the same origin to a browser here, and could queue
    jobs, read the gallery and, with ``--allow-promote``, move ``@champion`` (found in
    review: it did)."""
    names = list(LOOPBACK_NAMES)
    if host not in EVERY_INTERFACE:
        names.append(f"[{host}]" if ":" in host else host)
    return [*names, *extra]


def exposed(host: str) -> bool:
    """Whether listening on ``host`` reaches beyond this machine: any address it resolves
    to is not loopback (was: decided for IP literals only, so ``--host 0``, every
    interface, and a LAN host name listened without the warning)."""
    try:
        found = socket.getaddrinfo(host or None, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return True  # the bind fails next, with its own message
    return any(not ipaddress.ip_address(a[4][0].split("%")[0]).is_loopback for a in found)


def listen_check(host: str, port: int) -> list[str]:
    """What to warn of before listening on ``host:port``; ``UserError`` when it cannot
    (a taken port: one line, before torch loads)."""
    from training.errors import UserError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if not exposed(host):
        return []
    return [
        f"the playground has no login; {host} exposes it (and, with --allow-promote, the "
        "champion) to the network; it answers only the names --host and --allowed-host give"
    ]


def create_app(
    gallery: Path,
    allow_promote: bool = False,
    max_queue: int = 8,
    hosts: Sequence[str] | None = None,
    max_per_client: int | None = None,
) -> FastAPI:
    """The app; its worker thread starts now and keeps ``gallery`` (``data/playground``).
    ``hosts``: the ``Host`` headers it answers (``host_names``; default: loopback's);
    ``max_per_client``: jobs one client may keep waiting (``Worker``'s default)."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from training.tracking import versions as V

    worker = Worker(gallery, max_queue=max_queue, max_per_client=max_per_client)
    app = FastAPI(title="Kiln playground", docs_url=None, redoc_url=None, openapi_url=None)
    allowed = host_names("127.0.0.1") if hosts is None else list(hosts)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed, www_redirect=False)

    @app.middleware("http")
    async def same_origin_writes(request: Request, call_next):
        """A write (generate, cancel, promote) sent by a page of another site is refused
        here, not only by the browser's CORS preflight and FastAPI's strict JSON content
        type, which is what stood between a page anywhere and @champion with
        --allow-promote (a default of a dependency, not of Kiln)."""
        origin = request.headers.get("origin")
        write = request.method not in ("GET", "HEAD", "OPTIONS")
        if write and origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return _error(403, f"a request from another site ({origin}) is refused")
        return await call_next(request)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/gallery", StaticFiles(directory=gallery), name="gallery")
    app.state.worker = worker

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        d = Settings()  # the defaults the page starts from
        return {
            "allow_promote": allow_promote,
            "max_images": MAX_IMAGES,
            "defaults": {k: getattr(d, k) for k in ("steps", "guidance", "scheduler", "negative")},
        }

    @app.get("/api/versions", response_model=None)
    def versions() -> dict[str, Any] | JSONResponse:
        try:
            return {"versions": V.list_versions()}
        except Exception as exc:
            return _failure(exc if isinstance(exc, ConnectionError) else ConnectionError(exc))

    @app.get("/api/model", response_model=None)
    def model(ref: str) -> dict[str, Any] | JSONResponse:
        """What the page needs to offer a version's settings: its samplers (and its own,
        the one it was saved with), size and guidance."""
        from training.inference.defaults import recommended, scheduler_name
        from training.inference.sampling import scheduler_names

        try:
            version = V.resolve_version(ref)
            folder = worker.pipeline_dir(version)
            guidance = recommended(folder).guidance  # what its evaluation chose
        except Exception as exc:
            return _failure(exc)
        index = json.loads((folder / "model_index.json").read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return {
            "version": version,
            "pipeline": index["_class_name"],
            "backbone": "dit" if "transformer" in index else "unet2d",
            "schedulers": list(scheduler_names(sched)),
            "scheduler": scheduler_name(sched.get("_class_name", ""), sched),
            "guidance": guidance,
        }

    @app.post("/api/generate", response_model=None)
    def generate(
        request: Request, body: dict[str, Any] = Body(...)
    ) -> dict[str, Any] | JSONResponse:
        """Queue one job: ``models`` (one, or two to compare) and the settings; its
        client is the address it came from (the queue's fair share)."""
        models = body.get("models")
        if (
            not isinstance(models, list)
            or not 1 <= len(models) <= 2
            or not all(isinstance(m, str) and m.strip() for m in models)
        ):
            return _error(400, "models must be a list of one or two versions or aliases")
        try:
            client = request.client.host if request.client else ""
            job = worker.submit([m.strip() for m in models], _settings(body), client)
        except Exception as exc:
            return _failure(exc)
        # the token cancels it (DELETE /api/jobs/{id}); only this answer carries it
        return {**(worker.view(job.id) or {}), "token": job.token}

    @app.get("/api/jobs/{job_id}", response_model=None)
    def job(job_id: str) -> dict[str, Any] | JSONResponse:
        view = worker.view(job_id)
        return view if view is not None else _error(404, f"no job {job_id!r}")

    @app.delete("/api/jobs/{job_id}", response_model=None)
    def cancel(job_id: str, token: str = "") -> dict[str, Any] | JSONResponse:
        """Cancel a queued or running job with the token its submission answered."""
        done = worker.cancel(job_id, token)
        if done is None:
            return _error(404, f"no job {job_id!r}")
        if not done:
            return _error(403, "that is not this job's token (the answer that queued it has it)")
        return worker.view(job_id) or {}

    @app.get("/api/gallery")
    def recent(limit: int = 24) -> dict[str, Any]:
        return {"items": worker.recent(max(1, min(limit, 200)))}

    @app.post("/api/promote", response_model=None)
    def promote(body: dict[str, Any] = Body(...)) -> dict[str, Any] | JSONResponse:
        """Make a version ``@champion``; ``confirm`` must repeat the version."""
        if not allow_promote:
            return _error(403, "promotion is off: start `kiln playground --allow-promote`")
        version = str(body.get("version", ""))
        if not version.isdigit() or str(body.get("confirm", "")) != version:
            return _error(400, "promote needs a version number and confirm: the same number")
        try:
            decision = V.promote_by_hand(version, reason="kiln playground")
        except Exception as exc:
            return _failure(exc)
        return {"version": version, **decision}

    return app


def serve(
    host: str,
    port: int,
    gallery: Path,
    allow_promote: bool,
    max_queue: int,
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Run the playground until interrupted."""
    import uvicorn

    from training.engine.distributed import set_torch_threads

    set_torch_threads()
    hosts = host_names(host, allowed_hosts)
    app = create_app(gallery, allow_promote=allow_promote, max_queue=max_queue, hosts=hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning")
