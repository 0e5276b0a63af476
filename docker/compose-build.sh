#!/usr/bin/env bash
# Builds what compose.yaml runs: the binaries (release unless PROFILE=debug), the base image when
# the engine has none (no registry here: debootstrap + docker import), and the three images.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release -p lb -p dbproxy -p webapp -p collector
else
  cargo build -p lb -p dbproxy -p webapp -p collector
fi
base=${BASE:-ha-stack-base:bookworm}
if [ "$base" = ha-stack-base:bookworm ]; then
  bash docker/bootstrap-base.sh "$base"
fi
docker build -q -f docker/postgres.Dockerfile --build-arg BASE="$base" -t ha-stack-postgres:latest .
docker build -q -f docker/etcd.Dockerfile --build-arg BASE="$base" -t ha-stack-etcd:latest .
docker build -q -f docker/app.Dockerfile --build-arg BASE="$base" --build-arg BIN_DIR="target/$profile" -t ha-stack-app:latest .
echo "built ha-stack-postgres:latest, ha-stack-etcd:latest and ha-stack-app:latest"
