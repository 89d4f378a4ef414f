"""The servers of infra/compose.yaml, run with compose's own command lines and settings
against a real local PostgreSQL (Debian's package; skipped where it is not installed):
Prefect on PostgreSQL with its API auth string, and MLflow on PostgreSQL with basic auth.
MinIO is not available here, so MLflow's artifacts go to a local directory instead of
``s3://mlflow``."""

from __future__ import annotations

import base64
import configparser
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, REPO, background, free_port, run_ok, wait_http
from .test_infra import compose_interpolate


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None
    )
    return Path(found).resolve().parent if found else None


PG = _pg_bin()
pytestmark = pytest.mark.skipif(PG is None, reason="PostgreSQL (Debian: postgresql) not installed")
PASSWORD = "kiln-test-pw"
# what infra/.env would hold
DOTENV = {
    "POSTGRES_PASSWORD": PASSWORD,
    "PREFECT_AUTH_STRING": "kiln:test-prefect-auth-0123",
    "MLFLOW_ADMIN_USER": "kiln-admin",
    "MLFLOW_ADMIN_PASSWORD": "a-real-password",
    "MLFLOW_SECRET_KEY": "test-secret-0123456789",
    "MINIO_ROOT_USER": "kiln",
    "MINIO_ROOT_PASSWORD": "test-minio-0123456789",
}


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="module")
def postgres():
    base = Path(tempfile.mkdtemp(prefix="kiln-pg-"))  # pytest's tmp dirs are root-only
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    for d in (data, sock):
        d.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(d, pw.pw_uid, pw.pw_gid)
    run = _as_postgres()
    subprocess.run(
        [*run, str(PG / "initdb"), "-D", str(data), "-U", "postgres",
         "--auth-local=trust", "--auth-host=scram-sha-256"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    cmd = [*run, str(PG / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
           "-c", "listen_addresses=127.0.0.1"]  # fmt: skip
    log = base / "postgres.log"
    with background(cmd, dict(os.environ), base, log):
        psql = ["psql", "-h", str(sock), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        for _ in range(60):
            if subprocess.run([*psql, "-c", "select 1"], capture_output=True).returncode == 0:
                break
            subprocess.run(["sleep", "0.5"])
        else:
            raise AssertionError(log.read_text()[-2000:])
        subprocess.run(
            [*psql, "-c", f"CREATE ROLE kiln LOGIN PASSWORD '{PASSWORD}'",
             "-c", "CREATE DATABASE prefect OWNER kiln"],
            check=True, capture_output=True,
        )  # fmt: skip
        # compose runs postgres-init.sql from docker-entrypoint-initdb.d; so do we
        subprocess.run(
            [*psql, "-f", str(REPO / "infra" / "postgres-init.sql")],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*psql, "-c", "ALTER DATABASE mlflow OWNER TO kiln"], check=True, capture_output=True
        )
        yield {"port": port, "psql": psql}
    shutil.rmtree(base, ignore_errors=True)


def _compose() -> dict:
    """compose's services, its variables filled in from the test's infra/.env."""
    text = compose_interpolate((REPO / "infra" / "compose.yaml").read_text(), DOTENV)
    return yaml.safe_load(text)["services"]


def _localise(text: str, pg_port: int) -> str:
    """compose's values with this machine's addresses."""
    return text.replace("postgres:5432", f"127.0.0.1:{pg_port}")


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10):
            return 200
    except urllib.error.HTTPError as e:
        return e.code


def _health_check(svc: dict, container_port: int, port: int) -> int:
    """compose's health check command for `svc`, run here against `port`: its exit code."""
    cmd, _, code = svc["healthcheck"]["test"][1:]
    assert cmd == "python", svc["healthcheck"]  # the images have Python, not curl
    code = code.replace(f"127.0.0.1:{container_port}", f"127.0.0.1:{port}")
    return subprocess.run([str(BIN / "python"), "-c", code], timeout=60).returncode


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def test_prefect_server_on_postgres_with_composes_settings(postgres, tmp_path):
    services = _compose()
    svc = services["prefect"]
    env = _env(tmp_path)
    server_env = dict(svc["environment"])
    server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = _localise(
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"], postgres["port"]
    )
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"] == DOTENV["PREFECT_AUTH_STRING"]
    env.update(server_env, PREFECT_UI_ENABLED="false")
    port = free_port()
    cmd = svc["command"].split()
    assert cmd[:3] == ["prefect", "server", "start"]
    cmd = [str(BIN / "prefect"), *cmd[1:]]
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"
    api = f"http://127.0.0.1:{port}/api"
    with background([*cmd, "--port", str(port)], env, tmp_path, tmp_path / "p.log") as proc:
        wait_http(f"{api}/health", proc, tmp_path / "p.log")  # open, for probes
        # compose's health check (/api/ready, no auth string): healthy
        assert _health_check(svc, 4200, port) == 0
        # anyone else who reaches the port: refused
        assert _status(f"{api}/work_pools/default-agent-pool") == 401
        wrong = base64.b64encode(b"kiln:guess").decode()
        assert _status(f"{api}/admin/version", {"Authorization": f"Basic {wrong}"}) == 401
        client = {k: v for k, v in env.items() if not k.startswith("PREFECT_SERVER_")}
        client["PREFECT_API_URL"] = api
        anonymous = subprocess.run(
            [str(BIN / "prefect"), "work-pool", "create", "cpu", "--type", "process"],
            env=client, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert anonymous.returncode != 0, anonymous.stdout
        assert "401" in anonymous.stdout + anonymous.stderr
        # a worker, with the auth string compose gives it
        worker = services["worker-gpu"]["environment"]
        client["PREFECT_API_AUTH_STRING"] = worker["PREFECT_API_AUTH_STRING"]
        run_ok(
            client, tmp_path, str(BIN / "prefect"), "work-pool", "create", "gpu", "--type",
            "process",
        )  # fmt: skip
    assert _health_check(svc, 4200, port) != 0  # and unhealthy once it is gone
    # the pool is a row in PostgreSQL, not in a SQLite file somewhere
    rows = subprocess.run(
        [*postgres["psql"], "-d", "prefect", "-tAc", "select name from work_pool"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "gpu" in rows and "cpu" not in rows


def test_mlflow_server_on_postgres_with_basic_auth(postgres, tmp_path):
    svc = _compose()["mlflow"]
    port = free_port()
    cmd = _localise(svc["command"], postgres["port"]).split()
    assert cmd[:2] == ["mlflow", "server"] and "basic-auth" in cmd
    assert "--backend-store-uri" not in cmd  # MLFLOW_BACKEND_STORE_URI, below
    cmd = [str(BIN / "mlflow"), *cmd[1:]]
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    # no MinIO here: artifacts to a local directory instead of s3://mlflow
    cmd[cmd.index("s3://mlflow")] = str(tmp_path / "artifacts")
    # compose's auth config, with its database (on compose's mlflow-auth volume) moved here
    ini = configparser.ConfigParser()
    ini.read(REPO / "infra" / "mlflow-basic-auth.ini")
    db = Path(ini["mlflow"]["database_uri"].removeprefix("sqlite:///"))
    local_db = tmp_path / "mlflow-auth" / db.name
    local_db.parent.mkdir()
    ini["mlflow"]["database_uri"] = f"sqlite:///{local_db}"
    auth = tmp_path / "basic_auth.ini"
    with open(auth, "w") as f:
        ini.write(f)
    env = _env(tmp_path)
    server_env = {k: v for k, v in svc["environment"].items() if not k.startswith("AWS_")}
    server_env.pop("MLFLOW_S3_ENDPOINT_URL")
    # the backend store from the environment, as compose gives it (not on the command line)
    server_env["MLFLOW_BACKEND_STORE_URI"] = _localise(
        server_env["MLFLOW_BACKEND_STORE_URI"], postgres["port"]
    )
    env.update(server_env, MLFLOW_AUTH_CONFIG_PATH=str(auth))
    url = f"http://127.0.0.1:{port}"
    with background(cmd, env, tmp_path, tmp_path / "m.log") as proc:
        wait_http(f"{url}/health", proc, tmp_path / "m.log")
        # compose's health check, with the workers' Host header: healthy
        assert _health_check(svc, 5000, port) == 0
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert _status(search) == 401  # basic auth is on
        # the workers' Host header (compose's http://mlflow:5000) gets as far as auth;
        # a name nobody listed is turned away first
        assert _status(search, {"Host": "mlflow:5000"}) == 401
        assert _status(search, {"Host": "rebound.example:5000"}) == 403
        code = (
            "import mlflow\n"
            "mlflow.set_experiment('kiln-infra-check')\n"
            "with mlflow.start_run():\n"
            "    mlflow.log_metric('x', 1.5)\n"
            "print(mlflow.search_runs(experiment_names=['kiln-infra-check'])['metrics.x'][0])\n"
        )
        # the admin made from infra/.env, as the workers log in
        worker = _compose()["worker-cpu"]["environment"]
        ok = dict(env, MLFLOW_TRACKING_URI=url,
                  MLFLOW_TRACKING_USERNAME=worker["MLFLOW_TRACKING_USERNAME"],
                  MLFLOW_TRACKING_PASSWORD=worker["MLFLOW_TRACKING_PASSWORD"])  # fmt: skip
        assert ok["MLFLOW_TRACKING_USERNAME"] == "kiln-admin"
        assert run_ok(ok, tmp_path, str(BIN / "python"), "-c", code).strip().endswith("1.5")
        wrong = dict(ok, MLFLOW_TRACKING_PASSWORD="wrong")
        proc2 = subprocess.run(
            [str(BIN / "python"), "-c", code], env=wrong, cwd=tmp_path, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert proc2.returncode != 0
    rows = subprocess.run(
        [*postgres["psql"], "-d", "mlflow", "-tAc", "select name from experiments"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "kiln-infra-check" in rows
    # users live in the auth database the config names, i.e. on the volume
    users = sqlite3.connect(local_db).execute("select username from users").fetchall()
    assert users == [("kiln-admin",)]
