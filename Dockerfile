# position-sink in a container: a release build, then a small Debian runtime that runs
# as a non-root user. The worker serves /metrics, /healthz and /readyz on port 9464.
#
#   docker build -t position-sink .
#   docker run --rm -e POSITION_SINK__KAFKA__BROKERS=kafka:9092 position-sink
#
# Configuration: /etc/position-sink/config.toml (config/local.toml), overridden by
# POSITION_SINK__<SECTION>__<KEY> environment variables (README, "Configuration").

FROM rust:1.95-bookworm AS build
# librdkafka is built from source by the rdkafka crate (a C toolchain, perl), linked to
# the system's OpenSSL (TLS, SCRAM) and libcurl (OAUTHBEARER/OIDC), found by pkg-config;
# zstd is built in.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential perl pkg-config libssl-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked --bin position-sink

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libssl3 libcurl4 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sink \
    && mkdir -p /var/lib/position-sink && chown sink /var/lib/position-sink
COPY --from=build /src/target/release/position-sink /usr/local/bin/position-sink
COPY config/local.toml /etc/position-sink/config.toml
USER 10001
# A local table (delta.table_uri = ./data/positions) lands here; mount a volume, or
# point delta.table_uri at object storage.
WORKDIR /var/lib/position-sink
# Inside a container the probes come from outside it: listen on every interface.
ENV POSITION_SINK__HTTP__BIND=0.0.0.0:9464 \
    POSITION_SINK__LOG__FORMAT=json
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9464/healthz || exit 1
ENTRYPOINT ["position-sink"]
CMD ["run", "--config", "/etc/position-sink/config.toml"]
