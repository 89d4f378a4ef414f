"""Process-wide defaults: offline, no telemetry, quiet library progress bars.

Kiln never downloads weights or data at run time, and several libraries in the stack
phone home by default (Hugging Face hub, Great Expectations analytics, albumentations'
update check inside img2dataset, MLflow and Prefect telemetry). Every entry point calls
``offline_defaults()`` first; an explicit user setting always wins (``setdefault``).
"""

from __future__ import annotations

import os

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' own progress bars
    # Read when diffusers/transformers are first imported: setting verbosity this way
    # instead of importing them here keeps `kiln ingest`/`validate` (which never touch
    # them) ~3 s faster to start.
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A fresh Prefect home migrates its SQLite database when the ephemeral API first
    # starts; on a busy 2-core machine that takes longer than Prefect's 20 s default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def offline_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    import warnings

    warnings.filterwarnings("ignore")
