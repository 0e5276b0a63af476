# The PostgreSQL node of the ha-stack topology (primary or standby, chosen by ROLE).
# On an engine without a registry, docker/bootstrap-base.sh makes the base image first; elsewhere
# build with --build-arg BASE=debian:bookworm-slim and PostgreSQL is installed from Debian.
ARG BASE=ha-stack-base:bookworm
FROM ${BASE}
RUN if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql-15 curl ca-certificates procps && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
# The supervisor the entry point hands over to: it restarts the node as a standby when dbproxy's
# rejoin asks (docker/rejoin-node.sh in the app image).
COPY docker/pg-node.sh /usr/local/bin/pg-node
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
