"""``kiln playground`` when things are wrong, on real servers on loopback: a registry
that does not answer, a registry with nothing in it, a port already taken. The page
says so and the server stays up (tests/test_playground_e2e.py drives the working
case)."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from .browser import chrome, needs_browser, wait_for
from .conftest import BIN, background, copy_project, free_port, project_env, wait_http


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a GET, or of a POST of ``body``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start(project: Path, env: dict, log: Path, *args: str):
    port = free_port()
    cmd = [str(BIN / "kiln"), "playground", "--port", str(port), *args]
    return port, background(cmd, env, project, log)


def page_status(url: str) -> tuple[str, str]:
    """(text, class) of the page's status line once the page has loaded."""
    from selenium.webdriver.common.by import By

    with chrome() as d:
        d.get(url)
        wait_for(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        status = d.find_element(By.ID, "status")
        return status.text, status.get_attribute("class")


@needs_browser
def test_an_unreachable_or_empty_registry_is_a_message_on_the_page(tmp_path):
    project = copy_project(tmp_path / "kiln")
    dead = free_port()  # nothing listens there
    env = {**project_env(project), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{dead}"}
    port, server = start(project, env, tmp_path / "dead.log")
    with server as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/api/config", proc, tmp_path / "dead.log")
        code, body = call(f"{url}/api/versions")
        assert code == 503 and "cannot be reached" in body["error"], body
        code, body = call(f"{url}/api/generate", {"models": ["champion"], "prompt": "a circle"})
        assert code == 503 and f"127.0.0.1:{dead}" in body["error"], body
        # input is checked before the registry is asked
        code, body = call(f"{url}/api/generate", {"models": ["champion"], "prompt": " "})
        assert (code, body["error"]) == (400, "prompt must be a non-empty string")
        code, body = call(f"{url}/api/generate", {"models": ["champion"]})  # no prompt key
        assert (code, body["error"]) == (400, "prompt must be a non-empty string")
        code, body = call(f"{url}/api/promote", {"version": "1", "confirm": "1"})
        assert code == 403 and "--allow-promote" in body["error"]
        text, cls = page_status(url)
        assert "cannot be reached" in text and cls == "error", text
        assert proc.poll() is None
        assert call(f"{url}/api/config")[0] == 200  # still serving

    port, server = start(project, project_env(project), tmp_path / "empty.log")
    with server as proc:  # the embedded SQLite store, nothing registered yet
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/api/config", proc, tmp_path / "empty.log")
        assert call(f"{url}/api/versions") == (200, {"versions": []})
        code, body = call(f"{url}/api/generate", {"models": ["champion"], "prompt": "a circle"})
        assert code == 404 and "no registered model 'champion'" in body["error"], body
        text, cls = page_status(url)
        assert text.startswith("no kiln-text2image version is registered yet"), text
        assert proc.poll() is None


def test_a_taken_port_is_one_line_before_anything_loads(tmp_path):
    project = copy_project(tmp_path / "kiln")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [str(BIN / "kiln"), "playground", "--port", str(port)],
            cwd=project,
            env=project_env(project),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_request_for_another_host_name_is_refused(tmp_path, monkeypatch):
    """Found in review: the app answered any Host header, so a page of another site whose
    name was re-pointed at 127.0.0.1 (DNS rebinding) moved @champion through a browser
    here with --allow-promote. Only loopback's names, --host's and --allowed-host's are
    answered."""
    from fastapi.testclient import TestClient

    from training.playground.app import create_app, host_names

    promoted = []
    monkeypatch.setattr(
        "training.tracking.versions.promote_by_hand",
        lambda version, reason: promoted.append(version) or {"gate_decision": "champion"},
    )
    app = create_app(tmp_path / "gallery", allow_promote=True)
    body = {"version": "1", "confirm": "1"}
    evil = TestClient(app, base_url="http://kiln-rebind.attacker.example:7860")
    assert evil.post("/api/promote", json=body).status_code == 400
    assert evil.get("/api/gallery").status_code == 400
    assert promoted == []
    for name in ("http://127.0.0.1:7860", "http://localhost:7860", "http://[::1]:7860"):
        assert TestClient(app, base_url=name).get("/api/gallery").status_code == 200, name
    assert (
        TestClient(app, base_url="http://127.0.0.1")
        .post("/api/promote", json=body)
        .json()["gate_decision"]
        == "champion"
    )
    assert promoted == ["1"]
    assert host_names("0.0.0.0", ["kiln.lan"]) == ["localhost", "127.0.0.1", "[::1]", "kiln.lan"]
    assert host_names("::1")[-1] == "[::1]" and host_names("10.0.0.5")[-1] == "10.0.0.5"


def test_a_write_from_another_sites_page_is_refused(tmp_path, monkeypatch):
    """Found in review: nothing of Kiln's checked a write's Origin; a page of another site
    was kept from @champion only by the browser's preflight and FastAPI's strict JSON
    content type (a dependency's default). The page's own writes still pass."""
    from fastapi.testclient import TestClient

    from training.playground.app import create_app

    promoted = []
    monkeypatch.setattr(
        "training.tracking.versions.promote_by_hand",
        lambda version, reason: promoted.append(version) or {"gate_decision": "champion"},
    )
    app = create_app(tmp_path / "gallery", allow_promote=True)
    here = TestClient(app, base_url="http://127.0.0.1:7860")
    body = {"version": "1", "confirm": "1"}
    evil = here.post("/api/promote", json=body, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and "another site" in evil.json()["error"], evil.text
    assert here.delete("/api/jobs/x", headers={"Origin": "https://evil.example"}).status_code == 403
    assert promoted == []
    own = here.post("/api/promote", json=body, headers={"Origin": "http://127.0.0.1:7860"})
    assert own.status_code == 200 and promoted == ["1"], own.text
    assert here.get("/api/gallery", headers={"Origin": "https://evil.example"}).status_code == 200


def test_listening_on_every_interface_is_warned_of_however_it_is_spelt():
    """Was: only IP literals were looked at, so ``--host 0`` (every interface) or a LAN
    host name listened with no word of the missing login."""
    from training.playground.app import exposed, listen_check

    assert exposed("0") and exposed("0.0.0.0")
    assert not exposed("127.0.0.1") and not exposed("localhost")
    port = free_port()
    (warning,) = listen_check("0", port)
    assert "has no login" in warning
    assert listen_check("127.0.0.1", port) == []
