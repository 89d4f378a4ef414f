"""Which pipeline tasks Prefect retries: the ones where a retry can help."""

from flows.pipeline import CHECKPOINTED, GPU_STAGES, _stage, ingest_task
from training.config import STAGES


def test_only_transient_or_resumable_work_is_retried():
    # ingestion talks to servers: retried with backoff
    assert ingest_task.retries == 2 and ingest_task.retry_delay_seconds == [5, 30]
    for stage in STAGES[1:]:
        # a checkpointed training stage resumes on retry; the others would fail again
        assert _stage(stage).retries == (1 if stage in CHECKPOINTED else 0), stage
        assert _stage(stage).name == stage
    assert set(CHECKPOINTED) <= set(GPU_STAGES)
