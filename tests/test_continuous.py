"""Continuous training (#16) as users schedule it: the ``kiln-pipeline`` deployment, on
a real Prefect server with a process worker and a real MLflow server, run twice.

The data is the shapes set as a user would bring it: a URL list served by a counting
loopback server, graded by the shapes oracle (``evaluate.oracle``). Run 1 sees no
held-out colour-shape pair; with no champion yet the deployment's default ``mode:
continue`` trains from scratch and makes the champion. Then the list gains the
held-out pairs, and run 2, the same deployment with the same parameters, continues:
it fetches only the new images, reuses the champion's VAE and CLIP (so it encodes only
the new samples), fine-tunes the champion's U-Net, re-scores the champion in the same
evaluation and promotes the new version, whose held-out accuracy is above run 1's.

Then the checks a continuing run makes before any stage: a champion that does not fit
the profile and a registry that does not answer each stop ``kiln run --mode continue``
with a clear error, and nothing is registered.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from training import config
from training.intake import builtin

from .conftest import (
    BIN,
    CountingImages,
    background,
    copy_project,
    counting_server,
    free_port,
    kiln,
    prefect_server_settings,
    project_env,
    run_ok,
    wait_http,
)

pytestmark = pytest.mark.e2e

N = 2400  # shapes with every pair; 1/6 of them are the 4 held-out pairs
BUDGET = {
    "ingest.dataset": "url-list",
    "ingest.processes": 1,
    "ingest.allow_networks": ["127.0.0.1/32"],
    "validate.near_duplicates": "off",  # jittered renders are near-duplicates by design
    "train_vae.steps": 300,
    "train_clip.steps": 200,
    "train_unet.steps": 900,
    "train_unet.finetune_steps": 300,
    "train_unet.preview_every": 0,
    "evaluate.oracle": "shapes",
    "evaluate.sweep_prompts": 0,  # the report's sweeps: test_e2e's business
}


def _rows(base: str, n: int = N) -> tuple[list[dict], list[dict]]:
    """(rows without a held-out pair, rows with one), their images served at ``base``."""
    seen, held = [], []
    for i, s in enumerate(builtin.shapes(n, 32, seed=3, include_held_out=True)):
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        CountingImages.images[f"/{i}.png"] = buf.getvalue()
        pair = (s.meta["colour"], s.meta["shape"])
        (held if pair in builtin.HELD_OUT_PAIRS else seen).append(
            {"url": f"{base}/{i}.png", "caption": s.caption}
        )
    return seen, held


REGISTRY = r"""
import json
from mlflow import MlflowClient
c = MlflowClient()
out = {}
for name in ("kiln-vae", "kiln-clip", "kiln-unet", "kiln-text2image"):
    versions = c.search_model_versions(f"name='{name}'")
    out[name] = {str(v.version): {"tags": v.tags, "description": v.description or ""}
                 for v in versions}
    out[name]["@champion"] = str(c.get_model_version_by_alias(name, "champion").version)
print(json.dumps(out))
"""


def _metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "data" / "metrics" / f"{stage}.json").read_text())


def test_a_scheduled_run_continues_from_the_champion_on_new_data(tmp_path):
    project = copy_project(tmp_path / "kiln")
    source = tmp_path / "pairs.parquet"
    config.set_values(project / "params.yaml", {**BUDGET, "ingest.source": str(source)})
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    servers = tmp_path / "servers"
    servers.mkdir()
    env = project_env(project)
    env.update(
        PREFECT_HOME=str(servers / "prefect-home"),
        PREFECT_API_URL=api,
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
        KILN_HOME=str(project),
    )
    server_env = {**env, **prefect_server_settings(servers)}
    prefect = str(BIN / "prefect")
    mlflow_cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--backend-store-uri", f"sqlite:///{servers / 'mlflow.db'}",
        "--artifacts-destination", str(servers / "mlartifacts"), "--workers", "1",
    ]  # fmt: skip
    with (
        counting_server({}) as base,
        background(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            server_env,
            servers,
            servers / "prefect.log",
        ) as prefect_server,
        background(mlflow_cmd, server_env, servers, servers / "mlflow.log") as mlflow_server,
    ):
        seen, held = _rows(base)
        pd.DataFrame(seen).to_parquet(source)
        wait_http(f"{api}/health", prefect_server, servers / "prefect.log")
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow_server, servers / "mlflow.log")
        for pool in ("cpu", "gpu"):
            run_ok(env, project, prefect, "work-pool", "create", pool, "--type", "process")
        run_ok(env, project, prefect, "--no-prompt", "deploy", "--all")
        # the README's command: the deployment's own parameters (mode: continue), but
        # every stage on the one worker; --watch exits non-zero unless it completed
        worker_log = tmp_path / "worker.log"

        def deployment_run() -> None:
            proc = subprocess.run(
                [prefect, "deployment", "run", "kiln-pipeline/kiln-pipeline",
                 "--param", "gpu_deployment=null", "--watch", "--watch-timeout", "1500"],
                cwd=project, env=env, capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-2000:] + worker_log.read_text()[-6000:]

        # a worker whose environment once named a GPU deployment: gpu_deployment=null
        # still keeps every stage on it (was: an undocumented KILN_GPU_DEPLOYMENT won)
        worker_env = {**env, "KILN_GPU_DEPLOYMENT": "kiln-stage/gpu"}
        with background([prefect, "worker", "start", "--pool", "cpu"], worker_env, project,
                        worker_log):  # fmt: skip
            deployment_run()
            first = {s: _metrics(project, s) for s in ("validate", "train_unet", "evaluate")}
            hits_after_1 = sum(CountingImages.hits.values())

            pd.DataFrame(seen + held).to_parquet(source)  # the source gains the held-out pairs
            deployment_run()
        log = (tmp_path / "worker.log").read_text()
        registry = _registry(env, project)

        # the deployment runs in continue mode by default; run 1 had nothing to build on
        deployments = yaml.safe_load((project / "prefect.yaml").read_text())["deployments"]
        pipeline = next(d for d in deployments if d["name"].endswith("kiln-pipeline"))
        assert pipeline["parameters"]["mode"] == "continue"
        assert "no champion yet, so this run trains from scratch" in log
        assert first["train_unet"].get("init_version", "") == ""
        # run 2 fetched only the new images: each image was requested exactly once
        hits = CountingImages.hits
        assert hits_after_1 == len(seen) and sum(hits.values()) == len(seen) + len(held)
        assert set(hits.values()) == {1}
        ingest = _metrics(project, "ingest")
        assert (ingest["rows_new"], ingest["rows_kept"]) == (len(held), len(seen))
        # ... kept the champion's VAE and CLIP, so encoded only the new samples ...
        assert _metrics(project, "train_vae")["reused_version"] == "1"
        assert _metrics(project, "train_clip")["reused_version"] == "1"
        latents = _metrics(project, "precompute_latents")
        validate = _metrics(project, "validate")
        assert latents["latents_reused"] == first["validate"]["train"] + first["validate"]["val"]
        assert latents["latents_encoded"] + latents["latents_reused"] == (
            validate["train"] + validate["val"]
        )
        assert 0 < latents["latents_encoded"] <= len(held)
        # ... fine-tuned the champion's U-Net for finetune_steps ...
        unet = _metrics(project, "train_unet")
        assert (unet["init_version"], unet["finetune_steps"]) == ("1", 300)
        assert list(registry["kiln-vae"]) == ["1", "@champion"]  # no second VAE, no CLIP
        assert list(registry["kiln-clip"]) == ["1", "@champion"]
        v2 = registry["kiln-unet"]["2"]["tags"]
        assert v2["kiln.parent"] == "models:/kiln-unet/1"
        assert v2["kiln.rows_new"] == str(len(held))
        assert v2["kiln.parent_data"] == registry["kiln-unet"]["1"]["tags"]["kiln.data"]
        assert v2["kiln.data"] != v2["kiln.parent_data"]
        # ... and the gate compared both on the same requests in this run, and promoted it
        ev = _metrics(project, "evaluate")
        assert ev["champion_version"] == 1
        assert ev["gate_champion_source"] == "rescored" and ev["gate_decision"] == "champion"
        assert ev["gate_champion_value"] == ev["champion.acc_all"]
        assert registry["kiln-text2image"]["@champion"] == "2"
        assert registry["kiln-unet"]["@champion"] == "2"
        # the held-out pairs it now saw: better than run 1 on them
        assert ev["acc_all_held_out"] > first["evaluate"]["acc_all_held_out"], (
            ev["acc_all_held_out"],
            first["evaluate"]["acc_all_held_out"],
        )
        card = registry["kiln-text2image"]["2"]["description"]
        assert "fine-tuned from models:/kiln-unet@champion (v1)" in card
        assert f"rows new {len(held)}" in card and "| acc_all_held_out |" in card

        # before any stage: a champion that does not fit the profile ...
        config.set_values(project / "params.yaml", {"train_unet.block_out_channels": [32, 64, 96]})
        bad = kiln(project, "run", "--mode", "continue", check=False, env=_env(env), timeout=300)
        assert bad.returncode != 0
        assert "does not fit the tiny profile's U-Net" in bad.stderr, bad.stderr[-3000:]
        # ... or a registry that does not answer: a clear error, in seconds
        dead = {**_env(env), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
        gone = kiln(project, "run", "--mode", "continue", check=False, env=dead, timeout=300)
        assert gone.returncode != 0
        assert "cannot be reached" in gone.stderr, gone.stderr[-3000:]
        after = json.loads(
            run_ok(env, project, str(BIN / "python"), "-c", REGISTRY).splitlines()[-1]
        )
        assert {k: list(v) for k, v in after.items()} == {k: list(v) for k, v in registry.items()}
        assert _metrics(project, "train_unet")["mlflow_run_id"] == unet["mlflow_run_id"]


def _registry(env: dict, project: Path) -> dict:
    return json.loads(run_ok(env, project, str(BIN / "python"), "-c", REGISTRY).splitlines()[-1])


def _env(env: dict) -> dict:
    """What ``kiln run`` needs beside project_env: the servers."""
    return {k: v for k, v in env.items() if k.startswith(("PREFECT_", "MLFLOW_", "KILN_"))}
