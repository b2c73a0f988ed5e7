#!/usr/bin/env bash
# A local S3-compatible server for the tests and the demo: moto in server mode, from
# the project's Python virtualenv (scripts/setup.sh installs it), bound to 127.0.0.1.
# It implements S3 conditional writes (If-None-Match), which concurrent Delta commits
# on S3 rely on. Its objects live in memory: stopping it forgets them.
#
#   scripts/s3.sh start [PORT]          start a server on 127.0.0.1:PORT (default 9000)
#   scripts/s3.sh ensure [PORT]         start one unless a server already answers there
#   scripts/s3.sh stop [PORT]           stop the server started by this script
#   scripts/s3.sh bucket NAME [PORT]    create a bucket
#
# Credentials: any access key and secret (AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test),
# region us-east-1, endpoint http://127.0.0.1:PORT.
set -euo pipefail

CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
PYTHON="$CACHE/venv/bin/python"
RUN_DIR="${POSITION_SINK_S3_RUN:-${TMPDIR:-/tmp}/position-sink-s3}"

log() { echo "s3.sh: $*" >&2; }
# shellcheck source=scripts/lib/local-service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/local-service.sh"

start() {
  [ -x "$PYTHON" ] || { log "no Python virtualenv at $CACHE/venv: run scripts/setup.sh"; exit 1; }
  start_background "${1:-9000}" "S3 server" "$PYTHON" -m moto.server -H 127.0.0.1 -p "${1:-9000}"
}

ensure() { ensure_started "${1:-9000}" start; }

stop() { stop_started "${1:-9000}" "S3 server"; }

bucket() {
  local name="$1" port="${2:-9000}"
  "$PYTHON" - "$name" "$port" <<'PY'
import sys, boto3
name, port = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
s3.create_bucket(Bucket=name)
PY
}

cmd="${1:-}"; shift || true
case "$cmd" in
  start) start "$@" ;;
  ensure) ensure "$@" ;;
  stop) stop "$@" ;;
  bucket) bucket "$@" ;;
  *) echo "usage: $0 start [PORT] | ensure [PORT] | stop [PORT] | bucket NAME [PORT]" >&2; exit 2 ;;
esac
