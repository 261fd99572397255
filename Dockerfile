# syntax=docker/dockerfile:1
#
# millracer worker image: the Rust binary plus the pinned Millrace runtime (millrace-ai) in a
# Python virtual environment, running as the non-root user `millracer`.
#
#   docker build -t millracer .
#   docker run --rm --init -e MILLRACER_NATS_URL=nats://HOST:4222 \
#       -v "$PWD/demo-workspace:/workspace" millracer            # = millracer worker --workspace /workspace
#   docker run --rm millracer ops --help
#
# The workspace must be a Millrace workspace (`millrace init --workspace DIR`; the image has
# `millrace` too: `docker run --rm --entrypoint millrace -v …:/workspace millracer init --workspace /workspace`).
# Not in the image: the `pi` coding agent (Node), needed for natural-language requests and for
# Millrace modes that run stages through pi; status, list and enqueue work without it.

# ---- build ----------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache the registry and target dir between builds (BuildKit); copy the binary out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin millracer \
    && install -m 0755 target/release/millracer /usr/local/bin/millracer

# ---- runtime --------------------------------------------------------------------------------
FROM debian:bookworm-slim

ARG MILLRACE_AI_VERSION=0.21.1
# The uid/gid of `millracer`; match the owner of the mounted workspace (often 1000 on a desktop).
ARG MILLRACER_UID=1000
ARG MILLRACER_GID=1000

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/millrace \
    && /opt/millrace/bin/pip install --no-cache-dir --disable-pip-version-check \
        "millrace-ai==${MILLRACE_AI_VERSION}" \
    && /opt/millrace/bin/millrace --version

RUN groupadd --gid "${MILLRACER_GID}" millracer \
    && useradd --uid "${MILLRACER_UID}" --gid millracer --create-home --home-dir /home/millracer \
        --shell /usr/sbin/nologin millracer \
    && mkdir -p /workspace \
    && chown millracer:millracer /workspace

COPY --from=builder /usr/local/bin/millracer /usr/local/bin/millracer

ENV PATH="/opt/millrace/bin:${PATH}" \
    MILLRACER_NATS_URL="nats://nats:4222"

USER millracer
WORKDIR /workspace
# SIGTERM (docker stop) lets the worker finish or hand back its work; give it time
# (docker stop -t / compose stop_grace_period). Use --init (compose: init: true) so a PID 1
# reaps any process the runtime leaves behind.
STOPSIGNAL SIGTERM
ENTRYPOINT ["millracer"]
CMD ["worker", "--workspace", "/workspace"]
