# syntax=docker/dockerfile:1
# The relay as a small container: built in a Rust image, run from debian-slim as a
# non-root user. librdkafka and rustls are compiled in; the image needs only libssl
# (librdkafka's TLS to Kafka), CA certificates and curl for the health check.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# librdkafka with the relay's one fix (vendor/README.md).
COPY vendor ./vendor
COPY src ./src
COPY sql ./sql
COPY tests ./tests
COPY examples ./examples
RUN cargo build --release --locked --bin outbox-relay \
 && strip target/release/outbox-relay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY config/logical.toml /etc/outbox-relay/relay.toml
# Smoke test: the binary runs in this image.
RUN ["outbox-relay", "--version"]
USER 10001
EXPOSE 9187
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9187/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["outbox-relay"]
CMD ["run", "--config", "/etc/outbox-relay/relay.toml"]
