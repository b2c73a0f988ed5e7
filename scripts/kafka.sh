#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) for the demo and the tests, run from its jars
# on Maven Central. Nothing is installed system-wide: the jars live in the Maven cache
# and in $POSITION_SINK_CACHE, the broker's data in a temporary directory.
#
#   scripts/kafka.sh fetch                 download the pinned Kafka jars (once)
#   scripts/kafka.sh start [PORT]          start a broker on 127.0.0.1:PORT (default 9092)
#   scripts/kafka.sh ensure [PORT]         start one unless a broker already answers there
#   scripts/kafka.sh stop [PORT]           stop the broker started by this script
#   scripts/kafka.sh crash [PORT]          SIGKILL the broker, keep its data (outage tests)
#   scripts/kafka.sh resume [PORT]         restart a crashed broker on its data
#   scripts/kafka.sh topic NAME PARTS [PORT]   create a topic
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
RUN_DIR="${POSITION_SINK_KAFKA_RUN:-${TMPDIR:-/tmp}/position-sink-kafka}"

log() { echo "kafka.sh: $*" >&2; }

fetch() {
  if [ -f "$LIBS/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { log "Maven (mvn) is required to fetch Kafka's jars"; exit 1; }
  command -v java >/dev/null || { log "Java 17+ is required to run Kafka"; exit 1; }
  local work="$CACHE/kafka-$KAFKA_VERSION"
  mkdir -p "$work"
  cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.position-sink</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
POM
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central"
  if ! mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$LIBS" -DincludeScope=runtime >"$work/mvn.log" 2>&1; then
    log "Maven could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (is Maven Central reachable?); see $work/mvn.log"
    tail -20 "$work/mvn.log" >&2
    exit 1
  fi
  touch "$LIBS/.complete"
}

# shellcheck source=scripts/lib/local-service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/local-service.sh"

java_opts_for() {
  java_opts=(-Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$1/log4j2.yaml")
}

# Starts the broker of an existing run directory (configured and formatted) and waits
# for its port.
launch() {
  local port="$1" dir="$RUN_DIR/$1"
  local java_opts; java_opts_for "$dir"
  nohup java "${java_opts[@]}" -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" >"$dir/server.log" 2>&1 9>&- &
  echo $! > "$dir/pid"
  for _ in $(seq 1 120); do
    if port_open "$port"; then log "broker ready on 127.0.0.1:$port (pid $(cat "$dir/pid"), logs $dir/server.log)"; return 0; fi
    if ! alive "$(cat "$dir/pid")"; then log "broker exited:"; tail -30 "$dir/server.log" >&2; exit 1; fi
    sleep 0.5
  done
  log "broker did not open port $port within 60 s"; tail -30 "$dir/server.log" >&2; exit 1
}

# Kills the broker with SIGKILL and keeps its data: an outage, for tests.
crash() {
  local port="${1:-9092}" dir="$RUN_DIR/${1:-9092}"
  [ -f "$dir/pid" ] || { log "no broker started by this script on port $port"; exit 1; }
  kill -9 "$(cat "$dir/pid")" 2>/dev/null || true
  for _ in $(seq 1 60); do port_open "$port" || break; sleep 0.2; done
  log "broker on port $port killed; its data is kept for resume"
}

# Restarts a crashed broker on its kept data.
resume() {
  local port="${1:-9092}" dir="$RUN_DIR/${1:-9092}"
  [ -f "$dir/server.properties" ] || { log "no broker data for port $port to resume"; exit 1; }
  if alive "$(cat "$dir/pid")"; then log "the broker on port $port is running"; return 0; fi
  launch "$port"
}

start() {
  local port="${1:-9092}" controller=$(( ${1:-9092} + 1 ))
  fetch
  local dir="$RUN_DIR/$port"
  if [ -f "$dir/pid" ] && alive "$(cat "$dir/pid")"; then
    log "a broker started by this script already runs on port $port"; return 0
  fi
  if port_open "$port"; then log "port $port is taken by another process"; exit 1; fi
  rm -rf "$dir"; mkdir -p "$dir/data"
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# A crashed worker's open dead-letter transaction is aborted soon after it times out.
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=-1
PROPS
  cat > "$dir/log4j2.yaml" <<'LOG'
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
LOG
  local java_opts; java_opts_for "$dir"
  java "${java_opts[@]}" -cp "$LIBS/*" kafka.tools.StorageTool format --standalone \
    -t "$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)" \
    -c "$dir/server.properties" >"$dir/format.log" 2>&1 || { log "storage format failed:"; cat "$dir/format.log" >&2; exit 1; }
  launch "$port"
}

ensure() { ensure_started "${1:-9092}" start; }

stop() { stop_started "${1:-9092}" broker; }

topic() {
  local name="$1" parts="$2" port="${3:-9092}"
  java -Xmx256m -Dlog4j2.configurationFile="$RUN_DIR/$port/log4j2.yaml" -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "127.0.0.1:$port" --create --if-not-exists --topic "$name" --partitions "$parts" --replication-factor 1
}

cmd="${1:-}"; shift || true
case "$cmd" in
  fetch) fetch ;;
  start) start "$@" ;;
  ensure) ensure "$@" ;;
  stop) stop "$@" ;;
  crash) crash "$@" ;;
  resume) resume "$@" ;;
  topic) topic "$@" ;;
  *) echo "usage: $0 fetch | start [PORT] | ensure [PORT] | stop [PORT] | crash [PORT] | resume [PORT] | topic NAME PARTITIONS [PORT]" >&2; exit 2 ;;
esac
