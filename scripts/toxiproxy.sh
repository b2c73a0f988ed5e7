#!/usr/bin/env bash
# Toxiproxy (Shopify's fault proxy) for the slow- and failing-storage tests: built from
# the Go module proxy into the cache on first use, run bound to 127.0.0.1. Its HTTP API
# creates proxies (e.g. one in front of the local S3 server) and adds latency,
# timeouts and cut connections to them (tests/common/toxiproxy.rs).
#
#   scripts/toxiproxy.sh fetch          build the server if missing (needs Go)
#   scripts/toxiproxy.sh start [PORT]   start the server, its API on 127.0.0.1:PORT (default 8474)
#   scripts/toxiproxy.sh stop [PORT]    stop the server started by this script
set -euo pipefail

CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
VERSION="v2.12.0"
BIN="$CACHE/toxiproxy-$VERSION/toxiproxy-server"
RUN_DIR="${POSITION_SINK_TOXIPROXY_RUN:-${TMPDIR:-/tmp}/position-sink-toxiproxy}"

log() { echo "toxiproxy.sh: $*" >&2; }
# shellcheck source=scripts/lib/local-service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/local-service.sh"

fetch() {
  [ -x "$BIN" ] && return 0
  if ! command -v go >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing Go from Debian's packages"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null
    else
      log "Go is needed to build Toxiproxy: install it (https://go.dev/dl/)"; exit 1
    fi
  fi
  log "building Toxiproxy $VERSION from the Go module proxy"
  local build; build="$(mktemp -d)"
  GOBIN="$build" GOFLAGS=-mod=mod go install "github.com/Shopify/toxiproxy/v2/cmd/server@$VERSION"
  mkdir -p "$(dirname "$BIN")"
  mv "$build/server" "$BIN"
  rm -rf "$build"
}

start() {
  fetch
  start_background "${1:-8474}" "Toxiproxy API" "$BIN" -host 127.0.0.1 -port "${1:-8474}"
}

stop() { stop_started "${1:-8474}" "Toxiproxy"; }

cmd="${1:-}"; shift || true
case "$cmd" in
  fetch) fetch ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  *) echo "usage: $0 fetch | start [PORT] | stop [PORT]" >&2; exit 2 ;;
esac
