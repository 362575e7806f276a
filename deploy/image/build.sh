#!/bin/sh
# Build the rag-grpc container image with no image registry: a Debian
# bookworm root filesystem made by mmdebstrap from this machine's own Debian
# mirror (cached in build/rootfs.tar), imported as localhost/debian:bookworm,
# then `podman build` of Containerfile on it.
#
#   deploy/image/build.sh                     # IMAGE=localhost/rag-grpc:latest
#   IMAGE=localhost/rag-grpc:dev DEBIAN_MIRROR=http://deb.debian.org/debian deploy/image/build.sh
#
# Needs podman, runc and mmdebstrap (Debian packages), installed here when
# missing and run as root on Debian; runc because podman's default runtime
# (crun) fails on cgroups v1/hybrid hosts. Extra `podman build` arguments
# (for example --build-arg RAG_NATIVE_MARCH=-march=native) go in BUILD_ARGS.
set -eu

IMAGE=${IMAGE:-localhost/rag-grpc:latest}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
ROOTFS=${ROOTFS:-build/rootfs.tar}
# The CA bundle pip trusts inside the build (a TLS-inspecting proxy's CA on
# some networks); passed as a build secret, never stored in the image.
PIP_CA=${PIP_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
BUILD_ARGS=${BUILD_ARGS:-}

missing=""
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      podman runc mmdebstrap
  else
    echo "deploy/image/build.sh: missing$missing; as root run:" \
      "apt-get install --no-install-recommends podman runc mmdebstrap" >&2
    exit 1
  fi
fi

# The first Debian mirror the machine's apt sources name (one-line
# sources.list or deb822 *.sources), security archives excepted.
debian_mirror() {
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f"
  done
}

if ! podman image exists "$BASE_IMAGE"; then
  if [ ! -f "$ROOTFS" ]; then
    mirror=${DEBIAN_MIRROR:-$(debian_mirror | grep -v -- '-security' | head -n 1)}
    if [ -z "$mirror" ]; then
      echo "deploy/image/build.sh: no Debian mirror in /etc/apt/sources.list{,.d};" \
        "set DEBIAN_MIRROR=http://deb.debian.org/debian (or your mirror)" >&2
      exit 1
    fi
    mkdir -p "$(dirname "$ROOTFS")"
    echo "mmdebstrap bookworm from $mirror -> $ROOTFS"
    mmdebstrap --variant=minbase --format=tar bookworm "$ROOTFS.part" "$mirror"
    mv "$ROOTFS.part" "$ROOTFS"
  fi
  podman import "$ROOTFS" "$BASE_IMAGE"
fi

# --format docker: the OCI format has no HEALTHCHECK. --network host: the
# build installs from PyPI and the Debian mirror. --layers: later builds
# reuse every step whose inputs did not change.
# shellcheck disable=SC2086
podman build --isolation chroot --runtime runc --network host --format docker --layers \
  --secret "id=pip-ca,src=$PIP_CA" --build-arg "BASE=$BASE_IMAGE" \
  $BUILD_ARGS -t "$IMAGE" -f Containerfile .
