#!/usr/bin/env bash
# The version-exact check of tests/versions.rs at full size: half an hour per case of
# three workers of one group with maintenance every second and retentions of seconds,
# `position-sink maintain` in a loop beside them, random SIGKILLs and aborts inside
# checkpoint writing, log cleanup, vacuum's deletes and compaction, a reader of the
# latest version throughout, and (third case) the table on the local S3 server behind
# Toxiproxy delaying responses by up to 25 s and cutting connections. Each case then
# reads every version inside the retention window by time travel and compares it with
# the model of the stream at the offsets it records; it prints its counts (versions
# checked, kills, aborts, maintain runs, reader failures, failures).
#
#   scripts/chaos.sh [TEST_NAME_FILTER]     e.g. scripts/chaos.sh object_storage
#   POSITION_SINK_CHAOS_SECONDS=600 scripts/chaos.sh     ten minutes a case
#
# The test command (scripts/test.sh) runs the same cases for a minute each.
set -euo pipefail
cd "$(dirname "$0")/.."
export POSITION_SINK_FAULT_SCALE=full
# One case at a time: each runs three workers and would compete for the two cores.
scripts/test.sh --test versions -- --test-threads 1 --nocapture "$@" 2>&1 \
  | grep -E --line-buffered -A3 '^(version-exact|versions|scenario|test |test result)|panicked|FAILED'
