# Fetching a set of jars from Maven Central with their runtime dependencies, for the
# scripts that run Java programs from their jars (kafka.sh, spark.sh).
#
#   copy_dependencies WORK OUT WHAT    resolves WORK/pom.xml's dependencies into OUT
#                                      (a fresh directory), logging to WORK/mvn.log;
#                                      exits with WHAT named if Maven cannot fetch them

copy_dependencies() {
  local work="$1" out="$2" what="$3"
  command -v mvn >/dev/null || { echo "Maven (mvn) is required to fetch $what" >&2; exit 1; }
  rm -rf "$out"
  if ! mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$out" -DincludeScope=runtime >"$work/mvn.log" 2>&1; then
    echo "Maven could not fetch $what (is Maven Central reachable?); see $work/mvn.log" >&2
    tail -20 "$work/mvn.log" >&2
    exit 1
  fi
}
