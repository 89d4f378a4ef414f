"""Kiln as users run it at scale, for real on loopback: a Prefect server (SQLite), an
MLflow server, two work pools with a process worker each, each worker in its own clone
of the repository, and the data moving between them only through the DVC remote.

The commands are the README's "Running at scale" ones. The pipeline runs on the
built-in digits set with few steps: this checks the wiring, not the quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from training import config

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

pytestmark = pytest.mark.e2e

FAST = {
    "ingest.num_samples": 400,
    "train_vae.steps": 20,
    "train_clip.steps": 20,
    "train_unet.steps": 20,
    "evaluate.max_prompts": 10,
    "evaluate.steps": 5,
    "evaluate.sweep_prompts": 0,  # the report's sweeps: test_e2e's business
}


def test_deployed_pipeline_sends_gpu_stages_to_the_gpu_pool(tmp_path):
    cpu = copy_project(tmp_path / "cpu")  # the cpu worker's checkout
    gpu = copy_project(tmp_path / "gpu")  # the gpu worker's checkout
    config.set_values(cpu / "params.yaml", FAST)  # the pipeline hands its params to gpu
    # an earlier run's metrics in the gpu checkout: the caller's must be the ones read
    (gpu / "data" / "metrics").mkdir(parents=True)
    (gpu / "data" / "metrics" / "ingest.json").write_text('{"rows_new": 999, "rows_removed": 7}')
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    servers = tmp_path / "servers"
    servers.mkdir()

    def env_for(home: Path) -> dict:
        env = project_env(home)
        env.update(
            PREFECT_HOME=str(servers / "prefect-home"),
            PREFECT_API_URL=api,
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
            KILN_HOME=str(home),
        )
        return env

    server_env = env_for(cpu)
    server_env.update(prefect_server_settings(servers))
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
    mlflow_cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--backend-store-uri", f"sqlite:///{servers / 'mlflow.db'}",
        "--artifacts-destination", str(servers / "mlartifacts"), "--workers", "1",
    ]  # fmt: skip
    with (
        background(
            [*prefect_cmd, "--port", str(prefect_port)],
            server_env,
            servers,
            servers / "prefect.log",
        ) as prefect_server,
        background(mlflow_cmd, server_env, servers, servers / "mlflow.log") as mlflow_server,
    ):
        wait_http(f"{api}/health", prefect_server, servers / "prefect.log")
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow_server, servers / "mlflow.log")

        prefect = str(BIN / "prefect")
        for pool in ("cpu", "gpu"):
            run_ok(env_for(cpu), cpu, prefect, "work-pool", "create", pool, "--type", "process")
        out = run_ok(env_for(cpu), cpu, prefect, "--no-prompt", "deploy", "--all")
        assert "kiln-pipeline/kiln-pipeline" in out and "kiln-stage/gpu" in out

        with (
            background(
                [prefect, "worker", "start", "--pool", "cpu"],
                env_for(cpu),
                cpu,
                tmp_path / "w-cpu.log",
            ),
            background(
                [prefect, "worker", "start", "--pool", "gpu"],
                env_for(gpu),
                gpu,
                tmp_path / "w-gpu.log",
            ),
        ):
            run = _trigger_and_wait(env_for(cpu), cpu, tmp_path)
        logs = "".join((tmp_path / f).read_text()[-4000:] for f in ("w-cpu.log", "w-gpu.log"))
        assert run["state"] == "COMPLETED", f"{run}\n{logs}"

    # the GPU stages ran as kiln-stage flow runs on the gpu pool, in the gpu checkout ...
    stages = {r["name"]: r for r in run["children"]}
    # (train_controlnet is off: it records its skip on the cpu worker, no round trip)
    assert set(stages) == {"train_vae", "train_clip", "precompute_latents", "train_unet"}, run
    assert {(r["pool"], r["state"]) for r in stages.values()} == {("gpu", "COMPLETED")}
    for name in ("vae", "clip", "unet"):
        assert (gpu / "data" / "models" / name / "config.json").is_file()
        # ... and reached the cpu checkout only through the DVC remote
        assert (cpu / "data" / "models" / name / "config.json").is_file()
    assert (gpu / "data" / "checkpoints").is_dir() and not (cpu / "data" / "checkpoints").exists()
    assert any((tmp_path / "kiln-dvc-remote").rglob("*")), "nothing was pushed to the remote"
    lock = yaml.safe_load((cpu / "dvc.lock").read_text())["stages"]
    # the cpu checkout's lock knows every stage, and the source probe that ingest follows
    assert set(lock) == {"source", *config.STAGES}

    # the deployment's parameter chose the data set; the cpu worker evaluated
    report = json.loads((cpu / "data" / "raw" / "report.json").read_text())
    assert report["dataset"] == "digits" and report["successes"] == 400
    metrics = json.loads((cpu / "data" / "metrics" / "evaluate.json").read_text())
    assert 0.0 <= metrics["acc_digit"] <= 1.0 and metrics["samples"] == 20

    # every phase registered its model in the MLflow server, under one pipeline run
    assert run["registry"]["names"] >= {"kiln-vae", "kiln-clip", "kiln-unet", "kiln-text2image"}
    assert len(set(run["registry"]["pipeline_runs"])) == 1, run["registry"]
    # trained on the gpu worker, tagged with this run's ingestion (was: the gpu
    # checkout's stale ingest.json, 999 new rows and 7 removed)
    ingested = json.loads((cpu / "data" / "metrics" / "ingest.json").read_text())
    assert run["registry"]["rows"]["kiln-unet"] == {
        f"kiln.{k}": str(ingested[k]) for k in ("rows_new", "rows_kept", "rows_removed")
    }, run["registry"]["rows"]
    # a single phase re-run by hand through kiln-stage/cpu; a wrong stage fails, named
    assert run["by_hand"]["evaluate"]["state"] == "COMPLETED", run["by_hand"]
    assert run["by_hand"]["evaluate"]["pool"] == "cpu"
    assert run["by_hand"]["bad"]["state"] == "FAILED"
    assert "unknown stage 'nope'" in run["by_hand"]["bad"]["message"], run["by_hand"]
    # the weekly schedule exists and is off until turned on
    assert run["schedules"] == [{"cron": "0 3 * * 1", "active": False}]
    # the server took both gpu-pool templates as they are, and refused a broken one
    assert run["templates"]["kubernetes"] is True and run["templates"]["docker"] is True
    assert run["templates"]["broken"] != "accepted", run["templates"]


TRIGGER = r"""
import asyncio, json, sys, time
from mlflow import MlflowClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

async def main():
    async with get_client() as client:
        dep = await client.read_deployment_by_name("kiln-pipeline/kiln-pipeline")
        run = await client.create_flow_run_from_deployment(dep.id, parameters={"dataset": "digits"})
        deadline = time.monotonic() + 1500
        while time.monotonic() < deadline:
            run = await client.read_flow_run(run.id)
            if run.state and run.state.is_final():
                break
            await asyncio.sleep(3)
        kids = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
        )
        children = []
        for k in kids:
            if k.deployment_id is None:
                continue
            children.append({"name": k.name, "state": k.state.type.value, "pool": k.work_pool_name})
        schedules = [{"cron": s.schedule.cron, "active": s.active} for s in dep.schedules]
        # one phase by hand on the cpu pool (README), and a stage that does not exist
        stage_dep = await client.read_deployment_by_name("kiln-stage/cpu")
        by_hand = {}
        for key, params in (("evaluate", {"stage": "evaluate", "dataset": "digits"}),
                            ("bad", {"stage": "nope"})):
            r = await client.create_flow_run_from_deployment(stage_dep.id, parameters=params)
            while True:
                r = await client.read_flow_run(r.id)
                if r.state and r.state.is_final():
                    break
                await asyncio.sleep(2)
            by_hand[key] = {"state": r.state.type.value, "pool": r.work_pool_name,
                            "message": r.state.message}
        # the server validates the infra/ gpu-pool templates (placeholders vs variables)
        templates = {}
        for kind in ("kubernetes", "docker"):
            tpl = json.load(open(f"infra/gpu-pool-{kind}.json"))
            pool = await client.create_work_pool(
                WorkPoolCreate(name=f"gpu-{kind}", type=kind, base_job_template=tpl)
            )
            templates[kind] = pool.base_job_template == tpl
        broken = json.load(open("infra/gpu-pool-kubernetes.json"))
        del broken["variables"]["properties"]["gpus"]
        try:
            await client.create_work_pool(
                WorkPoolCreate(name="gpu-broken", type="kubernetes", base_job_template=broken)
            )
            templates["broken"] = "accepted"
        except Exception as exc:
            templates["broken"] = type(exc).__name__
    c = MlflowClient()
    names = {m.name for m in c.search_registered_models()}
    runs = []
    rows = {}
    for name in ("kiln-vae", "kiln-clip", "kiln-unet"):
        v = c.search_model_versions(f"name='{name}'")[0]
        runs.append(c.get_run(v.run_id).data.tags.get("kiln.pipeline_run_id"))
        rows[name] = {k: v for k, v in v.tags.items() if k.startswith("kiln.rows_")}
    print(json.dumps({"state": run.state.type.value, "message": run.state.message,
                      "children": children, "schedules": schedules, "templates": templates,
                      "by_hand": by_hand,
                      "registry": {"names": sorted(names), "pipeline_runs": runs,
                                   "rows": rows}}))

asyncio.run(main())
"""


def _trigger_and_wait(env: dict, cwd: Path, tmp_path: Path) -> dict:
    out = run_ok(env, cwd, str(BIN / "python"), "-c", TRIGGER, timeout=1800)
    run = json.loads(out.strip().splitlines()[-1])
    run["registry"]["names"] = set(run["registry"]["names"])
    return run
