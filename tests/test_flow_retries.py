"""Which pipeline tasks Prefect retries: the ones where a retry can help."""

from prefect.states import Failed

from flows.tasks import CHECKPOINTED, GPU_STAGES, StageFailed, _retryable, _stage, ingest_task
from training.config import STAGES


def test_only_transient_or_resumable_work_is_retried():
    # ingestion talks to servers: retried with backoff
    assert ingest_task.retries == 2 and ingest_task.retry_delay_seconds == [5, 30]
    for stage in STAGES[1:]:
        # a checkpointed training stage resumes on retry; the others would fail again
        assert _stage(stage).retries == (1 if stage in CHECKPOINTED else 0), stage
        assert _stage(stage).name == stage
    assert set(CHECKPOINTED) <= set(GPU_STAGES)


def test_a_stage_that_failed_for_a_reason_is_not_retried():
    """A missing source or a full disk fails the same way again (and printed its error
    three times); a stage that died without a word (killed, OOM) may pass."""
    assert ingest_task.retry_condition_fn is _retryable
    assert all(_stage(s).retry_condition_fn is _retryable for s in STAGES[1:])
    said = Failed(data=StageFailed("ingest: no such folder /data/x", retry=False))
    died = Failed(data=StageFailed("stage ingest failed (dvc exit code 255)"))
    flaky = Failed(data=StageFailed("ingest: connection reset", retry=True))
    assert not _retryable(ingest_task, None, said)
    assert _retryable(ingest_task, None, died)
    assert _retryable(ingest_task, None, flaky)
