"""The playground's queue shared by many clients (found in review: first come, first
served, so one client's many jobs kept every other client waiting behind all of them).

On the real thing over loopback: ``kiln playground`` as a server of its own, a
random-weight pipeline of the tiny profile's sizes registered in a real SQLite MLflow
registry, and two clients told apart by their source address (127.0.0.1 and
127.0.0.2, both loopback). Order is read from the gallery's manifest, which the one
worker writes in the order it draws: no timing is asserted."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import pytest

from tests.test_serving import REPO, build_tiny_pipeline, register
from training.playground.fair import Busy, FairQueue

from .conftest import BIN, background, free_port, project_env, wait_http

QUICK = {"models": ["1"], "prompt": "a red circle", "steps": 2}


def call(port: int, source: str, method: str, path: str, body: dict | None = None):
    """(status, JSON) of a request to the playground sent from address ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def until(port: int, job_id: str, states: tuple[str, ...]) -> dict:
    end = time.monotonic() + 300  # a hang guard only
    while (view := call(port, "127.0.0.1", "GET", f"/api/jobs/{job_id}")[1])["state"] not in states:
        assert time.monotonic() < end and view["state"] in ("queued", "running"), view
        time.sleep(0.05)
    return view


def test_one_clients_many_jobs_do_not_hold_another_clients_one(tmp_path: Path):
    root = tmp_path / "project"
    root.mkdir()
    version = register(root, build_tiny_pipeline(tmp_path / "tiny"))
    port = free_port()
    env = {**project_env(root), "PYTHONPATH": str(REPO)}
    cmd = [str(BIN / "kiln"), "playground", "--port", str(port), "--queue", "8"]
    log = tmp_path / "playground.log"
    with background(cmd, env, root, log) as proc:
        wait_http(f"http://127.0.0.1:{port}/api/config", proc, log)
        # A's long job holds the worker while the queue is filled
        code, long = call(port, "127.0.0.1", "POST", "/api/generate", {**QUICK, "steps": 900})
        assert code == 200, long
        assert long["versions"] == [f"kiln-text2image/{version}"]  # resolved by the registry
        until(port, long["id"], ("running",))
        a = [call(port, "127.0.0.1", "POST", "/api/generate", QUICK)[1]["id"] for _ in range(4)]
        # A's share is half of --queue: a fifth waiting job is refused, with the reason
        code, refused = call(port, "127.0.0.1", "POST", "/api/generate", QUICK)
        assert code == 429 and refused["error"].startswith("busy: 4 of your jobs are waiting")
        code, b = call(port, "127.0.0.2", "POST", "/api/generate", QUICK)
        assert code == 200, b  # the queue has room for B: A could not fill it
        assert call(port, "127.0.0.2", "GET", f"/api/jobs/{b['id']}")[1]["position"] == 2
        stop = f"/api/jobs/{long['id']}?token={long['token']}"
        assert call(port, "127.0.0.1", "DELETE", stop)[0] == 200  # frees the worker now
        for job_id in [*a, b["id"]]:
            assert until(port, job_id, ("done", "error", "cancelled"))["state"] == "done"
        assert proc.poll() is None
    lines = (root / "data/playground/manifest.jsonl").read_text().splitlines()
    drawn = [json.loads(t)["job"] for t in lines]
    # B's one job is drawn after one of A's (the round it joined), not after all four
    assert drawn == [a[0], b["id"], *a[1:]], drawn


def test_the_fair_order_takes_one_job_of_each_client_a_round():
    q = FairQueue(max_total=8, max_per_client=3)
    for job in ("a1", "a2", "a3"):
        q.push("A", job)
    q.push("B", "b1")
    q.push("C", "c1")
    q.push("B", "b2")
    assert [q.position(j) for j in ("a1", "b1", "c1", "a2", "b2", "a3")] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(Busy, match="^busy: 3 of your jobs are waiting"):
        q.push("A", "a4")
    assert q.pop() == "a1"
    q.remove("b1")  # cancelled
    q.push("D", "d1")  # joins the round after the one served
    assert [q.pop() for _ in range(len(q))] == ["c1", "a2", "b2", "d1", "a3"]
    assert q.pop() is None and q.last == {}
