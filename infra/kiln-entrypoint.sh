#!/bin/sh
# The worker image's entrypoint (infra/Dockerfile): compose's two workers and the gpu
# pools' Kubernetes and Docker jobs all start through it. Before `exec "$@"` it does
# what a fresh container of the image needs to run a stage:
#
# * A variable handed over empty is unset, as if never given: a `{{ $VAR }}` the docker
#   worker did not have, a Kubernetes pool variable left without a value. boto3, DVC and
#   MLflow read an empty AWS_ENDPOINT_URL or MLFLOW_TRACKING_URI as a value, not as none.
# * KILN_POOL_JOB=1 (the infra/gpu-pool-*.json templates set it): no job without
#   MLFLOW_TRACKING_URI. Without it a stage logs into a SQLite file inside the container
#   and nesting under the pipeline's run fails with "Run with id=... not found".
# * KILN_DVC_REMOTE (s3://bucket[/prefix]) becomes the checkout's default DVC remote, with
#   AWS_ENDPOINT_URL as its endpoint when that is set (MinIO; unset for AWS S3). The
#   image's own remote (.dvc/config) is a folder beside the checkout, empty in every
#   fresh container. Written with --local: .dvc/config.local, in neither git nor the
#   image. The keys are not written anywhere: DVC reads AWS_ACCESS_KEY_ID and
#   AWS_SECRET_ACCESS_KEY from the environment, as Kiln's own S3 reads do.
set -eu

for name in MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD \
  AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY KILN_DVC_REMOTE KILN_DATA_REMOTE \
  KILN_REGISTRY_PREFIX; do
  eval "value=\${$name-}"
  if [ -z "$value" ]; then
    unset "$name"
  fi
done
unset value

if [ "${KILN_POOL_JOB-}" = 1 ] && [ -z "${MLFLOW_TRACKING_URI-}" ]; then
  echo "kiln: refusing to start this job: MLFLOW_TRACKING_URI is not set, so its stage would" \
    "log into a SQLite file in the container, not under the pipeline's run. Set it in the" \
    "gpu pool (infra/README.md, \"GPU pools: what a job needs\")." >&2
  exit 1
fi

if [ -n "${KILN_DVC_REMOTE-}" ]; then
  (
    cd "${KILN_HOME:-/opt/kiln}"
    dvc remote add --force --default --local kiln "$KILN_DVC_REMOTE"
    if [ -n "${AWS_ENDPOINT_URL-}" ]; then
      dvc remote modify --local kiln endpointurl "$AWS_ENDPOINT_URL"
    fi
  )
fi

exec "$@"
