"""What a phase logs to: metrics, images and folders (an MLflow run in the pipeline,
``tracking.StageRun``), and the tracker that logs nothing (tests, benchmarks, the
followers of a data-parallel stage). Torch-free, so the CLI can hand one out without
loading the training engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_image(self, path: str | Path, artifact_dir: str = "images") -> None: ...
    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_image(self, path: str | Path, artifact_dir: str = "images") -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass
