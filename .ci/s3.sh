#!/usr/bin/env bash
# Start a throwaway S3-API server (moto_server from moto[server]) on a free loopback port for the tests.
# Writes .ci/s3.env (source it) exporting KVAGENT_TEST_S3_URL and the AWS_* variables the S3 blob
# backend reads, and prints the URL. The tests create their own buckets.
#   .ci/s3.sh         start (installs moto[server] into .ci/.s3-venv if moto_server is not on PATH)
#   .ci/s3.sh stop    stop the server started last
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ENV_FILE="$HERE/s3.env"

if [ "${1:-start}" = stop ]; then
  if [ -f "$ENV_FILE" ]; then
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    kill "$KVAGENT_TEST_S3_PID" 2>/dev/null || true
    rm -f "$ENV_FILE"
  fi
  exit 0
fi

MOTO="$(command -v moto_server || true)"
if [ -z "$MOTO" ] || ! "$MOTO" --help >/dev/null 2>&1; then
  echo "moto_server not found; installing moto[server] into $HERE/.s3-venv" >&2
  python3 -m venv "$HERE/.s3-venv"
  "$HERE/.s3-venv/bin/pip" install -q --disable-pip-version-check "moto[server]>=5" >&2
  MOTO="$HERE/.s3-venv/bin/moto_server"
fi

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
LOG="$(mktemp /tmp/kvagent-s3.XXXXXX.log)"
nohup "$MOTO" -H 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 &
PID=$!
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$URL/moto-api/" 2>/dev/null; then
    break
  fi
  kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.2
done

cat >"$ENV_FILE" <<ENV
export KVAGENT_TEST_S3_URL=$URL
export KVAGENT_TEST_S3_PID=$PID
export AWS_ENDPOINT_URL=$URL
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
ENV
echo "KVAGENT_TEST_S3_URL=$URL"
