"""What a failed request to the object store means, as one line that names the
``s3://`` object and says what to do.

boto3's own errors name neither the object nor the fix ("An error occurred (403) when
calling the HeadObject operation: Forbidden"), and none of them is an ``OSError`` or a
``UserError``: the stage printed them as a library's error and the flow recorded them
``retry: false``, a store that was restarting as surely as a wrong key. Found in
review. ``store_error`` sorts them in two:

* ``StoreRefused`` (a ``UserError``: one line, never retried): access refused, no
  credentials, no such bucket; only the user can mend those;
* ``StoreUnreachable`` (a ``ConnectionError``, which the flow's ``transient()`` retries):
  5xx answers, throttling, timeouts, refused connections, a download cut short on every
  try. boto3 has already retried each request (``s3_client``), so the loader does not
  retry it again (``readers.retrying`` passes it through): the message a user sees is
  this one, naming the object once.

A missing object (404) stays ``MissingShard``, and a full cache disk ``DiskFull``.
"""

from __future__ import annotations

from training.disk import DiskFull
from training.errors import UserError

_REFUSED_CODES = {
    "401",
    "403",
    "AccessDenied",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
}
_BUSY_CODES = {  # answers that a later try may not get
    "BandwidthLimitExceeded",
    "InternalError",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestTimeout",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
}
_HINT = "check the AWS_* credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"


class MissingShard(UserError):
    """A shard the index lists is not in the store: the split was not (fully) published."""


class StoreRefused(UserError):
    """The store refused the request, or boto3 found no credentials to make it with."""


class StoreUnreachable(ConnectionError):
    """The store did not answer (or answered that it is busy) on any of boto3's tries.
    One argument, so ``str()`` is the message alone."""


# what reading a shard through the cache raises that is not the sample's fault (the
# loader stops the stage on these instead of skipping the sample)
STORE_FAILURES = (MissingShard, StoreRefused, StoreUnreachable, DiskFull)


def not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    return error.get("Code") in ("404", "NoSuchKey", "NotFound")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def store_error(exc: BaseException, url: str, endpoint: str | None) -> Exception | None:
    """The one-line error ``exc`` (raised by boto3 reading ``url``) means, or None if
    it is not the store's (a disk error, a bug): the caller re-raises that as it is."""
    from boto3.exceptions import RetriesExceededError as Boto3RetriesExceeded
    from botocore.exceptions import (
        ClientError,
        CredentialRetrievalError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.exceptions import RetriesExceededError

    where = f"AWS_ENDPOINT_URL, now {endpoint or 'unset: AWS S3 itself'}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        said = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in _BUSY_CODES or status in (408, 429) or status >= 500:
            return StoreUnreachable(
                f"{url}: the object store did not answer after boto3's retries ({said}); "
                f"re-run when it is back ({where}; the flow retries the stage)"
            )
        if code in _REFUSED_CODES or status in (401, 403):
            return StoreRefused(
                f"{url}: the object store refused access ({said}); {_HINT} and the "
                f"endpoint ({where})"
            )
        return StoreRefused(
            f"{url}: the object store said {said}; check the URL and the endpoint ({where})"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return StoreRefused(
            f"{url}: no credentials for the object store ({_one_line(exc)}); {_HINT} and "
            f"the endpoint ({where})"
        )
    if isinstance(exc, RetriesExceededError | Boto3RetriesExceeded):  # cut on every try
        exc = exc.last_exception or exc
    elif not isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return None
    return StoreUnreachable(
        f"{url}: the object store did not answer after boto3's retries ({_one_line(exc)}); "
        f"check the endpoint ({where}) and the network, and re-run (the flow retries the "
        "stage)"
    )
