#!/usr/bin/env bash
# Apache Spark with Delta Lake, the reference reader of the tests: pyspark from PyPI in
# the tests' virtualenv and Delta's jars from Maven Central (Spark's own
# spark.jars.packages resolver is not used, so only Maven Central needs to be reachable).
#
#   scripts/spark.sh fetch     install pyspark and fetch the Delta jars (once)
#   scripts/spark.sh jars      print the jars' directory (tests pass them as spark.jars)
set -euo pipefail

CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
VENV="$CACHE/venv"
PYSPARK_VERSION=4.0.1
DELTA_VERSION=4.0.1
WORK="$CACHE/spark-delta-$DELTA_VERSION"
JARS="$WORK/jars"

log() { echo "spark.sh: $*" >&2; }
# shellcheck source=scripts/lib/maven.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/maven.sh"

fetch() {
  if ! "$VENV/bin/python" -c "import pyspark; assert pyspark.__version__ == '$PYSPARK_VERSION'" 2>/dev/null; then
    log "installing pyspark==$PYSPARK_VERSION into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "pyspark==$PYSPARK_VERSION"
  fi
  if [ -f "$JARS/.complete" ]; then return 0; fi
  mkdir -p "$WORK"
  cat > "$WORK/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.position-sink</groupId>
  <artifactId>spark-delta</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>io.delta</groupId>
      <artifactId>delta-spark_2.13</artifactId>
      <version>$DELTA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>io.delta</groupId>
      <artifactId>delta-storage</artifactId>
      <version>$DELTA_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  log "fetching Delta Lake $DELTA_VERSION jars for Spark from Maven Central"
  copy_dependencies "$WORK" "$JARS" "io.delta:delta-spark_2.13:$DELTA_VERSION"
  touch "$JARS/.complete"
}

case "${1:-}" in
  fetch) fetch ;;
  jars) echo "$JARS" ;;
  *) echo "usage: scripts/spark.sh fetch|jars" >&2; exit 2 ;;
esac
