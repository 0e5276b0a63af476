# lb, dbproxy, webapp and collector in one image; compose picks the program per service.
# The binaries are built on the host first (`cargo build --release`, or debug with
# --build-arg BIN_DIR=target/debug), so the image needs no Rust toolchain and no registry.
ARG BASE=ha-stack-base:bookworm
FROM ${BASE}
# psql: dbproxy's rejoin command (docker/rejoin-node.sh) asks a node through its server.
RUN if ! command -v curl >/dev/null || ! command -v psql >/dev/null; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        curl ca-certificates postgresql-client && rm -rf /var/lib/apt/lists/*; \
    fi
ARG BIN_DIR=target/release
COPY ${BIN_DIR}/lb ${BIN_DIR}/dbproxy ${BIN_DIR}/webapp ${BIN_DIR}/collector /usr/local/bin/
COPY docker/config/ /etc/ha-stack/
COPY docker/with-secrets.sh /usr/local/bin/with-secrets
COPY docker/secrets.sh /usr/local/bin/make-secrets
COPY docker/rejoin-node.sh /usr/local/bin/rejoin-node
ENV RUST_LOG=info
# Each program gets its secrets from the volume the `secrets` service fills at first start.
ENTRYPOINT ["/usr/local/bin/with-secrets"]
