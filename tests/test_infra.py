"""infra/ and prefect.yaml, checked as far as this machine allows (no Docker, no
Kubernetes): the gpu-pool templates render into GPU jobs with their defaults, compose
takes every secret from the environment, publishes on loopback only by default, has
auth on Prefect and MLflow and refuses env.example's placeholders, and the deployments
are what the README says. The Prefect server's own validation of the templates runs in
test_orchestration.py; test_infra_postgres.py runs compose's servers with their auth."""

from __future__ import annotations

import asyncio
import configparser
import fnmatch
import http.server
import json
import os
import re
import subprocess
import threading
from pathlib import Path

import yaml
from prefect.utilities.templating import apply_values, find_placeholders

from .conftest import BIN, REPO

INFRA = REPO / "infra"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|AUTH_STRING")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def compose_interpolate(text: str, env: dict[str, str]) -> str:
    """compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`
    and `$$`, as `docker compose` resolves them from infra/.env (no Docker here)."""

    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        return value or ""

    return "$".join(_VAR.sub(one, part) for part in text.split("$$"))


def env_example() -> dict[str, str]:
    lines = (INFRA / "env.example").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))


def secret_names() -> list[str]:
    return [k for k in env_example() if SECRET_KEY.search(k)]


# a value for every variable of env.example that passes refuse-example-secrets.sh
GOOD = {k: f"good-{k.lower().replace('_', '-')}-0123456789" for k in env_example()}


def _compose(**env: str) -> dict:
    text = (INFRA / "compose.yaml").read_text()
    return yaml.safe_load(compose_interpolate(text, GOOD | env))


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
    # its jobs join the stack's network, to reach prefect, mlflow and minio by name (was
    # "kiln", a network compose never made: it names its default kiln_default)
    assert job["networks"] == [_compose()["networks"]["default"]["name"]]


def test_compose_workers_share_minios_dvc_remote():
    """The stages on the two workers hand data over through the DVC remote only. The
    image's .dvc/config names a folder beside the checkout, which each container had to
    itself, so the gpu stage's `dvc pull` found nothing the cpu worker had pushed. Each
    worker now starts through the image's entrypoint, which makes KILN_DVC_REMOTE its
    default remote (the same script the gpu pools' jobs start through)."""
    compose = _compose()
    bucket_cmd = compose["services"]["minio-buckets"]["entrypoint"]
    for name in ("worker-cpu", "worker-gpu"):
        svc = compose["services"][name]
        env = svc["environment"]
        assert env["KILN_DVC_REMOTE"] == "s3://kiln-dvc", name
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert "entrypoint" not in svc, f"{name} would skip the image's entrypoint"
        # --limit 1: a checkout runs one flow at a time; a second stage queues rather
        # than failing on the checkout's run lock
        # --work-queue: the project's own runs only (prefect.yaml's queue), on a shared server
        assert svc["command"] == ["prefect", "worker", "start", "--pool", name[7:], "--type",
                                  "process", "--limit", "1", "--work-queue", "default"]  # fmt: skip
        assert env["KILN_REGISTRY_PREFIX"] == "", name  # Kiln's own model names
        shared = _compose(KILN_REGISTRY_PREFIX="pets-")["services"][name]
        assert shared["environment"]["KILN_REGISTRY_PREFIX"] == "pets-", name  # infra/.env's
        assert shared["command"][-2:] == ["--work-queue", "pets-default"], name
        assert svc.get("image") == "kiln-worker:latest", name
    assert compose["services"]["worker-cpu"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert "kiln/kiln-dvc" in bucket_cmd  # the bucket exists
    assert "s3://kiln-dvc" in (INFRA / "README.md").read_text()
    dockerfile = (INFRA / "Dockerfile").read_text()
    entry = 'ENTRYPOINT ["/bin/sh", "/opt/kiln/infra/kiln-entrypoint.sh"]'
    assert entry in dockerfile.splitlines()
    assert dockerfile.index("COPY . /opt/kiln") < dockerfile.index(entry)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not any(fnmatch.fnmatch("infra/kiln-entrypoint.sh", p) for p in ignored)


def _entrypoint(checkout: Path, env: dict[str, str], *command: str):
    """infra/kiln-entrypoint.sh as the image runs it, on `checkout` as KILN_HOME."""
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(checkout.parent),
            "DVC_NO_ANALYTICS": "1", "KILN_HOME": str(checkout)}  # fmt: skip
    return subprocess.run(
        ["sh", str(INFRA / "kiln-entrypoint.sh"), *command], env=base | env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


KILN_REMOTE = "'remote \"kiln\"'"  # DVC's section name, quotes and all


def _dvc_local(checkout: Path) -> configparser.ConfigParser:
    local = configparser.ConfigParser()
    local.read(checkout / ".dvc" / "config.local")
    return local


def test_entrypoint_sets_up_the_dvc_remote_and_refuses_a_job_without_mlflow(tmp_path):
    """What compose's `sh -c` wrapper did for its workers only, the image now does for
    every container, the gpu pools' jobs included (they never went through compose)."""
    checkout = tmp_path / "kiln"
    checkout.mkdir()
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=checkout, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})  # fmt: skip
    project_config = (checkout / ".dvc" / "config").read_text()
    listing = 'echo "args: $0 $1"; env | grep -E "^(AWS|MLFLOW|KILN)_" | sort'
    show = ["sh", "-c", listing, "a", "b c"]
    ran = _entrypoint(checkout, {
        "KILN_DVC_REMOTE": "s3://kiln-dvc", "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "s3cret-key-value",
        "MLFLOW_TRACKING_URI": "", "KILN_DATA_REMOTE": "",
    }, *show)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "args: a b c" in ran.stdout  # the command, exec'd with its arguments intact
    # variables handed over empty (a `{{ $VAR }}` the worker lacked) are unset, not ""
    assert "AWS_ACCESS_KEY_ID=" not in ran.stdout and "MLFLOW_TRACKING_URI=" not in ran.stdout
    assert "KILN_DATA_REMOTE=" not in ran.stdout
    assert "AWS_SECRET_ACCESS_KEY=s3cret-key-value" in ran.stdout
    local = _dvc_local(checkout)
    assert local["core"]["remote"] == "kiln"
    assert dict(local[KILN_REMOTE]) == {"url": "s3://kiln-dvc",
                                            "endpointurl": "http://minio:9000"}  # fmt: skip
    assert "s3cret-key-value" not in (checkout / ".dvc" / "config.local").read_text()
    assert (checkout / ".dvc" / "config").read_text() == project_config  # git's, untouched
    # a later start with another remote and no endpoint (AWS S3): no stale endpoint left
    again = _entrypoint(checkout, {"KILN_DVC_REMOTE": "s3://other/dvc"}, "true")
    assert again.returncode == 0, again.stderr
    assert dict(_dvc_local(checkout)[KILN_REMOTE]) == {"url": "s3://other/dvc"}
    # a pool job (the templates set KILN_POOL_JOB=1) without MLflow: refused, not run
    job = {"KILN_POOL_JOB": "1", "MLFLOW_TRACKING_URI": ""}
    refused = _entrypoint(checkout, job, "sh", "-c", "echo stage-ran")
    assert refused.returncode == 1 and "stage-ran" not in refused.stdout
    assert "MLFLOW_TRACKING_URI is not set" in refused.stderr, refused.stderr
    ok = _entrypoint(checkout, job | {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
                     "sh", "-c", "echo stage-ran")  # fmt: skip
    assert ok.returncode == 0 and "stage-ran" in ok.stdout, ok.stderr
    # without KILN_DVC_REMOTE the checkout's DVC config is left alone
    bare = tmp_path / "bare"
    bare.mkdir()
    assert _entrypoint(bare, {}, "true").returncode == 0
    assert not (bare / ".dvc").exists()


def test_compose_has_the_stack_and_no_literal_secrets():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "prefect", "mlflow", "worker-cpu", "worker-gpu"} <= set(services)
    assert "postgresql" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
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
            if SECRET_KEY.search(key):
                assert str(value).startswith("${"), f"{name}.{key} is a literal secret"
    assert "infra/.env" in (REPO / ".gitignore").read_text().split()
    # the committed MLflow auth config holds no password (the admin comes from .env)
    assert "password" not in (INFRA / "mlflow-basic-auth.ini").read_text().split("[mlflow]")[1]


def test_no_secret_on_a_command_line():
    """A container's argv is its process's /proc/PID/cmdline on the Docker host, which
    every local user reads (`ps aux`), and `docker inspect` shows it: secrets go in the
    environment. Found in review: MLflow's --backend-store-uri carried the PostgreSQL
    password."""
    services = _compose()["services"]
    for name, svc in services.items():
        for key in ("command", "entrypoint"):
            value = svc.get(key) or ""
            text = " ".join(value) if isinstance(value, list) else str(value)
            for var in secret_names():
                assert GOOD[var] not in text, f"{name}.{key} holds {var}"
    # MLflow reads the store from the environment (click's envvar for --backend-store-uri)
    from mlflow.cli import server

    option = next(p for p in server.params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"
    mlflow = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow == f"postgresql://kiln:{GOOD['POSTGRES_PASSWORD']}@postgres:5432/mlflow"


def _published(port: str) -> tuple[str, str, str]:
    parts = str(port).split(":")
    assert len(parts) == 3, f"{port!r}: publish as IP:HOST_PORT:CONTAINER_PORT"
    return parts[0], parts[1], parts[2]


def test_compose_publishes_on_loopback_only_by_default():
    services = _compose()["services"]
    published = {}
    for name, svc in services.items():
        # host networking would bypass `ports` altogether
        assert svc.get("network_mode") in (None, "none"), name
        for port in svc.get("ports", []):
            ip, host_port, _ = _published(port)
            assert ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
            published[host_port] = name
    assert published == {"4200": "prefect", "5000": "mlflow", "9000": "minio", "9001": "minio"}
    # KILN_BIND_ADDRESS moves Prefect and MLflow, deliberately; MinIO stays on loopback
    moved = _compose(KILN_BIND_ADDRESS="10.1.2.3")["services"]
    assert [_published(p)[0] for p in moved["prefect"]["ports"]] == ["10.1.2.3"]
    assert [_published(p)[0] for p in moved["mlflow"]["ports"]] == ["10.1.2.3"]
    assert {_published(p)[0] for p in moved["minio"]["ports"]} == {"127.0.0.1"}
    assert "KILN_BIND_ADDRESS" in (INFRA / "env.example").read_text()


def test_compose_prefect_server_has_auth_and_every_client_sends_it():
    raw = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    server = raw["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert server.startswith("${PREFECT_AUTH_STRING:?")
    clients = [n for n, s in raw.items() if "PREFECT_API_URL" in (s.get("environment") or {})]
    assert {"worker-cpu", "worker-gpu"} <= set(clients)
    for name in clients:
        assert raw[name]["environment"]["PREFECT_API_AUTH_STRING"] == server, name
    resolved = _compose()["services"]
    expected = resolved["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    for name in clients:
        assert resolved[name]["environment"]["PREFECT_API_AUTH_STRING"] == expected, name
    # Prefect reads both names, and a worker hands its auth string to the jobs it
    # creates (the Kubernetes/Docker gpu pools): Prefect's base job environment
    code = (
        "from prefect.settings import get_current_settings\n"
        "from prefect.workers.base import BaseJobConfiguration\n"
        "s = get_current_settings()\n"
        "print(s.server.api.auth_string.get_secret_value(), s.api.auth_string.get_secret_value(),"
        " BaseJobConfiguration._base_environment()['PREFECT_API_AUTH_STRING'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_API_AUTH_STRING="u:server", PREFECT_API_AUTH_STRING="u:client")
    out = subprocess.run(
        [str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["u:server", "u:client", "u:client"]


def _depends(svc: dict) -> set[str]:
    deps = svc.get("depends_on") or []
    return set(deps)


def test_compose_secrets_have_no_defaults_and_example_values_are_refused(tmp_path):
    text = (INFRA / "compose.yaml").read_text()
    secrets = secret_names()
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD"} <= set(secrets)
    assert {"MLFLOW_SECRET_KEY", "PREFECT_AUTH_STRING"} <= set(secrets)
    for name in secrets:
        uses = [m.group(0) for m in _VAR.finditer(text) if m.group(1) == name]
        assert uses, f"{name} is not used by compose"
        for use in uses:  # no `${X:-default}` / `${X-default}`: a missing secret stops compose
            assert use == f"${{{name}}}" or use.startswith(f"${{{name}:?"), use
        assert any(u.startswith(f"${{{name}:?") for u in uses), f"{name} is not required"
        missing = {k: v for k, v in GOOD.items() if k != name}
        try:
            compose_interpolate(text, missing)
        except KeyError as e:
            assert name in str(e)
        else:
            raise AssertionError(f"compose starts without {name}")
    # the one-shot check runs the script on every secret, and everything waits for it
    services = yaml.safe_load(text)["services"]
    check = services["secrets-check"]
    assert check["entrypoint"][:2] == ["sh", "/kiln/refuse-example-secrets.sh"]
    assert set(check["entrypoint"][2:]) == set(secrets)
    assert set(check["environment"]) == set(secrets)
    assert "./refuse-example-secrets.sh:/kiln/refuse-example-secrets.sh:ro" in check["volumes"]
    for name in services:
        if name == "secrets-check":
            continue
        seen, todo = set(), [name]
        while todo:
            for dep in _depends(services[todo.pop()]) - seen:
                seen.add(dep)
                todo.append(dep)
        assert "secrets-check" in seen, f"{name} can start without the secrets check"

    # the script itself, as compose runs it
    def check_with(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(INFRA / "refuse-example-secrets.sh"), *secrets],
            env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
        )  # fmt: skip

    ok = check_with(GOOD)
    assert ok.returncode == 0, ok.stderr
    assert "secrets checked" in ok.stdout
    example = check_with(env_example())  # infra/.env copied and left as it is
    assert example.returncode == 1
    for name in secrets:
        assert f"{name} is still the example value (change-me...)" in example.stderr
    for name in secrets:
        one = check_with(GOOD | {name: env_example()[name]})
        assert one.returncode == 1 and one.stderr.count("refusing to start") == 1, one.stderr
        assert f"kiln: refusing to start: {name} is still the example value" in one.stderr
    user_only = check_with(GOOD | {"PREFECT_AUTH_STRING": "admin:change-me-later"})
    assert user_only.returncode == 1 and "PREFECT_AUTH_STRING" in user_only.stderr
    unset = check_with({k: v for k, v in GOOD.items() if k != "MLFLOW_SECRET_KEY"})
    assert unset.returncode == 1 and "MLFLOW_SECRET_KEY is not set" in unset.stderr
    short = check_with(GOOD | {"POSTGRES_PASSWORD": "hunter2"})
    assert short.returncode == 1 and "POSTGRES_PASSWORD is shorter than 12" in short.stderr
    # were accepted: a short password behind a long user name, the placeholder in capitals
    weak = check_with(GOOD | {"PREFECT_AUTH_STRING": "administrator:1234567"})
    assert weak.returncode == 1, weak.stdout
    assert "the password in PREFECT_AUTH_STRING is shorter than 12" in weak.stderr
    shouted = check_with(GOOD | {"MLFLOW_SECRET_KEY": "Change-Me-Please-Now"})
    assert shouted.returncode == 1 and "MLFLOW_SECRET_KEY is still the example" in shouted.stderr
    strong = check_with(GOOD | {"PREFECT_AUTH_STRING": "kiln:a-long-enough-password"})
    assert strong.returncode == 0, strong.stderr
    # was accepted, and the database URLs read `kLq91s@postgres` as the host
    url = check_with(GOOD | {"POSTGRES_PASSWORD": "Zr8#mYp2@kLq91s"})
    assert url.returncode == 1 and "goes into database URLs" in url.stderr, url.stderr


def test_mlflow_auth_db_is_on_a_persisted_volume():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    svc = compose["services"]["mlflow"]
    env = svc["environment"]
    config = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"./mlflow-basic-auth.ini:{config}:ro" in svc["volumes"]
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow-basic-auth.ini")
    uri = ini["mlflow"]["database_uri"]
    assert uri.startswith("sqlite:////"), f"{uri}: relative to the container's cwd"
    db_dir = os.path.dirname(uri.removeprefix("sqlite:///"))
    mounts = dict(v.rsplit(":", 1)[::-1] for v in svc["volumes"] if not v.endswith(":ro"))
    assert db_dir in mounts, f"{db_dir} is not a volume: users and grants die with the container"
    assert mounts[db_dir] in compose["volumes"]  # a named volume, not the container layer
    # the admin is created from infra/.env, not from a password in a committed file
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"].startswith("${MLFLOW_ADMIN_USER:?")
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert "admin_password" not in ini["mlflow"]
    # the workers' URL is a Host header MLflow accepts (it answers only the ones listed)
    allowed = _compose()["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    url = _compose()["services"]["worker-cpu"]["environment"]["MLFLOW_TRACKING_URI"]
    assert url.removeprefix("http://") in allowed.split(",")


def test_worker_image_pins_torch_like_the_makefile():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and '"torch==2.13.0"' in (REPO / "Makefile").read_text()
    assert "KILN_HOME=/opt/kiln" in dockerfile
    assert ".venv" in (REPO / ".dockerignore").read_text().split()
    # the backport img2dataset pulls breaks Python 3.11's dataclasses: kiln run refuses
    # to start (training/doctor.py) unless it goes, in the image as in `make install`
    assert "uv pip uninstall dataclasses" in dockerfile
    assert "python -m training.doctor" in dockerfile


def test_the_image_leaves_out_what_git_leaves_out_of_dvc():
    """DVC's credentials file (infra/README.md puts the S3 keys there) and its cache are
    git-ignored; `COPY . /opt/kiln` baked them into an image bound for a registry."""
    ignored = (REPO / ".dockerignore").read_text().split()
    for line in (REPO / ".dvc/.gitignore").read_text().split():
        assert f".dvc{line}" in ignored, line
    assert "data/cache" in ignored  # every cached stage output (KILN_CACHE_LIMIT)


def test_deployments_schedule_and_runtime_checkout():
    # as `prefect deploy` names them with KILN_REGISTRY_PREFIX unset (test_flow_projects)
    text = (REPO / "prefect.yaml").read_text().replace("{{ $KILN_REGISTRY_PREFIX }}", "")
    spec = yaml.safe_load(text)
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


def test_workers_keep_what_runs_build_on_across_container_restarts():
    """Was: each worker's data/, DVC cache and run state lived in the container's layer,
    so a `compose down` or rebuild lost the raw rows ingest adds to and the latents it
    reuses: the next scheduled run fetched and encoded everything again."""
    compose = _compose()
    for worker in ("worker-cpu", "worker-gpu"):
        mounts = dict(v.rsplit(":", 1)[::-1] for v in compose["services"][worker]["volumes"])
        for path in ("/opt/kiln/data", "/opt/kiln/.dvc/cache", "/opt/kiln/.kiln"):
            assert mounts.get(path) in compose["volumes"], (worker, path)
    cpu, gpu = (set(compose["services"][w]["volumes"]) for w in ("worker-cpu", "worker-gpu"))
    assert not cpu & gpu  # two checkouts: never one data/ written by both


# ---- the gpu pools' jobs: what compose gives its workers, given by the templates --------

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY")  # fmt: skip
JOB_NEEDS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "KILN_DVC_REMOTE", "KILN_DATA_REMOTE",
             *CREDENTIALS)  # fmt: skip


def _configure(name: str, values: dict | None = None) -> dict:
    """The job configuration a worker builds for a flow run from the pool's template:
    Prefect's own `from_template_and_values`, which the Kubernetes and Docker workers
    inherit, after the server's validation of the template (as `work-pool create`)."""
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.workers.base import BaseJobConfiguration
    from pydantic import ConfigDict

    class AnyJob(BaseJobConfiguration):  # the base fields, and the template's others as they are
        model_config = ConfigDict(extra="allow")

    template = json.loads((INFRA / name).read_text())
    validate_base_job_template(template)
    # no block or Prefect-variable placeholders in these templates: the client is never used
    job = asyncio.run(AnyJob.from_template_and_values(template, values or {}, client=object()))
    return job.model_dump(mode="json")


def test_docker_pool_jobs_get_mlflow_s3_and_the_dvc_remote(monkeypatch):
    """A pool job gets only Prefect's settings and the template's env. Was: KILN_HOME
    alone, so a stage logged into a SQLite file in the container ("Run with id=... not
    found" when nesting under the pipeline's run) and could reach no S3."""
    for key in JOB_NEEDS:
        monkeypatch.delenv(key, raising=False)
    # the docker worker's own environment: where the credentials come from
    worker = {k: f"from-the-worker-{k.lower()}" for k in CREDENTIALS}
    for key, value in worker.items():
        monkeypatch.setenv(key, value)
    env = _configure("gpu-pool-docker.json", {"env": {"KILN_DEVICE": "cuda"}})["env"]
    # the stack's addresses on its kiln network, as compose gives its own workers
    composed = _compose()["services"]["worker-gpu"]["environment"]
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "KILN_DVC_REMOTE"):
        assert env[key] == composed[key], key
    for key, value in worker.items():
        assert env[key] == value, key
    assert env["KILN_POOL_JOB"] == "1" and env["KILN_HOME"] == "/opt/kiln"
    assert env["KILN_DEVICE"] == "cuda"  # a deployment's env adds to the defaults
    assert env["KILN_DATA_REMOTE"] == ""  # the worker has none: unset by the entrypoint
    monkeypatch.setenv("KILN_DATA_REMOTE", "s3://kiln-data/shapes-v1")
    env = _configure("gpu-pool-docker.json")["env"]
    assert env["KILN_DATA_REMOTE"] == "s3://kiln-data/shapes-v1"


def test_kubernetes_pool_jobs_get_mlflow_s3_and_credentials_from_a_secret():
    job = _configure(
        "gpu-pool-kubernetes.json",
        {"mlflow_tracking_uri": "https://mlflow.internal", "s3_endpoint_url": "https://s3.internal",
         "data_remote": "s3://kiln-data/v1", "env": {"KILN_DEVICE": "cuda"}},
    )  # fmt: skip
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    # a list, not `{{ env }}`: the Kubernetes worker then puts the `env` variable's entries
    # and Prefect's settings before it instead of replacing it
    assert isinstance(container["env"], list)
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.internal"
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.internal"
    assert env["KILN_DVC_REMOTE"]["value"] == "s3://kiln-dvc"
    assert env["KILN_DATA_REMOTE"]["value"] == "s3://kiln-data/v1"
    assert env["KILN_POOL_JOB"]["value"] == "1"
    for key in CREDENTIALS:
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "kiln-job-credentials", "key": key}},
        }
    assert job["env"] == {"KILN_HOME": "/opt/kiln", "KILN_DEVICE": "cuda"}
    # no MLflow address given: no value (empty in the pod), and the entrypoint refuses it
    bare = _configure("gpu-pool-kubernetes.json")
    bare_env = bare["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_TRACKING_URI"} in bare_env
    assert "MLFLOW_TRACKING_URI" in (INFRA / "kiln-entrypoint.sh").read_text()


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_pool_templates_hold_no_credentials():
    docker = json.loads((INFRA / "gpu-pool-docker.json").read_text())
    defaults = docker["variables"]["properties"]["env"]["default"]
    for key in CREDENTIALS:
        assert defaults[key] == f"{{{{ ${key} }}}}", f"{key}: not the worker's own"
    for key in defaults:
        if SECRET_KEY.search(key) or "USERNAME" in key:
            assert key in CREDENTIALS, key
    kube = json.loads((INFRA / "gpu-pool-kubernetes.json").read_text())
    container = kube["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    for entry in container["containers"][0]["env"]:
        if SECRET_KEY.search(entry["name"]) or "USERNAME" in entry["name"]:
            assert set(entry) == {"name", "valueFrom"}, entry
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "{{ credentials_secret }}", "key": entry["name"]}
    assert {e["name"] for e in container["containers"][0]["env"]} >= set(JOB_NEEDS)
    # nothing in either template is one of the stack's secrets or looks like a key
    for template in (docker, kube):
        for text in _strings(template):
            for secret in env_example().values():  # `change-me...`, and the user names
                assert secret not in text or len(secret) < 6, text
            assert not re.search(r"AKIA[0-9A-Z]{12,}", text), text


# ---- compose: restarts, health, the UI's API address ------------------------------------

LONG_RUNNING = {"postgres", "minio", "prefect", "mlflow", "worker-cpu", "worker-gpu"}
ONE_SHOT = {"secrets-check", "minio-buckets"}


def test_compose_restarts_services_and_starts_workers_once_servers_are_healthy():
    """Was: no restart policy (a worker exits after ~3 minutes without the Prefect API,
    and stayed down) and the workers waited only for the servers' containers to start."""
    services = _compose()["services"]
    assert set(services) == LONG_RUNNING | ONE_SHOT
    for name in LONG_RUNNING:
        assert services[name].get("restart") == "unless-stopped", name
    for name in ONE_SHOT:  # `unless-stopped` would run them again after they succeed
        assert services[name].get("restart", "no") == "no", name
    for name in ("postgres", "minio", "prefect", "mlflow"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    # what the images have: the prefect image and mlflow.Dockerfile are Python images
    # without curl; MinIO's images dropped curl and ship mc
    assert re.fullmatch(r"prefecthq/prefect:[\d.]+-python3\.11", services["prefect"]["image"])
    assert (INFRA / "mlflow.Dockerfile").read_text().count("FROM python:3.11-slim") == 1
    assert services["prefect"]["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
    assert services["mlflow"]["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    for name, svc in services.items():
        if "healthcheck" in svc:
            assert "curl" not in json.dumps(svc["healthcheck"]), name
        deps = svc.get("depends_on") or {}
        for dep, how in deps.items() if isinstance(deps, dict) else []:
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has none"
    for worker in ("worker-cpu", "worker-gpu"):
        deps = services[worker]["depends_on"]
        assert deps["prefect"] == {"condition": "service_healthy"}, worker
        assert deps["mlflow"] == {"condition": "service_healthy"}, worker


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[tuple[str, str]] = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Host", "")))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_compose_health_checks_ask_the_right_paths():
    """The Prefect and MLflow checks, run as the containers would (here against a stub
    on loopback; test_infra_postgres.py runs them against the real servers)."""
    services = _compose()["services"]
    server = http.server.HTTPServer(("127.0.0.1", 0), _Probe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for name, container_port, path, host in (
            ("prefect", 4200, "/api/ready", None),
            ("mlflow", 5000, "/health", "mlflow:5000"),  # a Host MLflow must always accept
        ):
            cmd, _, code = services[name]["healthcheck"]["test"][1:]
            code = code.replace(f"127.0.0.1:{container_port}", f"127.0.0.1:{port}")
            assert f"127.0.0.1:{port}" in code, name
            for status, healthy in ((200, True), (503, False)):
                _Probe.status, _Probe.seen = status, []
                rc = subprocess.run([str(BIN / cmd), "-c", code], timeout=60).returncode
                assert (rc == 0) is healthy, (name, status, rc)
                assert _Probe.seen[0][0] == path, _Probe.seen
                assert _Probe.seen[0][1] == (host or f"127.0.0.1:{port}"), _Probe.seen
    finally:
        server.shutdown()
        server.server_close()
    # nothing listening: unhealthy
    rc = subprocess.run([str(BIN / "python"), "-c", code], timeout=60).returncode
    assert rc != 0


def test_prefect_ui_calls_the_api_where_browsers_reach_it(tmp_path):
    """Was: compose set neither PREFECT_UI_API_URL nor PREFECT_API_URL on the server, so
    /ui-settings answered a loopback address and a UI opened from another machine (with
    KILN_BIND_ADDRESS set) called that machine's own loopback."""
    default = _compose()["services"]["prefect"]["environment"]
    assert default["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"
    moved = _compose(KILN_BIND_ADDRESS="10.1.2.3", KILN_PREFECT_URL="https://prefect.internal")
    server_env = moved["services"]["prefect"]["environment"]
    assert server_env["PREFECT_UI_API_URL"] == "https://prefect.internal/api"
    assert "KILN_PREFECT_URL" in (INFRA / "env.example").read_text()
    # what the server's /ui-settings answers with compose's environment (the UI app alone:
    # no database needed)
    code = (
        "from starlette.testclient import TestClient\n"
        "from prefect.server.api.server import create_ui_app\n"
        "print(TestClient(create_ui_app(ephemeral=False)).get('/ui-settings').json()['api_url'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({k: str(v) for k, v in server_env.items()}, PREFECT_HOME=str(tmp_path))
    env["PREFECT_SERVER_API_HOST"] = "0.0.0.0"  # compose's `--host 0.0.0.0`
    out = subprocess.run(
        [str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "https://prefect.internal/api"


def test_containers_run_without_privileges():
    """Found in review: every container ran as root, with the default capabilities and
    setuid escalation open; a Kubernetes job also got the namespace's service-account
    token, which nothing in a stage uses. A stage decodes images from the internet."""
    services = _compose()["services"]
    for name, svc in services.items():
        assert svc.get("security_opt") == ["no-new-privileges:true"], name
        assert "privileged" not in svc and "pid" not in svc, name
        for volume in svc.get("volumes", []):
            assert "docker.sock" not in volume, name
        # postgres and minio start as root to chown their data, then drop to their user
        if name not in ("postgres", "minio"):
            assert svc.get("cap_drop") == ["ALL"], name
    # the worker image's last USER is unprivileged, numeric (runAsNonRoot checks a number)
    lines = (INFRA / "Dockerfile").read_text().splitlines()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] == "10001", users
    after = "\n".join(lines[max(i for i, ln in enumerate(lines) if ln.startswith("USER ")) :])
    assert "ENTRYPOINT" in after and "CMD" in after  # nothing after it runs as root again
    # the folders compose mounts named volumes on exist in the image, owned by that user
    mounts = {v.split(":")[1] for n in ("worker-cpu", "worker-gpu") for v in services[n]["volumes"]}
    for mount in mounts:
        assert mount in (INFRA / "Dockerfile").read_text(), mount
    # Kubernetes: the pod as that user, no token, no escalation, no capabilities
    manifest, _ = _render("gpu-pool-kubernetes.json")
    pod = manifest["job_manifest"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = pod["containers"][0]["securityContext"]
    assert context == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    # Docker pool jobs: the same as compose's workers
    docker, _ = _render("gpu-pool-docker.json")
    assert docker["container_create_kwargs"]["security_opt"] == ["no-new-privileges:true"]
    assert docker["container_create_kwargs"]["cap_drop"] == ["ALL"]


def test_no_usage_telemetry_leaves_the_stack(monkeypatch):
    """MLflow 3 sends usage telemetry unless MLFLOW_DISABLE_TELEMETRY is true or
    DO_NOT_TRACK is "true"; found in review: the image's DO_NOT_TRACK=1 did not stop it,
    and the MLflow server had no opt-out. Checked with MLflow's own reading."""
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY

    services = _compose()["services"]
    text = (INFRA / "Dockerfile").read_text()
    image = dict(re.findall(r"\b(MLFLOW_DISABLE_TELEMETRY|DO_NOT_TRACK)=(\S+)", text))
    for name in ("mlflow", "worker-cpu", "worker-gpu"):
        env = dict(services[name].get("environment") or {})
        if name.startswith("worker"):
            env = image | env
        for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
            monkeypatch.delenv(key, raising=False)
        for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
            if key in env:
                monkeypatch.setenv(key, str(env[key]))
        do_not_track = os.environ.get("DO_NOT_TRACK", "false").lower() == "true"
        assert MLFLOW_DISABLE_TELEMETRY.get() or do_not_track, name
    assert image.get("DO_NOT_TRACK") in (None, "true"), image  # "1" reads as tracking on
    # Prefect's server sends none either
    assert services["prefect"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
