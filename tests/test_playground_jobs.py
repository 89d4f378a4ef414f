"""The playground's job queue under many clients (found in review): a job's size is
bounded, a client can cancel its own job (queued: skipped; running: stopped at its next
step), and one version's download does not hold the page loads of others.

On a random-weight pipeline of the tiny profile's architectures
(``test_serving.build_tiny_pipeline``: nothing trained, nothing downloaded), registered
as version 1 in a real SQLite MLflow registry, which the worker asks as it would in use."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.test_serving import build_tiny_pipeline, register
from training.playground import jobs
from training.tracking.versions import UnknownVersion

PROMPT = "a red circle at the top"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("jobs"))


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory) -> Path:
    """A project root whose ``mlflow.db`` registry holds ``tiny`` as version 1."""
    root = tmp_path_factory.mktemp("store")
    assert register(root, tiny) == "1"
    return root


@pytest.fixture()
def registry(store, monkeypatch) -> None:
    """Point this process's registry lookups at ``store``'s SQLite registry."""
    for var in ("MLFLOW_REGISTRY_URI", "KILN_REGISTRY_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")


@pytest.fixture()
def worker(registry, tmp_path) -> jobs.Worker:
    return jobs.Worker(tmp_path / "gallery")


def _wait(ready, job: jobs.Job, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < end and job.state != "error", (job.state, job.error)
        time.sleep(0.02)


def test_a_job_past_the_step_budget_is_refused_before_it_is_queued(worker):
    """Was: 2 models x 8 images x 1,000 steps was queued (~75 s of the one worker on the
    tiny model), and nine such jobs from one client kept everyone out for ten minutes."""
    big = jobs.Settings(prompt=PROMPT, steps=1000, n=8)
    with pytest.raises(ValueError, match="at most 2000 denoising steps .* this one is 16000"):
        worker.submit(["1", "2"], big)
    assert worker.jobs == {}
    with pytest.raises(UnknownVersion, match="no registered model '2'"):  # asked of the registry
        worker.submit(["1", "2"], jobs.Settings(prompt=PROMPT, steps=1, n=8))
    ok = worker.submit(["1", "1"], jobs.Settings(prompt=PROMPT, steps=1, n=8))  # 2 x 8
    assert ok.versions == ["kiln-text2image/1", "kiln-text2image/1"]
    _wait(lambda: ok.state == "done", ok)


def test_a_client_cancels_its_own_job_queued_or_running(worker, tmp_path):
    long = worker.submit(["1"], jobs.Settings(prompt=PROMPT, steps=900))
    queued = worker.submit(["1"], jobs.Settings(prompt=PROMPT, steps=2))
    _wait(lambda: long.state == "running" and long.done_steps > 0, long)
    assert worker.cancel(long.id, "not-its-token") is False
    assert worker.cancel("nope", long.token) is None
    assert worker.cancel(queued.id, queued.token) and queued.state == "cancelled"
    assert worker.cancel(long.id, long.token)
    _wait(lambda: long.state == "cancelled", long)
    assert long.done_steps < 900
    after = worker.submit(["1"], jobs.Settings(prompt=PROMPT, steps=2))
    _wait(lambda: after.state == "done", after)
    assert queued.state == "cancelled" and queued.done_steps == 0  # skipped, never drawn
    files = [p.name for p in (tmp_path / "gallery" / "images").iterdir()]
    assert [f for f in files if f.startswith(after.id)] and not [
        f for f in files if f.startswith((long.id, queued.id))
    ]


def test_cancel_over_http_needs_the_token_only_the_submission_answered(registry, tmp_path):
    from training.playground.app import create_app

    app = create_app(tmp_path / "gallery")
    client = TestClient(app, base_url="http://127.0.0.1")
    job = client.post("/api/generate", json={"models": ["1"], "prompt": PROMPT, "steps": 900})
    job = job.json()
    assert "token" not in client.get(f"/api/jobs/{job['id']}").json()
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 403
    assert client.delete("/api/jobs/nope", params={"token": job["token"]}).status_code == 404
    answer = client.delete(f"/api/jobs/{job['id']}", params={"token": job["token"]})
    assert answer.status_code == 200
    end = time.monotonic() + 60
    while (view := client.get(f"/api/jobs/{job['id']}").json())["state"] != "cancelled":
        assert time.monotonic() < end and view["state"] in ("queued", "running"), view
        time.sleep(0.02)


def test_one_versions_download_does_not_hold_another_versions_lookup(tmp_path, monkeypatch):
    """Was: one lock over every download, so a large version's download held every page
    load (``/api/model``) of every other version, cached ones included."""
    started = threading.Event()

    def slow_for_3(uri: str):
        if uri.endswith("/3"):
            started.set()
            time.sleep(3)
        return tmp_path / uri.rsplit("/", 1)[-1], uri

    monkeypatch.setattr("training.tracking.versions.pipeline_dir", slow_for_3)
    w = jobs.Worker(tmp_path / "gallery")
    assert w.pipeline_dir("kiln/1") == tmp_path / "1"  # cached from here on
    fetching = threading.Thread(target=w.pipeline_dir, args=("kiln/3",))
    fetching.start()
    started.wait(10)
    t0 = time.monotonic()
    assert w.pipeline_dir("kiln/1") == tmp_path / "1"
    assert w.pipeline_dir("kiln/2") == tmp_path / "2"
    assert time.monotonic() - t0 < 1.0
    fetching.join()
    assert w.pipeline_dir("kiln/3") == tmp_path / "3"
