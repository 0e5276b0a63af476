# etcd for the compose topology: the cluster record and the leader lease of the two dbproxy
# instances (dbproxy's `coordination.etcd`). Debian's `etcd-server` package on the same base as
# the other images (docker/bootstrap-base.sh when there is no registry).
ARG BASE=ha-stack-base:bookworm
FROM ${BASE}
RUN if [ ! -x /usr/bin/etcd ] || ! command -v curl >/dev/null; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        etcd-server curl ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi
EXPOSE 2379
# One member; clients (the dbproxy instances) reach it as etcd:2379 in the compose network.
ENTRYPOINT ["/usr/bin/etcd", "--name=etcd", "--data-dir=/var/lib/etcd", \
  "--listen-client-urls=http://0.0.0.0:2379", "--advertise-client-urls=http://etcd:2379", \
  "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380", \
  "--initial-cluster=etcd=http://127.0.0.1:2380"]
