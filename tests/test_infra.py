"""infra/ and prefect.yaml, checked as far as this machine allows (no Docker, no
Kubernetes): the gpu-pool templates render into GPU jobs with their defaults, compose
takes every secret from the environment, and the deployments are what the README says.
The Prefect server's own validation of the templates runs in test_orchestration.py."""

from __future__ import annotations

import json
import re

import yaml
from prefect.utilities.templating import apply_values, find_placeholders

from .conftest import REPO

INFRA = REPO / "infra"


def _render(name: str, **overrides) -> tuple[dict, dict]:
    template = json.loads((INFRA / name).read_text())
    props = template["variables"]["properties"]
    declared = set(props)
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= declared, f"{name}: placeholders without a variable: {used - declared}"
    values = {k: v["default"] for k, v in props.items() if "default" in v} | overrides
    return apply_values(template["job_configuration"], values), props


def test_kubernetes_gpu_template_requests_gpus_on_gpu_nodes():
    job, _ = _render("gpu-pool-kubernetes.json")
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    assert job["env"]["KILN_HOME"] == "/opt/kiln"  # where infra/Dockerfile puts the repo
    job4, _ = _render("gpu-pool-kubernetes.json", gpus=4)
    limits = job4["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"]["nvidia.com/gpu"] == 4


def test_docker_gpu_template_is_docker_run_gpus_all():
    job, _ = _render("gpu-pool-docker.json")
    (request,) = job["container_create_kwargs"]["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    assert job["env"]["KILN_HOME"] == "/opt/kiln"


def test_compose_has_the_stack_and_no_literal_secrets():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "prefect", "mlflow", "worker-cpu", "worker-gpu"} <= set(services)
    assert "postgresql" in services["mlflow"]["command"]
    assert "--app-name basic-auth" in services["mlflow"]["command"]
    assert "s3://" in services["mlflow"]["command"]
    assert (
        "postgresql+asyncpg"
        in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name, svc in services.items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"{name}.{key} is a literal secret"
    ignored = (REPO / ".gitignore").read_text().split()
    assert "infra/.env" in ignored and "infra/mlflow-auth.ini" in ignored


def test_worker_image_pins_torch_like_the_makefile():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and '"torch==2.13.0"' in (REPO / "Makefile").read_text()
    assert "KILN_HOME=/opt/kiln" in dockerfile
    assert ".venv" in (REPO / ".dockerignore").read_text().split()


def test_deployments_schedule_and_runtime_checkout():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"kiln-pipeline", "gpu", "cpu"}
    pipeline = deps["kiln-pipeline"]
    assert pipeline["work_pool"]["name"] == "cpu" and deps["gpu"]["work_pool"]["name"] == "gpu"
    assert pipeline["schedules"] == [{"cron": "0 3 * * 1", "timezone": "UTC", "active": False}]
    assert pipeline["parameters"]["gpu_deployment"] == "kiln-stage/gpu"
    # `{{ $VAR }}` would be filled in by `prefect deploy` from the deploying shell, and
    # every worker would then run in the deployer's checkout
    assert "{{ $" not in json.dumps(spec["pull"])
    assert spec["pull"][0]["prefect.deployments.steps.run_shell_script"]["script"] == (
        "printenv KILN_HOME"
    )
