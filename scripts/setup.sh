#!/usr/bin/env bash
# Installs what building, testing and the demo need, if missing: a C toolchain for
# librdkafka with the system's OpenSSL and libcurl headers (TLS, SASL/SCRAM, OAUTHBEARER),
# Java 17+ and Maven for the local Kafka broker, openssl for its throw-away CA, and a Python virtualenv
# with deltalake, polars and pyarrow for the independent-reader tests, and moto for the
# local S3-compatible server (scripts/s3.sh).
# Rust (cargo, 1.95+) must already be installed: see rust-toolchain in the README.
set -euo pipefail

CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
VENV="$CACHE/venv"
PY_PACKAGES=("deltalake==1.6.6" "polars==2.1.0" "pyarrow==26.0.1" "moto[server]==5.2.5" "boto3==1.44.8")

log() { echo "setup.sh: $*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: install Rust 1.95 or newer (https://rustup.rs)"; exit 1; }

missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v make >/dev/null || missing+=(make)
command -v perl >/dev/null || missing+=(perl)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v openssl >/dev/null || missing+=(openssl)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
pkg-config --exists libcurl 2>/dev/null || missing+=(libcurl4-openssl-dev)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
command -v flock >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    log "please install: ${missing[*]}"; exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import deltalake, polars, pyarrow, moto.server, boto3" 2>/dev/null; then
  log "creating Python virtualenv $VENV with ${PY_PACKAGES[*]}"
  python3 -m venv "$VENV" || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
fi

"$(dirname "$0")/kafka.sh" fetch
