"""Registered models on local disk, for what loads them (``kiln generate``, ``kiln
export``, the playground, a continuing run's components, the champion's re-score).

An embedded registry (SQLite + ``mlartifacts/``) keeps its files on this disk: MLflow
hands back their path. An MLflow server's are downloaded, once a version, into
``KILN_MODEL_CACHE`` (default ``~/.cache/kiln/models``) and found there the next time.
Was: ``download_artifacts`` without a destination, a new temporary folder at every call,
never removed (a 5 MB version three times left three folders; a base model, gigabytes a
command). A version's files never change once registered; the folder's name holds the
server, name, version and the version's creation time, so a registry rebuilt with other
models under the same numbers is not served from the old copies. Delete the cache freely.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

from training.tracking.store import setup, tracking_uri

MODEL_CACHE_ENV = "KILN_MODEL_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "kiln" / "models")


def resolve_model_dir(uri: str) -> Path:
    """Local directory of a registered model (``models:/name/version|@alias``)."""
    setup()
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    name_version = model_version(uri)
    exact = f"models:/{name_version}"
    server = tracking_uri()
    if not server.startswith(("http://", "https://")):  # the store's own files
        return Path(download_artifacts(artifact_uri=exact))
    name, version = name_version.rsplit("/", 1)
    mv = MlflowClient().get_model_version(name, version)
    key = hashlib.sha256(f"{server}|{name}|{version}|{mv.creation_timestamp}".encode())
    here = cache_root() / f"{name}-v{version}-{key.hexdigest()[:12]}"
    if here.is_dir():
        return here
    here.parent.mkdir(parents=True, exist_ok=True)
    part = here.with_name(f".{here.name}.{os.getpid()}.{threading.get_ident()}.part")
    shutil.rmtree(part, ignore_errors=True)
    got = Path(download_artifacts(artifact_uri=exact, dst_path=str(part)))
    try:
        os.replace(got, here)
    except OSError:  # another process put it there first: theirs is the same files
        if not here.is_dir():
            raise
    shutil.rmtree(part, ignore_errors=True)
    return here


def model_version(uri: str) -> str:
    """``name/version`` a registry URI points at now (``models:/n/latest``, ``models:/n@a``)."""
    from mlflow import MlflowClient

    setup()
    ref = uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
    name, _, version = ref.partition("/")
    if version in ("", "latest"):
        version = str(max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
    return f"{name}/{version}"
