# Multi-stage build of the relay. (The deployment work will harden and slim this further.)
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
COPY examples ./examples
COPY tests ./tests
RUN cargo build --release --locked --bin outbox-relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY config/polling.toml /etc/outbox-relay/relay.toml
USER relay
RUN ["outbox-relay", "--version"]
ENTRYPOINT ["outbox-relay"]
CMD ["run", "--config", "/etc/outbox-relay/relay.toml"]
