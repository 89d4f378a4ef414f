"""The servers of infra/compose.yaml, run with compose's own command lines against a
real local PostgreSQL (Debian's package; skipped where it is not installed): Prefect
on PostgreSQL, and MLflow on PostgreSQL with basic auth. MinIO is not available here, so
MLflow's artifacts go to a local directory instead of ``s3://mlflow``."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, REPO, background, free_port, run_ok, wait_http


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None
    )
    return Path(found).resolve().parent if found else None


PG = _pg_bin()
pytestmark = pytest.mark.skipif(PG is None, reason="PostgreSQL (Debian: postgresql) not installed")
PASSWORD = "kiln-test-pw"


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
    return yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())["services"]


def _localise(text: str, pg_port: int) -> str:
    """compose's values with this machine's addresses and the test's password."""
    return text.replace("${POSTGRES_PASSWORD}", PASSWORD).replace(
        "postgres:5432", f"127.0.0.1:{pg_port}"
    )


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def test_prefect_server_on_postgres_with_composes_settings(postgres, tmp_path):
    svc = _compose()["prefect"]
    env = _env(tmp_path)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = _localise(
        svc["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"], postgres["port"]
    )
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_UI_ENABLED"] = "false"
    port = free_port()
    cmd = svc["command"].split()
    assert cmd[:3] == ["prefect", "server", "start"]
    cmd = [str(BIN / "prefect"), *cmd[1:]]
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"
    with background([*cmd, "--port", str(port)], env, tmp_path, tmp_path / "p.log") as proc:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, tmp_path / "p.log")
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        run_ok(
            env, tmp_path, str(BIN / "prefect"), "work-pool", "create", "gpu", "--type", "process"
        )
    # the pool is a row in PostgreSQL, not in a SQLite file somewhere
    rows = subprocess.run(
        [*postgres["psql"], "-d", "prefect", "-tAc", "select name from work_pool"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "gpu" in rows


def test_mlflow_server_on_postgres_with_basic_auth(postgres, tmp_path):
    svc = _compose()["mlflow"]
    port = free_port()
    cmd = _localise(svc["command"], postgres["port"]).split()
    assert cmd[:2] == ["mlflow", "server"] and "basic-auth" in cmd
    cmd = [str(BIN / "mlflow"), *cmd[1:]]
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    # no MinIO here: artifacts to a local directory instead of s3://mlflow
    cmd[cmd.index("s3://mlflow")] = str(tmp_path / "artifacts")
    ini = (REPO / "infra" / "mlflow-auth.ini.example").read_text()
    admin_pw = re.search(r"admin_password = (.+)", ini).group(1).strip()
    auth = tmp_path / "basic_auth.ini"
    auth.write_text(ini.replace(admin_pw, "a-real-password").replace(
        "sqlite:///basic_auth.db", f"sqlite:///{tmp_path / 'auth.db'}"
    ))  # fmt: skip
    env = _env(tmp_path)
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(auth), MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret")
    url = f"http://127.0.0.1:{port}"
    with background(cmd, env, tmp_path, tmp_path / "m.log") as proc:
        wait_http(f"{url}/health", proc, tmp_path / "m.log")
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=10)
        assert refused.value.code == 401  # basic auth is on
        code = (
            "import mlflow\n"
            "mlflow.set_experiment('kiln-infra-check')\n"
            "with mlflow.start_run():\n"
            "    mlflow.log_metric('x', 1.5)\n"
            "print(mlflow.search_runs(experiment_names=['kiln-infra-check'])['metrics.x'][0])\n"
        )
        ok = dict(env, MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="admin",
                  MLFLOW_TRACKING_PASSWORD="a-real-password")  # fmt: skip
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
