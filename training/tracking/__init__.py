"""Registry and tracking: the only code that imports ``mlflow`` (with the pyfunc wrapper
``training/inference/text2image_model.py``).

* ``store``: where runs and models live (SQLite by default, a server when configured);
* ``runs``: one MLflow run per stage nested under the pipeline's run; closing runs whose
  process died;
* ``lineage``: git commit and DVC hashes as tags;
* ``registry``: each phase's model as a registered version, the promotion gate, and
  re-registering what DVC restored from its cache (``signatures``: a component's MLmodel);
* ``twins``: a stage that made a registered model again takes its version, no copy;
* ``resume``: finishing a ``kiln-text2image`` registration a stop interrupted, instead
  of registering the same weights again;
* ``components``: fetching a registered component to reuse, crowning a champion's;
* ``versions``: the text-to-image versions as people see them (``kiln generate``'s
  model argument, the playground's list, promotion by hand).
"""

from training.stages import MODEL_NAMES
from training.tracking import components, gate, lineage, twins
from training.tracking.gate import describe_gate, promote
from training.tracking.lineage import dvc_lineage, git_commit, tag_stage_outputs
from training.tracking.registry import (
    REGISTERED_OUTS,
    champion_version,
    component_model,
    ensure_registered,
    model_version,
    newest_versions,
    register_dir,
    register_text2image,
    resolve_model_dir,
)
from training.tracking.runs import (
    StageRun,
    close_orphaned_runs,
    log_pipeline_summary,
    pipeline_run,
    stage_run,
)
from training.tracking.store import EXPERIMENT, PARENT_ENV, setup, tracking_uri
from training.tracking.versions import list_versions, pipeline_dir, promote_by_hand

__all__ = [
    "EXPERIMENT",
    "MODEL_NAMES",
    "PARENT_ENV",
    "REGISTERED_OUTS",
    "StageRun",
    "champion_version",
    "close_orphaned_runs",
    "components",
    "gate",
    "lineage",
    "component_model",
    "describe_gate",
    "dvc_lineage",
    "ensure_registered",
    "git_commit",
    "list_versions",
    "log_pipeline_summary",
    "model_version",
    "newest_versions",
    "pipeline_dir",
    "pipeline_run",
    "promote",
    "promote_by_hand",
    "register_dir",
    "register_text2image",
    "resolve_model_dir",
    "setup",
    "stage_run",
    "tag_stage_outputs",
    "tracking_uri",
    "twins",
]
