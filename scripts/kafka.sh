#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) for the demo and the tests, run from its jars
# on Maven Central. Nothing is installed system-wide: the jars live in the Maven cache
# and in $POSITION_SINK_CACHE, the broker's data in a temporary directory.
#
#   scripts/kafka.sh fetch                 download the pinned Kafka jars (once)
#   scripts/kafka.sh start [PORT]          start a broker on 127.0.0.1:PORT (default 9092)
#                                          with its secured listeners beside it (below)
#   scripts/kafka.sh ensure [PORT]         start one unless a broker already answers there
#   scripts/kafka.sh stop [PORT]           stop the broker started by this script
#   scripts/kafka.sh crash [PORT]          SIGKILL the broker, keep its data (outage tests)
#   scripts/kafka.sh resume [PORT]         restart a crashed broker on its data
#   scripts/kafka.sh topic NAME PARTS [PORT]   create a topic
#   scripts/kafka.sh libs                  print the directory of the jars (fetching them)
#
# Besides its plaintext listener on PORT (and its controller on PORT+1), a broker has
# the listeners production clusters use, all on 127.0.0.1, with certificates of a
# throw-away CA made at start in $RUN_DIR/PORT/tls (ca.pem; client.pem and client.key
# for mTLS, the key encrypted with the password in client.key.password; other-ca.pem, a
# CA the broker does not use, for tests of an untrusted certificate):
#   PORT+2  SSL        TLS, server certificate only
#   PORT+3  SASL_SSL   TLS + SASL PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER
#                      (the broker's unsecured JWT validator); users alice and bob,
#                      passwords alice-secret and bob-secret (SCRAM and PLAIN)
#   PORT+4  MTLS       TLS with a client certificate required
#   PORT+5  SASL_PLAINTEXT  the SASL mechanisms of PORT+3 without TLS
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
RUN_DIR="${POSITION_SINK_KAFKA_RUN:-${TMPDIR:-/tmp}/position-sink-kafka}"

log() { echo "kafka.sh: $*" >&2; }
# shellcheck source=scripts/lib/maven.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/maven.sh"

fetch() {
  # The marker names what the set holds: a set fetched before slf4j 2 was added is fetched again.
  if [ -f "$LIBS/.complete-slf4j2" ]; then return 0; fi
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
    <!-- The broker's logs reach log4j (and server.log) only through slf4j 2. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>2.0.16</version>
    </dependency>
  </dependencies>
</project>
POM
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central"
  copy_dependencies "$work" "$LIBS" "org.apache.kafka:kafka_2.13:$KAFKA_VERSION"
  touch "$LIBS/.complete-slf4j2"
}

# shellcheck source=scripts/lib/local-service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/local-service.sh"

java_opts_for() {
  java_opts=(-Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$1/log4j2.yaml")
}

# Starts the broker of an existing run directory (configured and formatted) and waits
# until every listener of its server.properties accepts connections (3 minutes at most:
# a loaded machine starts a JVM slowly).
launch() {
  local port="$1" dir="$RUN_DIR/$1" attempt
  local ports
  ports=$(sed -n 's/^listeners=//p' "$dir/server.properties" | tr ',' '\n' | sed 's/.*://')
  # A listener port may be held for a moment by another program's outgoing connection
  # (it lies in the kernel's ephemeral range): a broker that exits at start is started again.
  for attempt in 1 2 3; do
    local java_opts; java_opts_for "$dir"
    nohup java "${java_opts[@]}" -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" >"$dir/server.log" 2>&1 9>&- &
    echo $! > "$dir/pid"
    local _ closed p
    for _ in $(seq 1 360); do
      closed=0
      for p in $ports; do port_open "$p" || closed=$((closed + 1)); done
      if [ "$closed" = 0 ]; then log "broker ready on 127.0.0.1:$port (pid $(cat "$dir/pid"), logs $dir/server.log)"; return 0; fi
      alive "$(cat "$dir/pid")" || break
      sleep 0.5
    done
    if alive "$(cat "$dir/pid")"; then
      log "broker did not open all of its listeners ($(echo $ports)) within 3 minutes"; tail -30 "$dir/server.log" >&2; exit 1
    fi
    log "broker exited at start (attempt $attempt of 3):"; grep -E "ERROR|Exception" "$dir/server.log" | tail -5 >&2
    sleep 2
  done
  log "broker on port $port exited at start 3 times"; tail -30 "$dir/server.log" >&2; exit 1
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

# A throw-away CA, the broker's certificate for 127.0.0.1 and localhost, a client
# certificate (for mTLS) whose key is encrypted, and a second CA nobody uses.
make_certificates() {
  local tls="$1"
  command -v openssl >/dev/null || { log "openssl is required for the broker's TLS listeners"; exit 1; }
  mkdir -p "$tls"
  (
    cd "$tls"
    local days=30
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days "$days" \
      -subj "/CN=position-sink test CA" 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days "$days" \
      -subj "/CN=position-sink untrusted CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out broker.crt \
      -days "$days" -extfile broker.ext 2>/dev/null
    # Kafka reads an unencrypted PKCS#8 key and its chain from one PEM file.
    openssl pkcs8 -topk8 -nocrypt -in broker.key -out broker.pk8
    cat broker.pk8 broker.crt ca.pem > broker-keystore.pem
    printf 'client-key-secret' > client.key.password
    openssl req -newkey rsa:2048 -nodes -keyout client-plain.key -out client.csr -subj "/CN=position-sink-client" 2>/dev/null
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days "$days" 2>/dev/null
    openssl pkey -in client-plain.key -aes256 -passout file:client.key.password -out client.key
    rm -f client-plain.key ./*.csr ./*.srl broker.key broker.pk8 broker.ext
  )
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
  local tls="$dir/tls" ssl=$((port + 2)) sasl_ssl=$((port + 3)) mtls=$((port + 4)) sasl_plaintext=$((port + 5))
  make_certificates "$tls"
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller,SSL://127.0.0.1:$ssl,SASL_SSL://127.0.0.1:$sasl_ssl,MTLS://127.0.0.1:$mtls,SASL_PLAINTEXT://127.0.0.1:$sasl_plaintext
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SSL://127.0.0.1:$ssl,SASL_SSL://127.0.0.1:$sasl_ssl,MTLS://127.0.0.1:$mtls,SASL_PLAINTEXT://127.0.0.1:$sasl_plaintext
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,MTLS:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT
inter.broker.listener.name=PLAINTEXT
ssl.keystore.type=PEM
ssl.keystore.location=$tls/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
listener.name.mtls.ssl.client.auth=required
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512,OAUTHBEARER
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_alice="alice-secret" user_bob="bob-secret";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required unsecuredLoginStringClaim_sub="broker";
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_alice="alice-secret" user_bob="bob-secret";
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_plaintext.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required unsecuredLoginStringClaim_sub="broker";
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
    --add-scram 'SCRAM-SHA-256=[name=alice,password=alice-secret]' \
    --add-scram 'SCRAM-SHA-512=[name=alice,password=alice-secret]' \
    --add-scram 'SCRAM-SHA-256=[name=bob,password=bob-secret]' \
    --add-scram 'SCRAM-SHA-512=[name=bob,password=bob-secret]' \
    -t "$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)" \
    -c "$dir/server.properties" >"$dir/format.log" 2>&1 || { log "storage format failed:"; cat "$dir/format.log" >&2; exit 1; }
  launch "$port"
  log "secured listeners: SSL 127.0.0.1:$ssl, SASL_SSL 127.0.0.1:$sasl_ssl, mTLS 127.0.0.1:$mtls, SASL_PLAINTEXT 127.0.0.1:$sasl_plaintext (certificates in $tls)"
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
  libs) fetch; echo "$LIBS" ;;
  *) echo "usage: $0 fetch | start [PORT] | ensure [PORT] | stop [PORT] | crash [PORT] | resume [PORT] | topic NAME PARTITIONS [PORT]" >&2; exit 2 ;;
esac
