"""A registered version on an MLflow server is downloaded once, not at every load.

``kiln generate``, ``kiln export`` and the playground resolved ``@champion`` through
``download_artifacts`` without a destination: a new temporary folder every call, never
removed (three loads of a 5 MB version left three copies; a base model, gigabytes a
command). Against a real ``mlflow server`` on loopback with served artifacts."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import BIN, background, free_port, project_env, wait_http

REGISTER = """
import sys
from pathlib import Path
import mlflow
from mlflow import MlflowClient
from training.tracking.store import setup
setup()
folder = Path(sys.argv[1])
with mlflow.start_run() as run:
    mlflow.log_artifacts(str(folder), artifact_path="model")
client = MlflowClient()
client.create_registered_model("m")
v = client.create_model_version("m", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
client.set_registered_model_alias("m", "champion", v.version)
"""

RESOLVE = """
import json, os, sys, tempfile
from pathlib import Path
from training.tracking.registry import resolve_model_dir
before = set(os.listdir(tempfile.gettempdir()))
uris = ("models:/m@champion", "models:/m/1", "models:/m@champion")
paths = [str(resolve_model_dir(u)) for u in uris]
tmp = Path(tempfile.gettempdir())
new = sorted(n for n in set(os.listdir(tmp)) - before if (tmp / n).is_dir())
print(json.dumps({"paths": paths, "new_tmp": new}))
"""


def test_a_server_version_is_downloaded_once_into_the_model_cache(tmp_path: Path):
    import json
    import subprocess
    import sys

    servers = tmp_path / "servers"
    servers.mkdir()
    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{servers / 'mlflow.db'}",
        "--artifacts-destination", str(servers / "mlartifacts"), "--workers", "1",
    ]  # fmt: skip
    env = project_env(tmp_path)
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    env |= {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "KILN_MODEL_CACHE": str(tmp_path / "cache"),
        "TMPDIR": str(own_tmp),  # what a temporary copy would leave behind
    }
    env.pop("MLFLOW_REGISTRY_URI", None)
    model = tmp_path / "weights"
    model.mkdir()
    (model / "config.json").write_text('{"w": 1}')
    with background(cmd, env, servers, servers / "mlflow.log") as server:
        wait_http(f"http://127.0.0.1:{port}/health", server, servers / "mlflow.log")
        for script, args in ((REGISTER, [str(model)]), (RESOLVE, [])):
            proc = subprocess.run(
                [sys.executable, "-c", script, *args], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, *again = (Path(p) for p in out["paths"])
    assert all(p == first for p in again), out["paths"]  # one copy, found again
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-v1-")
    assert json.loads((first / "config.json").read_text()) == {"w": 1}
    assert out["new_tmp"] == []  # was: a folder of the model's files a call (MLflow's
    # own lock files, db_init_lock-*, are files)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no .part left
