"""Two Kiln projects on one Prefect server, for real on loopback: the README's
"Several projects on one server" commands. ``KILN_REGISTRY_PREFIX`` names a project's
deployments and work queues as it names its MLflow models (was: both projects'
``prefect deploy`` wrote the same three deployments, so the second replaced the first,
and either project's workers took the other's runs).
"""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import (
    BIN,
    background,
    copy_project,
    free_port,
    prefect_server_settings,
    project_env,
    run_ok,
    wait_http,
)

PREFIX = "pets-"

READ = r"""
import asyncio, json, sys, time
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        deps = {}
        for d in await client.read_deployments():
            flow = await client.read_flow(d.flow_id)
            deps[f"{flow.name}/{d.name}"] = {
                "pool": d.work_pool_name, "queue": d.work_queue_name,
                "gpu_deployment": d.parameters.get("gpu_deployment"),
            }
        runs = {}
        for name in [n for n in sys.argv[1:] if n in deps]:  # a run of a stage not there
            dep = await client.read_deployment_by_name(name)
            runs[name] = await client.create_flow_run_from_deployment(
                dep.id, parameters={"stage": "nope"}
            )
        deadline = time.monotonic() + 240
        while runs and time.monotonic() < deadline:
            states = {n: await client.read_flow_run(r.id) for n, r in runs.items()}
            if all(r.state and r.state.is_final() for r in states.values()):
                break
            await asyncio.sleep(2)
        runs = {n: {"id": str(r.id), "state": r.state.type.value, "message": r.state.message}
                for n, r in states.items()} if runs else {}
    print(json.dumps({"deployments": deps, "runs": runs}))

asyncio.run(main())
"""


def test_two_projects_keep_their_own_deployments_and_runs(tmp_path):
    plain = copy_project(tmp_path / "plain")  # a project without a prefix, as today
    pets = copy_project(tmp_path / "pets")  # a second team's, on the same server
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    servers = tmp_path / "servers"
    servers.mkdir()

    def env_for(home: Path, prefix: str | None = None) -> dict:
        env = project_env(home)
        env.update(PREFECT_HOME=str(servers / "home"), PREFECT_API_URL=api, KILN_HOME=str(home))
        if prefix is not None:
            env["KILN_REGISTRY_PREFIX"] = prefix
        return env

    server_env = env_for(plain)
    server_env.update(prefect_server_settings(servers))
    prefect = str(BIN / "prefect")
    cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(cmd, server_env, servers, servers / "prefect.log") as server:
        wait_http(f"{api}/health", server, servers / "prefect.log")
        for pool in ("cpu", "gpu"):
            run_ok(env_for(plain), plain, prefect, "work-pool", "create", pool, "--type", "process")
        run_ok(env_for(plain), plain, prefect, "--no-prompt", "deploy", "--all")
        run_ok(env_for(pets, PREFIX), pets, prefect, "--no-prompt", "deploy", "--all")
        # each project's cpu worker, started as the README says, on its own queue
        logs = {name: tmp_path / f"worker-{name}.log" for name in ("plain", "pets")}
        start = [prefect, "worker", "start", "--pool", "cpu", "--limit", "1", "--work-queue"]
        with (
            background([*start, "default"], env_for(plain), plain, logs["plain"]),
            background([*start, f"{PREFIX}default"], env_for(pets, PREFIX), pets, logs["pets"]),
        ):
            out = run_ok(
                env_for(plain), plain, str(BIN / "python"), "-c", READ,
                "kiln-stage/cpu", f"kiln-stage/{PREFIX}cpu", timeout=300,
            )  # fmt: skip
        found = json.loads(out.strip().splitlines()[-1])
        # a worker that takes another project's queue (as one started without
        # --work-queue takes every queue of its pool) refuses that project's run
        stray = tmp_path / "worker-stray.log"
        with background([*start, f"{PREFIX}default"], env_for(plain), plain, stray):
            out = run_ok(
                env_for(plain), plain, str(BIN / "python"), "-c", READ,
                f"kiln-stage/{PREFIX}cpu", timeout=300,
            )  # fmt: skip
        strayed = json.loads(out.strip().splitlines()[-1])["runs"][f"kiln-stage/{PREFIX}cpu"]

    # both projects' deployments stay, the first's exactly as without a prefix, and each
    # pipeline sends its GPU stages to its own stage deployment
    assert found["deployments"] == {**_deployments(""), **_deployments(PREFIX)}, found
    # each project's worker ran its own project's run, and not the other's
    runs = found["runs"]
    logs = {name: log.read_text() for name, log in logs.items()}
    for deployment, mine, other in (
        ("kiln-stage/cpu", "plain", "pets"),
        (f"kiln-stage/{PREFIX}cpu", "pets", "plain"),
    ):
        run = runs[deployment]
        assert run["state"] == "FAILED" and "unknown stage 'nope'" in run["message"], runs
        assert run["id"] in logs[mine] and run["id"] not in logs[other], (run, logs)
    # was: run in the plain project's checkout under its registry names
    assert strayed["state"] == "FAILED", strayed
    assert f"deployment '{PREFIX}cpu' is another project's" in strayed["message"], strayed


def _deployments(prefix: str) -> dict:
    """A project's three deployments of prefect.yaml: pool, queue, gpu_deployment."""
    queue = f"{prefix}default"
    return {
        f"kiln-pipeline/{prefix}kiln-pipeline": {
            "pool": "cpu",
            "queue": queue,
            "gpu_deployment": f"kiln-stage/{prefix}gpu",
        },
        f"kiln-stage/{prefix}gpu": {"pool": "gpu", "queue": queue, "gpu_deployment": None},
        f"kiln-stage/{prefix}cpu": {"pool": "cpu", "queue": queue, "gpu_deployment": None},
    }
