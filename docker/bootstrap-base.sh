#!/usr/bin/env bash
# Creates the base image ha-stack's Dockerfiles build FROM, on an engine that cannot pull images
# (no registry): a Debian bookworm rootfs made with debootstrap, with the PostgreSQL 15 server,
# etcd (Debian's etcd-server, for docker/etcd.Dockerfile), curl and CA certificates, imported with
# `docker import`. Does nothing when the image exists with etcd in it; an older base image without
# etcd is made again, since a build FROM it could only add etcd with a network the engine may not
# give its builds.
#
# Usage: docker/bootstrap-base.sh [IMAGE]      (default ha-stack-base:bookworm; needs root)
# On a machine with Docker Hub this is unnecessary: build with --build-arg BASE=debian:bookworm-slim.
set -euo pipefail
image=${1:-ha-stack-base:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
  if docker run --rm "$image" test -x /usr/bin/etcd; then
    echo "$image exists"
    exit 0
  fi
  echo "$image has no etcd: making it again" >&2
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi
# The mirror this machine's apt already uses.
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /tmp/ha-stack-rootfs.XXXXXX)
trap 'umount "$rootfs/proc" 2>/dev/null || true; rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror" >&2
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
# Packages must not start services inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"
mkdir -p "$rootfs/etc/postgresql-common"
echo 'create_main_cluster = false' > "$rootfs/etc/postgresql-common/createcluster.conf"
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" apt-get update -q >/dev/null
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confold postgresql-15 etcd-server curl ca-certificates procps >/dev/null
chroot "$rootfs" apt-get clean
umount "$rootfs/proc"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs/usr/sbin/policy-rc.d"
tar -C "$rootfs" -c . | docker import --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$image"
echo "built $image"
