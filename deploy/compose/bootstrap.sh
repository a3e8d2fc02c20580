#!/bin/sh
# bootstrap.sh MODEL_DIR FINGERPRINT_FILE: run once per `docker compose up`.
# Creates the S3 bucket of LORAPLEX_BLOB_URL, opens (so migrates) the registry,
# registers the base model in MODEL_DIR and writes its fingerprint to
# FINGERPRINT_FILE for the engines' resolver. Every step is idempotent.
set -eu
model_dir=$1
fingerprint_file=$2
# Empty for the second base when .env does not name it: stop here, saying which to set.
if [ -z "${LORAPLEX_SERVED_MODEL_NAME:-}" ]; then
    echo "bootstrap: no name to serve $model_dir under: set LORAPLEX_SERVED_MODEL_NAME" \
        "(LORAPLEX_SECOND_SERVED_MODEL_NAME for the second base) in .env" >&2
    exit 2
fi

python - <<'PY'
import os
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

url = os.environ["LORAPLEX_BLOB_URL"]
if url.startswith("s3://"):
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=os.environ.get("LORAPLEX_S3_ENDPOINT_URL") or None)
    # SeaweedFS answers a few seconds after its container starts.
    for attempt in range(60):
        try:
            s3.head_bucket(Bucket=bucket)
            break
        except ClientError:
            s3.create_bucket(Bucket=bucket)
            break
        except EndpointConnectionError:
            time.sleep(1)
    else:
        raise SystemExit(f"bootstrap: S3 at {s3.meta.endpoint_url} did not answer in 60 s")
    print(f"bootstrap: bucket {bucket} ready")
PY

out=$(loraplex bases register "$model_dir" \
    --name "$LORAPLEX_SERVED_MODEL_NAME" --revision "$LORAPLEX_BASE_REVISION")
echo "bootstrap: $out"
# The last word of "registered base NAME@REV fingerprint HEX".
echo "${out##* }" > "$fingerprint_file"
