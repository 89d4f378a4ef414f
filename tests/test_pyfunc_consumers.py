"""``kiln-text2image`` as a user consumes it with ``mlflow.pyfunc.load_model`` in their own
process (a notebook, a batch job): pandas' own nulls are nulls, and loading the model
leaves the caller's process as it was.

On a random-weight pipeline with the tiny profile's architectures
(``test_serving.build_tiny_pipeline``), registered by the evaluate stage's own code
(``test_serving.register``): nothing trained, nothing downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import BIN, project_env, run_ok
from tests.test_serving import MODEL, build_tiny_pipeline, register


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[Path, str]:
    tiny = build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    root = tmp_path_factory.mktemp("registry")
    return root, register(root, tiny)


def test_a_nullable_integer_column_s_null_gets_the_default(registry):
    """``pd.NA`` (an ``Int64`` column, ``convert_dtypes()``) is a null like None and NaN:
    the row gets the default seed (its row number), the others keep theirs (was: refused,
    "seed must be a whole number ..., got <NA>")."""
    root, version = registry
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    finally:
        mlflow.set_tracking_uri(before)
    rows = pd.DataFrame(
        {
            "prompt": ["a red circle", "a red circle", "a blue square"],
            "seed": pd.array([7, None, 9], dtype="Int64"),
            "steps": pd.array([1, 1, None], dtype="Int64"),
        }
    )
    alone = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [1], "steps": [1]}))
    out = model.predict(rows)
    assert out["seed"].tolist() == [7, 1, 9]
    assert out["image"][1] == alone["image"][0]  # seed 1 = its row number, as a None would
    assert out.convert_dtypes()["seed"].tolist() == [7, 1, 9]


# A user's script, without Kiln's checkout on its path (the venv's editable install of it
# taken out): load the model, then check the process is as the user left it.
USER = """
import json, os, sys, warnings
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_importer_cache.clear()
env = dict(os.environ)
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [1], "steps": [1]}))
with warnings.catch_warnings(record=True) as seen:
    warnings.warn("the user's own warning")
import training
print(json.dumps({
    "changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "warnings": len(seen),
    "training": training.__file__,
    "rows": len(out),
}))
"""


def test_loading_the_model_leaves_the_users_process_as_it_was(registry, tmp_path):
    """Loading is not Kiln's entry point: its offline defaults are for its own commands and
    ``mlflow models serve``'s process (was: after the load every warning of the user's
    code was silenced, and HF_HUB_OFFLINE, PYTHONWARNINGS=ignore... were set for the
    rest of the process and its children). The model needs no Kiln checkout: its code
    comes with it."""
    root, version = registry
    from training.env import DEFAULTS

    env = {**project_env(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("PYTHONPATH")
    # a user's process, not one started by Kiln's: without the defaults this suite's own
    # process took (PYTHONWARNINGS=ignore among them, which silenced the warning below)
    env = {k: v for k, v in env.items() if k not in DEFAULTS}
    env["OMP_NUM_THREADS"] = "1"
    out = run_ok(env, tmp_path, str(BIN / "python"), "-c", USER, f"models:/{MODEL}/{version}")
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["rows"] == 1
    assert seen["warnings"] == 1
    assert seen["changed"] == []
    assert "/artifacts/code/training/" in seen["training"], seen["training"]
