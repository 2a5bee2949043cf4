# One image, one container per node. Configuration comes from a mounted
# file (--config) or SCALABLE_CHAT__<SECTION>__<KEY> environment variables.

# 1. The web client.
FROM node:20-bookworm-slim AS web
WORKDIR /src/frontend
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY frontend/ ./
RUN npm run build

# 2. The node (librdkafka is built from source by rdkafka-sys, and OpenSSL
# for its TLS by openssl-src: perl and make).
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake perl make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY examples ./examples
RUN cargo build --release --locked --bin scalable-chat

# 3. A slim runtime, as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin chat
WORKDIR /app
COPY --from=build /src/target/release/scalable-chat /usr/local/bin/scalable-chat
COPY --from=web /src/frontend/dist /app/frontend/dist
COPY config /app/config
RUN mkdir -p /app/data && chown chat /app/data
USER chat
ENV SCALABLE_CHAT__HTTP__BIND=0.0.0.0:8080 \
    SCALABLE_CHAT__NODE__DATA_DIR=/app/data \
    SCALABLE_CHAT__HTTP__STATIC_DIR=/app/frontend/dist \
    RUST_LOG=info
EXPOSE 8080
ENTRYPOINT ["scalable-chat"]
CMD ["--config", "/app/config/default.toml"]
